"""Choose the post-processing thresholds (``TEST.NUCLEI``) of a trained model on validation data.

The model runs once per image; every combination of score threshold, mask threshold and maximum
overlap then turns the same detections into a label map (the evaluator's and predictor's rules,
:func:`~nucseg_d2.modeling.postprocess.instances_to_label_map`) and is scored. The combination
with the best mean of the selection metric (AJI by default) is reported with the config
overrides that apply it; score the test split once with those, never sweep on it.

    python -m nucseg_d2.evaluation.postprocess_sweep --config-file output/tnbc/config.yaml \\
        --weights output/tnbc/model_final.pth --dataset tnbc_val --output-dir output/tnbc/sweep

writes ``sweep.csv`` (one row per combination: its mean metrics and pooled AJI) and
``best.json`` (the chosen combination, its metrics and those of the config's own setting).
"""
import argparse
import itertools
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import NucleiConfigError
from ..data.readers import NucleiDataError
from ..modeling.postprocess import instances_to_label_map
from ..predict.predictor import CheckpointError, build_predict_cfg
from ..utils import first_few
from .metrics import metric_keys
from .reporting import pooled_aji_from_scores, score_image, write_csv_atomic, write_json_atomic

__all__ = ["DEFAULT_GRID", "SWEEP_METRICS", "sweep_postprocess", "best_setting", "main"]

SETTING_KEYS = ("score_thresh", "mask_thresh", "max_overlap")
DEFAULT_GRID: Dict[str, Tuple[float, ...]] = {
    "score_thresh": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "mask_thresh": (0.4, 0.5, 0.6),
    "max_overlap": (0.3, 0.5, 0.7),
}
# The object metrics (Dice, Hausdorff) cost far more per image and do not decide the choice.
SWEEP_METRICS = ("aji", "aji_plus", "paper_aji", "dice1", "pq")
CONFIG_KEYS = {"score_thresh": "SCORE_THRESH", "mask_thresh": "MASK_THRESH", "max_overlap": "MAX_OVERLAP"}


class SweepError(ValueError):
    pass


def sweep_postprocess(images, grid: Mapping[str, Sequence[float]] = DEFAULT_GRID,
                      metrics: Sequence[str] = SWEEP_METRICS) -> List[Dict[str, float]]:
    """One row per combination of ``grid`` (in grid order): the setting, each metric's mean over
    ``images`` and the pooled AJI.

    ``images``: (image id, ground-truth label map, the model's Instances on the CPU) triples.
    """
    images = list(images)
    if not images:
        raise SweepError("no images to sweep over")
    names = metric_keys(metrics)
    rows = []
    for setting in itertools.product(*(grid[key] for key in SETTING_KEYS)):
        thresholds = dict(zip(SETTING_KEYS, setting))
        scores = [score_image(image_id, gt, instances_to_label_map(instances, image_size=gt.shape, **thresholds),
                              metrics)
                  for image_id, gt, instances in images]
        row: Dict[str, float] = dict(thresholds)
        row.update({name: float(np.mean([score.row[name] for score in scores])) for name in names})
        row["pooled_aji"] = pooled_aji_from_scores(scores)
        row["mean_num_pred"] = float(np.mean([score.row["num_pred"] for score in scores]))
        rows.append(row)
    return rows


def best_setting(rows: Sequence[Mapping[str, float]], select: str = "aji") -> Mapping[str, float]:
    """The row with the highest ``select``; among equals the first in grid order."""
    if not rows:
        raise SweepError("no sweep rows")
    if select not in rows[0]:
        raise SweepError(f"selection metric {select!r} is not among the swept columns {sorted(rows[0])}")
    return max(rows, key=lambda row: row[select])  # max keeps the first of equal values


def _parse_values(text: str, option: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SweepError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    # Mask probabilities are kept above the threshold: 0 would keep whole boxes, 1 nothing
    # (TEST.NUCLEI.MASK_THRESH refuses both, so a winning 0 or 1 could not be used).
    if option == "--mask-thresh":
        bounds, outside = "(0, 1)", [value for value in values if not 0.0 < value < 1.0]
    else:
        bounds, outside = "[0, 1]", [value for value in values if not 0.0 <= value <= 1.0]
    if not values or outside:
        raise SweepError(f"{option}: expected values in {bounds}, got {text!r}")
    return values


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", required=True, help="a registered validation data set, e.g. tnbc_val")
    parser.add_argument("--output-dir", required=True, help="sweep.csv and best.json are written here")
    for key, values in DEFAULT_GRID.items():
        option = "--" + key.replace("_", "-")
        parser.add_argument(option, default=",".join(str(v) for v in values),
                            help=f"comma-separated values (default {','.join(str(v) for v in values)})")
    parser.add_argument("--select", default="aji", help="metric whose mean picks the setting (default aji)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def _run_model(cfg, weights: str, dataset: str) -> List[Tuple[str, np.ndarray, object]]:
    """(image id, ground truth, the model's Instances on the CPU) of every image of ``dataset``."""
    from detectron2.data import DatasetCatalog

    from ..data.datasets import register_config_datasets, unregistered_datasets_message
    from ..data.readers import load_label_map, read_rgb_image
    from ..predict import NucleiPredictor

    register_config_datasets(cfg)  # the run's own folders (DATASETS.NUCLEI_FOLDERS)
    unknown = unregistered_datasets_message([dataset])
    if unknown:
        raise SweepError(unknown)
    records = DatasetCatalog.get(dataset)
    _refuse_images_the_run_trained_or_is_tested_on(cfg, dataset, records)
    predictor = NucleiPredictor(cfg, weights=weights)
    images = []
    for record in records:
        image = read_rgb_image(record["file_name"])
        instances = predictor.run_model([image])[0].to("cpu")
        images.append((str(record["image_id"]), load_label_map(record), instances))
    return images


def _refuse_images_the_run_trained_or_is_tested_on(cfg, dataset: str, records) -> None:
    """The sweep's images must be none of the run's DATASETS.TRAIN, nor of a test split in its
    DATASETS.TEST: a validation set by name can hold them (tnbc_val's patients 02 and 05 are test
    patients of tnbc_cv5 folds 2 and 4)."""
    from detectron2.data import DatasetCatalog

    from ..data.datasets import unregistered_datasets_message

    files = {os.path.realpath(record["file_name"]) for record in records}
    others = [("DATASETS.TRAIN", name) for name in cfg.DATASETS.TRAIN]
    others += [("DATASETS.TEST", name) for name in cfg.DATASETS.TEST if _is_test_split(name)]
    for key, name in others:
        if unregistered_datasets_message([name]):
            continue  # a set this checkout does not have holds none of these files
        shared = sorted(os.path.basename(record["file_name"]) for record in DatasetCatalog.get(name)
                        if os.path.realpath(record["file_name"]) in files)
        if shared:
            raise SweepError(f"{dataset} shares {len(shared)} image(s) with {name} ({key} of the run): "
                             f"{first_few(shared, 5)}; choose post-processing on images the run neither "
                             "trained on nor is tested on")


def _is_test_split(dataset: str) -> bool:
    """``tnbc_test``, ``kumar_test_same_organ``, ``tnbc_cv5_fold0_test``: a name with a word "test"."""
    return "test" in dataset.lower().split("_")


def _selectable_columns() -> List[str]:
    return metric_keys(SWEEP_METRICS) + ["pooled_aji"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if _is_test_split(args.dataset):
            raise SweepError(f"{args.dataset} is a test split: post-processing is chosen on validation data only")
        if args.select not in _selectable_columns():
            raise SweepError(f"--select {args.select!r}: choose one of {_selectable_columns()}")
        options_after_overrides = [item for item in args.opts if item.startswith("--")]
        if options_after_overrides:
            raise SweepError(f"{options_after_overrides[0]} comes after the config overrides (KEY VALUE ...), "
                             "which must be last")
        # Sorted, without repeats, so that the order of the rows (and which of equal settings wins)
        # does not depend on the values given or on the config's own setting.
        grid = {key: _parse_values(getattr(args, key), "--" + key.replace("_", "-")) for key in SETTING_KEYS}
        for path, what in ((args.config_file, "config file"), (args.weights, "weights")):
            if not os.path.isfile(path):
                raise SweepError(f"{path}: {what} not found")
        cfg = build_predict_cfg(args.config_file, args.opts)
        detection_floor = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
        if min(grid["score_thresh"]) < detection_floor:
            raise SweepError(f"--score-thresh {min(grid['score_thresh'])} is below the model's "
                             f"MODEL.ROI_HEADS.SCORE_THRESH_TEST {detection_floor}: those detections never exist")
        config_setting = {key: float(cfg.TEST.NUCLEI[CONFIG_KEYS[key]]) for key in SETTING_KEYS}
        # The config's own setting is always a row, to compare the chosen one with.
        grid = {key: tuple(sorted(set(values) | {config_setting[key]})) for key, values in grid.items()}
        images = _run_model(cfg, args.weights, args.dataset)
        rows = sweep_postprocess(images, grid)
        best = best_setting(rows, args.select)
    except (SweepError, NucleiDataError, NucleiConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_row = next(row for row in rows if all(row[key] == config_setting[key] for key in SETTING_KEYS))
    os.makedirs(args.output_dir, exist_ok=True)
    write_csv_atomic(os.path.join(args.output_dir, "sweep.csv"), rows)
    overrides = " ".join(f"TEST.NUCLEI.{CONFIG_KEYS[key]} {best[key]}" for key in SETTING_KEYS)
    write_json_atomic(os.path.join(args.output_dir, "best.json"), {
        "dataset": args.dataset, "images": len(images), "config_file": args.config_file, "weights": args.weights,
        "select": args.select, "best": dict(best), "config_setting": dict(config_row), "overrides": overrides,
    })
    columns = list(dict.fromkeys(list(SETTING_KEYS) + [args.select, "pooled_aji", "dice1", "pq", "mean_num_pred"]))
    gt_nuclei = np.mean([len(np.unique(gt[gt > 0])) for _, gt, _ in images])
    print(f"{args.dataset}: {len(images)} images ({gt_nuclei:.1f} nuclei per image), {len(rows)} settings")
    print(" ".join(f"{c:>13}" for c in columns))
    for row in sorted(rows, key=lambda row: -row[args.select])[:10]:
        print(" ".join(f"{row[c]:>13.4f}" for c in columns))
    print(f"config's setting: {args.select} {config_row[args.select]:.4f}; best: {best[args.select]:.4f} with\n"
          f"  {overrides}\n(chosen on {args.dataset}; {os.path.join(args.output_dir, 'sweep.csv')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

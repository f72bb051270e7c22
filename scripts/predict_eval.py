#!/usr/bin/env python
"""Score the predictor (tiling, TTA, thresholds: what users run) on a registered data set.

Predicts every image of DATASET with NucleiPredictor, writes the label maps as uint16 PNGs named
after the image id (TIFF past 65,535 nuclei, as the evaluator) under RUN_DIR/DATASET/label_maps/,
scores them with nucseg-eval's dataset mode (metrics.json, per_image.csv beside them) and logs
the seconds per image, so that a variant of
inference (e.g. --tta) becomes a results folder the tables of docs/RESULTS.md can compare.

    python scripts/predict_eval.py --config-file results/tnbc_proposed_cpu1100/config.yaml \
        --weights output/tnbc_proposed_cpu1100/model_final.pth --dataset tnbc_val \
        --run-dir results/my_predictor_tta --tta

An existing RUN_DIR/DATASET is refused unless --overwrite. The folder is built as
RUN_DIR/DATASET.partial and renamed into place once scored, so an error or interruption never
leaves new label maps beside old metrics. Exit status 2, with one `error:` line, for a config,
data set, checkpoint or output folder that cannot be used.
"""
import argparse
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nucseg_d2.config import NucleiConfigError  # noqa: E402
from nucseg_d2.data.datasets import register_config_datasets  # noqa: E402
from nucseg_d2.data.readers import NucleiDataError, read_rgb_image  # noqa: E402
from nucseg_d2.evaluation.folder_eval import DEFAULT_METRICS, FolderEvalError, evaluate_label_map_folder  # noqa: E402
from nucseg_d2.evaluation.metrics import metric_keys  # noqa: E402
from nucseg_d2.evaluation.reporting import format_summary_table, write_reports  # noqa: E402
from nucseg_d2.predict import CheckpointError, NucleiPredictor, require_checkpoint_path  # noqa: E402
from nucseg_d2.predict.predictor import build_predict_cfg  # noqa: E402
from nucseg_d2.predict.writers import write_label_map_image  # noqa: E402
from nucseg_d2.utils import atomic_path, first_few  # noqa: E402

PARTIAL_SUFFIX = ".partial"


class PredictEvalError(ValueError):
    """Arguments that cannot be used: a data set name not registered, an output folder already there."""


def check_arguments(args, out_dir: str):
    """Everything that can be refused before the model is built and the first image predicted;
    returns the config (with the overrides)."""
    if os.path.lexists(out_dir) and not args.overwrite:
        raise PredictEvalError(f"{out_dir}: already exists (results of an earlier run); "
                               "pass --overwrite to replace it, or choose another --run-dir")
    require_checkpoint_path(args.weights, "--weights")
    cfg = build_predict_cfg(args.config_file, args.opts)
    register_config_datasets(cfg)  # the run's own folders (DATASETS.NUCLEI_FOLDERS)
    registered = DatasetCatalog.list()
    if args.dataset not in registered:
        raise PredictEvalError(f"--dataset {args.dataset!r}: not a registered data set (registered: "
                               f"{first_few(sorted(registered), 12)}; folders of your own: DATASETS.NUCLEI_FOLDERS)")
    return cfg


def predict_and_score(args, cfg, partial_dir: str, final_dir: str) -> dict:
    """Predict every image of the data set into ``partial_dir``, score it there; returns the summary."""
    records = DatasetCatalog.get(args.dataset)  # a missing data root fails here, before the model
    predictor = NucleiPredictor(cfg, weights=args.weights, tta=args.tta, tile_size=args.tile_size)
    maps_dir = os.path.join(partial_dir, "label_maps")
    os.makedirs(maps_dir)
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"device {predictor.device}; tta {args.tta}; config {args.config_file}; weights {args.weights}"]
    seconds = []
    for record in records:
        image = read_rgb_image(record["file_name"])
        start = time.perf_counter()
        result = predictor.predict(image)
        seconds.append(time.perf_counter() - start)
        write_label_map_image(os.path.join(maps_dir, str(record["image_id"])), result.label_map)
        lines.append(f"{record['image_id']}: {int(result.label_map.max())} nuclei, {seconds[-1]:.2f} s")
    # The first image pays for lazy initialisation; as Detectron2's evaluator, leave it out.
    timed = seconds[1:] or seconds
    lines.append(f"seconds per image: {np.mean(timed):.2f} (mean of {len(timed)}, first image excluded)")
    with atomic_path(os.path.join(partial_dir, "predict_log.txt")) as temp:
        with open(temp, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    summary, rows, group_key = evaluate_label_map_folder(maps_dir, dataset=args.dataset)
    # metrics.json names the maps where they will lie, not the folder they were built in.
    summary["predictions"] = os.path.abspath(os.path.join(final_dir, "label_maps"))
    write_reports(partial_dir, summary, rows)
    print(f"{summary['num_images']} image(s): predictions {summary['predictions']} "
          f"against {summary['ground_truth']}")
    print(format_summary_table(summary, metric_keys(DEFAULT_METRICS), group_key))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", required=True, help="a registered data set, e.g. tnbc_val")
    parser.add_argument("--run-dir", required=True, help="results folder; DATASET/ is written inside")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing RUN_DIR/DATASET (once the new one is complete)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (flips, rot90)")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    out_dir = os.path.join(args.run_dir, args.dataset)
    partial_dir = out_dir + PARTIAL_SUFFIX
    try:
        cfg = check_arguments(args, out_dir)
        # A folder left by a run that was killed: never scored, so nothing of value.
        shutil.rmtree(partial_dir, ignore_errors=True)
        new_run_dir = not os.path.isdir(args.run_dir)
        try:
            predict_and_score(args, cfg, partial_dir, out_dir)
            # As scripts/tune_postprocess.sh: the old folder goes only once the new one is complete.
            if os.path.lexists(out_dir):
                shutil.rmtree(out_dir)
            os.rename(partial_dir, out_dir)
        finally:
            shutil.rmtree(partial_dir, ignore_errors=True)
            if new_run_dir and os.path.isdir(args.run_dir) and not os.listdir(args.run_dir):
                os.rmdir(args.run_dir)  # a failed first run leaves no empty results folder to mistake for one
    except (PredictEvalError, NucleiConfigError, NucleiDataError, CheckpointError, FolderEvalError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

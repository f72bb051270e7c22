"""Score a folder of predicted label maps against ground truth, whatever method made them.

Command line (installed as ``nucseg-eval``)::

    python -m nucseg_d2.evaluation.folder_eval --pred PRED_DIR --gt GT_DIR -o OUT_DIR \
        [--gt-suffix _label] [--pred-suffix _pred] [--groups groups.csv [--group-column organ]] \
        [--metrics aji,aji_plus,paper_aji,dice1,pq | all] [--allow-extra-predictions] [--overwrite]

    python -m nucseg_d2.evaluation.folder_eval --pred PRED_DIR --dataset kumar_test -o OUT_DIR

Label maps are PNG, TIFF, ``.npy`` or ``.mat`` (``inst_map``), read with
:func:`nucseg_d2.data.readers.read_label_map`; 0 is background, each nucleus one positive id.
Files are paired by file stem after removing ``--gt-suffix`` / ``--pred-suffix`` (with a suffix,
files whose stem does not end with it are ignored). With ``--dataset``, the ground truth and the
groups (organ, patient) come from a registered data set and prediction stems must equal its image
ids. Writes the same ``metrics.json`` and ``per_image.csv`` as
:class:`~nucseg_d2.evaluation.NucleiEvaluator` and prints a table. Exit status 2, with a message
naming the files, for missing pairs, size mismatches, non-integer or unreadable maps and empty
folders, and when ``OUT_DIR`` already holds ``metrics.json`` or ``per_image.csv``: an earlier
evaluation's are replaced only with ``--overwrite``, any other file of those names (Detectron2's
training log) never.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..data.readers import LABEL_MAP_SUFFIXES, NucleiDataError, load_label_map, read_label_map
from ..utils import files_by_stem, first_few
from .metrics import ALL_METRICS, metric_keys
from .reporting import (
    DEFAULT_METRICS,
    GROUP_FIELDS,
    ID_AND_COUNT_COLUMNS,
    METRICS_JSON,
    PER_IMAGE_CSV,
    ImageScore,
    format_summary_table,
    report_overwrite_problem,
    score_image,
    summarize_scores,
    write_reports,
)

__all__ = [
    "LABEL_MAP_SUFFIXES",
    "DEFAULT_METRICS",
    "FolderEvalError",
    "label_maps_by_stem",
    "read_groups_csv",
    "evaluate_label_map_folder",
    "main",
]

# Error messages list at most this many file names, then say how many more there are.
_MAX_LISTED = 20


class FolderEvalError(ValueError):
    """The folders, files or options cannot be scored; the message names the files and why."""


def _listing(items: Sequence[str]) -> str:
    return first_few(items, _MAX_LISTED)


def label_maps_by_stem(folder: str, strip_suffix: str = "", role: str = "label") -> Dict[str, str]:
    """{stem: path} of the label-map files in ``folder`` (not recursive).

    Only files ending in :data:`LABEL_MAP_SUFFIXES` count (so an overlay JPEG or a results JSON
    beside the maps is ignored). With ``strip_suffix``, only stems ending with it count and it is
    removed from the key ("img1_pred.png" with "_pred" -> "img1"). Raises FolderEvalError for a
    missing or empty folder and for two files with the same key (e.g. img1.png and img1.npy).
    """
    if not os.path.isdir(folder):
        raise FolderEvalError(f"{folder}: {role} folder not found")
    try:
        by_stem = files_by_stem(folder, LABEL_MAP_SUFFIXES, strip_suffix, what=f"{role} files")
    except ValueError as e:
        raise FolderEvalError(str(e)) from None
    if not by_stem:
        ending = f" with a stem ending in {strip_suffix!r}" if strip_suffix else ""
        raise FolderEvalError(
            f"{folder}: no {role} label maps ({', '.join(LABEL_MAP_SUFFIXES)}){ending} in this folder"
        )
    return by_stem


def read_groups_csv(path: str, group_column: Optional[str] = None) -> Tuple[str, Dict[str, str]]:
    """(group column name, {image_id: group}) from a CSV with an ``image_id`` column.

    ``group_column`` defaults to the only other column; with several, it must be named.
    """
    if not os.path.isfile(path):
        raise FolderEvalError(f"{path}: groups file not found")
    try:
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark before the first name.
        with open(path, newline="", encoding="utf-8-sig") as groups_file:
            return _read_groups(path, csv.DictReader(groups_file), group_column)
    except UnicodeDecodeError as err:
        raise FolderEvalError(f"{path}: groups file is not UTF-8 text ({err.reason} at byte {err.start}); "
                              "save it as CSV UTF-8") from err
    except csv.Error as err:
        raise FolderEvalError(f"{path}: groups file is not valid CSV ({err})") from err


def _read_groups(path: str, reader: csv.DictReader, group_column: Optional[str]) -> Tuple[str, Dict[str, str]]:
    columns = reader.fieldnames or []
    if "image_id" not in columns:
        raise FolderEvalError(f"{path}: groups file needs an 'image_id' column (columns: {columns})")
    others = [column for column in columns if column != "image_id"]
    if group_column is None:
        if len(others) != 1:
            raise FolderEvalError(
                f"{path}: pick the group column with --group-column (columns besides image_id: {others})"
            )
        group_column = others[0]
    elif group_column not in others:
        raise FolderEvalError(f"{path}: no column {group_column!r} (columns: {columns})")
    group_of: Dict[str, str] = {}
    for row in reader:
        if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
            continue  # a line of empty cells
        image_id, group = (row["image_id"] or "").strip(), (row[group_column] or "").strip()
        if not image_id or not group:
            raise FolderEvalError(f"{path}: line {reader.line_num}: empty image_id or {group_column} "
                                  f"({image_id!r}, {group!r})")
        if image_id in group_of and group_of[image_id] != group:
            raise FolderEvalError(
                f"{path}: image {image_id!r} is in two {group_column} groups "
                f"({group_of[image_id]!r} and {group!r})"
            )
        group_of[image_id] = group
    return group_column, group_of


def _parse_metrics(text: Optional[str]) -> List[str]:
    if text is None:
        return list(DEFAULT_METRICS)
    if text.strip() == "all":
        return list(ALL_METRICS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_METRICS]
    if unknown or not names:
        raise FolderEvalError(f"--metrics: unknown metrics {unknown}; known: {', '.join(ALL_METRICS)} (or 'all')")
    return names


def _check_pairs(ground_truth: Mapping[str, str], predictions: Mapping[str, str], gt_source: str,
                 pred_dir: str, allow_extra_predictions: bool) -> None:
    """Raise FolderEvalError naming every image without a prediction (and vice versa).

    ``ground_truth`` maps each image key to the name shown for it (its file, or its image id).
    """
    without_prediction = sorted(ground_truth[key] for key in ground_truth if key not in predictions)
    without_truth = sorted(os.path.basename(predictions[key]) for key in predictions if key not in ground_truth)
    problems = []
    if without_prediction:
        problems.append(
            f"{len(without_prediction)} ground-truth image(s) in {gt_source} have no prediction in "
            f"{pred_dir}: {_listing(without_prediction)}"
        )
    if without_truth and not allow_extra_predictions:
        problems.append(
            f"{len(without_truth)} prediction file(s) in {pred_dir} have no ground truth in {gt_source}: "
            f"{_listing(without_truth)} (pass --allow-extra-predictions to ignore them)"
        )
    if problems:
        # Nothing paired at all usually means the names differ by a fixed ending ("_label").
        hint = (" (if the names differ by an ending such as '_label', strip it with --gt-suffix/--pred-suffix)"
                if len(without_prediction) == len(ground_truth) else "")
        raise FolderEvalError("missing pairs: " + "; ".join(problems) + hint)


def _dataset_ground_truth(dataset: str) -> Tuple[Dict[str, dict], Optional[str]]:
    """({image_id: record}, group field) of a registered data set."""
    from detectron2.data import DatasetCatalog

    from ..data.datasets import unregistered_datasets_message  # the import registers the data sets

    unknown = unregistered_datasets_message([dataset])
    if unknown:
        raise FolderEvalError(unknown)
    records = {str(record["image_id"]): record for record in DatasetCatalog.get(dataset)}
    if not records:
        raise FolderEvalError(f"data set {dataset} has no images")
    first = next(iter(records.values()))
    group_key = next((key for key in GROUP_FIELDS if key in first), None)
    return records, group_key


def evaluate_label_map_folder(
    pred_dir: str,
    gt_dir: Optional[str] = None,
    dataset: Optional[str] = None,
    output_dir: Optional[str] = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    gt_suffix: str = "",
    pred_suffix: str = "",
    groups_csv: Optional[str] = None,
    group_column: Optional[str] = None,
    allow_extra_predictions: bool = False,
    overwrite: bool = False,
) -> Tuple[Dict[str, object], List[Dict[str, object]], Optional[str]]:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` or the data set ``dataset``.

    Returns (summary, per-image rows, group key); with ``output_dir`` also writes
    ``metrics.json`` and ``per_image.csv`` there (replacing an earlier evaluation's only with
    ``overwrite``, and no other file: see :func:`~.reporting.report_overwrite_problem`). Raises
    FolderEvalError when anything cannot be scored or written; read errors and size mismatches are
    collected over all pairs and reported together, so one run shows every bad file.
    """
    if (gt_dir is None) == (dataset is None):
        raise FolderEvalError("give exactly one of a ground-truth folder (--gt) or a data set (--dataset)")
    if output_dir is not None:
        # Before any map is read: scoring a large folder only to be refused at the end wastes the run.
        problem = report_overwrite_problem(output_dir, overwrite)
        if problem:
            raise FolderEvalError(problem)
    metrics = list(metrics)
    metric_names = metric_keys(metrics)
    predictions = label_maps_by_stem(pred_dir, pred_suffix, role="prediction")
    group_key: Optional[str] = None
    if dataset is not None:
        records, group_key = _dataset_ground_truth(dataset)
        truth_file = {image_id: record["label_file"] for image_id, record in records.items()}
        shown_names, gt_source = {image_id: image_id for image_id in records}, f"data set {dataset}"
        read_truth = lambda image_id: load_label_map(records[image_id])  # noqa: E731
    else:
        truth_file = label_maps_by_stem(gt_dir, gt_suffix, role="ground-truth")
        shown_names = {stem: os.path.basename(path) for stem, path in truth_file.items()}
        gt_source = gt_dir
        read_truth = lambda image_id: read_label_map(truth_file[image_id])  # noqa: E731
    _check_pairs(shown_names, predictions, gt_source, pred_dir, allow_extra_predictions)
    image_ids = sorted(shown_names)

    group_of: Dict[str, object] = {}
    if groups_csv is not None:
        group_key, group_of = read_groups_csv(groups_csv, group_column)
        reserved = set(ID_AND_COUNT_COLUMNS) | set(metric_names)
        if group_key in reserved:
            raise FolderEvalError(f"{groups_csv}: group column {group_key!r} clashes with a per_image.csv column")
        ungrouped = [image_id for image_id in image_ids if image_id not in group_of]
        if ungrouped:
            raise FolderEvalError(
                f"{groups_csv}: no {group_key} for {len(ungrouped)} image(s): {_listing(ungrouped)}"
            )
    elif group_key is not None:
        group_of = {image_id: records[image_id][group_key] for image_id in image_ids}

    scores: List[ImageScore] = []
    problems: List[str] = []
    for image_id in image_ids:
        pred_path = predictions[image_id]
        try:
            gt = read_truth(image_id)
            pred = read_label_map(pred_path)
        except NucleiDataError as err:
            problems.append(str(err))
            continue
        if gt.shape != pred.shape:
            problems.append(
                f"{pred_path}: prediction is {pred.shape[0]}x{pred.shape[1]} but its ground truth "
                f"{truth_file[image_id]} is {gt.shape[0]}x{gt.shape[1]}"
            )
            continue
        if problems:
            continue  # the run fails anyway: only keep looking for more bad files
        groups = {group_key: group_of[image_id]} if group_key is not None else None
        scores.append(score_image(image_id, gt, pred, metrics, groups))
    if problems:
        listed = "\n  ".join(problems)
        raise FolderEvalError(f"{len(problems)} of {len(image_ids)} image(s) cannot be scored:\n  {listed}")

    rows, summary = summarize_scores(scores, metric_names, group_key=group_key)
    summary["dataset"] = dataset
    summary["ground_truth"] = os.path.abspath(gt_dir) if gt_dir is not None else dataset
    summary["predictions"] = os.path.abspath(pred_dir)
    if output_dir is not None:
        write_reports(output_dir, summary, rows)
    return summary, rows, group_key


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucseg-eval",
        description="Score predicted nuclei label maps (PNG/TIFF/.npy/.mat, 0 = background) against "
                    "ground truth, paired by file stem. Writes metrics.json and per_image.csv.",
    )
    parser.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps")
    truth = parser.add_mutually_exclusive_group(required=True)
    truth.add_argument("--gt", metavar="DIR", help="folder of ground-truth label maps")
    truth.add_argument("--dataset", metavar="NAME",
                       help="registered data set giving ground truth and groups (e.g. kumar_test; "
                            "reads $NUCSEG_DATASETS); prediction stems must be its image ids")
    parser.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                        help="where metrics.json and per_image.csv are written")
    parser.add_argument("--metrics", metavar="NAMES",
                        help=f"comma-separated metric names or 'all' (default {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--gt-suffix", default="", help="remove from ground-truth stems before pairing")
    parser.add_argument("--pred-suffix", default="", help="remove from prediction stems before pairing")
    parser.add_argument("--groups", metavar="CSV", help="CSV mapping image_id to a group (e.g. organ)")
    parser.add_argument("--group-column", metavar="NAME", help="group column of --groups when it has several")
    parser.add_argument("--allow-extra-predictions", action="store_true",
                        help="ignore prediction files without ground truth instead of failing")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the metrics.json and per_image.csv of an earlier evaluation in the "
                             "-o folder (never another file of those names, e.g. Detectron2's training log)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 with a message on stderr)."""
    args = _build_parser().parse_args(argv)
    try:
        metrics = _parse_metrics(args.metrics)
        summary, rows, group_key = evaluate_label_map_folder(
            args.pred,
            gt_dir=args.gt,
            dataset=args.dataset,
            output_dir=args.output_dir,
            metrics=metrics,
            gt_suffix=args.gt_suffix,
            pred_suffix=args.pred_suffix,
            groups_csv=args.groups,
            group_column=args.group_column,
            allow_extra_predictions=args.allow_extra_predictions,
            overwrite=args.overwrite,
        )
    except (FolderEvalError, NucleiDataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['num_images']} image(s): predictions {summary['predictions']} "
          f"against {summary['ground_truth']}")
    print(format_summary_table(summary, metric_keys(metrics), group_key))
    json_path, csv_path = (os.path.join(args.output_dir, name) for name in (METRICS_JSON, PER_IMAGE_CSV))
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

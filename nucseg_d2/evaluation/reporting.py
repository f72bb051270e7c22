"""Per-image scores -> summary, report files and a printed table.

Shared by :class:`~nucseg_d2.evaluation.evaluator.NucleiEvaluator` (Detectron2 predictions) and
:mod:`nucseg_d2.evaluation.folder_eval` (label-map files of any method), so both produce the same
``per_image.csv`` and ``metrics.json`` for the same label maps.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import DEFAULT_METRICS  # noqa: F401  (one list, re-exported for the evaluation tools)
from ..utils import atomic_path
from .metrics import aji_counts, compute_metrics, pairwise_overlap, summarize

__all__ = [
    "METRICS_JSON",
    "PER_IMAGE_CSV",
    "ImageScore",
    "score_image",
    "pooled_aji_from_scores",
    "summarize_scores",
    "json_safe",
    "write_json_atomic",
    "write_csv_atomic",
    "write_reports",
    "report_overwrite_problem",
    "format_summary_table",
    "read_training_metrics",
]

METRICS_JSON = "metrics.json"
PER_IMAGE_CSV = "per_image.csv"
# Record fields copied into each per-image row so results can be grouped (per organ, patient).
GROUP_FIELDS = ("organ", "patient")

# Per-image columns that are neither metrics nor group labels.
ID_AND_COUNT_COLUMNS = ("image_id", "num_gt", "num_pred")


@dataclass(frozen=True)
class ImageScore:
    """One image's ``per_image.csv`` row plus the raw AJI sums that pooled AJI needs.

    ``row`` holds ``image_id``, the group labels (e.g. ``organ``), ``num_gt``, ``num_pred`` and
    one value per metric key. Pooled AJI is a ratio of sums over images, so the per-image ratio
    alone cannot give it; the two integers are small enough to gather across processes.
    """

    row: Dict[str, object]
    aji_intersection: int
    aji_union: int


def score_image(image_id, gt, pred, metrics: Sequence[str],
                groups: Optional[Mapping[str, object]] = None) -> ImageScore:
    """Score one (ground truth, prediction) pair of label maps.

    ``metrics`` are names of :data:`~nucseg_d2.evaluation.metrics.ALL_METRICS` ("pq" gives the
    keys dq, sq, pq); ``groups`` are copied into the row (e.g. ``{"organ": "Breast"}``).
    """
    overlap = pairwise_overlap(gt, pred)
    row: Dict[str, object] = {"image_id": image_id}
    row.update(groups or {})
    row["num_gt"] = overlap.num_gt
    row["num_pred"] = overlap.num_pred
    row.update(compute_metrics(overlap, None, metrics))
    intersection, union = aji_counts(overlap, variant="aji")
    return ImageScore(row, int(intersection), int(union))


def pooled_aji_from_scores(scores: Iterable[ImageScore]) -> float:
    """AJI aggregated over all images: Σ intersections / Σ unions (1.0 when every map is empty,
    the same convention as :func:`~nucseg_d2.evaluation.metrics.pooled_aji`)."""
    scores = list(scores)
    total_union = sum(score.aji_union for score in scores)
    if total_union == 0:
        return 1.0
    return sum(score.aji_intersection for score in scores) / total_union


def summarize_scores(scores: Sequence[ImageScore], metric_names: Sequence[str],
                     group_key: Optional[str] = None) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """(rows sorted by image id, summary) for ``metrics.json``.

    The summary is :func:`~nucseg_d2.evaluation.metrics.summarize` (mean, sample std, count and,
    with ``group_key``, per group) plus ``num_images`` and ``pooled_aji``. Rows are sorted so
    the files do not depend on the order images were processed in (or on how many processes
    shared the work).
    """
    if not scores:
        raise ValueError("no images were scored")
    rows = sorted((score.row for score in scores), key=lambda row: str(row["image_id"]))
    # An inf Hausdorff (an empty map) makes that std NaN by design (written as null); numpy's
    # "invalid value" warning about it would only be noise.
    with np.errstate(invalid="ignore"):
        summary = summarize(rows, list(metric_names), group_key=group_key)
    summary["num_images"] = len(rows)
    summary["pooled_aji"] = pooled_aji_from_scores(scores)
    if group_key is not None:
        for group, group_summary in summary["groups"].items():
            members = [score for score in scores if score.row.get(group_key) == group]
            group_summary["pooled_aji"] = pooled_aji_from_scores(members)
    return rows, summary


def json_safe(obj):
    """``obj`` with non-finite floats replaced by None and keys made strings.

    Strict JSON has no NaN or Infinity: NaN (the std of a single image) and inf (Hausdorff
    against an empty map) become ``null``, which every JSON reader accepts.
    """
    if isinstance(obj, Mapping):
        return {str(key): json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _replace_atomically(path: str, write) -> None:
    """Write text through ``write(file)`` to a temporary file beside ``path``, then rename it."""
    with atomic_path(path) as tmp_path, open(tmp_path, "w", newline="") as tmp_file:
        write(tmp_file)


def write_json_atomic(path: str, obj) -> None:
    """Strict JSON (NaN and inf written as null, see :func:`json_safe`), written atomically."""
    _replace_atomically(path, lambda f: json.dump(json_safe(obj), f, indent=2, allow_nan=False))


def write_csv_atomic(path: str, rows: Sequence[Mapping[str, object]]) -> None:
    """Rows as CSV with a header (columns in order of first appearance), written atomically."""
    fields: List[str] = []
    for row in rows:
        fields.extend(key for key in row if key not in fields)

    def write(csv_file):
        writer = csv.DictWriter(csv_file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    _replace_atomically(path, write)


def write_reports(output_dir: str, summary: Mapping[str, object],
                  rows: Sequence[Mapping[str, object]]) -> Tuple[str, str]:
    """Write ``metrics.json`` and ``per_image.csv`` into ``output_dir``; return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, METRICS_JSON)
    csv_path = os.path.join(output_dir, PER_IMAGE_CSV)
    write_json_atomic(json_path, summary)
    write_csv_atomic(csv_path, rows)
    return json_path, csv_path


# Keys every summary written by write_reports holds; a metrics.json without them is someone else's.
_SUMMARY_KEYS = ("mean", "std", "count", "num_images", "pooled_aji")


def _not_a_report(path: str, name: str) -> Optional[str]:
    """None when ``path`` is a report file that write_reports wrote, else what it is instead."""
    if not os.path.isfile(path):
        return "not a regular file"
    try:
        # utf-8-sig: a table saved again by a spreadsheet starts with a byte-order mark.
        with open(path, encoding="utf-8-sig", newline="") as stream:
            text = stream.read()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except OSError as err:
        return f"cannot be read to check what it is ({err.strerror or err})"
    if name == PER_IMAGE_CSV:
        header = next(csv.reader(text.splitlines()[:1]), [])
        missing = [column for column in ID_AND_COUNT_COLUMNS if column not in header]
        return f"its header lacks {', '.join(missing)}" if missing else None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError:
        summary = None
    if isinstance(summary, dict) and all(key in summary for key in _SUMMARY_KEYS):
        return None
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    try:
        first = json.loads(first_line)
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and "iteration" in first:
        # A training run's only record of its losses (viz curves reads it): worth a refusal, not a replace.
        return "Detectron2's training log (JSON lines with 'iteration')"
    return f"no JSON object with {', '.join(_SUMMARY_KEYS)}"


def report_overwrite_problem(output_dir: str, overwrite: bool = False) -> Optional[str]:
    """None when :func:`write_reports` may write into ``output_dir``, else why not, naming the file.

    An earlier run's ``metrics.json`` or ``per_image.csv`` is replaced only with ``overwrite``; a
    file of that name that write_reports did not write (Detectron2's JSON-lines training log in a
    run folder) is never replaced. Meant to be asked before any scoring, so a refusal costs nothing.
    """
    existing = [(name, os.path.join(output_dir, name)) for name in (METRICS_JSON, PER_IMAGE_CSV)]
    existing = [(name, path) for name, path in existing if os.path.lexists(path)]
    # A foreign file is reported first: --overwrite would not get past it either.
    for name, path in existing:
        foreign = _not_a_report(path, name)
        if foreign is not None:
            what = "summary" if name == METRICS_JSON else "per-image table"
            return (f"{path}: not a nucseg-eval {what} ({foreign}); it is not replaced, even with --overwrite: "
                    "give another -o folder")
    if existing and not overwrite:
        return (f"{existing[0][1]}: already exists (an earlier evaluation's); pass --overwrite to replace "
                "it, or give another -o folder")
    return None


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # std of a single image
    return f"{value:.4f}"


def _render(lines: List[List[str]]) -> List[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]


def format_summary_table(summary: Mapping[str, object], metric_names: Sequence[str],
                         group_key: Optional[str] = None) -> str:
    """Plain-text table: mean and std per metric, pooled AJI, then one row of means per group."""
    lines = [["metric", "mean", "std"]]
    lines += [[name, _format_value(summary["mean"][name]), _format_value(summary["std"][name])]
              for name in metric_names]
    text = _render(lines)
    text.append(f"pooled AJI (Σ intersections / Σ unions over {summary['num_images']} images): "
                f"{_format_value(summary['pooled_aji'])}")
    groups = summary.get("groups")
    if group_key and groups:
        text.append("")
        text.append(f"mean per {group_key}:")
        group_lines = [[group_key, "n", *metric_names]]
        group_lines += [[str(group), str(stats["count"]), *(_format_value(stats["mean"][m]) for m in metric_names)]
                        for group, stats in sorted(groups.items(), key=lambda item: str(item[0]))]
        text.extend(_render(group_lines))
    return "\n".join(text)


def read_training_metrics(metrics_json) -> Dict[str, Dict[int, float]]:
    """{key: {iteration: value}} from Detectron2's metrics.json (one JSON object per line).

    Detectron2 appends to the file when a run is resumed or started again in the same folder, so
    a training line (losses, lr) at an iteration lower than the previous line's starts a new run:
    earlier lines from that iteration on are dropped (resume: the rerun replaces them; fresh start:
    the old run goes). An evaluation line may come after a later training line (Detectron2 writes
    an iteration's values in the order their keys were first stored: the losses at 279 before the
    evaluation at 274), so a lower one without training values is kept.
    A line that does not parse (a run killed mid-write) is skipped.
    """
    entries: List[dict] = []
    with open(metrics_json, encoding="utf-8") as stream:
        for line in stream:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("iteration"), (int, float)):
                continue
            training_line = "total_loss" in entry or "lr" in entry
            if training_line and entries and entry["iteration"] < entries[-1]["iteration"]:
                entries = [e for e in entries if e["iteration"] < entry["iteration"]]
            entries.append(entry)
    series: Dict[str, Dict[int, float]] = {}
    for entry in entries:
        for key, value in entry.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[int(entry["iteration"])] = float(value)
    if not series:
        raise ValueError(f"{metrics_json}: no metrics entries (expected Detectron2's metrics.json, "
                         "one JSON object with an 'iteration' per line)")
    return series

"""Pictures to look at instead of tables: match overlays, per-image metric bars, training curves.

Command line::

    python -m nucseg_d2.viz overlay IMAGE GT PRED OUT.png
    python -m nucseg_d2.viz metrics PER_IMAGE_CSV OUT.png [--metrics aji pq ...]
    python -m nucseg_d2.viz curves METRICS_JSON OUT.png

Figures use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image
from skimage.segmentation import find_boundaries

from .evaluation.metrics import pairwise_overlap
from .evaluation.reporting import read_training_metrics
from .utils import atomic_path

__all__ = [
    "TRUE_POSITIVE",
    "FALSE_POSITIVE",
    "FALSE_NEGATIVE",
    "MERGED",
    "SPLIT",
    "CATEGORY_COLORS",
    "MatchCategories",
    "match_categories",
    "match_overlay",
    "save_match_overlay",
    "plot_per_image_metrics",
    "plot_training_curves",
    "main",
]

TRUE_POSITIVE = "true positive"
FALSE_POSITIVE = "false positive"
FALSE_NEGATIVE = "false negative"
MERGED = "merged"
SPLIT = "split"

# Saturated colours that stay visible on both purple nuclei and pink stroma.
CATEGORY_COLORS: Dict[str, tuple] = {
    TRUE_POSITIVE: (0, 230, 64),
    FALSE_POSITIVE: (255, 32, 32),
    FALSE_NEGATIVE: (255, 230, 0),
    MERGED: (0, 200, 255),
    SPLIT: (255, 64, 255),
}
GROUND_TRUTH_OUTLINE = (255, 255, 255)
_FILL_ALPHA = 0.3
_DEFAULT_METRICS = ("aji", "pq", "dice1", "object_f1")


# --------------------------------------------------------------------------- match categories


@dataclass(frozen=True)
class MatchCategories:
    """Category of every ground-truth and predicted nucleus: {id: category}."""

    gt: Dict[int, str]
    pred: Dict[int, str]

    def counts(self) -> Dict[str, int]:
        """How many nuclei each category has: predictions for true positive, false positive and
        merged; ground truth for false negative and split (the side the error is about)."""
        pred_values, gt_values = list(self.pred.values()), list(self.gt.values())
        return {
            TRUE_POSITIVE: pred_values.count(TRUE_POSITIVE),
            FALSE_POSITIVE: pred_values.count(FALSE_POSITIVE),
            FALSE_NEGATIVE: gt_values.count(FALSE_NEGATIVE),
            MERGED: pred_values.count(MERGED),
            SPLIT: gt_values.count(SPLIT),
        }


def match_categories(gt, pred, iou_threshold: float = 0.5,
                     cover_fraction: float = 0.5) -> MatchCategories:
    """Classify every nucleus of ``gt`` and ``pred`` (label maps) by how they match.

    * merged: a prediction that covers more than ``cover_fraction`` of each of two or more
      ground-truth nuclei; it and those nuclei are "merged".
    * split: a ground-truth nucleus that holds more than ``cover_fraction`` of each of two or
      more predictions; it and those predictions are "split".
    * true positive: otherwise, a (gt, pred) pair with IoU > ``iou_threshold`` (one-to-one, as
      IoU > 0.5 cannot be shared).
    * false positive / false negative: any other prediction / ground-truth nucleus.

    Merged takes precedence over split (an object can be both only in tangled clusters). With
    the defaults the categories are consistent: a true-positive pair never straddles a merge
    or a split, since IoU > 0.5 implies each side covers more than half of the other.
    """
    overlap = pairwise_overlap(gt, pred)
    pair_gt, pair_pred = overlap.pair_gt, overlap.pair_pred
    intersection = overlap.pair_intersection
    covers_gt = intersection > cover_fraction * overlap.gt_areas[pair_gt]
    inside_gt = intersection > cover_fraction * overlap.pred_areas[pair_pred]

    merging_pred = np.bincount(pair_pred[covers_gt], minlength=overlap.num_pred) >= 2
    merged_pairs = covers_gt & merging_pred[pair_pred]
    splitting_gt = np.bincount(pair_gt[inside_gt], minlength=overlap.num_gt) >= 2
    split_pairs = inside_gt & splitting_gt[pair_gt]
    true_pairs = overlap.pair_iou > iou_threshold

    gt_category = np.full(overlap.num_gt, FALSE_NEGATIVE, dtype=object)
    pred_category = np.full(overlap.num_pred, FALSE_POSITIVE, dtype=object)
    # Assigned from lowest to highest precedence, so later assignments win.
    for pairs, category in ((true_pairs, TRUE_POSITIVE), (split_pairs, SPLIT), (merged_pairs, MERGED)):
        gt_category[pair_gt[pairs]] = category
        pred_category[pair_pred[pairs]] = category
    return MatchCategories(
        gt=dict(zip(overlap.gt_ids.tolist(), gt_category.tolist())),
        pred=dict(zip(overlap.pred_ids.tolist(), pred_category.tolist())),
    )


def _category_masks(label_map: np.ndarray, categories: Mapping[int, str]) -> Dict[str, np.ndarray]:
    """{category: boolean mask of the nuclei in it} via one lookup table over the ids (np.isin
    where the largest id would make that table larger than the map: ids past 2^31 exist)."""
    masks = {}
    ids = np.fromiter(categories.keys(), np.int64, len(categories))
    names = np.array(list(categories.values()), dtype=object)
    max_id = int(label_map.max()) if label_map.size else 0
    for category in set(categories.values()):
        if max_id > max(label_map.size, 2**16):
            masks[category] = np.isin(label_map, ids[names == category])
            continue
        lookup = np.zeros(max_id + 1, bool)
        lookup[ids[names == category]] = True
        masks[category] = lookup[label_map]
    return masks


def _paint(picture: np.ndarray, mask: np.ndarray, color, alpha: float) -> None:
    if alpha >= 1.0:
        picture[mask] = color
    else:
        blended = (1 - alpha) * picture[mask] + alpha * np.asarray(color, np.float64)
        picture[mask] = np.round(blended).astype(np.uint8)


def _legend_strip(width: int, entries: Sequence[tuple], dpi: int = 100) -> np.ndarray:
    """An RGB strip ``width`` pixels wide holding a legend of (label, colour) entries."""
    columns = max(1, min(len(entries), width // 170))
    rows = math.ceil(len(entries) / columns)
    height = 10 + 20 * rows
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    handles = [Patch(facecolor=np.array(color) / 255, edgecolor="black", linewidth=0.5, label=label)
               for label, color in entries]
    figure.legend(handles=handles, loc="center", ncol=columns, frameon=False, fontsize=9,
                  handlelength=1.2, columnspacing=1.2, borderaxespad=0.0)
    canvas.draw()
    strip = np.asarray(canvas.buffer_rgba())[..., :3]
    return strip[:height, :width].copy()


def match_overlay(image, gt, pred, legend: bool = True, min_width: int = 512,
                  iou_threshold: float = 0.5, cover_fraction: float = 0.5) -> np.ndarray:
    """RGB picture of ``image`` with nuclei coloured by match category, legend below.

    Predictions are filled (translucent) and outlined in their category colour; ground-truth
    nuclei that nothing found (false negatives) likewise in yellow; every other ground-truth
    nucleus gets a thin white outline, so merges (one prediction over several outlines) and splits
    (several predictions inside one outline) can be seen. Images narrower than ``min_width`` are
    enlarged by an integer factor (nearest neighbour) so outlines and legend stay legible.
    Output: (k·H + legend height, k·W, 3) uint8.
    """
    image = np.asarray(image)
    gt, pred = np.asarray(gt), np.asarray(pred)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"image (H, W, 3), gt and pred must share H, W; got {image.shape}, "
                         f"{gt.shape}, {pred.shape}")
    categories = match_categories(gt, pred, iou_threshold, cover_fraction)
    scale = max(1, math.ceil(min_width / image.shape[1]))
    if scale > 1:
        image, gt, pred = (np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) for a in (image, gt, pred))
    picture = image.astype(np.uint8, copy=True)
    pred_masks = _category_masks(pred, categories.pred)
    gt_masks = _category_masks(gt, categories.gt)
    for category, mask in pred_masks.items():
        _paint(picture, mask, CATEGORY_COLORS[category], _FILL_ALPHA)
    if FALSE_NEGATIVE in gt_masks:
        _paint(picture, gt_masks[FALSE_NEGATIVE], CATEGORY_COLORS[FALSE_NEGATIVE], _FILL_ALPHA)
    # Outlines last, ground truth under predictions: a prediction's own edge is what matters.
    found_gt = np.where(np.isin(gt, [i for i, c in categories.gt.items() if c != FALSE_NEGATIVE]), gt, 0)
    _paint(picture, find_boundaries(found_gt, mode="inner"), GROUND_TRUTH_OUTLINE, 0.8)
    if FALSE_NEGATIVE in gt_masks:
        _paint(picture, find_boundaries(np.where(gt_masks[FALSE_NEGATIVE], gt, 0), mode="inner"),
               CATEGORY_COLORS[FALSE_NEGATIVE], 1.0)
    for category, mask in pred_masks.items():
        _paint(picture, find_boundaries(np.where(mask, pred, 0), mode="inner"),
               CATEGORY_COLORS[category], 1.0)
    if not legend:
        return picture
    counts = categories.counts()
    entries = [(f"{name} ({counts[name]})", CATEGORY_COLORS[name]) for name in CATEGORY_COLORS]
    return np.concatenate([picture, _legend_strip(picture.shape[1], entries)], axis=0)


def save_match_overlay(out_png, image, gt, pred, **kwargs) -> np.ndarray:
    """Write :func:`match_overlay` as a PNG (atomically); returns the picture."""
    picture = match_overlay(image, gt, pred, **kwargs)
    with atomic_path(out_png) as temp_path:
        Image.fromarray(picture).save(temp_path, format="PNG")
    return picture


# --------------------------------------------------------------------------- figures


def _save_figure(figure: Figure, out_png, dpi: int = 100) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(out_png) as temp_path:
        figure.savefig(temp_path, format="png", dpi=dpi)


def _as_number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value


def plot_per_image_metrics(per_image_csv, out_png, metrics: Optional[Sequence[str]] = None,
                           group_key: str = "organ") -> List[str]:
    """Bar chart per image of each metric in the evaluator's ``per_image.csv``; returns the
    metrics drawn.

    One panel per metric, one bar per image. When the CSV has a ``group_key`` column (organ),
    images are grouped by it, coloured per group, and each group's mean is drawn as a dashed
    line. Default metrics: those of aji, pq, dice1, object_f1 that the CSV has.
    """
    with open(per_image_csv, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{per_image_csv}: no rows")
    columns = list(rows[0])
    if metrics is None:
        metrics = [m for m in _DEFAULT_METRICS if m in columns]
        if not metrics:
            metrics = [c for c in columns if c not in ("image_id", "num_gt", "num_pred", group_key)
                       and all(_as_number(r[c]) is not None for r in rows)]
    missing = [m for m in metrics if m not in columns]
    if missing or not metrics:
        raise ValueError(f"{per_image_csv}: metrics {missing or 'none'} not found; columns: {columns}")
    grouped = group_key in columns
    if grouped:
        rows.sort(key=lambda r: (r[group_key], r.get("image_id", "")))
    groups = [r[group_key] if grouped else "" for r in rows]
    group_names = list(dict.fromkeys(groups))
    palette = colormaps["tab10"].colors
    colors = [palette[group_names.index(g) % len(palette)] for g in groups]
    labels = [r.get("image_id", str(i)) for i, r in enumerate(rows)]
    positions = np.arange(len(rows))

    width = max(6.0, 1.5 + 0.28 * len(rows))
    figure = Figure(figsize=(width, 0.6 + 2.0 * len(metrics) + 0.08 * max(len(s) for s in labels)))
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for axis, metric in zip(axes, metrics):
        values = np.array([_as_number(r[metric]) for r in rows], dtype=float)
        axis.bar(positions, values, color=colors, width=0.8)
        for name in group_names:
            members = np.flatnonzero(np.array(groups) == name)
            finite = values[members][np.isfinite(values[members])]
            if finite.size:
                axis.hlines(finite.mean(), members[0] - 0.4, members[-1] + 0.4, colors="black",
                            linestyles="--", linewidth=1)
        finite_all = values[np.isfinite(values)]
        if finite_all.size and finite_all.min() >= 0 and finite_all.max() <= 1:
            axis.set_ylim(0, 1.02)
        mean = finite_all.mean() if finite_all.size else math.nan
        # matplotlib draws no bar for inf (an object Hausdorff where nothing was found), which
        # would read as a perfect 0: a marker at the top shows each.
        infinite = np.flatnonzero(np.isinf(values))
        title = f"{metric}: mean {mean:.3f} over {finite_all.size} images"
        if infinite.size:
            top = finite_all.max() if finite_all.size else 1.0
            axis.plot(positions[infinite], np.full(infinite.size, top), "^", color="red", markersize=6)
            title += f"; {infinite.size} more infinite (red ^)"
        axis.set_ylabel(metric)
        axis.set_title(title, fontsize=9, loc="left")
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    axes[-1].set_xticks(positions)
    axes[-1].set_xticklabels(labels, rotation=90, fontsize=7)
    axes[-1].set_xlim(-0.6, len(rows) - 0.4)
    if grouped:
        handles = [Patch(color=palette[i % len(palette)], label=name) for i, name in enumerate(group_names)]
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"{group_key} mean"))
        axes[0].legend(handles=handles, fontsize=7, ncol=min(len(handles), 6), loc="lower left",
                       bbox_to_anchor=(0, 1.12), frameon=False)
    figure.suptitle(os.path.basename(os.fspath(per_image_csv)), fontsize=10, x=0.99, ha="right")
    figure.tight_layout()
    _save_figure(figure, out_png)
    return list(metrics)


def _xy(points: Mapping[int, float]):
    iterations = sorted(points)
    return np.array(iterations), np.array([points[i] for i in iterations])


def plot_training_curves(metrics_json, out_png) -> Dict[str, List[str]]:
    """Losses, learning rate and AJI against iteration from Detectron2's ``metrics.json``.

    Three panels: every ``loss_*`` key and ``total_loss`` (log scale), ``lr``, and every
    evaluation key whose last part is ``aji`` (e.g. ``nuclei/aji``). Returns the keys drawn
    per panel ({"losses": [...], "lr": [...], "aji": [...]}).
    """
    series = read_training_metrics(metrics_json)
    loss_keys = sorted(k for k in series if k.startswith("loss_"))
    if "total_loss" in series:
        loss_keys.append("total_loss")
    aji_keys = sorted(k for k in series if k.split("/")[-1] == "aji")
    lr_keys = ["lr"] if "lr" in series else []

    figure = Figure(figsize=(11, 3.6))
    loss_axis, lr_axis, aji_axis = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for key in loss_keys:
        iterations, values = _xy(series[key])
        emphasis = {"color": "black", "linewidth": 2} if key == "total_loss" else {"linewidth": 1}
        loss_axis.plot(iterations, values, label=key, **emphasis)
    if loss_keys and all(v > 0 for k in loss_keys for v in series[k].values()):
        loss_axis.set_yscale("log")
    loss_axis.set_title("losses", fontsize=10)
    if loss_keys:
        loss_axis.legend(fontsize=7, loc="upper right", ncol=2)
    for key in lr_keys:
        lr_axis.plot(*_xy(series[key]), color="tab:purple")
    lr_axis.set_title("learning rate", fontsize=10)
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for key in aji_keys:
        iterations, values = _xy(series[key])
        aji_axis.plot(iterations, values, marker="o", markersize=4, label=key)
        aji_axis.annotate(f"{values[-1]:.3f}", (iterations[-1], values[-1]), fontsize=8,
                          textcoords="offset points", xytext=(-6, 6), ha="right")
    aji_axis.set_title("AJI (evaluation)", fontsize=10)
    if aji_keys:
        aji_axis.legend(fontsize=7, loc="lower right")
        low = min(min(series[k].values()) for k in aji_keys)
        aji_axis.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.05), 1.0)
    else:
        aji_axis.text(0.5, 0.5, "no evaluation entries", ha="center", va="center",
                      transform=aji_axis.transAxes, color="grey")
    last_iteration = max(max(points) for points in series.values())
    for axis in (loss_axis, lr_axis, aji_axis):
        axis.set_xlabel("iteration")
        axis.set_xlim(0, max(1, last_iteration) * 1.02)
        axis.grid(alpha=0.3)
    figure.suptitle(os.fspath(metrics_json), fontsize=9, x=0.99, ha="right")
    figure.tight_layout()
    _save_figure(figure, out_png)
    return {"losses": loss_keys, "lr": lr_keys, "aji": aji_keys}


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nucseg_d2.viz", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    overlay = commands.add_parser("overlay", help="ground truth vs prediction, coloured by match")
    overlay.add_argument("image")
    overlay.add_argument("gt", help="ground-truth label map (PNG/TIFF/.npy/.mat)")
    overlay.add_argument("pred", help="predicted label map (PNG/TIFF/.npy/.mat)")
    overlay.add_argument("out_png")
    metrics = commands.add_parser("metrics", help="per-image metric bars from per_image.csv")
    metrics.add_argument("per_image_csv")
    metrics.add_argument("out_png")
    metrics.add_argument("--metrics", nargs="+", default=None, help="columns to plot")
    metrics.add_argument("--group-key", default="organ", help="column to group images by")
    curves = commands.add_parser("curves", help="losses, lr and AJI from Detectron2 metrics.json")
    curves.add_argument("metrics_json")
    curves.add_argument("out_png")
    args = parser.parse_args(argv)

    try:
        if args.command == "overlay":
            from .data.readers import read_label_map, read_rgb_image

            gt, pred = read_label_map(args.gt), read_label_map(args.pred)
            picture = save_match_overlay(args.out_png, read_rgb_image(args.image), gt, pred)
            counts = match_categories(gt, pred).counts()
            print(f"{args.out_png}: {picture.shape[1]}x{picture.shape[0]}, "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
        elif args.command == "metrics":
            drawn = plot_per_image_metrics(args.per_image_csv, args.out_png, args.metrics, args.group_key)
            print(f"{args.out_png}: {', '.join(drawn)}")
        else:
            drawn = plot_training_curves(args.metrics_json, args.out_png)
            print(f"{args.out_png}: " + "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in drawn.items()))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

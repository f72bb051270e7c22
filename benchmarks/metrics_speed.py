"""Speed of the nuclei metrics: one-pass intersection table vs per-nucleus loops.

Baseline: AJI, AJI+, PQ and Dice1 written in the style of HoVer-Net's ``metrics/stats_utils.py``
(``get_fast_aji``, ``get_fast_aji_plus``, ``get_fast_pq``, ``get_dice_1``): one full-image binary
mask per nucleus, and for each ground-truth nucleus a full-image sum per overlapping prediction;
each function builds its own table, as there. Ours: ``nucseg_d2.evaluation.metrics``, whose
functions derive everything from ``pairwise_overlap`` (one ``np.bincount`` over the pixels).

Data: the Kumar label map with the most nuclei near 1,000 (../shared/data/kumar/labels, uint16
PNG), or, when that folder is absent, a synthetic 1000x1000 map with ~1,000 nuclei; the
prediction is a perturbed copy (shift, dilation, dropped, split and merged nuclei, false
positives). Asserts that both implementations give identical values, prints both timings and
the ratio, then seconds per image for object Hausdorff (and for all metrics).

Usage: .venv/bin/python benchmarks/metrics_speed.py [--labels DIR] [--repeats N] [--all-images]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import sys
import time

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from nucseg_d2.evaluation import metrics
from timing import best_time, best_times_interleaved, run_stamp  # benchmarks/timing.py

DEFAULT_LABELS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kumar", "labels")
TARGET_NUCLEI = 1000


# --------------------------------------------------------------------------- baseline (loops)


def _instance_masks(label_map):
    ids = [int(i) for i in np.unique(label_map) if i != 0]
    return ids, {i: np.array(label_map == i, np.uint8) for i in ids}


def _loop_pairwise(true, pred):
    """Per-nucleus loop building the (true x pred) intersection and union tables."""
    true_ids, true_masks = _instance_masks(true)
    pred_ids, pred_masks = _instance_masks(pred)
    pred_column = {p: j for j, p in enumerate(pred_ids)}
    inter = np.zeros((len(true_ids), len(pred_ids)), np.float64)
    union = np.zeros((len(true_ids), len(pred_ids)), np.float64)
    for row, true_id in enumerate(true_ids):
        t_mask = true_masks[true_id]
        for pred_id in np.unique(pred[t_mask > 0]):
            if pred_id == 0:  # background under the nucleus
                continue
            p_mask = pred_masks[int(pred_id)]
            total = (t_mask + p_mask).sum()
            both = (t_mask * p_mask).sum()
            inter[row, pred_column[int(pred_id)]] = both
            union[row, pred_column[int(pred_id)]] = total - both
    return true_ids, true_masks, pred_ids, pred_masks, inter, union


def _loop_aji_from_pairs(true_ids, true_masks, pred_ids, pred_masks, inter, union, paired_true, paired_pred):
    overall_inter = inter[paired_true, paired_pred].sum()
    overall_union = union[paired_true, paired_pred].sum()
    paired_true_ids = {true_ids[i] for i in paired_true}
    paired_pred_ids = {pred_ids[j] for j in paired_pred}
    for true_id in true_ids:
        if true_id not in paired_true_ids:
            overall_union += true_masks[true_id].sum()
    for pred_id in pred_ids:
        if pred_id not in paired_pred_ids:
            overall_union += pred_masks[pred_id].sum()
    return float(overall_inter / overall_union)


def loop_aji(true, pred):
    tables = _loop_pairwise(true, pred)
    inter, union = tables[4], tables[5]
    # HoVer-Net's epsilon also breaks exact IoU ties towards the larger intersection.
    iou = inter / (union + 1.0e-6)
    paired_pred = np.argmax(iou, axis=1)
    paired_true = np.nonzero(np.max(iou, axis=1) > 0.0)[0]
    return _loop_aji_from_pairs(*tables, paired_true, paired_pred[paired_true])


def loop_aji_plus(true, pred):
    tables = _loop_pairwise(true, pred)
    inter, union = tables[4], tables[5]
    iou = inter / (union + 1.0e-6)
    paired_true, paired_pred = linear_sum_assignment(-iou)
    keep = iou[paired_true, paired_pred] > 0.0
    return _loop_aji_from_pairs(*tables, paired_true[keep], paired_pred[keep])


def loop_pq(true, pred):
    true_ids, _, pred_ids, _, inter, union = _loop_pairwise(true, pred)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    paired_true, paired_pred = np.nonzero(iou > 0.5)
    tp = len(paired_true)
    fp = len(pred_ids) - tp
    fn = len(true_ids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    # HoVer-Net divides by (tp + 1e-6); the exact mean is used so values can be compared exactly.
    sq = math.fsum(iou[paired_true, paired_pred].tolist()) / tp if tp else 0.0
    return dq, sq, dq * sq


def loop_dice1(true, pred):
    true = (true > 0).astype(np.int64)
    pred = (pred > 0).astype(np.int64)
    return float(2.0 * np.sum(true * pred) / np.sum(true + pred))


# --------------------------------------------------------------------------- data


def synthetic_label_map(rng, size=1000, count=TARGET_NUCLEI):
    """~``count`` elliptic nuclei (radii 5-12 px) on a size x size map; later ones occlude."""
    from skimage.draw import ellipse

    label_map = np.zeros((size, size), np.int32)
    for nucleus_id in range(1, count + 1):
        centre = rng.uniform(0, size, 2)
        radii = rng.uniform(5, 12, 2)
        rows, cols = ellipse(centre[0], centre[1], radii[0], radii[1], shape=label_map.shape,
                             rotation=rng.uniform(0, np.pi))
        label_map[rows, cols] = nucleus_id
    return label_map


def perturbed(label_map, rng):
    """A plausible imperfect prediction: every kind of error the metrics must handle."""
    from skimage.segmentation import expand_labels

    pred = np.zeros_like(label_map)
    pred[1:, 2:] = label_map[:-1, :-2]  # shift by (1, 2) pixels
    pred = expand_labels(pred, 1)  # boundaries one pixel too wide, as nets often do
    ids = np.unique(pred)
    ids = ids[ids != 0]
    next_id = int(ids.max()) + 1
    drop, split, merge = (rng.random(ids.size) < p for p in (0.05, 0.05, 0.05))
    pred[np.isin(pred, ids[drop])] = 0  # missed nuclei
    boxes = ndimage.find_objects(pred)
    for nucleus_id in ids[split]:  # split along the centroid column
        box = boxes[nucleus_id - 1]
        if box is None:
            continue
        rows, cols = np.nonzero(pred[box] == nucleus_id)
        right = cols > cols.mean()
        pred[box][rows[right], cols[right]] = next_id
        next_id += 1
    # Merge each chosen nucleus with the nucleus touching it (if any) after one more dilation.
    grown = expand_labels(pred, 2)
    for nucleus_id in ids[merge]:
        neighbours = np.unique(pred[(grown == nucleus_id) & (pred != nucleus_id) & (pred > 0)])
        if neighbours.size:
            pred[pred == neighbours[0]] = nucleus_id
    for _ in range(30):  # false positives in the background
        r, c = rng.integers(10, np.array(label_map.shape) - 10)
        if not pred[r - 4:r + 5, c - 4:c + 5].any():
            pred[r - 4:r + 5, c - 4:c + 5] = next_id
            next_id += 1
    return pred


def load_benchmark_map(labels_dir, rng):
    paths = sorted(glob.glob(os.path.join(labels_dir, "*.png")))
    if not paths:
        return "synthetic (no Kumar labels found)", synthetic_label_map(rng)
    from skimage.io import imread

    maps = {os.path.basename(p): imread(p).astype(np.int32) for p in paths}
    name = min(maps, key=lambda n: abs(len(np.unique(maps[n])) - 1 - TARGET_NUCLEI))
    return f"Kumar {name}", maps[name]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", default=DEFAULT_LABELS, help="folder of Kumar label PNGs")
    parser.add_argument("--repeats", type=int, default=5,
                        help="fastest of N for each AJI/PQ/Dice1 version (the per-nucleus baseline "
                             "takes ~10 s a call); object Hausdorff and all metrics: fastest of 3")
    parser.add_argument("--all-images", action="store_true",
                        help="also time object Hausdorff on every label map in --labels")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    name, gt = load_benchmark_map(args.labels, rng)
    pred = perturbed(gt, rng)
    num_gt, num_pred = len(np.unique(gt)) - 1, len(np.unique(pred)) - 1
    print(f"data: {name}, {gt.shape[0]}x{gt.shape[1]}, {num_gt} gt nuclei, {num_pred} predicted")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, best of {args.repeats}")
    print(run_stamp())

    def baseline():
        return {"aji": loop_aji(gt, pred), "aji_plus": loop_aji_plus(gt, pred),
                **dict(zip(("dq", "sq", "pq"), loop_pq(gt, pred))), "dice1": loop_dice1(gt, pred)}

    def ours_separate():
        return {"aji": metrics.aji(gt, pred), "aji_plus": metrics.aji_plus(gt, pred),
                **metrics.pq(gt, pred)._asdict(), "dice1": metrics.dice1(gt, pred)}

    def ours_shared():
        return metrics.compute_metrics(gt, pred, ["aji", "aji_plus", "pq", "dice1"])

    # Fastest of N each, the three called in turn within every repeat.
    (baseline_seconds, expected), (separate_seconds, separate), (shared_seconds, shared) = \
        best_times_interleaved([baseline, ours_separate, ours_shared], args.repeats)
    for key, value in expected.items():
        assert separate[key] == value and shared[key] == value, (key, value, separate[key], shared[key])
    print("values (identical in all three):", ", ".join(f"{k}={v:.6f}" for k, v in expected.items()))
    print(f"AJI + AJI+ + PQ + Dice1, per-nucleus loops (HoVer-Net style): {baseline_seconds:8.3f} s")
    print(f"AJI + AJI+ + PQ + Dice1, nucseg_d2, four separate calls:      {separate_seconds:8.3f} s"
          f"  ({baseline_seconds / separate_seconds:.0f}x faster)")
    print(f"AJI + AJI+ + PQ + Dice1, nucseg_d2, compute_metrics (1 table): {shared_seconds:8.3f} s"
          f"  ({baseline_seconds / shared_seconds:.0f}x faster)")
    overlap_seconds, _ = best_time(lambda: metrics.pairwise_overlap(gt, pred), args.repeats)
    print(f"pairwise_overlap alone: {overlap_seconds:.3f} s")

    hausdorff_seconds, hausdorff = best_time(lambda: metrics.object_hausdorff(gt, pred), 3)
    print(f"object Hausdorff: {hausdorff:.4f} px in {hausdorff_seconds:.3f} s per image")
    all_seconds, _ = best_time(lambda: metrics.compute_metrics(gt, pred), 3)
    print(f"all metrics (compute_metrics, every name): {all_seconds:.3f} s per image")

    if args.all_images:
        paths = sorted(glob.glob(os.path.join(args.labels, "*.png")))
        if paths:
            from skimage.io import imread

            seconds = []
            for path in paths:
                label_map = imread(path).astype(np.int32)
                prediction = perturbed(label_map, rng)
                start = time.perf_counter()
                metrics.object_hausdorff(label_map, prediction)
                seconds.append(time.perf_counter() - start)
            print(f"object Hausdorff over {len(paths)} label maps: mean {np.mean(seconds):.3f} s, "
                  f"max {np.max(seconds):.3f} s per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())

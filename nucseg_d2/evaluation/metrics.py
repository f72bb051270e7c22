"""Nuclei instance-segmentation metrics on integer label maps (pure NumPy/SciPy).

Every function takes ``(gt, pred)``: two 2-D integer label maps of the same shape, 0 = background,
each nucleus one positive id. Ids are arbitrary (non-contiguous, any size, including above 65,535
and above 2**31); only which pixels share an id matters.

All overlap-based metrics derive from one intersection table (:func:`pairwise_overlap`) computed
in a single pass over the pixels, instead of the per-nucleus mask loops of the reference
implementations (HoVer-Net ``stats_utils.py``, the MoNuSeg MATLAB code, the GlaS MATLAB code).
See ``docs/METRICS.md`` for the definitions, which paper uses which variant, and the pitfalls.

Conventions fixed here (the papers leave them open):

* Empty inputs. Both maps empty: every score is 1.0 (nothing to find, nothing found) and the
  object Hausdorff distance is 0.0. Exactly one map empty: every score is 0.0 and the object
  Hausdorff distance is ``inf`` (the distance from an object to the empty set).
* PQ's SQ is 0.0 when there is no true positive (Kirillov et al. leave it undefined).
* Exact ties are broken without looking at ids where the data allows it, then by the smaller id:
  AJI picks the largest IoU, then the largest intersection (what HoVer-Net's
  ``inter / (union + 1e-6)`` does implicitly), then the smaller prediction id; the GlaS metrics
  pick the largest intersection, then the smaller id (MATLAB's ``mode``/``min`` return the
  smallest of tied values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "PairwiseOverlap",
    "PQResult",
    "pairwise_overlap",
    "aji",
    "aji_plus",
    "paper_aji",
    "aji_counts",
    "dice1",
    "dice2",
    "pq",
    "object_dice",
    "object_hausdorff",
    "object_f1",
    "ALL_METRICS",
    "LOWER_IS_BETTER",
    "metric_keys",
    "compute_metrics",
    "summarize",
    "pooled_aji",
]

# Ids up to this bound are mapped to sequential indices with a lookup table (O(pixels + max id));
# larger ids fall back to sorting (np.unique), which gives the same result, only slower.
_LOOKUP_TABLE_MIN_MAX_ID = 1 << 20
# The (gt, pred) pair histogram uses np.bincount while it has at most this many bins (32 MiB).
_DENSE_PAIR_BINS = 1 << 22


# --------------------------------------------------------------------------- intersection table


@dataclass(frozen=True, eq=False)
class PairwiseOverlap:
    """Intersection table of all (ground truth, prediction) nucleus pairs that share a pixel.

    Objects are indexed 0..n-1 in ascending id order (``gt_ids[k]`` is the id of gt object k).
    Only overlapping pairs are stored (sparse, COO), sorted by (gt index, pred index).
    ``gt_index_map``/``pred_index_map`` are the label maps relabelled to index + 1 (0 stays
    background); the geometric metric (object Hausdorff) needs them.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_intersection: np.ndarray
    gt_index_map: np.ndarray
    pred_index_map: np.ndarray

    @property
    def num_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def num_pred(self) -> int:
        return int(self.pred_ids.size)

    @cached_property
    def pair_union(self) -> np.ndarray:
        """|G ∪ S| = |G| + |S| - |G ∩ S| per stored pair (int64)."""
        return self.gt_areas[self.pair_gt] + self.pred_areas[self.pair_pred] - self.pair_intersection

    @cached_property
    def pair_iou(self) -> np.ndarray:
        """|G ∩ S| / |G ∪ S| per stored pair (float64, exact division, no epsilon)."""
        return self.pair_intersection / self.pair_union

    def intersection_matrix(self) -> np.ndarray:
        """Dense (num_gt, num_pred) int64 matrix of pixel intersections."""
        dense = np.zeros((self.num_gt, self.num_pred), np.int64)
        dense[self.pair_gt, self.pair_pred] = self.pair_intersection
        return dense

    def iou_matrix(self) -> np.ndarray:
        """Dense (num_gt, num_pred) float64 IoU matrix (0 where objects do not overlap)."""
        dense = np.zeros((self.num_gt, self.num_pred), np.float64)
        dense[self.pair_gt, self.pair_pred] = self.pair_iou
        return dense


def _check_label_map(label_map, name: str) -> np.ndarray:
    array = np.asarray(label_map)
    if array.dtype == bool:
        raise TypeError(
            f"{name} is a boolean mask, not an instance label map; label its connected "
            "components first (e.g. scipy.ndimage.label)"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise ValueError(f"{name} has negative ids (min {array.min()}); ids must be >= 0")
    return array


def _sequential_labels(label_map: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel to 0 (background) and 1..n in ascending id order.

    Returns (ids (n,), flat index map (pixels,) int32/int64, areas (n,) int64).
    """
    flat = label_map.ravel()
    max_id = int(flat.max()) if flat.size else 0
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    if max_id <= max(_LOOKUP_TABLE_MIN_MAX_ID, 4 * flat.size):
        # bincount refuses uint64 (no safe cast to intp); the ids are small here, so cast.
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        lookup = np.zeros(max_id + 1, index_dtype)
        lookup[ids] = np.arange(1, ids.size + 1, dtype=index_dtype)
        return ids.astype(np.int64), lookup[flat], counts[ids].astype(np.int64)
    unique_ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inverse = inverse.ravel().astype(index_dtype, copy=False)
    if unique_ids[0] == 0:
        return unique_ids[1:], inverse, counts[1:].astype(np.int64)
    return unique_ids, inverse + 1, counts.astype(np.int64)


def pairwise_overlap(gt, pred) -> PairwiseOverlap:
    """All pairwise intersections |G_i ∩ S_j| > 0, object areas and ids, in one pass.

    Both maps are relabelled to sequential indices (a lookup table, or ``np.unique`` for huge
    ids), the pair (g, s) of every pixel where both are foreground is encoded as one integer
    ``g * (n_pred + 1) + s`` and counted with ``np.bincount`` (or ``np.unique`` when the table
    would be large). Cost O(pixels), independent of the number of nuclei, against
    O(nuclei × pixels) for the per-nucleus mask loops of HoVer-Net's ``stats_utils.py``.
    """
    gt = _check_label_map(gt, "gt")
    pred = _check_label_map(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
    gt_ids, gt_index, gt_areas = _sequential_labels(gt)
    pred_ids, pred_index, pred_areas = _sequential_labels(pred)

    both_foreground = (gt_index > 0) & (pred_index > 0)
    pair_code = gt_index[both_foreground].astype(np.int64) * (pred_ids.size + 1)
    pair_code += pred_index[both_foreground]
    num_bins = (gt_ids.size + 1) * (pred_ids.size + 1)
    if num_bins <= _DENSE_PAIR_BINS:
        histogram = np.bincount(pair_code, minlength=num_bins)
        codes = np.flatnonzero(histogram)
        intersections = histogram[codes]
    else:
        codes, intersections = np.unique(pair_code, return_counts=True)
    return PairwiseOverlap(
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_areas=gt_areas,
        pred_areas=pred_areas,
        pair_gt=codes // (pred_ids.size + 1) - 1,
        pair_pred=codes % (pred_ids.size + 1) - 1,
        pair_intersection=intersections.astype(np.int64),
        gt_index_map=gt_index.reshape(gt.shape),
        pred_index_map=pred_index.reshape(pred.shape),
    )


def _as_overlap(gt, pred=None) -> PairwiseOverlap:
    # Internal entry points accept a precomputed table so compute_metrics does one pass only.
    if isinstance(gt, PairwiseOverlap):
        return gt
    return pairwise_overlap(gt, pred)


def _first_per_group(sorted_groups: np.ndarray) -> np.ndarray:
    """Positions of the first element of each run of equal values in a sorted array."""
    if sorted_groups.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])


def _ratio(numerator, denominator, both_empty: bool) -> float:
    if both_empty:
        return 1.0
    return float(numerator / denominator) if denominator else 0.0


# --------------------------------------------------------------------------- AJI family


def _aji_preference_order(ov: PairwiseOverlap) -> np.ndarray:
    """Pair indices sorted by gt, then IoU desc, intersection desc, prediction index asc."""
    return np.lexsort((ov.pair_pred, -ov.pair_intersection, -ov.pair_iou, ov.pair_gt))


def _aji_totals(ov: PairwiseOverlap, picked_pairs: np.ndarray) -> Tuple[int, int]:
    """(Σ|G_i ∩ S_i*|, Σ|G_i ∪ S_i*| + Σ|G unpicked| + Σ|S never picked|) for chosen pairs."""
    intersection = int(ov.pair_intersection[picked_pairs].sum())
    union = int(ov.pair_union[picked_pairs].sum())
    gt_picked = np.zeros(ov.num_gt, bool)
    gt_picked[ov.pair_gt[picked_pairs]] = True
    pred_picked = np.zeros(ov.num_pred, bool)
    pred_picked[ov.pair_pred[picked_pairs]] = True
    union += int(ov.gt_areas[~gt_picked].sum()) + int(ov.pred_areas[~pred_picked].sum())
    return intersection, union


def _aji_pairs(ov: PairwiseOverlap) -> np.ndarray:
    order = _aji_preference_order(ov)
    return order[_first_per_group(ov.pair_gt[order])]


def _aji_plus_pairs(ov: PairwiseOverlap) -> np.ndarray:
    """One-to-one matching maximising Σ IoU, solved per connected component of the overlap graph.

    Pairs that do not overlap have IoU 0 and add nothing to the objective, so the optimum of the
    full (num_gt × num_pred) assignment problem is the union of the optima of the components of
    the bipartite "shares a pixel" graph; most components are a single pair.

    The solver maximises HoVer-Net's ``intersection / (union + 1e-6)``, not the exact IoU: of two
    predictions with the same IoU it then takes the one with the larger intersection, as AJI
    does, instead of whichever has the smaller id.
    """
    num_pairs = ov.pair_intersection.size
    if num_pairs == 0:
        return np.zeros(0, np.int64)
    num_nodes = ov.num_gt + ov.num_pred
    graph = coo_matrix(
        (np.ones(num_pairs, np.int8), (ov.pair_gt, ov.num_gt + ov.pair_pred)),
        shape=(num_nodes, num_nodes),
    )
    _, node_component = connected_components(graph, directed=False)
    pair_component = node_component[ov.pair_gt]
    pairs_per_component = np.bincount(pair_component)
    single = pairs_per_component[pair_component] == 1
    chosen = [np.flatnonzero(single)]

    tie_breaking_iou = ov.pair_intersection / (ov.pair_union + 1e-6)
    multi = np.flatnonzero(~single)
    multi = multi[np.argsort(pair_component[multi], kind="stable")]
    for group in np.split(multi, _first_per_group(pair_component[multi])[1:]):
        if group.size == 0:
            continue
        rows, row_of_pair = np.unique(ov.pair_gt[group], return_inverse=True)
        cols, col_of_pair = np.unique(ov.pair_pred[group], return_inverse=True)
        local_iou = np.zeros((rows.size, cols.size))
        local_iou[row_of_pair, col_of_pair] = tie_breaking_iou[group]
        local_pair = np.full((rows.size, cols.size), -1, np.int64)
        local_pair[row_of_pair, col_of_pair] = group
        matched_rows, matched_cols = linear_sum_assignment(local_iou, maximize=True)
        matched = local_pair[matched_rows, matched_cols]
        chosen.append(matched[matched >= 0])  # a zero-IoU assignment is no match
    return np.sort(np.concatenate(chosen))


def _paper_aji_pairs(ov: PairwiseOverlap) -> np.ndarray:
    """Greedy one-to-one: ground truth in ascending id order takes its best still-unused prediction."""
    order = _aji_preference_order(ov)
    sorted_gt = ov.pair_gt[order]
    starts = _first_per_group(sorted_gt).tolist()
    ends = starts[1:] + [order.size]
    candidate_pred = ov.pair_pred[order].tolist()
    pred_used = [False] * ov.num_pred
    chosen = []
    for start, end in zip(starts, ends):
        for position in range(start, end):
            pred_index = candidate_pred[position]
            if not pred_used[pred_index]:
                pred_used[pred_index] = True
                chosen.append(int(order[position]))
                break
    return np.asarray(chosen, np.int64)


_AJI_PAIRINGS = {"aji": _aji_pairs, "aji_plus": _aji_plus_pairs, "paper_aji": _paper_aji_pairs}


def aji_counts(gt, pred=None, variant: str = "aji") -> Tuple[int, int]:
    """(Σ intersection, Σ union) of one image for an AJI variant; AJI = first / second.

    ``gt`` may also be a precomputed :class:`PairwiseOverlap` (then ``pred`` is not given).
    ``variant`` is "aji", "aji_plus" or "paper_aji". Summing both over images gives the pooled
    ("aggregated over all images") AJI, see :func:`pooled_aji`. Both maps empty gives (0, 0).
    """
    if variant not in _AJI_PAIRINGS:
        raise ValueError(f"unknown AJI variant {variant!r}; known: {sorted(_AJI_PAIRINGS)}")
    ov = _as_overlap(gt, pred)
    return _aji_totals(ov, _AJI_PAIRINGS[variant](ov))


def _aji_score(ov: PairwiseOverlap, variant: str) -> float:
    intersection, union = aji_counts(ov, variant=variant)
    return _ratio(intersection, union, ov.num_gt == 0 and ov.num_pred == 0)


def aji(gt, pred) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017; MoNuSeg).

    AJI = Σ_i |G_i ∩ S_i*| / (Σ_i |G_i ∪ S_i*| + Σ_{S ∈ U} |S|), S_i* = argmax_j IoU(G_i, S_j).
    A prediction may be picked by several G_i (many-to-one; the over-penalisation AJI+ fixes);
    a G_i that overlaps no prediction adds |G_i| to the denominator; U = predictions never
    picked. Ties: larger IoU, then larger intersection, then smaller prediction id.
    """
    return _aji_score(pairwise_overlap(gt, pred), "aji")


def aji_plus(gt, pred) -> float:
    """AJI+ (Graham et al., HoVer-Net, Medical Image Analysis 2019).

    As :func:`aji`, but (G_i, S_j) pairs come from the one-to-one matching maximising Σ IoU
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); pairs with IoU 0 are not
    matches. Unmatched ground truth and unmatched predictions add their areas to the union.
    """
    return _aji_score(pairwise_overlap(gt, pred), "aji_plus")


def paper_aji(gt, pred) -> float:
    """AJI as evaluated by the seed paper (Liu et al., IJCAI 2019, eq. 5: "each index cannot be
    used more than once").

    Greedy one-to-one: ground-truth nuclei in ascending id order; each G_i takes the unused
    prediction of largest IoU (ties: larger intersection, then smaller id). A G_i with no
    overlapping unused prediction adds |G_i| to the union; unused predictions add their areas.
    Depends on the ground-truth id order by definition.
    """
    return _aji_score(pairwise_overlap(gt, pred), "paper_aji")


# --------------------------------------------------------------------------- pixel and PQ metrics


class PQResult(NamedTuple):
    """Panoptic quality and its factors: PQ = DQ × SQ."""

    dq: float
    sq: float
    pq: float


def _dice1(ov: PairwiseOverlap) -> float:
    foreground_total = int(ov.gt_areas.sum()) + int(ov.pred_areas.sum())
    return _ratio(2 * int(ov.pair_intersection.sum()), foreground_total, foreground_total == 0)


def dice1(gt, pred) -> float:
    """Pixel-level Dice = pixel F1 of the binary foreground (the "F1" of the paper's Tables 2-4).

    Dice1 = 2 |G ∩ S| / (|G| + |S|) with G, S the foreground (id > 0) pixel sets.
    """
    return _dice1(pairwise_overlap(gt, pred))


def _dice2(ov: PairwiseOverlap) -> float:
    both_empty = ov.num_gt == 0 and ov.num_pred == 0
    pair_area_sum = int(ov.gt_areas[ov.pair_gt].sum()) + int(ov.pred_areas[ov.pair_pred].sum())
    return _ratio(2 * int(ov.pair_intersection.sum()), pair_area_sum, both_empty)


def dice2(gt, pred) -> float:
    """Ensemble Dice, "Dice2" (Vu et al., Frontiers in Bioengineering 2019, CPM-17; as in
    HoVer-Net's ``get_fast_dice_2``).

    Dice2 = 2 Σ_{(i,j): G_i ∩ S_j ≠ ∅} |G_i ∩ S_j| / Σ_{(i,j): G_i ∩ S_j ≠ ∅} (|G_i| + |S_j|),
    over every overlapping pair (no matching). 0.0 when no pair overlaps.
    """
    return _dice2(pairwise_overlap(gt, pred))


def _pq(ov: PairwiseOverlap) -> PQResult:
    if ov.num_gt == 0 and ov.num_pred == 0:
        return PQResult(1.0, 1.0, 1.0)
    # IoU > 0.5 written on integers (2|∩| > |∪|) so the threshold has no rounding; such pairs
    # are unique per object because objects within one map are disjoint (Kirillov et al.).
    matched = 2 * ov.pair_intersection > ov.pair_union
    true_positives = int(matched.sum())
    false_positives = ov.num_pred - true_positives
    false_negatives = ov.num_gt - true_positives
    dq = true_positives / (true_positives + (false_positives + false_negatives) / 2)
    # fsum: exactly rounded, so the result does not depend on the pair order.
    sq = math.fsum(ov.pair_iou[matched].tolist()) / true_positives if true_positives else 0.0
    return PQResult(float(dq), float(sq), float(dq * sq))


def pq(gt, pred) -> PQResult:
    """Panoptic quality (Kirillov et al., CVPR 2019; for nuclei, Graham et al. 2019).

    Matches: pairs with IoU > 0.5 (unique). DQ = TP / (TP + FP/2 + FN/2),
    SQ = Σ_matches IoU / TP (0.0 without a match), PQ = DQ × SQ. Returns ``PQResult(dq, sq, pq)``.
    """
    return _pq(pairwise_overlap(gt, pred))


# --------------------------------------------------------------------------- GlaS object metrics


def _best_by_intersection(ov: PairwiseOverlap, side: str) -> Tuple[np.ndarray, np.ndarray]:
    """For each object of ``side`` ("gt" or "pred"): the other side's object it overlaps most.

    Returns (partner index or -1 when it overlaps nothing, intersection with it). The
    maximum is taken over objects only, never background (the "mode includes background" pitfall
    of GlaS ports); ties go to the smaller id, as MATLAB's ``mode`` does.
    """
    own, other = (ov.pair_gt, ov.pair_pred) if side == "gt" else (ov.pair_pred, ov.pair_gt)
    count = ov.num_gt if side == "gt" else ov.num_pred
    order = np.lexsort((other, -ov.pair_intersection, own))
    first = order[_first_per_group(own[order])]
    partner = np.full(count, -1, np.int64)
    partner[own[first]] = other[first]
    intersection = np.zeros(count, np.int64)
    intersection[own[first]] = ov.pair_intersection[first]
    return partner, intersection


def _object_dice(ov: PairwiseOverlap) -> float:
    if ov.num_gt == 0 or ov.num_pred == 0:
        return 1.0 if ov.num_gt == ov.num_pred else 0.0

    def weighted_side(own_areas, other_areas, partner, intersection):
        # Dice(X, partner) = 2|X ∩ Y| / (|X| + |Y|), 0 without partner; weight |X| / Σ|X|.
        partner_area = np.where(partner >= 0, other_areas[np.maximum(partner, 0)], 0)
        dice = 2 * intersection / (own_areas + partner_area)
        return math.fsum((own_areas / own_areas.sum() * dice).tolist())

    gt_side = weighted_side(ov.gt_areas, ov.pred_areas, *_best_by_intersection(ov, "gt"))
    pred_side = weighted_side(ov.pred_areas, ov.gt_areas, *_best_by_intersection(ov, "pred"))
    return 0.5 * (gt_side + pred_side)


def object_dice(gt, pred) -> float:
    """Object-level Dice (Sirinukunwattana et al., GlaS challenge, Medical Image Analysis 2017).

    Dice_obj = ½ [ Σ_i γ_i Dice(G_i, S*(G_i)) + Σ_j σ_j Dice(G*(S_j), S_j) ],
    γ_i = |G_i| / Σ|G|, σ_j = |S_j| / Σ|S|; S*(G_i) is the segmented object overlapping G_i most,
    G*(S_j) the ground-truth object overlapping S_j most; Dice is 0 for an object with no overlap.
    Used for CPM-17 in the paper's Table 5 (via Cell R-CNN).
    """
    return _object_dice(pairwise_overlap(gt, pred))


def _object_f1(ov: PairwiseOverlap) -> float:
    if ov.num_gt == 0 or ov.num_pred == 0:
        return 1.0 if ov.num_gt == ov.num_pred else 0.0
    partner, intersection = _best_by_intersection(ov, "pred")
    has_partner = partner >= 0
    # TP: the segmented object covers more than half of its ground-truth object. Two disjoint
    # objects cannot both cover more than half of one object, so TPs are one-to-one.
    covers_half = 2 * intersection[has_partner] > ov.gt_areas[partner[has_partner]]
    true_positives = int(covers_half.sum())
    return 2 * true_positives / (ov.num_gt + ov.num_pred)


def object_f1(gt, pred) -> float:
    """Object-level F1 (GlaS, Sirinukunwattana et al. 2017; the "F1-score" of Table 5).

    A segmented object S_j is a true positive when |S_j ∩ G*(S_j)| > 0.5 |G*(S_j)|, with G*(S_j)
    the ground-truth object it overlaps most. FP = #S − TP, FN = #G − TP,
    F1 = 2TP / (2TP + FP + FN) = 2TP / (#G + #S).
    """
    return _object_f1(pairwise_overlap(gt, pred))


class _ObjectGeometry:
    """Bounding boxes of the objects of one index map and exact Hausdorff distances between them."""

    def __init__(self, index_map: np.ndarray, count: int):
        self.index_map = index_map
        slices = ndimage.find_objects(index_map, max_label=count)
        # (count, 4): first row, last row, first column, last column (inclusive, pixel centres).
        self.boxes = np.array(
            [(s[0].start, s[0].stop - 1, s[1].start, s[1].stop - 1) for s in slices], np.int64
        ).reshape(count, 4)


def _hausdorff(gt_geometry: _ObjectGeometry, gt_index: int,
               pred_geometry: _ObjectGeometry, pred_index: int) -> float:
    """Hausdorff distance between the pixel sets of one gt and one predicted object (pixels).

    H(A, B) = max(max_{a∈A} d(a, B), max_{b∈B} d(b, A)), Euclidean, over all object pixels
    (as the GlaS MATLAB code). Computed with distance transforms on the union bounding box,
    which holds both objects, so the nearest pixel of either object is always inside the crop.
    """
    gt_box, pred_box = gt_geometry.boxes[gt_index], pred_geometry.boxes[pred_index]
    row0, row1 = min(gt_box[0], pred_box[0]), max(gt_box[1], pred_box[1]) + 1
    col0, col1 = min(gt_box[2], pred_box[2]), max(gt_box[3], pred_box[3]) + 1
    in_gt = gt_geometry.index_map[row0:row1, col0:col1] == gt_index + 1
    in_pred = pred_geometry.index_map[row0:row1, col0:col1] == pred_index + 1
    distance_to_pred = ndimage.distance_transform_edt(~in_pred)
    distance_to_gt = ndimage.distance_transform_edt(~in_gt)
    return float(max(distance_to_pred[in_gt].max(), distance_to_gt[in_pred].max()))


def _box_lower_bound(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    # H(A, B) >= |first row of A - first row of B|: the extreme pixel of one set is at least that
    # far from every pixel of the other; likewise for the other three box sides.
    return np.abs(boxes - box).max(axis=1)


def _object_hausdorff(ov: PairwiseOverlap) -> float:
    if ov.num_gt == 0 or ov.num_pred == 0:
        return 0.0 if ov.num_gt == ov.num_pred else math.inf
    gt_geometry = _ObjectGeometry(ov.gt_index_map, ov.num_gt)
    pred_geometry = _ObjectGeometry(ov.pred_index_map, ov.num_pred)
    cache: Dict[Tuple[int, int], float] = {}

    def distance(gt_index: int, pred_index: int) -> float:
        key = (gt_index, pred_index)
        if key not in cache:
            cache[key] = _hausdorff(gt_geometry, gt_index, pred_geometry, pred_index)
        return cache[key]

    def nearest(own_box, other_boxes, distance_to) -> float:
        """Smallest Hausdorff distance to an object of the other side, pruned by box bounds.

        Only the distance enters the metric, so which of several equidistant objects is "the"
        nearest does not matter. Candidates are visited by increasing lower bound; once a bound
        reaches the best distance found, no later candidate can be nearer.
        """
        bounds = _box_lower_bound(own_box, other_boxes)
        best = math.inf
        for candidate in np.argsort(bounds, kind="stable").tolist():
            if bounds[candidate] >= best:
                break
            best = min(best, distance_to(candidate))
        return best

    gt_partner, _ = _best_by_intersection(ov, "gt")
    gt_distances = np.empty(ov.num_gt)
    for gt_index, pred_index in enumerate(gt_partner.tolist()):
        if pred_index >= 0:
            gt_distances[gt_index] = distance(gt_index, pred_index)
        else:  # overlaps nothing: compared with the nearest predicted object (GlaS)
            gt_distances[gt_index] = nearest(
                gt_geometry.boxes[gt_index], pred_geometry.boxes, lambda j, i=gt_index: distance(i, j))

    pred_partner, _ = _best_by_intersection(ov, "pred")
    pred_distances = np.empty(ov.num_pred)
    for pred_index, gt_index in enumerate(pred_partner.tolist()):
        if gt_index >= 0:
            pred_distances[pred_index] = distance(gt_index, pred_index)
        else:
            pred_distances[pred_index] = nearest(
                pred_geometry.boxes[pred_index], gt_geometry.boxes, lambda i, j=pred_index: distance(i, j))

    def weighted(areas, distances):
        return math.fsum((areas / areas.sum() * distances).tolist())

    return 0.5 * (weighted(ov.gt_areas, gt_distances) + weighted(ov.pred_areas, pred_distances))


def object_hausdorff(gt, pred) -> float:
    """Object-level Hausdorff distance in pixels (GlaS, Sirinukunwattana et al. 2017; Table 5).

    H_obj = ½ [ Σ_i γ_i H(G_i, S*(G_i)) + Σ_j σ_j H(G*(S_j), S_j) ], weights and partners as in
    :func:`object_dice`, except that an object overlapping nothing is compared with the object
    of the other side at the smallest Hausdorff distance. H is the Euclidean Hausdorff distance
    between the objects' pixel sets. Lower is better. Both maps empty: 0.0; one empty: inf.
    """
    return _object_hausdorff(pairwise_overlap(gt, pred))


# --------------------------------------------------------------------------- registry, batch API

ALL_METRICS: Dict[str, Callable] = {
    "aji": aji,
    "aji_plus": aji_plus,
    "paper_aji": paper_aji,
    "dice1": dice1,
    "dice2": dice2,
    "pq": pq,
    "object_dice": object_dice,
    "object_hausdorff": object_hausdorff,
    "object_f1": object_f1,
}

# Output keys where smaller is better (significance tests flip the direction for them).
LOWER_IS_BETTER = frozenset({"object_hausdorff"})

_FROM_OVERLAP: Dict[str, Callable[[PairwiseOverlap], object]] = {
    "aji": lambda ov: _aji_score(ov, "aji"),
    "aji_plus": lambda ov: _aji_score(ov, "aji_plus"),
    "paper_aji": lambda ov: _aji_score(ov, "paper_aji"),
    "dice1": _dice1,
    "dice2": _dice2,
    "pq": _pq,
    "object_dice": _object_dice,
    "object_hausdorff": _object_hausdorff,
    "object_f1": _object_f1,
}


def _check_names(names: Iterable[str]) -> List[str]:
    names = list(names)
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(ALL_METRICS)}")
    return names


def metric_keys(names: Optional[Iterable[str]] = None) -> List[str]:
    """Result keys produced by ``compute_metrics(..., names)``: "pq" expands to dq, sq, pq."""
    keys: List[str] = []
    for name in _check_names(ALL_METRICS if names is None else names):
        keys.extend(PQResult._fields if name == "pq" else (name,))
    return keys


def compute_metrics(gt, pred, names: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """Metrics ``names`` (default: all of :data:`ALL_METRICS`) for one image, as {key: float}.

    The intersection table is computed once and shared (``gt`` may also be a precomputed
    :class:`PairwiseOverlap`, with ``pred`` None). "pq" gives the keys "dq", "sq", "pq".
    """
    names = _check_names(ALL_METRICS if names is None else names)
    ov = _as_overlap(gt, pred)
    results: Dict[str, float] = {}
    for name in names:
        value = _FROM_OVERLAP[name](ov)
        if isinstance(value, PQResult):
            results.update({key: float(v) for key, v in value._asdict().items()})
        else:
            results[name] = float(value)
    return results


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _mean_std(rows: Sequence[Mapping], metrics: Sequence[str]) -> Dict[str, object]:
    means, stds = {}, {}
    for metric in metrics:
        values = np.array([float(row[metric]) for row in rows])
        means[metric] = float(values.mean())
        # Sample std (ddof=1): reproduces the paper's Table 3 (e.g. AJI 0.0820 from Table 2).
        stds[metric] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return {"mean": means, "std": stds, "count": len(rows)}


def summarize(per_image_rows: Sequence[Mapping], metrics: Optional[Sequence[str]] = None,
              group_key: Optional[str] = None) -> Dict[str, object]:
    """Mean ± sample std over images, overall and per group (e.g. organ).

    ``per_image_rows``: one mapping per image ({"image_id": ..., "organ": ..., "aji": ...}).
    ``metrics``: keys to summarise; default every key whose value is a number in all rows
    (except ``group_key``). Returns ``{"mean": {m: float}, "std": {m: float}, "count": n}`` plus,
    with ``group_key``, ``"groups": {group value: {"mean", "std", "count"}}``. The std is the
    sample std (ddof=1), NaN for a single image; an ``inf`` (Hausdorff with an empty map)
    propagates to the mean.
    """
    rows = list(per_image_rows)
    if not rows:
        raise ValueError("summarize needs at least one per-image row")
    if metrics is None:
        metrics = [key for key in rows[0] if key != group_key and all(_is_number(r.get(key)) for r in rows)]
    metrics = list(metrics)
    for row in rows:
        missing = [m for m in metrics if m not in row]
        if missing:
            raise KeyError(f"row {row.get('image_id', row)!r} lacks metrics {missing}")
    summary = _mean_std(rows, metrics)
    if group_key is not None:
        groups: Dict[object, List[Mapping]] = {}
        for row in rows:
            if group_key not in row:
                raise KeyError(f"row {row.get('image_id', row)!r} lacks the group key {group_key!r}")
            groups.setdefault(row[group_key], []).append(row)
        summary["groups"] = {group: _mean_std(members, metrics) for group, members in groups.items()}
    return summary


def pooled_aji(pairs: Iterable[Tuple[np.ndarray, np.ndarray]], variant: str = "aji") -> float:
    """AJI "aggregated over all images": Σ_images intersections / Σ_images unions.

    Unlike the mean of per-image AJI, large crowded images weigh more. ``pairs`` yields
    (gt, pred) label maps; ``variant`` is "aji", "aji_plus" or "paper_aji". 1.0 when every map
    is empty.
    """
    total_intersection = total_union = 0
    for gt, pred in pairs:
        intersection, union = aji_counts(gt, pred, variant=variant)
        total_intersection += intersection
        total_union += union
    return _ratio(total_intersection, total_union, total_union == 0)

"""Tests of nucseg_d2.evaluation.metrics.

Hand-worked cases (values derived in the comments), property tests (hypothesis), and agreement
with slow implementations written here straight from the published definitions, on real Kumar
and TNBC label maps (skipped when ../shared/data is absent) and on a synthetic twin that always
runs; plus the cellseg-metrics package where it is installed.
"""
import glob
import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import directed_hausdorff
from skimage.draw import ellipse
from skimage.segmentation import expand_labels, find_boundaries

from nucseg_d2.evaluation.metrics import (
    ALL_METRICS,
    aji,
    aji_counts,
    aji_plus,
    compute_metrics,
    dice1,
    dice2,
    metric_keys,
    object_dice,
    object_f1,
    object_hausdorff,
    pairwise_overlap,
    paper_aji,
    pooled_aji,
    pq,
    summarize,
)

from real_data import REAL_DATA_ROOT  # noqa: E402  (tests/ helper)

DATA = str(REAL_DATA_ROOT)
KUMAR_LABELS = sorted(glob.glob(os.path.join(DATA, "kumar", "labels", "*.png")))
TNBC_GT = sorted(glob.glob(os.path.join(DATA, "tnbc", "GT_*", "*.png")))
SCORE_KEYS = [k for k in metric_keys() if k != "object_hausdorff"]


def canvas(shape, *objects):
    """Label map with ``objects`` = (id, row slice, col slice) painted in order."""
    label_map = np.zeros(shape, np.int64)
    for object_id, rows, cols in objects:
        label_map[rows, cols] = object_id
    return label_map


def assert_metrics(gt, pred, expected):
    got = compute_metrics(gt, pred)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # The single-metric functions agree with compute_metrics.
    assert aji(gt, pred) == got["aji"] and aji_plus(gt, pred) == got["aji_plus"]
    assert paper_aji(gt, pred) == got["paper_aji"] and dice1(gt, pred) == got["dice1"]
    assert dice2(gt, pred) == got["dice2"] and tuple(pq(gt, pred)) == (got["dq"], got["sq"], got["pq"])
    assert object_dice(gt, pred) == got["object_dice"] and object_f1(gt, pred) == got["object_f1"]
    assert object_hausdorff(gt, pred) == got["object_hausdorff"]


# --------------------------------------------------------------------------- hand-worked cases


def test_perfect_prediction_scores_one_and_hausdorff_zero():
    # Non-contiguous ids, one above 65,535; the prediction uses other ids for the same nuclei.
    gt = canvas((8, 10), (3, slice(1, 4), slice(1, 4)), (70000, slice(4, 7), slice(5, 9)))
    pred = canvas((8, 10), (9, slice(1, 4), slice(1, 4)), (2, slice(4, 7), slice(5, 9)))
    assert_metrics(gt, pred, {**{k: 1.0 for k in SCORE_KEYS}, "object_hausdorff": 0.0})


def test_empty_prediction_and_empty_ground_truth():
    gt = canvas((6, 6), (1, slice(1, 3), slice(1, 3)), (2, slice(3, 5), slice(3, 5)))
    empty = np.zeros_like(gt)
    # Nothing found: every intersection is 0 -> every score 0; a Hausdorff distance to the empty
    # set is infinite.
    zeros = {**{k: 0.0 for k in SCORE_KEYS}, "object_hausdorff": math.inf}
    assert_metrics(gt, empty, zeros)
    assert_metrics(empty, gt, zeros)
    # Both empty: nothing to find and nothing found -> perfect by convention.
    assert_metrics(empty, empty, {**{k: 1.0 for k in SCORE_KEYS}, "object_hausdorff": 0.0})


def test_merge_of_two_nuclei():
    # G1 = rows 1-2 x cols 1-2 (4 px), G2 = rows 1-2 x cols 4-6 (6 px); S = rows 1-2 x cols 1-6
    # (12 px) covers both and the gap column 3.
    gt = canvas((4, 8), (1, slice(1, 3), slice(1, 3)), (2, slice(1, 3), slice(4, 7)))
    pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)))
    assert_metrics(gt, pred, {
        # IoU(G1,S) = 4/12, IoU(G2,S) = 6/12; both pick S: (4+6) / (12+12).
        "aji": 10 / 24,
        # One-to-one: S goes to G2 (larger IoU); G1 unmatched adds 4: 6 / (12+4).
        "aji_plus": 6 / 16,
        # Greedy in gt order: G1 takes S first; G2 finds S used and adds 6: 4 / (12+6).
        "paper_aji": 4 / 18,
        "dice1": 2 * 10 / (10 + 12),
        # Pairs (G1,S), (G2,S): 2(4+6) / ((4+12) + (6+12)).
        "dice2": 20 / 34,
        # IoU(G2,S) = 0.5 exactly, not > 0.5: no match. TP 0, FP 1, FN 2.
        "dq": 0.0, "sq": 0.0, "pq": 0.0,
        # gt side: 0.4 * Dice(G1,S)=8/16 + 0.6 * Dice(G2,S)=12/18 = 0.6; pred side: S -> G2
        # (largest intersection), Dice 2/3, weight 1. Mean: (0.6 + 2/3) / 2 = 19/30.
        "object_dice": 19 / 30,
        # S covers 6 of G2's 6 px (> 50%): TP 1; F1 = 2*1 / (2 gt + 1 pred).
        "object_f1": 2 / 3,
        # H(G1,S) = 4 (S's col 6 to G1's col 2), H(G2,S) = 3 (S's col 1 to G2's col 4).
        # gt side 0.4*4 + 0.6*3 = 3.4; pred side H(G2,S) = 3; mean 3.2.
        "object_hausdorff": 3.2,
    })


def test_paper_aji_depends_on_ground_truth_order():
    # The merge case with the gt ids swapped: G2 (now id 1) is processed first, takes S
    # (IoU 6/12), and G1 adds its 4 px: 6 / (12+4). Kumar's AJI and AJI+ do not change.
    gt = canvas((4, 8), (2, slice(1, 3), slice(1, 3)), (1, slice(1, 3), slice(4, 7)))
    pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)))
    assert paper_aji(gt, pred) == 6 / 16
    assert aji(gt, pred) == 10 / 24 and aji_plus(gt, pred) == 6 / 16


def test_split_of_a_nucleus():
    # G = rows 0-3 x cols 0-5 (24 px); S1 = its cols 0-3 (16 px), S2 = its cols 4-5 (8 px).
    gt = canvas((5, 7), (1, slice(0, 4), slice(0, 6)))
    pred = canvas((5, 7), (1, slice(0, 4), slice(0, 4)), (2, slice(0, 4), slice(4, 6)))
    assert_metrics(gt, pred, {
        # G picks S1 (IoU 16/24 vs 8/24); S2 unused adds 8: 16 / (24 + 8), same for all three.
        "aji": 0.5, "aji_plus": 0.5, "paper_aji": 0.5,
        "dice1": 1.0,
        # 2(16+8) / ((24+16) + (24+8)).
        "dice2": 48 / 72,
        # IoU(G,S1) = 2/3 > 0.5: TP 1, FP 1 (S2), FN 0. DQ = 1/1.5, SQ = 2/3.
        "dq": 2 / 3, "sq": 2 / 3, "pq": 4 / 9,
        # gt side: Dice(G,S1) = 32/40 = 0.8. pred side: 16/24 * 0.8 + 8/24 * Dice(G,S2)=16/32.
        # (0.8 + 0.7) / 2.
        "object_dice": 0.75,
        # S1 covers 16/24 of G: TP; S2 8/24: FP. 2*1 / (1 + 2).
        "object_f1": 2 / 3,
        # H(G,S1) = 2 (G's col 5 to S1's col 3); H(G,S2) = 4 (G's col 0 to S2's col 4).
        # gt side 2; pred side 2/3*2 + 1/3*4 = 8/3; mean 7/3.
        "object_hausdorff": 7 / 3,
    })


def test_shifted_mask_with_large_non_contiguous_ids():
    # A 4x4 nucleus (16 px) predicted one column to the right: intersection 12, union 20.
    # Ids above 65,535 and above 2**32 (uint16/uint32 casts would wrap them).
    gt = canvas((6, 7), (70001, slice(1, 5), slice(1, 5)))
    pred = canvas((6, 7), (5_000_000_007, slice(1, 5), slice(2, 6)))
    assert_metrics(gt, pred, {
        "aji": 0.6, "aji_plus": 0.6, "paper_aji": 0.6,  # 12 / 20
        "dice1": 0.75, "dice2": 0.75,  # 24 / 32
        "dq": 1.0, "sq": 0.6, "pq": 0.6,  # IoU 0.6 > 0.5
        "object_dice": 0.75, "object_f1": 1.0,  # 12/16 > 50%
        "object_hausdorff": 1.0,  # every pixel is within one column of the other mask
    })


def test_prediction_matching_nothing():
    # G = rows 0-1 x cols 0-1, S = rows 0-1 x cols 5-6: no shared pixel.
    gt = canvas((3, 8), (1, slice(0, 2), slice(0, 2)))
    pred = canvas((3, 8), (1, slice(0, 2), slice(5, 7)))
    assert_metrics(gt, pred, {
        # Intersection 0; union |G| + |S| = 8.
        "aji": 0.0, "aji_plus": 0.0, "paper_aji": 0.0,
        "dice1": 0.0, "dice2": 0.0, "dq": 0.0, "sq": 0.0, "pq": 0.0,
        "object_dice": 0.0, "object_f1": 0.0,
        # Each object is compared with the nearest one: G's col 0 to S's col 5, S's col 6 to
        # G's col 1: H = 5 on both sides.
        "object_hausdorff": 5.0,
    })


def test_hausdorff_unmatched_object_takes_the_nearest_by_hausdorff_distance():
    # G = one pixel at (0,0). A = row 0, cols 2-20 except col 5 (18 px; closest pixel 2 away,
    # Hausdorff 20); B = one pixel at (0,5) (Hausdorff 5). GlaS compares unmatched G with the
    # object at the smallest *Hausdorff* distance, B, not with A whose pixels come closer.
    gt = canvas((2, 22), (1, slice(0, 1), slice(0, 1)))
    pred = canvas((2, 22), (1, slice(0, 1), slice(2, 21)), (2, slice(0, 1), slice(5, 6)))
    # gt side: H(G,B) = 5. pred side: A and B overlap nothing, their nearest gt is G:
    # 18/19 * 20 + 1/19 * 5 = 365/19. Mean (5 + 365/19) / 2 = 230/19 (A instead of B: 12.6).
    assert object_hausdorff(gt, pred) == pytest.approx(230 / 19, rel=1e-12)


def test_aji_breaks_iou_ties_by_intersection_not_by_id():
    # G = row 0, cols 0-7 (8 px). P1 = cols 0-1 (I 2, U 8, IoU 1/4); P2 = row 0 cols 2-4 plus
    # row 1 cols 2-5 (I 3, |P2| 7, U 12, IoU 1/4). Tie -> the larger intersection, P2:
    # AJI = 3 / (12 + |P1| 2) = 3/14 whichever id each prediction has (P1 would give 2/15).
    gt = canvas((2, 8), (1, slice(0, 1), slice(0, 8)))
    for id_p1, id_p2 in ((1, 2), (2, 1)):
        pred = canvas((2, 8), (id_p1, slice(0, 1), slice(0, 2)), (id_p2, slice(1, 2), slice(2, 6)),
                      (id_p2, slice(0, 1), slice(2, 5)))
        assert aji(gt, pred) == 3 / 14
        assert paper_aji(gt, pred) == 3 / 14
        assert aji_plus(gt, pred) == 3 / 14


def test_glas_match_ignores_background_even_when_it_is_the_mode():
    # S (9 px: row 0, cols 1-9) lies mostly on background (6 px); only cols 1-3 hit G (row 0,
    # cols 0-3, 4 px). GlaS ports that take the mode of the labels under S *including 0* match
    # S to the background (Dice 0). The definition matches S to G:
    # gt side Dice(G,S) = 2*3 / (4+9), pred side the same, both weight 1 -> 6/13.
    gt = canvas((1, 12), (1, slice(0, 1), slice(0, 4)))
    pred = canvas((1, 12), (1, slice(0, 1), slice(1, 10)))
    assert object_dice(gt, pred) == pytest.approx(6 / 13, rel=1e-12)
    # F1: S covers 3 of G's 4 px (> 50%): TP.
    assert object_f1(gt, pred) == 1.0


def test_ids_above_255_are_not_wrapped():
    # With a uint8 cast, ids 256 and 512 both become 0 (background) and 257 becomes 1.
    rows, left, middle, right = slice(0, 2), slice(0, 2), slice(3, 5), slice(6, 8)
    gt = canvas((3, 9), (256, rows, left), (512, rows, middle), (1, rows, right))
    pred = canvas((3, 9), (257, rows, left), (1, rows, middle), (513, rows, right))
    assert_metrics(gt, pred, {**{k: 1.0 for k in SCORE_KEYS}, "object_hausdorff": 0.0})


def test_object_f1_needs_more_than_half_of_the_ground_truth_object():
    # G = 1x4. S covering exactly 2 px (50%) is not a TP; 3 px (75%) is.
    gt = canvas((1, 6), (1, slice(0, 1), slice(0, 4)))
    assert object_f1(gt, canvas((1, 6), (1, slice(0, 1), slice(0, 2)))) == 0.0
    assert object_f1(gt, canvas((1, 6), (1, slice(0, 1), slice(0, 3)))) == 1.0


# --------------------------------------------------------------------------- inputs and API


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_integer_dtypes_give_identical_results(dtype):
    gt = canvas((4, 8), (1, slice(1, 3), slice(1, 3)), (2, slice(1, 3), slice(4, 7)))
    pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)))
    assert compute_metrics(gt.astype(dtype), pred.astype(dtype)) == compute_metrics(gt, pred)


def test_huge_ids_take_the_sorting_path_with_the_same_table():
    gt = canvas((4, 8), (1, slice(1, 3), slice(1, 3)), (2, slice(1, 3), slice(4, 7)))
    pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)))
    huge_gt = np.where(gt > 0, gt.astype(np.uint64) + np.uint64(2**62), np.uint64(0))
    huge_pred = np.where(pred > 0, pred.astype(np.uint64) + np.uint64(2**63 + 7), np.uint64(0))  # > int64
    small, huge = pairwise_overlap(gt, pred), pairwise_overlap(huge_gt, huge_pred)
    assert huge.pred_ids.tolist() == [2**63 + 12]
    np.testing.assert_array_equal(small.intersection_matrix(), huge.intersection_matrix())
    np.testing.assert_array_equal(small.gt_areas, huge.gt_areas)
    assert compute_metrics(huge_gt, huge_pred) == compute_metrics(gt, pred)


def test_pairwise_overlap_of_the_merge_case():
    gt = canvas((4, 8), (7, slice(1, 3), slice(1, 3)), (90000, slice(1, 3), slice(4, 7)))
    pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)), (6, slice(3, 4), slice(0, 1)))
    ov = pairwise_overlap(gt, pred)
    assert ov.gt_ids.tolist() == [7, 90000] and ov.pred_ids.tolist() == [5, 6]
    assert ov.gt_areas.tolist() == [4, 6] and ov.pred_areas.tolist() == [12, 1]
    np.testing.assert_array_equal(ov.intersection_matrix(), [[4, 0], [6, 0]])
    np.testing.assert_allclose(ov.iou_matrix(), [[4 / 12, 0], [6 / 12, 0]])
    assert ov.pair_union.tolist() == [12, 12]


def test_invalid_inputs_are_rejected_with_clear_errors():
    gt = np.zeros((4, 4), np.int32)
    with pytest.raises(TypeError, match="integer"):
        aji(gt.astype(float), gt)
    with pytest.raises(TypeError, match="boolean"):
        aji(gt, gt.astype(bool))
    with pytest.raises(ValueError, match="shapes differ"):
        aji(gt, np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match="negative"):
        aji(gt - 1, gt)
    with pytest.raises(ValueError, match="2-D"):
        aji(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(gt, gt, ["aji", "ajj"])
    with pytest.raises(ValueError, match="variant"):
        aji_counts(gt, gt, variant="aji++")


def test_registry_names_and_result_keys():
    assert list(ALL_METRICS) == ["aji", "aji_plus", "paper_aji", "dice1", "dice2", "pq",
                                 "object_dice", "object_hausdorff", "object_f1"]
    assert metric_keys(["aji", "pq", "dice1"]) == ["aji", "dq", "sq", "pq", "dice1"]
    gt = canvas((4, 8), (1, slice(1, 3), slice(1, 3)))
    assert list(compute_metrics(gt, gt, ["pq", "aji"])) == ["dq", "sq", "pq", "aji"]
    assert pq(gt, gt)._fields == ("dq", "sq", "pq")
    assert set(compute_metrics(gt, gt)) == set(metric_keys())


# --------------------------------------------------------------------------- aggregation


def test_summarize_mean_sample_std_and_groups():
    rows = [
        {"image_id": "a", "organ": "liver", "aji": 0.5, "dice1": 0.7},
        {"image_id": "b", "organ": "liver", "aji": 0.7, "dice1": 0.9},
        {"image_id": "c", "organ": "colon", "aji": 0.6, "dice1": 0.8},
    ]
    summary = summarize(rows, group_key="organ")
    # Overall AJI mean 0.6; deviations -0.1, 0.1, 0 -> sample variance 0.02/2 = 0.01, std 0.1.
    assert summary["mean"]["aji"] == pytest.approx(0.6)
    assert summary["std"]["aji"] == pytest.approx(0.1)
    assert summary["count"] == 3 and set(summary["mean"]) == {"aji", "dice1"}
    liver = summary["groups"]["liver"]
    # Liver: 0.5, 0.7 -> mean 0.6, sample std sqrt(0.02) = 0.1414.
    assert liver["mean"]["aji"] == pytest.approx(0.6) and liver["std"]["aji"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary["groups"]["colon"]["std"]["aji"])  # one image: undefined
    assert summarize(rows, ["dice1"])["mean"] == {"dice1": pytest.approx(0.8)}
    with pytest.raises(KeyError, match="lacks"):
        summarize(rows + [{"image_id": "d", "organ": "colon"}], ["aji"])


def test_summarize_reproduces_the_papers_std_from_its_per_image_values():
    # Table 2 (Proposed, 14 Kumar test images) -> Table 3 reports avg 0.5854 / std 0.0820 for AJI
    # and 0.7936 / 0.0591 for F1: the paper's std is the sample std (ddof=1).
    aji_values = [0.5490, 0.6362, 0.6202, 0.5902, 0.5491, 0.5179, 0.6305, 0.6423, 0.6749, 0.4745,
                  0.4450, 0.4871, 0.6909, 0.6871]
    f1_values = [0.7887, 0.8478, 0.8097, 0.7724, 0.7907, 0.7323, 0.8090, 0.7992, 0.8666, 0.6963,
                 0.7036, 0.7474, 0.8795, 0.8668]
    summary = summarize([{"aji": a, "dice1": f} for a, f in zip(aji_values, f1_values)])
    assert round(summary["mean"]["aji"], 4) == 0.5854 and round(summary["std"]["aji"], 4) == 0.0820
    assert round(summary["mean"]["dice1"], 4) == 0.7936 and round(summary["std"]["dice1"], 4) == 0.0591


def test_pooled_aji_sums_numerators_and_denominators():
    merge_gt = canvas((4, 8), (1, slice(1, 3), slice(1, 3)), (2, slice(1, 3), slice(4, 7)))
    merge_pred = canvas((4, 8), (5, slice(1, 3), slice(1, 7)))
    perfect = canvas((4, 8), (1, slice(0, 2), slice(0, 2)))
    assert aji_counts(merge_gt, merge_pred) == (10, 24)
    assert aji_counts(perfect, perfect) == (4, 4)
    # Pooled: (10 + 4) / (24 + 4) = 0.5, not the mean of 10/24 and 1.
    assert pooled_aji([(merge_gt, merge_pred), (perfect, perfect)]) == 0.5
    assert pooled_aji([(merge_gt, merge_pred)], variant="paper_aji") == 4 / 18
    empty = np.zeros((3, 3), int)
    assert pooled_aji([(empty, empty)]) == 1.0


# --------------------------------------------------------------------------- slow references


def _objects(label_map):
    """{id: (slice box, area)} by plain per-object masks."""
    boxes = {}
    for object_id in np.unique(label_map):
        if object_id == 0:
            continue
        rows, cols = np.nonzero(label_map == object_id)
        boxes[int(object_id)] = ((slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)), rows.size)
    return boxes


def _objects_fast(label_map):
    # Same output as _objects via find_objects on a relabelled map (real maps have ~1,000 nuclei).
    ids = np.unique(label_map)
    ids = ids[ids != 0]
    sequential = np.searchsorted(ids, label_map) + 1
    sequential[label_map == 0] = 0
    result = {}
    for k, box in enumerate(ndimage.find_objects(sequential)):
        result[int(ids[k])] = (box, int((label_map[box] == ids[k]).sum()))
    return result


def reference_aji(gt, pred, variant):
    """AJI, AJI+ or paper AJI straight from the definitions, with exact fractions for IoU."""
    gt_objects = _objects_fast(gt) if gt.size > 10_000 else _objects(gt)
    pred_objects = _objects_fast(pred) if pred.size > 10_000 else _objects(pred)
    pred_list = sorted(pred_objects)
    candidates = {}  # gt id -> [(IoU, intersection, pred id)]
    for gt_id, (box, gt_area) in sorted(gt_objects.items()):
        inside = gt[box] == gt_id
        overlapping = np.unique(pred[box][inside])
        candidates[gt_id] = []
        for pred_id in overlapping[overlapping != 0]:
            intersection = int((inside & (pred[box] == pred_id)).sum())
            union = gt_area + pred_objects[int(pred_id)][1] - intersection
            candidates[gt_id].append((Fraction(intersection, union), intersection, int(pred_id), union))
    picked = []  # (gt id, pred id, intersection, union)
    if variant == "aji":
        for gt_id, options in candidates.items():
            if options:
                best = max(options, key=lambda o: (o[0], o[1], -o[2]))
                picked.append((gt_id, best[2], best[1], best[3]))
    elif variant == "paper_aji":
        used = set()
        for gt_id, options in sorted(candidates.items()):
            for option in sorted(options, key=lambda o: (-o[0], -o[1], o[2])):
                if option[2] not in used:
                    used.add(option[2])
                    picked.append((gt_id, option[2], option[1], option[3]))
                    break
    else:  # aji_plus: Hungarian on the full dense IoU matrix, with HoVer-Net's 1e-6 in the union
        gt_list = sorted(gt_objects)
        iou = np.zeros((len(gt_list), len(pred_list)))
        details = {}
        for row, gt_id in enumerate(gt_list):
            for fraction, intersection, pred_id, union in candidates[gt_id]:
                column = pred_list.index(pred_id)
                iou[row, column] = intersection / (union + 1e-6)
                details[row, column] = (intersection, union)
        for row, column in zip(*linear_sum_assignment(iou, maximize=True)):
            if iou[row, column] > 0:
                picked.append((gt_list[row], pred_list[column], *details[row, column]))
    intersection = sum(p[2] for p in picked)
    union = sum(p[3] for p in picked)
    picked_gt = {p[0] for p in picked}
    picked_pred = {p[1] for p in picked}
    union += sum(area for gt_id, (_, area) in gt_objects.items() if gt_id not in picked_gt)
    union += sum(area for pred_id, (_, area) in pred_objects.items() if pred_id not in picked_pred)
    if not gt_objects and not pred_objects:
        return 1.0
    return intersection / union


def reference_glas(gt, pred):
    """Object Dice, Hausdorff and F1 from the GlaS definitions with per-object masks."""
    gt_ids = [int(i) for i in np.unique(gt) if i]
    pred_ids = [int(i) for i in np.unique(pred) if i]
    if not gt_ids or not pred_ids:
        both_empty = not gt_ids and not pred_ids
        return {"object_dice": float(both_empty), "object_f1": float(both_empty),
                "object_hausdorff": 0.0 if both_empty else math.inf}
    masks = {("g", i): gt == i for i in gt_ids}
    masks.update({("s", j): pred == j for j in pred_ids})
    coords = {key: np.argwhere(mask) for key, mask in masks.items()}

    def hausdorff(a, b):
        return max(directed_hausdorff(coords[a], coords[b])[0], directed_hausdorff(coords[b], coords[a])[0])

    def most_overlapping(own, other_map):
        labels, counts = np.unique(other_map[masks[own]], return_counts=True)
        counts, labels = counts[labels != 0], labels[labels != 0]
        if labels.size == 0:
            return None
        return int(labels[counts == counts.max()].min())  # MATLAB mode: smallest of the tied

    def side(own_tag, own_ids, other_tag, other_ids, other_map):
        total = sum(masks[(own_tag, i)].sum() for i in own_ids)
        dice_sum = hausdorff_sum = 0.0
        for i in own_ids:
            own = (own_tag, i)
            weight = masks[own].sum() / total
            partner = most_overlapping(own, other_map)
            if partner is None:
                distances = [hausdorff(own, (other_tag, j)) for j in other_ids]
                hausdorff_sum += weight * min(distances)  # first minimum = smallest id
            else:
                other = (other_tag, partner)
                both = (masks[own] & masks[other]).sum()
                dice_sum += weight * 2 * both / (masks[own].sum() + masks[other].sum())
                hausdorff_sum += weight * hausdorff(own, other)
        return dice_sum, hausdorff_sum

    gt_dice, gt_hausdorff = side("g", gt_ids, "s", pred_ids, pred)
    pred_dice, pred_hausdorff = side("s", pred_ids, "g", gt_ids, gt)
    true_positives = 0
    for j in pred_ids:
        partner = most_overlapping(("s", j), gt)
        if partner is None:
            continue
        partner_mask = masks[("g", partner)]
        if 2 * (masks[("s", j)] & partner_mask).sum() > partner_mask.sum():
            true_positives += 1
    return {"object_dice": (gt_dice + pred_dice) / 2, "object_hausdorff": (gt_hausdorff + pred_hausdorff) / 2,
            "object_f1": 2 * true_positives / (len(gt_ids) + len(pred_ids))}


# Perturbations of a ground truth into plausible predictions.


def eroded(label_map):
    return np.where(find_boundaries(label_map, mode="inner"), 0, label_map)


def merged(label_map):
    """Merge disjoint pairs of touching (within 2 px) nuclei into one id."""
    grown = expand_labels(label_map, 1)
    right = grown[:, :-1], grown[:, 1:]
    down = grown[:-1, :], grown[1:, :]
    pairs = set()
    for a, b in (right, down):
        touching = (a != b) & (a > 0) & (b > 0)
        pairs.update(zip(np.minimum(a, b)[touching].tolist(), np.maximum(a, b)[touching].tolist()))
    result, used = label_map.copy(), set()
    for a, b in sorted(pairs):
        if a not in used and b not in used:
            used.update((a, b))
            result[label_map == b] = a
    return result


def split(label_map):
    """Split every nucleus of >= 30 px at its centroid column (left part keeps the id)."""
    result = label_map.copy()
    next_id = int(label_map.max()) + 1
    for k, box in enumerate(ndimage.find_objects(label_map)):
        if box is None:
            continue
        rows, cols = np.nonzero(label_map[box] == k + 1)
        if rows.size < 30:
            continue
        right = cols > cols.mean()
        result[box][rows[right], cols[right]] = next_id
        next_id += 1
    return result


def sequential(label_map):
    """Relabel to 1..n in id order (0 stays background)."""
    ids, inverse = np.unique(label_map, return_inverse=True)
    inverse = inverse.reshape(label_map.shape)
    return inverse if ids[0] == 0 else inverse + 1


def synthetic_label_map(seed=0, size=300, count=120):
    """Crowded, touching and occluding elliptic nuclei, as a real H&E label map."""
    rng = np.random.default_rng(seed)
    label_map = np.zeros((size, size), np.int64)
    for nucleus_id in range(1, count + 1):
        rows, cols = ellipse(*rng.uniform(0, size, 2), *rng.uniform(4, 11, 2), shape=label_map.shape,
                             rotation=rng.uniform(0, np.pi))
        label_map[rows, cols] = nucleus_id
    return sequential(label_map)


def _kumar(index):
    if not KUMAR_LABELS:
        pytest.skip("../shared/data/kumar/labels absent")
    from skimage.io import imread

    return sequential(imread(KUMAR_LABELS[index]).astype(np.int64))


def _tnbc(index):
    if not TNBC_GT:
        pytest.skip("../shared/data/tnbc absent")
    from skimage.io import imread
    from skimage.measure import label

    binary = imread(TNBC_GT[index])
    binary = binary[..., 0] if binary.ndim == 3 else binary
    return label(binary > 0, connectivity=1)  # the data set's instances: 4-connected components


PERTURBATIONS = {"eroded": eroded, "merged": merged, "split": split,
                 "shifted": lambda m: np.roll(m, (1, 2), axis=(0, 1))}


def _check_aji_against_reference(gt):
    for name, perturb in PERTURBATIONS.items():
        pred = perturb(gt)
        for variant, function in (("aji", aji), ("aji_plus", aji_plus), ("paper_aji", paper_aji)):
            expected = reference_aji(gt, pred, variant)
            assert function(gt, pred) == pytest.approx(expected, rel=1e-12), (name, variant)
        # Sanity of the perturbations themselves: they do lower AJI.
        assert aji(gt, pred) < 1.0, name


def test_aji_variants_match_reference_on_synthetic_map():
    _check_aji_against_reference(synthetic_label_map())


@pytest.mark.parametrize("index", [0, 16])
def test_aji_variants_match_reference_on_kumar(index):
    _check_aji_against_reference(_kumar(index))


def test_aji_variants_match_reference_on_tnbc():
    _check_aji_against_reference(_tnbc(0))


def _check_glas_against_reference(gt):
    for name, perturb in PERTURBATIONS.items():
        pred = perturb(gt)
        # Drop a few predictions and add an isolated one so unmatched objects occur on both sides.
        pred[np.isin(pred, np.unique(pred)[1::9])] = 0
        pred[-4:, -4:] = pred.max() + 1
        got = compute_metrics(gt, pred, ["object_dice", "object_hausdorff", "object_f1"])
        expected = reference_glas(gt, pred)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-12), (name, key)


def test_glas_metrics_match_reference_on_synthetic_map():
    _check_glas_against_reference(synthetic_label_map(seed=1, size=160, count=50))


def test_glas_metrics_match_reference_on_kumar_crop():
    _check_glas_against_reference(sequential(_kumar(3)[300:460, 500:660]))


# --------------------------------------------------------------------------- property tests

small_maps = st.integers(2, 7).flatmap(
    lambda h: st.integers(2, 7).flatmap(
        lambda w: st.tuples(*(hnp.arrays(np.int64, (h, w), elements=st.integers(0, 4)) for _ in range(2)))
    )
)


def _relabel(label_map, new_ids):
    """Map the i-th smallest nonzero id of ``label_map`` to ``new_ids[i]``."""
    ids = np.unique(label_map)
    ids = ids[ids != 0]
    result = np.zeros(label_map.shape, np.int64)
    for old, new in zip(ids, new_ids):
        result[label_map == old] = new
    return result


@settings(max_examples=150, deadline=None)
@given(small_maps)
def test_pairwise_overlap_matches_brute_force(maps):
    gt, pred = maps
    ov = pairwise_overlap(gt, pred)
    gt_ids, pred_ids = np.unique(gt[gt > 0]), np.unique(pred[pred > 0])
    assert ov.gt_ids.tolist() == gt_ids.tolist() and ov.pred_ids.tolist() == pred_ids.tolist()
    expected = np.array([[np.sum((gt == g) & (pred == p)) for p in pred_ids] for g in gt_ids]).reshape(
        gt_ids.size, pred_ids.size)
    np.testing.assert_array_equal(ov.intersection_matrix(), expected)
    assert ov.gt_areas.tolist() == [int(np.sum(gt == g)) for g in gt_ids]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_maps)
def test_metrics_match_slow_references_on_random_maps(maps):
    gt, pred = maps
    got = compute_metrics(gt, pred)
    assert got["aji"] == pytest.approx(reference_aji(gt, pred, "aji"), rel=1e-12)
    assert got["paper_aji"] == pytest.approx(reference_aji(gt, pred, "paper_aji"), rel=1e-12)
    # AJI+ (an optimal one-to-one assignment) is defined regardless of ties only where the optimum is unique.
    if _unique_assignment(_aji_plus_weights(pairwise_overlap(gt, pred))):
        assert got["aji_plus"] == pytest.approx(reference_aji(gt, pred, "aji_plus"), rel=1e-12)
    for key, value in reference_glas(gt, pred).items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


@settings(max_examples=150, deadline=None)
@given(small_maps, st.data())
def test_order_preserving_relabelling_changes_no_metric(maps, data):
    # Ids may become huge and gappy; their order is kept, so even the order-dependent paper AJI
    # and every id tie-break are unchanged: all values identical.
    gt, pred = maps
    new_ids = [sorted(data.draw(st.lists(st.integers(1, 2**62), min_size=5, max_size=5, unique=True)))
               for _ in range(2)]
    assert compute_metrics(_relabel(gt, new_ids[0]), _relabel(pred, new_ids[1])) == compute_metrics(gt, pred)


def _unique_argmax_everywhere(matrix, axis):
    """Each row (axis=1) / column (axis=0) with a positive entry has exactly one maximum."""
    if matrix.size == 0:
        return True
    best = matrix.max(axis=axis, keepdims=True)
    return bool(np.all(((matrix == best) & (best > 0)).sum(axis=axis) <= 1))


def _aji_plus_weights(ov):
    """The dense matrix AJI+'s solver maximises: HoVer-Net's intersection / (union + 1e-6)."""
    inter = ov.intersection_matrix().astype(float)
    union = ov.gt_areas[:, None] + ov.pred_areas[None, :] - inter
    return inter / (union + 1e-6)


def _unique_assignment(iou):
    if iou.size == 0:
        return True
    rows, cols = linear_sum_assignment(iou, maximize=True)
    optimum = iou[rows, cols].sum()
    for r, c in zip(rows, cols):
        if iou[r, c] > 0:
            forbidden = iou.copy()
            forbidden[r, c] = -1e9
            alt_rows, alt_cols = linear_sum_assignment(forbidden, maximize=True)
            if forbidden[alt_rows, alt_cols].sum() >= optimum - 1e-12:
                return False
    return True


def _tie_free_metrics(gt, pred):
    """Metrics whose value cannot depend on id order for this pair of maps (no exact ties)."""
    ov = pairwise_overlap(gt, pred)
    keys = {"dice1", "dice2", "dq", "sq", "pq"}
    iou, inter = ov.iou_matrix(), ov.intersection_matrix()
    # AJI ranks by (IoU, intersection): a unique best per gt row makes the choice id-free.
    ranked = iou + inter * 1e-9
    if _unique_argmax_everywhere(ranked, axis=1):
        keys.add("aji")
    if _unique_assignment(_aji_plus_weights(ov)):
        keys.add("aji_plus")
    if _unique_argmax_everywhere(inter, 1) and _unique_argmax_everywhere(inter, 0):
        keys.update({"object_dice", "object_f1"})
        gt_ids, pred_ids = ov.gt_ids, ov.pred_ids
        if gt_ids.size and pred_ids.size:
            h = np.array([[max(directed_hausdorff(np.argwhere(gt == g), np.argwhere(pred == p))[0],
                                directed_hausdorff(np.argwhere(pred == p), np.argwhere(gt == g))[0])
                           for p in pred_ids] for g in gt_ids])
            lonely_gt = inter.sum(axis=1) == 0
            lonely_pred = inter.sum(axis=0) == 0
            nearest_unique = all(np.sum(row == row.min()) == 1 for row in h[lonely_gt]) and all(
                np.sum(col == col.min()) == 1 for col in h.T[lonely_pred])
            if nearest_unique:
                keys.add("object_hausdorff")
        else:
            keys.add("object_hausdorff")
    return keys


@settings(max_examples=200, deadline=None)
@given(small_maps, st.permutations(range(1, 6)), st.permutations(range(1, 6)))
def test_any_relabelling_changes_no_metric_without_ties(maps, gt_order, pred_order):
    # Any permutation of ids leaves Dice1, Dice2 and PQ unchanged, and every other metric too
    # unless an exact tie is resolved by id (paper AJI is order-dependent by definition).
    gt, pred = maps
    before = compute_metrics(gt, pred)
    after = compute_metrics(_relabel(gt, [i * 70001 for i in gt_order]), _relabel(pred, list(pred_order)))
    for key in sorted(_tie_free_metrics(gt, pred)):
        event(f"compared {key}")
        assert after[key] == pytest.approx(before[key], rel=1e-12, abs=0), key


def test_relabelling_invariance_on_a_realistic_map_without_ties():
    # Always-run deterministic twin of the property test above, with every metric involved.
    gt = synthetic_label_map(seed=2, size=120, count=30)
    pred = split(np.roll(gt, (1, 1), axis=(0, 1)))
    rng = np.random.default_rng(0)
    before = compute_metrics(gt, pred)
    shuffled_gt = _relabel(gt, rng.permutation(np.arange(1, gt.max() + 1)) * 100003)
    shuffled_pred = _relabel(pred, rng.permutation(np.arange(1, pred.max() + 1)) + 70000)
    after = compute_metrics(shuffled_gt, shuffled_pred)
    for key in metric_keys():
        if key != "paper_aji":
            assert after[key] == pytest.approx(before[key], rel=1e-12), key


@settings(max_examples=200, deadline=None)
@given(small_maps)
def test_symmetric_metrics_do_not_change_when_gt_and_pred_swap(maps):
    gt, pred = maps
    forward, backward = compute_metrics(gt, pred), compute_metrics(pred, gt)
    for key in ("dice1", "dice2", "dq", "sq", "pq", "object_dice", "object_hausdorff"):
        assert forward[key] == backward[key], key


# --------------------------------------------------------------------------- cellseg-metrics


def _cellseg_style_aji(gt, pred):
    """cellseg-metrics' AJI rule on our table: every prediction of *maximal intersection* (all ties)."""
    ov = pairwise_overlap(gt, pred)
    inter = ov.intersection_matrix()
    union = ov.gt_areas[:, None] + ov.pred_areas[None, :] - inter
    matches = (inter == inter.max(axis=1, keepdims=True)) & (inter > 0)
    total_union = union[matches].sum() + ov.gt_areas[~matches.any(1)].sum() + ov.pred_areas[~matches.any(0)].sum()
    return inter[matches].sum() / total_union


def test_cellseg_metrics_agrees_on_pq_and_dice2_and_relates_on_aji():
    cellseg = pytest.importorskip("cellseg_metrics")
    maps = [synthetic_label_map(seed=3, size=160, count=50)]
    if KUMAR_LABELS:
        maps += [_kumar(5)[:256, :256], _kumar(20)[500:756, 300:556]]
    for gt in maps:
        for name, perturb in PERTURBATIONS.items():
            pred = perturb(gt)
            ours = pq(gt, pred)
            theirs = cellseg.panoptic_quality(gt, pred)
            for key in ("dq", "sq", "pq"):
                assert getattr(ours, key) == pytest.approx(theirs[key], rel=1e-6), (name, key)
            assert dice2(gt, pred) == pytest.approx(cellseg.dice2(gt, pred), rel=1e-6), name
            # Their AJI matches each gt nucleus to the prediction(s) of largest *intersection*
            # (all tied ones), ours to the largest IoU. Their value is reproduced exactly by that
            # rule on our table, and equals our AJI wherever both rules pick the same prediction.
            their_aji = cellseg.aggregated_jaccard_index(gt, pred)
            assert their_aji == pytest.approx(_cellseg_style_aji(gt, pred), rel=1e-6), name
            ov = pairwise_overlap(gt, pred)
            inter, iou = ov.intersection_matrix(), ov.iou_matrix()
            overlapping = inter.max(axis=1) > 0
            same_choice = _unique_argmax_everywhere(inter, axis=1) and np.array_equal(
                inter.argmax(1)[overlapping], iou.argmax(1)[overlapping])
            if same_choice:
                assert aji(gt, pred) == pytest.approx(their_aji, rel=1e-6), name


def test_cellseg_aji_differs_where_max_intersection_is_not_max_iou():
    cellseg = pytest.importorskip("cellseg_metrics")
    # G = rows 0-1 x cols 0-4 (10 px). P1 = rows 0-1 x cols 0-2 (6 px of G) plus rows 2-5 x
    # cols 0-5 (24 px outside): |P1| 30, IoU 6/34. P2 = rows 0-1 x cols 3-4 (4 px, inside G):
    # IoU 4/10. Max intersection picks P1: 6 / (34 + |P2| 4) = 6/38. Max IoU picks P2:
    # 4 / (10 + |P1| 30) = 4/40.
    gt = canvas((6, 6), (1, slice(0, 2), slice(0, 5)))
    pred = canvas((6, 6), (1, slice(2, 6), slice(0, 6)), (1, slice(0, 2), slice(0, 3)),
                  (2, slice(0, 2), slice(3, 5)))
    assert aji(gt, pred) == 4 / 40
    assert cellseg.aggregated_jaccard_index(gt, pred) == pytest.approx(6 / 38, rel=1e-6)

"""instances_to_label_map: score threshold, painting order and the overlap rule, by hand."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from nucseg_d2.modeling.postprocess import instances_to_label_map, label_map_dtype


def _full_mask_instances(masks, scores, size=(10, 10)):
    inst = Instances(size)
    inst.pred_masks = torch.tensor(np.stack(masks))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
    return inst


def _square(y0, y1, x0, x1, size=(10, 10)):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_ids_follow_descending_score_and_low_scores_are_dropped():
    a, b, c = _square(0, 3, 0, 3), _square(5, 8, 5, 8), _square(0, 2, 7, 9)
    lm = instances_to_label_map(_full_mask_instances([a, b, c], [0.6, 0.9, 0.4]))
    assert lm[6, 6] == 1  # score 0.9 painted first
    assert lm[1, 1] == 2
    assert lm[0, 8] == 0  # score 0.4 <= 0.5
    assert set(np.unique(lm)) == {0, 1, 2}


def test_overlap_rule_keeps_uncovered_part_or_drops_mostly_covered_mask():
    top = _square(0, 4, 0, 4)  # 16 px, score 0.9
    partly = _square(0, 4, 2, 6)  # 16 px, 8 covered (50% <= 70%): keeps its 8 free pixels
    mostly = _square(0, 4, 0, 5)  # 20 px, 16 covered (80% > 70%): dropped
    lm = instances_to_label_map(_full_mask_instances([top, partly, mostly], [0.9, 0.8, 0.7]))
    assert (lm == 1).sum() == 16
    assert (lm == 2).sum() == 8 and (lm[0:4, 4:6] == 2).all()
    assert lm.max() == 2


@pytest.mark.parametrize("max_overlap", [0.3, 0.7])
def test_a_mask_covered_exactly_at_the_limit_is_kept(max_overlap):
    # "Dropped when covered by *more than* max_overlap": 3 (or 7) of 10 px covered is kept, one
    # pixel more is dropped. In floats 1 - 7/10 = 0.30000000000000004 > 0.3 dropped it.
    covered = round(max_overlap * 10)
    for top_width, kept in ((covered, True), (covered + 1, False)):
        top = _square(0, 1, 0, top_width)
        row = _square(0, 1, 0, 10)
        lm = instances_to_label_map(_full_mask_instances([top, row], [0.9, 0.8]), max_overlap=max_overlap)
        assert ((lm == 2).sum() == 10 - top_width) if kept else (lm.max() == 1), (max_overlap, top_width)


def test_fully_covered_mask_leaves_no_gap_in_ids():
    top = _square(0, 4, 0, 4)
    inside = _square(1, 3, 1, 3)
    other = _square(6, 9, 6, 9)
    lm = instances_to_label_map(
        _full_mask_instances([top, inside, other], [0.9, 0.8, 0.7]), max_overlap=1.0
    )
    # "inside" has no pixel left under "top": it is dropped and "other" takes id 2, not 3.
    assert sorted(np.unique(lm)) == [0, 1, 2]
    assert (lm[0:4, 0:4] == 1).all() and (lm[6:9, 6:9] == 2).all() and (lm > 0).sum() == 16 + 9


def test_box_relative_probabilities_paste_into_their_box():
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(torch.tensor([[5.0, 2.0, 15.0, 8.0]]))  # wide box: 10 x 6
    inst.scores = torch.tensor([0.9])
    inst.pred_mask_probs = torch.ones(1, 1, 28, 28)
    lm = instances_to_label_map(inst)
    ys, xs = np.nonzero(lm)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (2, 7, 5, 14)
    assert (lm > 0).sum() == 60


def test_empty_instances_give_empty_map():
    inst = Instances((7, 9))
    inst.scores = torch.zeros(0)
    inst.pred_masks = torch.zeros(0, 7, 9, dtype=torch.bool)
    lm = instances_to_label_map(inst)
    assert lm.shape == (7, 9) and lm.max() == 0


def test_missing_masks_is_an_error():
    inst = Instances((4, 4))
    inst.scores = torch.tensor([0.9])
    with pytest.raises(ValueError, match="pred_masks"):
        instances_to_label_map(inst)


def test_label_map_dtype_grows_past_uint16():
    assert label_map_dtype(65535) == np.uint16
    assert label_map_dtype(65536) == np.uint32

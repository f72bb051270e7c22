"""Tiling pieces by hand: the grid, core ownership, the bit-packed store, TTA inversion, merging."""
import errno
import os
import re

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from nucseg_d2.modeling.postprocess import instances_to_label_map
from nucseg_d2.predict.tiling import (
    TTA_TRANSFORMS,
    DetectionStore,
    TileDetections,
    detections_from_instances,
    invert_detections,
    merge_by_mask_iou,
    open_label_map_file,
    tile_grid,
    tile_starts,
    transform_image,
)


@pytest.mark.parametrize("length,tile,overlap", [(100, 256, 32), (256, 256, 32), (300, 256, 32),
                                                 (1000, 256, 64), (1000, 300, 100), (517, 128, 0)])
def test_tiles_cover_the_axis_at_full_size_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    ends = [min(s + tile, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    assert all(e - s == min(tile, length) for s, e in zip(starts, ends))
    assert all(ends[i] - starts[i + 1] >= overlap for i in range(len(starts) - 1))


@pytest.mark.parametrize("height,width,tile,overlap", [(700, 517, 256, 64), (300, 1000, 300, 100),
                                                       (90, 120, 256, 32)])
def test_cores_partition_the_image_and_keep_half_the_overlap_from_interior_borders(height, width,
                                                                                    tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    owners = np.zeros((height, width), int)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    for t in tiles:
        cy0, cy1, cx0, cx1 = t.core
        owners += (ys >= cy0) & (ys < cy1) & (xs >= cx0) & (xs < cx1)
        # An interior core edge is at least overlap / 2 inside the tile.
        if np.isfinite(cy0):
            assert cy0 - t.y0 >= overlap / 2
        if np.isfinite(cy1):
            assert t.y1 - cy1 >= overlap / 2
        if np.isfinite(cx0):
            assert cx0 - t.x0 >= overlap / 2
        if np.isfinite(cx1):
            assert t.x1 - cx1 >= overlap / 2
    assert (owners == 1).all()


def _instances(masks, scores, size):
    """Full-image pred_masks instances with their tight boxes."""
    inst = Instances(size)
    masks = np.stack(masks)
    boxes = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    inst.pred_masks = torch.from_numpy(masks)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    return inst


def _disk(size, cy, cx, r):
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r


def test_store_of_one_whole_tile_paints_exactly_like_instances_to_label_map():
    size = (60, 80)
    rng = np.random.default_rng(0)
    masks = [_disk(size, *rng.uniform(5, 55, 2), rng.uniform(3, 12)) for _ in range(25)]
    scores = rng.uniform(0.3, 1.0, 25)
    inst = _instances(masks, scores, size)
    expected = instances_to_label_map(inst, score_thresh=0.5, max_overlap=0.7)
    store = DetectionStore()
    (tile,) = tile_grid(*size, tile_size=128, overlap=16)
    dets = detections_from_instances(inst, *size, score_thresh=0.5, mask_thresh=0.5)
    assert store.add(dets, tile) == int((scores > 0.5).sum())
    label_map, kept_scores = store.paint(*size, max_overlap=0.7)
    assert label_map.dtype == np.uint16
    np.testing.assert_array_equal(label_map, expected)
    # scores[i - 1] is the score of id i, descending.
    assert len(kept_scores) == label_map.max()
    assert (np.diff(kept_scores) <= 0).all()
    assert np.isin(kept_scores, scores[scores > 0.5].astype(np.float32)).all()


def test_store_paints_into_a_memory_mapped_file_exactly_as_into_memory(tmp_path):
    left, right = tile_grid(100, 200, tile_size=120, overlap=40)
    store = DetectionStore()
    store.add(TileDetections.concatenate([_square_det(20, score=0.6), _square_det(60, 45, 30, 0.8)]), left)
    store.add(_square_det(150 - right.x0), right)
    in_memory, scores = store.paint(100, 200, max_overlap=0.7)
    path = str(tmp_path / "labels.npy")
    mapped, mapped_scores = store.paint(100, 200, max_overlap=0.7, label_map_file=path)
    assert isinstance(mapped, np.memmap) and in_memory.max() == 3
    np.testing.assert_array_equal(mapped, in_memory)
    np.testing.assert_array_equal(mapped_scores, scores)
    mapped.flush()
    np.testing.assert_array_equal(np.load(path), in_memory)  # a plain .npy file


def test_a_label_map_file_without_room_on_disk_is_a_clear_error_and_removed(tmp_path, monkeypatch):
    # Without the space reserved, painting into the map would end the process with SIGBUS.
    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", disk_full, raising=False)
    path = tmp_path / "labels.npy"
    with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path))}: no room for a 3000x2000 label map on disk "
                                      r"\(0.02 GiB needed, [\d.]+ GiB free\)") as caught:
        open_label_map_file(str(path), 2000, 3000, np.uint32)
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_a_file_system_that_cannot_reserve_space_still_gets_its_label_map(tmp_path, monkeypatch):
    def cannot_reserve(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", cannot_reserve, raising=False)
    with pytest.warns(UserWarning, match="disk space for the label map not reserved"):
        label_map = open_label_map_file(str(tmp_path / "labels.npy"), 20, 30, np.uint16)
    label_map[3, 4] = 7
    assert label_map.shape == (20, 30) and label_map.sum() == 7


def _square_det(x0, y0=40, side=10, score=0.9):
    """One side x side square detection at tile-local (x0, y0)."""
    return TileDetections(np.array([score], np.float32),
                          np.array([[x0, y0, x0 + side, y0 + side]], np.float32),
                          [(np.ones((side, side), bool), y0, x0)])


def test_store_keeps_detections_centred_in_the_expanded_core_only():
    tiles = tile_grid(100, 200, tile_size=120, overlap=40)
    left, right = tiles  # cores split at x = 100, grown by overlap / 4 = 10 px
    assert left.expanded_core()[3] == 110 and right.expanded_core()[2] == 90
    assert left.private_area() == (0, 100, 0, 80) and right.private_area() == (0, 100, 120, 200)
    store = DetectionStore()
    assert store.add(_square_det(20), left) == 1  # centre x = 25
    assert store.add(_square_det(106), left) == 0  # centre x = 111: beyond the expanded core
    assert store.add(_square_det(83 - right.x0), right) == 0  # centre x = 88
    assert store.add(_square_det(150 - right.x0), right) == 1
    label_map, scores = store.paint(100, 200, max_overlap=0.7)
    assert label_map.max() == 2 and len(scores) == 2 and len(store) == 2


@pytest.mark.parametrize("left_x0,right_x0,winner", [
    (96, 93, "left"),  # centres 101 (right core) and 98 (left core): the old rule lost it
    (93, 96, "left"),  # centres 98 and 101: the old rule kept it twice
    (97, 97, "right"), (95, 95, "right"), (98, 99, "right")])  # 95: a tie, higher score
def test_a_nucleus_on_the_cut_is_kept_once_from_the_tile_that_sees_it_farthest_from_its_border(
        left_x0, right_x0, winner):
    """Both tiles see the nucleus, with boxes up to 2 px apart (each centre may lie on the
    other side of the cut): exactly one detection survives, from the tile where its box lies
    farther from that tile's interior edge (ties: the higher score)."""
    left, right = tile_grid(100, 200, tile_size=120, overlap=40)
    store = DetectionStore()
    assert store.add(_square_det(left_x0, score=0.6), left) == 1
    kept_right = store.add(_square_det(right_x0 - right.x0, score=0.9), right)
    assert kept_right == (winner == "right")
    assert len(store) == 1 and store.duplicates_removed == (winner == "right")
    label_map, scores = store.paint(100, 200, max_overlap=0.7)
    x0 = left_x0 if winner == "left" else right_x0
    assert label_map.max() == 1 and (label_map[40:50, x0 : x0 + 10] == 1).all()
    assert label_map.sum() == 100 and scores.tolist() == pytest.approx([0.6 if winner == "left" else 0.9])


def test_a_truncated_piece_loses_to_the_whole_nucleus_and_neighbours_survive():
    left, right = tile_grid(100, 200, tile_size=120, overlap=40)
    store = DetectionStore()
    # Left tile: a nucleus at x 104..124 cut by its edge at 120 (piece 104..120, centre 112: out
    # of the expanded core) and one at 92..108 seen whole (centre 100).
    truncated = TileDetections(np.array([0.99], np.float32), np.array([[104, 10, 120, 30]], np.float32),
                               [(np.ones((20, 16), bool), 10, 104)])
    whole_left = _square_det(92, side=16, score=0.5)
    assert store.add(TileDetections.concatenate([truncated, whole_left]), left) == 1
    # Right tile: the first nucleus whole; the second 2 px off (x 90..106), nearer the right
    # tile's edge (10 px from x = 80 vs 12 px from x = 120): the left copy stays.
    first = TileDetections(np.array([0.7], np.float32), np.array([[24, 10, 44, 30]], np.float32),
                           [(np.ones((20, 20), bool), 10, 24)])
    assert store.add(TileDetections.concatenate([first, _square_det(10, side=16, score=0.95)]), right) == 1
    label_map, scores = store.paint(100, 200, max_overlap=0.7)
    assert label_map.max() == 2 and sorted(scores.tolist()) == pytest.approx([0.5, 0.7])


def test_store_returns_instances_of_the_painted_nuclei():
    (tile,) = tile_grid(60, 80, tile_size=128, overlap=16)
    store = DetectionStore()
    dets = TileDetections.concatenate([_square_det(10, 10, 12, 0.6), _square_det(40, 30, 20, 0.9)])
    dets.classes[:] = [0, 1]
    store.add(dets, tile)
    label_map, scores, instances = store.paint(60, 80, max_overlap=0.7, return_instances=True)
    assert len(instances) == 2 and instances.image_size == (60, 80)
    np.testing.assert_array_equal(instances.scores.numpy(), scores)
    assert scores.tolist() == pytest.approx([0.9, 0.6])
    assert instances.pred_classes.tolist() == [1, 0]
    assert instances.pred_boxes.tensor[0].tolist() == [40, 30, 60, 50]
    assert instances.pred_mask_probs.shape == (2, 1, 28, 28) and (instances.pred_mask_probs == 1).all()
    repainted = instances_to_label_map(instances, score_thresh=0.0)
    np.testing.assert_array_equal(repainted, label_map)


@pytest.mark.parametrize("name", TTA_TRANSFORMS)
def test_tta_inversion_maps_boxes_and_masks_back_to_the_tile(name):
    height, width = 40, 64
    rng = np.random.default_rng(1)
    masks = [_disk((height, width), 10, 15, 6), _disk((height, width), 28, 50, 4) & (rng.random((height, width)) > 0.3)]
    original = detections_from_instances(_instances(masks, [0.9, 0.8], (height, width)),
                                         height, width, 0.5, 0.5)
    seen = [transform_image(m, name) for m in masks]
    view = detections_from_instances(_instances(seen, [0.9, 0.8], seen[0].shape), *seen[0].shape, 0.5, 0.5)
    back = invert_detections(view, name, height, width)
    np.testing.assert_allclose(back.boxes, original.boxes)
    for (m, y, x), (m0, y0, x0) in zip(back.masks, original.masks):
        assert (y, x) == (y0, x0)
        np.testing.assert_array_equal(m, m0)


def test_merge_by_mask_iou_drops_duplicates_and_keeps_neighbours():
    def square(y, x, side, score):
        return TileDetections(np.array([score], np.float32),
                              np.array([[x, y, x + side, y + side]], np.float32),
                              [(np.ones((side, side), bool), y, x)])

    dets = TileDetections.concatenate([
        square(0, 0, 10, 0.7),  # duplicate of the next (IoU 81/119 = 0.68): dropped
        square(1, 1, 10, 0.9),
        square(0, 6, 10, 0.8),  # IoU with the 0.9 one 36/164 = 0.22: kept
        square(30, 30, 5, 0.6),
    ])
    merged = merge_by_mask_iou(dets, 40, 40)
    assert sorted(merged.scores.tolist()) == pytest.approx([0.6, 0.8, 0.9])

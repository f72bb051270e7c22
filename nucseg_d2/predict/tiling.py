"""Tiles, the rule that decides which tile owns a nucleus, and the stitched painting.

An image larger than one tile is cut into overlapping tiles. Every detection has a box centre;
the tiles' *core* regions partition the image (each tile minus half of its overlap with each
neighbour), and a detection is kept only from the tile whose core holds its box centre. A
nucleus narrower than the overlap is therefore decided by the tile in which it lies farthest
from the border, where the model saw it whole. Kept detections are stored as bit-packed binary
crops (≈ 1/8 byte per pixel of their box) and painted once, globally, in descending score order
with the same overlap rules as :func:`~nucseg_d2.modeling.postprocess.instances_to_label_map`.
"""
import contextlib
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Instances

from ..modeling.postprocess import box_local_masks, label_map_dtype, paint_masks

__all__ = [
    "Tile",
    "tile_grid",
    "tile_starts",
    "TileDetections",
    "detections_from_instances",
    "TTA_TRANSFORMS",
    "transform_image",
    "invert_detections",
    "merge_by_mask_iou",
    "DetectionStore",
]


def tile_starts(length: int, tile_size: int, overlap: int) -> List[int]:
    """Start offsets of tiles of ``tile_size`` covering [0, length) with at least ``overlap``.

    The last tile is aligned with the end, so every tile is full-size when the image is at
    least one tile long (a shorter image is one tile of its own length).
    """
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(f"need tile_size > 0 and 0 <= overlap < tile_size, got {tile_size}, {overlap}")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = int(np.ceil((length - overlap) / stride))
    return sorted({min(i * stride, length - tile_size) for i in range(count)})


def _core_bounds(starts: Sequence[int], tile_size: int, length: int) -> List[Tuple[float, float]]:
    """[low, high) of each tile's core along one axis: cut at the middle of each overlap."""
    ends = [min(s + tile_size, length) for s in starts]
    cuts = [(starts[i + 1] + ends[i]) / 2.0 for i in range(len(starts) - 1)]
    lows = [-np.inf] + cuts
    highs = cuts + [np.inf]  # the outer cores are open so centres on the image edge count
    return list(zip(lows, highs))


@dataclass(frozen=True)
class Tile:
    """One tile: pixel bounds [y0, y1) x [x0, x1) and the core its detections must centre in."""

    y0: int
    y1: int
    x0: int
    x1: int
    core: Tuple[float, float, float, float]  # (y low, y high, x low, x high)

    @property
    def shape(self) -> Tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> List[Tile]:
    """Row-major tiles covering a height x width image; their cores partition the plane."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image is empty ({height}x{width})")
    ys, xs = tile_starts(height, tile_size, overlap), tile_starts(width, tile_size, overlap)
    y_cores, x_cores = _core_bounds(ys, tile_size, height), _core_bounds(xs, tile_size, width)
    return [
        Tile(y0, min(y0 + tile_size, height), x0, min(x0 + tile_size, width), (*yc, *xc))
        for y0, yc in zip(ys, y_cores)
        for x0, xc in zip(xs, x_cores)
    ]


@dataclass
class TileDetections:
    """Detections of one tile in its own pixel frame.

    ``masks[i]`` is (boolean crop, y0, x0): the binarised mask of detection i inside its box.
    """

    scores: np.ndarray  # float32 (N,)
    boxes: np.ndarray  # float32 (N, 4) XYXY
    masks: List[Tuple[np.ndarray, int, int]] = field(default_factory=list)

    def __len__(self):
        return len(self.scores)

    @staticmethod
    def empty() -> "TileDetections":
        return TileDetections(np.zeros(0, np.float32), np.zeros((0, 4), np.float32), [])

    def select(self, keep: np.ndarray) -> "TileDetections":
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep
        return TileDetections(self.scores[keep], self.boxes[keep], [self.masks[i] for i in keep])

    @staticmethod
    def concatenate(parts: Sequence["TileDetections"]) -> "TileDetections":
        if not parts:
            return TileDetections.empty()
        return TileDetections(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            [m for p in parts for m in p.masks],
        )


@contextlib.contextmanager
def single_threaded_torch():
    """Run torch ops on one thread: pasting is thousands of tiny ops, and waking idle intra-op
    threads for each costs far more than the op (10 ms instead of 3 µs on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def detections_from_instances(instances: Instances, height: int, width: int,
                              score_thresh: float, mask_thresh: float) -> TileDetections:
    """Binarise the masks of the detections scoring above ``score_thresh`` (box-local crops)."""
    instances = instances.to("cpu")
    with single_threaded_torch():
        instances = instances[instances.scores > score_thresh]
        if len(instances) == 0:
            return TileDetections.empty()
        masks = [(mask, ys.start, xs.start)
                 for mask, ys, xs in box_local_masks(instances, height, width, mask_thresh)]
    return TileDetections(
        instances.scores.float().numpy(),
        instances.pred_boxes.tensor.float().numpy().reshape(-1, 4),
        masks,
    )


# ------------------------------------------------------------------------ test-time augmentation
# Each transform maps the tile to the image the model sees; invert_detections maps back.
TTA_TRANSFORMS = ("identity", "hflip", "vflip", "rot90")


def transform_image(image: np.ndarray, name: str) -> np.ndarray:
    """The tile as seen under transform ``name`` (rot90 is counter-clockwise, as np.rot90)."""
    if name == "identity":
        return image
    if name == "hflip":
        return image[:, ::-1]
    if name == "vflip":
        return image[::-1]
    if name == "rot90":
        return np.rot90(image)
    raise ValueError(f"unknown TTA transform {name!r}; known: {TTA_TRANSFORMS}")


def invert_detections(dets: TileDetections, name: str, height: int, width: int) -> TileDetections:
    """Map detections made on ``transform_image(tile, name)`` back to the (height, width) tile."""
    if name == "identity" or len(dets) == 0:
        return dets
    x0, y0, x1, y1 = dets.boxes.T
    masks = []
    if name == "hflip":
        boxes = np.stack([width - x1, y0, width - x0, y1], axis=1)
        for mask, my, mx in dets.masks:
            masks.append((mask[:, ::-1], my, width - mx - mask.shape[1]))
    elif name == "vflip":
        boxes = np.stack([x0, height - y1, x1, height - y0], axis=1)
        for mask, my, mx in dets.masks:
            masks.append((mask[::-1], height - my - mask.shape[0], mx))
    elif name == "rot90":
        # Rotated pixel (i, j) is original (j, width - 1 - i): original x = width - y', y = x'.
        boxes = np.stack([width - y1, x0, width - y0, x1], axis=1)
        for mask, my, mx in dets.masks:
            masks.append((np.rot90(mask, -1), mx, width - my - mask.shape[0]))
    else:
        raise ValueError(f"unknown TTA transform {name!r}; known: {TTA_TRANSFORMS}")
    masks = [(np.ascontiguousarray(m), int(my), int(mx)) for m, my, mx in masks]
    return TileDetections(dets.scores, boxes.astype(np.float32), masks)


def merge_by_mask_iou(dets: TileDetections, height: int, width: int,
                      iou_thresh: float = 0.5) -> TileDetections:
    """Greedy mask NMS: keep detections by descending score, drop those with mask IoU > thresh.

    Overlaps are counted against an owner map (each pixel belongs to the first kept mask that
    covers it), so the cost is linear in mask area rather than quadratic in detections.
    """
    if len(dets) == 0:
        return dets
    order = np.argsort(-dets.scores, kind="stable")
    owner = np.full((height, width), -1, dtype=np.int32)
    kept_areas: List[int] = []
    kept: List[int] = []
    for index in order:
        mask, my, mx = dets.masks[index]
        area = int(mask.sum())
        if area == 0:
            continue
        region = owner[my : my + mask.shape[0], mx : mx + mask.shape[1]]
        owners, counts = np.unique(region[mask], return_counts=True)
        duplicate = False
        for k, inter in zip(owners, counts):
            if k >= 0 and inter / (area + kept_areas[k] - inter) > iou_thresh:
                duplicate = True
                break
        if duplicate:
            continue
        region[mask & (region < 0)] = len(kept)
        kept.append(index)
        kept_areas.append(area)
    return dets.select(np.asarray(kept, dtype=np.int64))


# ------------------------------------------------------------------------ stitching
class DetectionStore:
    """Detections kept from all tiles, in image coordinates, with bit-packed masks."""

    def __init__(self):
        self._scores: List[np.ndarray] = []
        self._geometry: List[np.ndarray] = []  # (N, 4) int64: y0, x0, height, width
        self._bits: List[np.ndarray] = []  # packed masks of one add(), concatenated
        self._offsets: List[np.ndarray] = []  # (N + 1,) byte offsets into that chunk
        self._count = 0

    def __len__(self):
        return self._count

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for part in (self._scores, self._geometry, self._bits, self._offsets)
                   for a in part)

    def add(self, dets: TileDetections, tile: Tile) -> int:
        """Keep the detections of ``tile`` whose box centre lies in its core; returns how many."""
        if len(dets) == 0:
            return 0
        centre_y = tile.y0 + (dets.boxes[:, 1] + dets.boxes[:, 3]) / 2.0
        centre_x = tile.x0 + (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2.0
        cy0, cy1, cx0, cx1 = tile.core
        keep = np.flatnonzero((centre_y >= cy0) & (centre_y < cy1)
                              & (centre_x >= cx0) & (centre_x < cx1))
        if keep.size == 0:
            return 0
        packed, geometry = [], []
        for i in keep:
            mask, my, mx = dets.masks[i]
            packed.append(np.packbits(mask, axis=None))
            geometry.append((tile.y0 + my, tile.x0 + mx, mask.shape[0], mask.shape[1]))
        self._scores.append(dets.scores[keep].astype(np.float32))
        self._geometry.append(np.asarray(geometry, dtype=np.int64).reshape(-1, 4))
        self._bits.append(np.concatenate(packed))
        self._offsets.append(np.concatenate([[0], np.cumsum([p.size for p in packed])]))
        self._count += keep.size
        return int(keep.size)

    def paint(self, height: int, width: int, max_overlap: float) -> Tuple[np.ndarray, np.ndarray]:
        """(label map, scores): all stored masks painted by descending score, ids 1..N.

        The map is allocated once, in the smallest dtype that holds every stored detection
        (uint16 up to 65,535, else uint32); it is not narrowed afterwards when overlaps left
        fewer ids, since that copy would double the peak memory of a whole slide.
        """
        label_map = np.zeros((height, width), dtype=label_map_dtype(self._count))
        if self._count == 0:
            return label_map, np.zeros(0, np.float32)
        scores = np.concatenate(self._scores)
        chunk_of = np.concatenate([np.full(len(s), c) for c, s in enumerate(self._scores)])
        index_in_chunk = np.concatenate([np.arange(len(s)) for s in self._scores])
        order = np.argsort(-scores, kind="stable")

        def masks_in_order():
            for i in order:
                chunk, j = chunk_of[i], index_in_chunk[i]
                y0, x0, h, w = self._geometry[chunk][j]
                start, end = self._offsets[chunk][j : j + 2]
                mask = np.unpackbits(self._bits[chunk][start:end], count=h * w).reshape(h, w)
                yield mask.view(bool), slice(y0, y0 + h), slice(x0, x0 + w)

        painted = paint_masks(label_map, masks_in_order(), max_overlap)
        painted_scores = scores[order[painted]] if painted else np.zeros(0, np.float32)
        return label_map, painted_scores.astype(np.float32)

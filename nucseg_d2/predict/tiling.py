"""Tiles, the rule that decides which tile owns a nucleus, and the stitched painting.

An image larger than one tile is cut into overlapping tiles. Every detection has a box centre;
the tiles' *core* regions partition the image (each tile minus half of its overlap with each
neighbour). A detection is kept from a tile when its box centre lies in the tile's core grown
by a quarter of the overlap on interior sides, so a nucleus on a cut whose box differs slightly
between the two tiles is kept at least once; where two tiles both keep it (mask IoU > 0.5, or
one mask mostly inside the other), the detection from the tile in which it lies farthest from
the tile's interior borders wins, i.e. the one the model saw whole. Kept detections are stored
as bit-packed binary crops (~1/8 byte per pixel of their box) and painted once, globally, in
descending score order with the same overlap rules as
:func:`~nucseg_d2.modeling.postprocess.instances_to_label_map`.
"""
import contextlib
import errno
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

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
    "open_label_map_file",
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

    def expanded_core(self) -> Tuple[float, float, float, float]:
        """The core grown on each interior side by half its distance to the tile edge, i.e. by a
        quarter of the overlap with that neighbour (outer sides stay open)."""
        cy0, cy1, cx0, cx1 = self.core
        return ((cy0 + self.y0) / 2.0 if np.isfinite(cy0) else cy0,
                (cy1 + self.y1) / 2.0 if np.isfinite(cy1) else cy1,
                (cx0 + self.x0) / 2.0 if np.isfinite(cx0) else cx0,
                (cx1 + self.x1) / 2.0 if np.isfinite(cx1) else cx1)

    def private_area(self) -> Tuple[float, float, float, float]:
        """(y0, y1, x0, x1) of the part of the tile no other tile covers (the neighbour before
        ends at ``2 * cut - start``, the one after starts at ``2 * cut - end``)."""
        cy0, cy1, cx0, cx1 = self.core
        return (2 * cy0 - self.y0 if np.isfinite(cy0) else self.y0,
                2 * cy1 - self.y1 if np.isfinite(cy1) else self.y1,
                2 * cx0 - self.x0 if np.isfinite(cx0) else self.x0,
                2 * cx1 - self.x1 if np.isfinite(cx1) else self.x1)

    def border_distance(self, boxes: np.ndarray) -> np.ndarray:
        """Pixels from each tile-local XYXY box to the nearest interior tile edge (an edge with a
        neighbouring tile; image edges do not count), clipped at 0; 1e9 without such edges."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        cy0, cy1, cx0, cx1 = self.core
        height, width = self.shape
        distance = np.full(len(boxes), 1e9)
        for finite, gap in ((cy0, boxes[:, 1]), (cy1, height - boxes[:, 3]),
                            (cx0, boxes[:, 0]), (cx1, width - boxes[:, 2])):
            if np.isfinite(finite):
                distance = np.minimum(distance, gap)
        return np.maximum(distance, 0.0)


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
    classes: Optional[np.ndarray] = None  # int64 (N,); zeros when not given

    def __post_init__(self):
        if self.classes is None:
            self.classes = np.zeros(len(self.scores), np.int64)

    def __len__(self):
        return len(self.scores)

    @staticmethod
    def empty() -> "TileDetections":
        return TileDetections(np.zeros(0, np.float32), np.zeros((0, 4), np.float32), [])

    def select(self, keep: np.ndarray) -> "TileDetections":
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep
        return TileDetections(self.scores[keep], self.boxes[keep], [self.masks[i] for i in keep],
                              self.classes[keep])

    @staticmethod
    def concatenate(parts: Sequence["TileDetections"]) -> "TileDetections":
        if not parts:
            return TileDetections.empty()
        return TileDetections(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            [m for p in parts for m in p.masks],
            np.concatenate([p.classes for p in parts]),
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
        instances.pred_classes.numpy().astype(np.int64) if instances.has("pred_classes") else None,
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
    return TileDetections(dets.scores, boxes.astype(np.float32), masks, dets.classes)


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
def _duplicate(inter: int, area_a: int, area_b: int, iou_thresh: float, contain_thresh: float) -> bool:
    """Same nucleus: mask IoU above ``iou_thresh``, or one mask lies mostly inside the other
    (a truncated piece of the nucleus that the other tile saw whole)."""
    if inter == 0:
        return False
    return (inter / (area_a + area_b - inter) > iou_thresh
            or inter / max(1, min(area_a, area_b)) > contain_thresh)


def open_label_map_file(path, height: int, width: int, dtype) -> np.memmap:
    """A zeroed (height, width) label map memory-mapped from a new ``.npy`` file at ``path``
    (``np.load(path, mmap_mode="r")`` reads it back), its disk space reserved up front.

    Reserving matters: a write to a mapped page that the disk has no room for kills the process
    (SIGBUS) instead of raising, and with it the outputs of every later input. Where the space is
    not there (ENOSPC, EDQUOT), OSError naming the folder and the sizes, and the file is removed;
    where the file system cannot reserve space, a warning.
    """
    label_map = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(height, width))
    if hasattr(os, "posix_fallocate"):  # Linux and the BSDs; elsewhere (macOS) the file stays sparse
        try:
            with open(path, "r+b") as stream:
                os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                # A file system that cannot reserve (EOPNOTSUPP, EINVAL): painting still works,
                # unprotected against a disk that fills meanwhile.
                warnings.warn(f"{path}: disk space for the label map not reserved ({err.strerror})")
                return label_map
            del label_map
            with contextlib.suppress(OSError):
                os.unlink(path)
            folder = os.path.dirname(os.path.abspath(path))
            need, free = height * width * np.dtype(dtype).itemsize / 2**30, ""
            with contextlib.suppress(OSError):
                free = f", {shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
            raise OSError(err.errno, f"{folder}: no room for a {width}x{height} label map on disk "
                          f"({need:.2f} GiB needed{free}): {err.strerror}") from err
    return label_map


class DetectionStore:
    """Detections kept from all tiles, in image coordinates, with bit-packed masks.

    :meth:`add` keeps the detections of a tile whose box centre lies in its
    :meth:`Tile.expanded_core` (the core grown by a quarter of the overlap on interior sides),
    so a nucleus near a cut whose boxes differ slightly between two tiles is never lost. Where a
    kept detection duplicates one kept from another tile (mask IoU > ``iou_thresh``, or one mask
    covering more than ``contain_thresh`` of the other), only the detection from the tile where
    it lies farthest from the tile's interior borders survives (ties: higher score, then the
    first added): that is the tile that saw the nucleus whole. Only detections whose box reaches
    into an area another tile also covers are indexed for this check.
    """

    _CELL = 64  # px side of the spatial-hash cells used to find candidate duplicates

    def __init__(self, iou_thresh: float = 0.5, contain_thresh: float = 0.8):
        self.iou_thresh, self.contain_thresh = iou_thresh, contain_thresh
        self._scores: List[np.ndarray] = []
        self._classes: List[np.ndarray] = []
        self._boxes: List[np.ndarray] = []  # (N, 4) float32 XYXY, image coordinates
        self._geometry: List[np.ndarray] = []  # (N, 4) int64: y0, x0, height, width
        self._bits: List[np.ndarray] = []  # packed masks of one add(), concatenated
        self._offsets: List[np.ndarray] = []  # (N + 1,) byte offsets into that chunk
        self._alive: List[np.ndarray] = []  # bool (N,): False once beaten by a duplicate
        self._border: List[np.ndarray] = []  # float32 (N,): px to the tile's nearest interior edge
        self._areas: List[np.ndarray] = []  # int64 (N,)
        self._tile_of: List[Tuple[int, int, int, int]] = []  # tile bounds of each chunk
        self._cells: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
        self._count = 0
        self.duplicates_removed = 0

    def __len__(self):
        return self._count

    @property
    def nbytes(self) -> int:
        parts = (self._scores, self._classes, self._boxes, self._geometry, self._bits, self._offsets,
                 self._alive, self._border, self._areas)
        return sum(a.nbytes for part in parts for a in part)

    def _mask(self, chunk: int, j: int) -> np.ndarray:
        _, _, h, w = self._geometry[chunk][j]
        start, end = self._offsets[chunk][j : j + 2]
        return np.unpackbits(self._bits[chunk][start:end], count=h * w).reshape(h, w).view(bool)

    def _cells_of(self, y0, x0, h, w):
        c = self._CELL
        return [(cy, cx) for cy in range(y0 // c, (y0 + max(h, 1) - 1) // c + 1)
                for cx in range(x0 // c, (x0 + max(w, 1) - 1) // c + 1)]

    def add(self, dets: TileDetections, tile: Tile) -> int:
        """Keep the detections of ``tile`` whose box centre lies in its expanded core, resolving
        duplicates with detections of other tiles; returns how many of ``dets`` are kept now."""
        if len(dets) == 0:
            return 0
        centre_y = tile.y0 + (dets.boxes[:, 1] + dets.boxes[:, 3]) / 2.0
        centre_x = tile.x0 + (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2.0
        cy0, cy1, cx0, cx1 = tile.expanded_core()
        keep = np.flatnonzero((centre_y >= cy0) & (centre_y < cy1)
                              & (centre_x >= cx0) & (centre_x < cx1))
        if keep.size == 0:
            return 0
        chunk, tile_key = len(self._scores), (tile.y0, tile.y1, tile.x0, tile.x1)
        py0, py1, px0, px1 = tile.private_area()
        border = tile.border_distance(dets.boxes[keep])
        alive = np.ones(keep.size, bool)
        packed, geometry, areas, shared = [], [], [], []
        for k, i in enumerate(keep):
            mask, my, mx = dets.masks[i]
            y0, x0, h, w = tile.y0 + my, tile.x0 + mx, mask.shape[0], mask.shape[1]
            area = int(mask.sum())
            is_shared = not (py0 <= y0 and y0 + h <= py1 and px0 <= x0 and x0 + w <= px1)
            if is_shared and area:
                alive[k] = self._resolve(mask, y0, x0, area, border[k], dets.scores[i], tile_key)
            packed.append(np.packbits(mask, axis=None))
            geometry.append((y0, x0, h, w))
            areas.append(area)
            shared.append(is_shared)
        boxes = dets.boxes[keep] + np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
        self._scores.append(dets.scores[keep].astype(np.float32))
        self._classes.append(dets.classes[keep].astype(np.int64))
        self._boxes.append(boxes.astype(np.float32))
        self._geometry.append(np.asarray(geometry, dtype=np.int64).reshape(-1, 4))
        self._bits.append(np.concatenate(packed))
        self._offsets.append(np.concatenate([[0], np.cumsum([p.size for p in packed])]))
        self._alive.append(alive)
        self._border.append(border.astype(np.float32))
        self._areas.append(np.asarray(areas, dtype=np.int64))
        self._tile_of.append(tile_key)
        for k in np.flatnonzero(alive & np.asarray(shared)):
            for cell in self._cells_of(*geometry[k]):
                self._cells.setdefault(cell, []).append((chunk, int(k)))
        self._count += int(alive.sum())
        return int(alive.sum())

    def _resolve(self, mask, y0, x0, area, border, score, tile_key) -> bool:
        """Whether a new detection survives its duplicates among other tiles' kept detections;
        the duplicates it beats are removed."""
        h, w = mask.shape
        seen, rivals = set(), []
        for cell in self._cells_of(y0, x0, h, w):
            for chunk, j in self._cells.get(cell, ()):
                if ((chunk, j) in seen or not self._alive[chunk][j]
                        or self._tile_of[chunk] == tile_key):
                    continue
                seen.add((chunk, j))
                oy0, ox0, oh, ow = self._geometry[chunk][j]
                iy0, iy1 = max(y0, oy0), min(y0 + h, oy0 + oh)
                ix0, ix1 = max(x0, ox0), min(x0 + w, ox0 + ow)
                if iy0 >= iy1 or ix0 >= ix1:
                    continue
                other = self._mask(chunk, j)
                inter = int((mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
                             & other[iy0 - oy0 : iy1 - oy0, ix0 - ox0 : ix1 - ox0]).sum())
                if _duplicate(inter, area, int(self._areas[chunk][j]), self.iou_thresh,
                              self.contain_thresh):
                    rivals.append((chunk, j))
        mine = (float(border), float(score))
        for chunk, j in rivals:
            if (float(self._border[chunk][j]), float(self._scores[chunk][j])) >= mine:
                return False  # an earlier tile saw it farther from its border (or ties)
        for chunk, j in rivals:
            self._alive[chunk][j] = False
            self._count -= 1
            self.duplicates_removed += 1
        return True

    def paint(self, height: int, width: int, max_overlap: float,
              return_instances: bool = False, label_map_file: Optional[str] = None):
        """(label map, scores[, instances]): the surviving masks painted by descending score.

        The map is allocated once, in the smallest dtype that holds every stored detection
        (uint16 up to 65,535, else uint32); it is not narrowed afterwards when overlaps left
        fewer ids, since that copy would double the peak memory of a whole slide. With
        ``label_map_file``, the map is a ``np.memmap`` of a new ``.npy`` file there
        (:func:`open_label_map_file`) instead of memory, for maps larger than the RAM; the caller
        removes the file. With ``return_instances``, also the painted detections as Instances
        (index i = id i + 1; see :meth:`_instances`).
        """
        dtype = label_map_dtype(self._count)
        label_map = (np.zeros((height, width), dtype=dtype) if label_map_file is None
                     else open_label_map_file(label_map_file, height, width, dtype))
        empty = np.zeros(0, np.int64)
        if self._count == 0:
            out = (label_map, np.zeros(0, np.float32))
            return out + (self._instances(empty, height, width),) if return_instances else out
        alive = np.concatenate(self._alive)
        scores = np.concatenate(self._scores)
        chunk_of = np.concatenate([np.full(len(s), c) for c, s in enumerate(self._scores)])
        index_in_chunk = np.concatenate([np.arange(len(s)) for s in self._scores])
        order = np.flatnonzero(alive)
        order = order[np.argsort(-scores[order], kind="stable")]

        def masks_in_order():
            for i in order:
                chunk, j = chunk_of[i], index_in_chunk[i]
                y0, x0, h, w = self._geometry[chunk][j]
                yield self._mask(chunk, j), slice(y0, y0 + h), slice(x0, x0 + w)

        painted = paint_masks(label_map, masks_in_order(), max_overlap)
        kept = order[painted] if painted else empty
        painted_scores = scores[kept].astype(np.float32)
        if not return_instances:
            return label_map, painted_scores
        return label_map, painted_scores, self._instances(kept, height, width)

    def _instances(self, kept: np.ndarray, height: int, width: int,
                   mask_size: int = 28) -> Instances:
        """Instances of the detections ``kept`` (global indices): model boxes, scores, classes
        and ``pred_mask_probs`` (N, 1, M, M): each stitched binary mask sampled at M x M points
        of its box (nearest pixel), the compact box-relative format of NucleiRCNN."""
        instances = Instances((height, width))
        if len(kept) == 0:
            instances.pred_boxes = Boxes(torch.zeros(0, 4))
            instances.scores = torch.zeros(0)
            instances.pred_classes = torch.zeros(0, dtype=torch.int64)
            instances.pred_mask_probs = torch.zeros(0, 1, mask_size, mask_size)
            return instances
        boxes = np.concatenate(self._boxes)[kept]
        chunk_of = np.concatenate([np.full(len(s), c) for c, s in enumerate(self._scores)])[kept]
        index_in_chunk = np.concatenate([np.arange(len(s)) for s in self._scores])[kept]
        probs = np.zeros((len(kept), 1, mask_size, mask_size), np.float32)
        steps = (np.arange(mask_size) + 0.5) / mask_size
        for n, (chunk, j) in enumerate(zip(chunk_of, index_in_chunk)):
            y0, x0, h, w = self._geometry[chunk][j]
            mask = self._mask(chunk, j)
            bx0, by0, bx1, by1 = boxes[n]
            rows = np.floor(by0 + steps * (by1 - by0)).astype(np.int64) - y0
            cols = np.floor(bx0 + steps * (bx1 - bx0)).astype(np.int64) - x0
            inside_r, inside_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
            sample = mask[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)]
            probs[n, 0] = sample & inside_r[:, None] & inside_c[None, :]
        instances.pred_boxes = Boxes(torch.from_numpy(boxes))
        instances.scores = torch.from_numpy(np.concatenate(self._scores)[kept])
        instances.pred_classes = torch.from_numpy(np.concatenate(self._classes)[kept])
        instances.pred_mask_probs = torch.from_numpy(probs)
        return instances

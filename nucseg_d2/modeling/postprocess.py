"""Detections -> instance label map, shared by the evaluator and the predictor.

The rules are the defaults of the paper's released code: keep detections scoring above a
threshold, binarise masks, paint in descending score order, drop a mask that is mostly covered by
higher-scoring ones and otherwise keep only its uncovered part.
"""
from fractions import Fraction
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.structures import Instances

__all__ = ["instances_to_label_map", "label_map_dtype", "box_local_masks", "paint_masks"]


def label_map_dtype(num_labels: int):
    """The smallest unsigned dtype that QuPath/napari/Fiji open and that holds ``num_labels`` ids."""
    return np.uint16 if num_labels <= np.iinfo(np.uint16).max else np.uint32


def box_local_masks(instances: Instances, height: int, width: int, mask_thresh: float):
    """Yield (binary mask, y slice, x slice) per instance, each covering only its own box.

    Accepts either full-image ``pred_masks`` (Detectron2's default output) or box-relative mask
    probabilities ``pred_mask_probs`` (N, 1, M, M), which avoids one full-image array per nucleus.
    """
    if instances.has("pred_mask_probs"):
        probs = instances.pred_mask_probs
        boxes = instances.pred_boxes.tensor
        for i in range(len(instances)):
            pasted, (ys, xs) = _do_paste_mask(probs[i : i + 1], boxes[i : i + 1], height, width)
            yield (pasted[0] > mask_thresh).cpu().numpy(), ys, xs
    elif instances.has("pred_masks"):
        masks = instances.pred_masks
        for i in range(len(instances)):
            mask = masks[i]
            mask = (mask > mask_thresh) if mask.dtype.is_floating_point else mask.bool()
            mask = mask.cpu().numpy()
            rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
            if not rows.any():
                yield mask[:0, :0], slice(0, 0), slice(0, 0)
                continue
            y0, y1 = np.flatnonzero(rows)[[0, -1]]
            x0, x1 = np.flatnonzero(cols)[[0, -1]]
            ys, xs = slice(y0, y1 + 1), slice(x0, x1 + 1)
            yield mask[ys, xs], ys, xs
    else:
        raise ValueError("Instances carry neither 'pred_masks' nor 'pred_mask_probs'")


def instances_to_label_map(
    instances: Instances,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    max_overlap: float = 0.7,
    image_size: Optional[tuple] = None,
) -> np.ndarray:
    """Paint predicted instances into an int32 label map (0 = background, ids 1..N by score).

    Args:
        instances: predictions of one image with ``scores`` and ``pred_masks`` or
            ``pred_mask_probs`` + ``pred_boxes``.
        score_thresh: detections with score <= this are ignored.
        mask_thresh: mask probabilities above this are foreground.
        max_overlap: a mask whose area is covered by higher-scoring masks by more than this
            fraction is dropped; otherwise only its uncovered pixels are painted.
        image_size: (height, width); defaults to ``instances.image_size``.
    """
    height, width = image_size if image_size is not None else instances.image_size
    label_map = np.zeros((height, width), dtype=np.int32)
    if len(instances) == 0:
        return label_map
    instances = instances[instances.scores > score_thresh]
    instances = instances[torch.argsort(instances.scores, descending=True, stable=True)]
    paint_masks(label_map, box_local_masks(instances, height, width, mask_thresh), max_overlap)
    return label_map


def paint_masks(
    label_map: np.ndarray, masks: Iterable[Tuple[np.ndarray, slice, slice]], max_overlap: float
) -> List[int]:
    """Paint binary masks, highest priority first, into an all-zero ``label_map`` in place.

    ``masks`` yields (boolean mask, y slice, x slice) with the mask covering
    ``label_map[ys, xs]``. The i-th painted mask gets id i (1, 2, ...). Returns the positions in
    ``masks`` of the painted ones, so callers can map ids back to scores. The tiled predictor
    paints stitched detections with this too, so tiles and whole images follow the same rules.
    """
    # Compared in integers: in floats 1 - 7/10 > 0.3, so a mask exactly 30 % covered was dropped.
    # The limit is taken as the decimal it is written as (0.3 = 3/10, not the nearest binary).
    limit = Fraction(repr(float(max_overlap)))
    painted = []
    for position, (mask, ys, xs) in enumerate(masks):
        area = int(mask.sum())
        if area == 0:
            continue
        region = label_map[ys, xs]
        free = mask & (region == 0)
        free_area = int(free.sum())
        if free_area == 0 or (area - free_area) * limit.denominator > limit.numerator * area:
            continue
        painted.append(position)
        region[free] = len(painted)
    return painted

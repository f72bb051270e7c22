"""Feature fusion of the paper's instance branch (Sec. 3.1, Eq. 1-3), training only.

A 2-channel map F_0 (background / nucleus logits) is made from one FPN level (P2) at input
resolution; the mask logits of every positive ROI are then pasted into it at their regressed
boxes, each REPLACING what lies under its box, and the result F_N is trained with a second
semantic cross-entropy (L_semseg2, :func:`fusion_loss`).

Contract of :meth:`FeatureFusion.forward` (all images of the batch are fused):

* ``feature``: (B, C, h, w), the FPN level named by ``MODEL.NUCSEG.FUSION_IN_FEATURE``.
* ``mask_logits_per_image``: B tensors (R_b, M, M): Detectron2's single foreground logit ``l``
  of each positive ROI for its ground-truth class (gradients flow back into the mask head).
* ``boxes_per_image``: B tensors (R_b, 4), XYXY absolute input-image coordinates: the
  regressed box of each ROI (highest-scoring class). Detached here: boxes get no gradient.
* ``image_size``: (H, W) of the output, the padded batch size (= the sem_seg target size).
* returns F_N: (B, 2, H, W) logits. A pixel is covered by a box when its centre
  (x + 0.5, y + 0.5) lies in [x0, x1) x [y0, y1) (an integer box covers exactly its
  x0..x1-1 columns and y0..y1-1 rows, Eq. 3). Covered pixels hold (0, l_resized), so their
  2-class softmax is sigmoid(l); the others keep F_0.
* Order: ROIs are pasted in ascending index within each image; where boxes overlap the later
  ROI wins (Eq. 2 applied for i = 1..N).

The mask is resized to its box by bilinear sampling at pixel centres with the coordinate
convention of ``detectron2.layers.mask_ops._do_paste_mask`` (``grid_sample``,
``align_corners=False``), but with border clamping instead of zero padding because the values
are logits (0 would mean p = 0.5 at the box edge). Instead of N sequential full-size writes,
a "last writer wins" index map is computed first (memory O(H*W) plus a bounded chunk of box
areas), then every covered pixel is sampled once from its winning ROI: gradients are exactly
those of the sequential replacement, and memory does not grow with the number of ROIs.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import nn

from .losses import mean_cross_entropy

__all__ = [
    "FeatureFusion",
    "build_feature_fusion",
    "fusion_loss",
    "box_pixel_ranges",
    "last_writer_index_map",
    "paste_mask_logits",
]

# Upper bound on the number of (box pixel) entries scattered at once when building the
# winner map; early in training regressed boxes can be huge and ~1000 of them overlap.
_MAX_SCATTER_ENTRIES = 1 << 22


def box_pixel_ranges(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer pixel ranges (R, 4) = (col0, row0, col1, row1), end-exclusive, clipped to the map.

    Pixel column c is inside [x0, x1) when its centre c + 0.5 is, i.e.
    ceil(x0 - 0.5) <= c < ceil(x1 - 0.5). Empty boxes give col1 <= col0 or row1 <= row0.
    """
    ranges = torch.ceil(boxes - 0.5).to(torch.int64)
    ranges[:, 0::2] = ranges[:, 0::2].clamp(0, width)
    ranges[:, 1::2] = ranges[:, 1::2].clamp(0, height)
    return ranges


def last_writer_index_map(pixel_ranges: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H*W,) int64: index of the last ROI (highest index) whose range covers each pixel, else -1.

    Scatter-max of ROI indices over the pixels of each range, in chunks of at most
    ``_MAX_SCATTER_ENTRIES`` entries (max is associative, so chunking does not change the result).
    """
    device = pixel_ranges.device
    winner = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    range_widths = (pixel_ranges[:, 2] - pixel_ranges[:, 0]).clamp(min=0)
    range_heights = (pixel_ranges[:, 3] - pixel_ranges[:, 1]).clamp(min=0)
    areas = range_widths * range_heights
    areas_list = areas.tolist()  # one host sync, to size the chunks
    start = 0
    while start < len(areas_list):
        end, total = start, 0
        while end < len(areas_list) and (end == start or total + areas_list[end] <= _MAX_SCATTER_ENTRIES):
            total += areas_list[end]
            end += 1
        if total > 0:
            chunk_areas = areas[start:end]
            roi_of_entry = torch.repeat_interleave(torch.arange(start, end, device=device), chunk_areas)
            first_entry = torch.cumsum(chunk_areas, 0) - chunk_areas
            offset = torch.arange(total, device=device) - first_entry[roi_of_entry - start]
            rows = pixel_ranges[roi_of_entry, 1] + offset // range_widths[roi_of_entry]
            cols = pixel_ranges[roi_of_entry, 0] + offset % range_widths[roi_of_entry]
            winner.scatter_reduce_(0, rows * width + cols, roi_of_entry, reduce="amax")
        start = end
    return winner


def _sample_bilinear_border(masks: torch.Tensor, roi: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """``masks[roi]`` sampled at continuous cell coordinates (u, v) as ``grid_sample`` does with
    ``padding_mode="border", align_corners=False`` (u = 0 is the centre of the first column).

    Differentiable with respect to ``masks`` (gathers backpropagate as scatter-adds).
    """
    mask_height, mask_width = masks.shape[-2:]
    u = u.clamp(0, mask_width - 1)
    v = v.clamp(0, mask_height - 1)
    u0 = u.floor()
    v0 = v.floor()
    wu = (u - u0).to(masks.dtype)
    wv = (v - v0).to(masks.dtype)
    u0 = u0.to(torch.int64)
    v0 = v0.to(torch.int64)
    u1 = (u0 + 1).clamp(max=mask_width - 1)
    v1 = (v0 + 1).clamp(max=mask_height - 1)
    top = masks[roi, v0, u0] * (1 - wu) + masks[roi, v0, u1] * wu
    bottom = masks[roi, v1, u0] * (1 - wu) + masks[roi, v1, u1] * wu
    return top * (1 - wv) + bottom * wv


def paste_mask_logits(mask_logits: torch.Tensor, boxes: torch.Tensor, height: int, width: int):
    """Paste R mask logits (R, M, M) at their boxes (R, 4) into one (H, W) map, later ROIs on top.

    Returns ``(pasted, covered)``: (H, W) logits (0 where uncovered) and an (H, W) bool map.
    Boxes are detached; gradients reach each mask logit only through the pixels its ROI wins.
    """
    boxes = boxes.detach()
    pixel_ranges = box_pixel_ranges(boxes, height, width)
    winner = last_writer_index_map(pixel_ranges, height, width)
    covered = winner >= 0
    pixel_index = covered.nonzero().squeeze(1)
    roi = winner[pixel_index]
    rows = torch.div(pixel_index, width, rounding_mode="floor")
    cols = pixel_index - rows * width
    mask_height, mask_width = mask_logits.shape[-2:]
    box = boxes[roi].to(torch.float32)
    # Pixel centre -> normalised box coordinate in [0, 1) -> mask cell coordinate, as the
    # (img - x0) / (x1 - x0) * 2 - 1 grid of _do_paste_mask read by grid_sample(align_corners=False).
    u = ((cols.to(torch.float32) + 0.5 - box[:, 0]) / (box[:, 2] - box[:, 0])) * mask_width - 0.5
    v = ((rows.to(torch.float32) + 0.5 - box[:, 1]) / (box[:, 3] - box[:, 1])) * mask_height - 0.5
    values = _sample_bilinear_border(mask_logits, roi, u, v)
    pasted = mask_logits.new_zeros(height * width).index_put((pixel_index,), values)
    return pasted.view(height, width), covered.view(height, width)


class FeatureFusion(nn.Module):
    """F_0 = conv(upsample_nearest(P2, x stride)) with 2 channels; F_N = F_0 with every positive
    ROI's mask logits pasted at its box (module docstring: full input/output contract)."""

    @configurable
    def __init__(self, *, in_channels: int, in_stride: int, kernel_size: int = 1):
        """
        Args:
            in_channels: channels of the input feature (FPN width).
            in_stride: its stride; nearest upsampling by this factor gives input resolution.
            kernel_size: of the 2-channel convolution. With 1 (the default) the conv commutes with
                nearest upsampling, so it runs at the feature's resolution (16x cheaper for P2)
                with the same result.
        """
        super().__init__()
        self.in_stride = int(in_stride)
        self.kernel_size = int(kernel_size)
        # Channel 0 = background, 1 = nucleus, as the semantic targets (0/1).
        self.predictor = Conv2d(in_channels, 2, kernel_size=kernel_size, padding=kernel_size // 2)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        in_feature = cfg.MODEL.NUCSEG.FUSION_IN_FEATURE
        if in_feature not in input_shape:
            raise ValueError(
                f"MODEL.NUCSEG.FUSION_IN_FEATURE={in_feature!r} is not a backbone output "
                f"(available: {sorted(input_shape)})"
            )
        shape: ShapeSpec = input_shape[in_feature]
        return {"in_channels": shape.channels, "in_stride": shape.stride}

    def initial_map(self, feature: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """F_0: (B, 2, H, W) logits at input resolution, cropped to ``image_size``."""
        height, width = int(image_size[0]), int(image_size[1])
        if self.kernel_size == 1:
            logits = self.predictor(feature)
            logits = F.interpolate(logits, scale_factor=self.in_stride, mode="nearest")
        else:
            upsampled = F.interpolate(feature, scale_factor=self.in_stride, mode="nearest")
            logits = self.predictor(upsampled)
        if logits.shape[-2] < height or logits.shape[-1] < width:
            raise ValueError(
                f"feature of size {tuple(feature.shape[-2:])} x stride {self.in_stride} does not "
                f"cover the image size {(height, width)}"
            )
        # Pixel i of a stride-s level covers input pixels s*i .. s*i+s-1: crop, never resample.
        return logits[..., :height, :width]

    def forward(
        self,
        feature: torch.Tensor,
        mask_logits_per_image: Optional[Sequence[torch.Tensor]],
        boxes_per_image: Optional[Sequence[torch.Tensor]],
        image_size: Tuple[int, int],
    ) -> torch.Tensor:
        fused = self.initial_map(feature, image_size)
        if mask_logits_per_image is None:
            return fused
        if len(mask_logits_per_image) != len(fused) or len(boxes_per_image) != len(fused):
            raise ValueError(
                f"expected mask logits and boxes for each of the {len(fused)} images, got "
                f"{len(mask_logits_per_image)} and {len(boxes_per_image)}"
            )
        height, width = fused.shape[-2:]
        fused_per_image: List[torch.Tensor] = []
        for initial, mask_logits, boxes in zip(fused, mask_logits_per_image, boxes_per_image):
            if mask_logits.dim() != 3 or len(mask_logits) != len(boxes):
                raise ValueError(
                    f"mask logits must be (R, M, M) with one box each, got {tuple(mask_logits.shape)} "
                    f"for {len(boxes)} boxes"
                )
            if len(boxes) == 0:
                fused_per_image.append(initial)
                continue
            pasted, covered = paste_mask_logits(mask_logits.to(initial.dtype), boxes, height, width)
            # Channels (0, l): softmax over them is sigmoid(l).
            fused_per_image.append(
                torch.stack(
                    [
                        torch.where(covered, torch.zeros_like(pasted), initial[0]),
                        torch.where(covered, pasted, initial[1]),
                    ]
                )
            )
        return torch.stack(fused_per_image)


def build_feature_fusion(cfg, input_shape) -> FeatureFusion:
    """The FeatureFusion for ``MODEL.NUCSEG.FUSION_IN_FEATURE`` of a backbone's output shapes."""
    return FeatureFusion(cfg, input_shape)


def fusion_loss(fused: torch.Tensor, sem_seg_targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """L_semseg2: mean pixel cross-entropy of F_N (B, 2, H, W) against (B, H, W) 0/1 targets.

    Pixels labelled ``ignore_value`` (batch padding) do not count; all-ignored gives 0.
    """
    if sem_seg_targets.shape[-2:] != fused.shape[-2:]:
        raise ValueError(
            f"fused map {tuple(fused.shape[-2:])} and sem_seg targets "
            f"{tuple(sem_seg_targets.shape[-2:])} differ in size"
        )
    return mean_cross_entropy(fused, sem_seg_targets, ignore_value)


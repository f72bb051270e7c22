"""Losses shared by the semantic branch (L_semseg1) and feature fusion (L_semseg2)."""
import torch
from torch.nn import functional as F

__all__ = ["mean_cross_entropy"]


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Pixel cross-entropy averaged over the pixels not labelled ``ignore_value``, as
    ``F.cross_entropy(reduction="mean", ignore_index=...)``, but 0 (with a graph) when every pixel
    is ignored, where that mean is NaN and would poison every weight through the backbone. The
    count is clamped rather than tested, so no step waits on the GPU for it."""
    total = F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_value)
    return total / (targets != ignore_value).sum().clamp(min=1)

"""The paper's semantic branch: the decoder of the Global Convolutional Network.

Peng et al. 2017, "Large Kernel Matters". A drop-in replacement for Detectron2's
``SemSegFPNHead`` (same constructor/forward contract), so it works in stock ``SemanticSegmentor``
and ``PanopticFPN`` as well as in this project's meta-architecture.
"""
from typing import Dict, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from .losses import mean_cross_entropy

__all__ = ["GlobalConvBlock", "BoundaryRefinementBlock", "GCNSemSegHead"]


class GlobalConvBlock(nn.Module):
    """A k×k receptive field from two separable paths: (k×1 → 1×k) + (1×k → k×1).

    No nonlinearity inside, as in the original GCN module. ``norm`` (e.g. "GN") normalises the
    summed output: trained from scratch, the un-normalised sums of res2-res5 features grow
    large enough to start the semantic loss above 20 (measured on the demo config).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str = ""):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            # An even kernel cannot be centred, so "same" padding would shift the map.
            raise ValueError(f"GCN kernel size must be odd and positive, got {kernel_size}")
        half = kernel_size // 2
        self.left_vertical = Conv2d(in_channels, out_channels, (kernel_size, 1), padding=(half, 0))
        self.left_horizontal = Conv2d(out_channels, out_channels, (1, kernel_size), padding=(0, half))
        self.right_horizontal = Conv2d(in_channels, out_channels, (1, kernel_size), padding=(0, half))
        self.right_vertical = Conv2d(out_channels, out_channels, (kernel_size, 1), padding=(half, 0))
        for conv in (self.left_vertical, self.left_horizontal, self.right_horizontal, self.right_vertical):
            # Linear chain (no ReLU follows), so a unit-gain init as FPN's lateral convs.
            weight_init.c2_xavier_fill(conv)
        self.norm = get_norm(norm, out_channels) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.left_horizontal(self.left_vertical(x))
        right = self.right_vertical(self.right_horizontal(x))
        return self.norm(left + right)


class BoundaryRefinementBlock(nn.Module):
    """Residual refinement ``x + conv3×3(relu(norm(conv3×3(x))))`` (the original's BR block)."""

    def __init__(self, channels: int, norm: str = ""):
        super().__init__()
        self.conv1 = Conv2d(
            channels, channels, kernel_size=3, padding=1, norm=get_norm(norm, channels), activation=F.relu
        )
        self.conv2 = Conv2d(channels, channels, kernel_size=3, padding=1)
        weight_init.c2_msra_fill(self.conv1)
        weight_init.c2_msra_fill(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


@SEM_SEG_HEADS_REGISTRY.register()
class GCNSemSegHead(nn.Module):
    """GCN decoder over several feature levels, predicting class logits at the finest stride.

    Per level: GCN block (into ``gcn_channels``) then a BR block. Top-down from the coarsest
    level: resize to the next finer level's exact size (bilinear), add, BR. A 1×1 conv then maps
    to ``num_classes`` at the finest level's stride, which must equal ``common_stride``; the
    logits are upsampled by ``common_stride`` to the (padded) input size, as ``SemSegFPNHead``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        gcn_channels: int,
        kernel_size: int,
        common_stride: int,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        norm: str = "",
    ):
        """
        Args:
            input_shape: shapes (channels, stride) of the features the head reads
            num_classes: number of classes predicted
            gcn_channels: width of every GCN and BR block
            kernel_size: k of the GCN blocks (odd)
            common_stride: stride of the predicted logits; equals the finest input stride
            loss_weight: multiplier of the cross-entropy loss
            ignore_value: target value excluded from the loss
            norm: normalisation in the GCN and BR blocks ("" for none, as the original)
        """
        super().__init__()
        if not input_shape:
            raise ValueError("GCNSemSegHead(input_shape=) cannot be empty!")
        input_shape = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in input_shape]
        finest_stride = input_shape[0][1].stride
        if finest_stride != common_stride:
            raise ValueError(
                f"GCNSemSegHead predicts at the stride of its finest input feature "
                f"({self.in_features[0]}: {finest_stride}), but common_stride is {common_stride}"
            )
        self.num_classes = num_classes
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value

        self.gcn = nn.ModuleDict(
            {name: GlobalConvBlock(shape.channels, gcn_channels, kernel_size, norm) for name, shape in input_shape}
        )
        self.lateral_refine = nn.ModuleDict(
            {name: BoundaryRefinementBlock(gcn_channels, norm) for name in self.in_features})
        # The coarsest level starts the top-down path, so only the finer ones refine a sum.
        self.top_down_refine = nn.ModuleDict(
            {name: BoundaryRefinementBlock(gcn_channels, norm) for name in self.in_features[:-1]}
        )
        self.predictor = Conv2d(gcn_channels, num_classes, kernel_size=1)
        # Small logits at the start (loss ~ log 2), as Detectron2's mask predictor is initialised.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head_cfg = cfg.MODEL.SEM_SEG_HEAD
        missing = [name for name in head_cfg.IN_FEATURES if name not in input_shape]
        if missing:
            # Silently dropping them (as SemSegFPNHead does) would build a different decoder.
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs "
                f"{sorted(input_shape)}; res2-res5 need MODEL.BACKBONE.NAME "
                f"build_resnet_fpn_with_bottom_up_backbone"
            )
        return {
            "input_shape": {name: input_shape[name] for name in head_cfg.IN_FEATURES},
            "num_classes": head_cfg.NUM_CLASSES,
            "gcn_channels": head_cfg.GCN_CHANNELS,
            "kernel_size": head_cfg.GCN_KERNEL_SIZE,
            "common_stride": head_cfg.COMMON_STRIDE,
            "loss_weight": head_cfg.LOSS_WEIGHT,
            "ignore_value": head_cfg.IGNORE_VALUE,
            "norm": head_cfg.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """
        Returns:
            In training, (None, {"loss_sem_seg": loss}) for (N, H, W) long ``targets``;
            at inference, ((N, num_classes, H, W) logits, {}), H, W = common_stride × the finest
            feature's size (the padded image size inside Detectron2's meta-architectures).
        """
        x = self.layers(features)
        if self.training:
            return None, self.losses(x, targets)
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x, {}

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits at the finest input stride."""
        x = None
        for name in reversed(self.in_features):  # coarsest first
            lateral = self.lateral_refine[name](self.gcn[name](features[name]))
            if x is None:
                x = lateral
            else:
                # Exact target size rather than ×2: odd feature sizes do not double evenly.
                x = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
                x = self.top_down_refine[name](lateral + x)
        return self.predictor(x)

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("GCNSemSegHead needs sem_seg targets in training mode")
        predictions = predictions.float()  # cross-entropy in fp32 under autocast
        predictions = F.interpolate(
            predictions, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        loss = mean_cross_entropy(predictions, targets, self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}

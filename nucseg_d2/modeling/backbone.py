"""An FPN backbone that also returns the bottom-up (ResNet) features it was built from.

The paper's semantic branch reads res2-res5 while the instance branch reads p2-p6. The authors'
released code obtained res2-res5 by running the ResNet body a second time; here one forward
returns both, so the body runs once per image.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["FPNWithBottomUp", "build_resnet_fpn_with_bottom_up_backbone"]


class FPNWithBottomUp(FPN):
    """Detectron2's :class:`FPN` whose outputs also include the bottom-up features.

    ``forward`` returns ``{"res2": ..., "res5": ..., "p2": ..., "p6": ...}`` (every feature the
    bottom-up network outputs, then every pyramid level). The parameters are exactly FPN's, so
    checkpoints move freely between this backbone and ``build_resnet_fpn_backbone``; heads that
    select features by name (RPN, ROI heads) ignore the extra keys.
    """

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up_features = self.bottom_up(x)
        pyramid_features = self.pyramid(bottom_up_features)
        return {**bottom_up_features, **pyramid_features}

    def pyramid(self, bottom_up_features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The FPN levels p* from already computed bottom-up features.

        Same computation as ``FPN.forward`` after its ``self.bottom_up(x)`` call (checked against
        it by the tests), which this class must not repeat.
        """
        # Top-down order: coarsest level first, as FPN stores lateral/output convs.
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev_features)]
        for idx, (lateral_conv, output_conv) in enumerate(zip(self.lateral_convs, self.output_convs)):
            if idx == 0:
                continue  # the coarsest level, done above
            lateral_features = lateral_conv(bottom_up_features[self.in_features[-idx - 1]])
            top_down_features = F.interpolate(prev_features, scale_factor=2.0, mode="nearest")
            prev_features = lateral_features + top_down_features
            if self._fuse_type == "avg":
                prev_features = prev_features / 2
            results.insert(0, output_conv(prev_features))

        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_input = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_input = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_input))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {**self.bottom_up.output_shape(), **super().output_shape()}


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_with_bottom_up_backbone(cfg, input_shape: ShapeSpec):
    """``build_resnet_fpn_backbone`` returning :class:`FPNWithBottomUp` (same config keys).

    The exposed bottom-up features are ``MODEL.RESNETS.OUT_FEATURES``.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return FPNWithBottomUp(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

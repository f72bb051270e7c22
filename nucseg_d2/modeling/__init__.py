"""Model components, registered in Detectron2's registries on import."""
from .backbone import FPNWithBottomUp, build_resnet_fpn_with_bottom_up_backbone
from .fusion import FeatureFusion, fusion_loss
from .gcn_head import GCNSemSegHead
from .mask_head import DualModalMaskHead
from .meta_arch import NucleiRCNN, PanopticNucleiRCNN
from .postprocess import instances_to_label_map
from .roi_heads import NucleiROIHeads

__all__ = [
    "FPNWithBottomUp",
    "build_resnet_fpn_with_bottom_up_backbone",
    "GCNSemSegHead",
    "DualModalMaskHead",
    "NucleiRCNN",
    "PanopticNucleiRCNN",
    "NucleiROIHeads",
    "FeatureFusion",
    "fusion_loss",
    "instances_to_label_map",
]

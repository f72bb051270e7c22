"""Model components, registered in Detectron2's registries on import."""
from .meta_arch import NucleiRCNN
from .postprocess import instances_to_label_map

__all__ = ["NucleiRCNN", "instances_to_label_map"]

"""nucseg-d2: panoptic nuclei segmentation for H&E histopathology on Detectron2.

Importing the package registers its data sets, heads and meta-architectures.
"""
from .config import add_nucseg_config
from . import data  # noqa: F401  (registers data sets)
from . import modeling  # noqa: F401  (registers model components)

__all__ = ["add_nucseg_config"]

"""Data sets, readers, mapper and augmentations for nuclei segmentation.

Importing this package registers the nuclei data sets (lazily: nothing is read until requested).
"""
from . import datasets  # noqa: F401  (registers the data sets in DatasetCatalog)
from .datasets import (
    NUCLEI_DATASET_NAMES,
    absolute_nuclei_folders,
    get_nuclei_data_root,
    nuclei_dataset_subsets,
    register_config_datasets,
    register_nuclei_folder,
    register_tnbc_cross_validation,
    tnbc_patient_folds,
)
from .augment import build_nuclei_augmentations
from .mapper import NucleiDatasetMapper
from .readers import (
    NucleiDataError,
    load_label_map,
    read_cpm17_mat,
    read_label_map,
    read_monuseg_xml,
    read_rgb_image,
    read_tnbc_gt,
)
from .records import build_records, get_nuclei_cache_dir, label_map_to_annotations

__all__ = [
    "NUCLEI_DATASET_NAMES",
    "NucleiDataError",
    "NucleiDatasetMapper",
    "absolute_nuclei_folders",
    "build_nuclei_augmentations",
    "build_records",
    "get_nuclei_cache_dir",
    "get_nuclei_data_root",
    "label_map_to_annotations",
    "load_label_map",
    "nuclei_dataset_subsets",
    "read_cpm17_mat",
    "read_label_map",
    "read_monuseg_xml",
    "read_rgb_image",
    "read_tnbc_gt",
    "register_config_datasets",
    "register_nuclei_folder",
    "register_tnbc_cross_validation",
    "tnbc_patient_folds",
]

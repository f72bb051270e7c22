"""Data sets, readers, mapper and augmentations for nuclei segmentation."""

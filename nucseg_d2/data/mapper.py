"""Dataset mapper: record -> augmented image tensor, instance targets and sem_seg.

Instance targets are derived from the (augmented) instance label map rather than from the
record's cached annotations, so a crop or rotation can never leave masks and sem_seg
disagreeing: both come from the same transformed label map.
"""
import logging
from typing import List, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from . import readers
from .augment import build_nuclei_augmentations

__all__ = ["NucleiDatasetMapper", "instances_from_label_map", "remove_small_fragments", "compact_label_ids"]

_SUPPORTED_FORMATS = ("RGB", "BGR")


def _object_areas(label_map: np.ndarray) -> np.ndarray:
    """Pixel count of every id 0..max (index = id)."""
    if label_map.size and label_map.min() < 0:
        raise ValueError(f"label map has negative ids (min {label_map.min()})")
    return np.bincount(label_map.ravel())


def compact_label_ids(label_map: np.ndarray) -> np.ndarray:
    """Relabel to 0..N when ids are sparse, so per-id tables stay small (ids may exceed 2^31)."""
    if label_map.size == 0 or label_map.max() <= label_map.size:
        return label_map
    ids, inverse = np.unique(label_map, return_inverse=True)
    if ids[0] < 0:
        raise ValueError(f"label map has negative ids (min {ids[0]})")
    offset = 0 if ids[0] == 0 else 1  # keep background at 0
    return (inverse.reshape(label_map.shape) + offset).astype(np.int32)


def remove_small_fragments(label_map: np.ndarray, min_area: int) -> np.ndarray:
    """Return a copy of ``label_map`` with every id covering < ``min_area`` pixels set to 0."""
    label_map = np.array(label_map, copy=True)
    if min_area <= 0 or label_map.size == 0:
        return label_map
    compact = compact_label_ids(label_map)
    too_small = _object_areas(compact) < min_area
    too_small[0] = False
    label_map[too_small[compact]] = 0
    return label_map


def instances_from_label_map(label_map: np.ndarray, min_area: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split an instance label map into per-nucleus targets.

    Args:
        label_map: (H, W) non-negative integer array, 0 = background.
        min_area: ids covering fewer pixels are dropped (e.g. slivers left by a crop).

    Returns:
        boxes: (N, 4) float32 XYXY absolute boxes, end-exclusive (``x1 = last column + 1``,
            as ``BitMasks.get_bounding_boxes``).
        masks: (N, H, W) bool, one full-size mask per kept id, in increasing id order.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must have an integer dtype, got {label_map.dtype}")
    height, width = label_map.shape
    compact = compact_label_ids(label_map)
    areas = _object_areas(compact)
    slices = ndimage.find_objects(compact) if compact.size else []

    boxes, masks = [], []
    for index, object_slice in enumerate(slices):
        object_id = index + 1
        if object_slice is None or areas[object_id] < max(min_area, 1):
            continue
        rows, cols = object_slice
        mask = np.zeros((height, width), dtype=bool)
        mask[object_slice] = compact[object_slice] == object_id
        masks.append(mask)
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))

    if not masks:
        return np.zeros((0, 4), dtype=np.float32), np.zeros((0, height, width), dtype=bool)
    return np.asarray(boxes, dtype=np.float32), np.stack(masks)


class NucleiDatasetMapper:
    """Map a nuclei record to the inputs of a Detectron2 model.

    Output: ``image`` (C,H,W uint8 tensor in ``image_format``), ``height``, ``width``,
    and when training ``sem_seg`` (H,W long, 1 = nucleus) and ``instances`` (``gt_boxes``,
    ``gt_classes`` = 0, ``gt_masks`` BitMasks). At test time labels are not read: evaluators
    read them from the record, so the test loader pays for images only.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "RGB",
        min_fragment_area: int = 0,
    ):
        """
        Args:
            is_train: training adds ``instances`` and requires labels.
            augmentations: applied to the RGB image and the label map (as ``sem_seg``)
                together; photometric ones may assume RGB.
            image_format: "RGB" or "BGR", the channel order of the output image.
            min_fragment_area: nuclei with fewer visible pixels after augmentation are erased
                from both the instance targets and sem_seg (training only).
        """
        if image_format not in _SUPPORTED_FORMATS:
            raise ValueError(f"image_format must be one of {_SUPPORTED_FORMATS}, got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.min_fragment_area = int(min_fragment_area)
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[NucleiDatasetMapper] {mode} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_nuclei_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "min_fragment_area": cfg.INPUT.MIN_FRAGMENT_AREA,
        }

    def _read_labels(self, record: dict):
        """Label map of a training record whose height and width are the image's (load_label_map
        checks the map against them); None at test time (evaluators read labels themselves)."""
        if not self.is_train:
            return None
        if not record.get("label_file"):
            raise readers.NucleiDataError(
                f"{record.get('file_name')}: training record has no 'label_file'"
            )
        return readers.load_label_map(record)

    def __call__(self, record: dict) -> dict:
        # Shallow copy: the record is not modified, and its (possibly large) cached annotations
        # are not needed because targets are rebuilt from the label map.
        dataset_dict = dict(record)
        dataset_dict.pop("annotations", None)

        image = readers.read_rgb_image(record["file_name"])
        if not image.flags.writeable:
            # Decoded buffers can be read-only; torch warns when wrapping those.
            image = image.copy()
        image_shape = image.shape[:2]
        expected = (record.get("height", image_shape[0]), record.get("width", image_shape[1]))
        if tuple(expected) != image_shape:
            raise readers.NucleiDataError(
                f"{record['file_name']}: image size {image_shape} does not match the record's "
                f"(height, width) {tuple(expected)}"
            )
        dataset_dict["height"], dataset_dict["width"] = image_shape
        label_map = self._read_labels(dataset_dict)  # records may leave the size to the image

        # Augment in RGB (stain jitter works in HED space); convert channel order afterwards.
        aug_input = T.AugInput(image, sem_seg=label_map)
        self.augmentations(aug_input)
        image, label_map = aug_input.image, aug_input.sem_seg
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if label_map is None:
            return dataset_dict

        label_map = remove_small_fragments(label_map, self.min_fragment_area)
        boxes, masks = instances_from_label_map(label_map, self.min_fragment_area)
        instances = Instances(image.shape[:2])
        instances.gt_boxes = Boxes(torch.from_numpy(boxes))
        instances.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        instances.gt_masks = BitMasks(torch.from_numpy(masks))
        dataset_dict["instances"] = instances
        dataset_dict["sem_seg"] = torch.as_tensor((label_map > 0).astype(np.int64))
        return dataset_dict

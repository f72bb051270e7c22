"""Model inputs made from synthetic tiles, shared by the model tests (no mapper), and a folder of
them for the scripts that read registered data sets."""
import numpy as np
import torch
from PIL import Image
from detectron2.structures import BitMasks, Boxes, Instances

from nucseg_d2.data.mapper import instances_from_label_map
from nucseg_d2.data.synthetic import generate_tile


def synthetic_training_input(seed: int, height: int, width: int) -> dict:
    """One Detectron2 training input (image, instances, sem_seg) from a seeded synthetic tile."""
    image, label_map = generate_tile(np.random.default_rng(seed), size=(height, width))
    boxes, masks = instances_from_label_map(label_map)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.from_numpy(boxes))
    instances.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    instances.gt_masks = BitMasks(torch.from_numpy(masks))
    return {
        "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
        "height": height,
        "width": width,
        "instances": instances,
        "sem_seg": torch.from_numpy((label_map > 0).astype(np.int64)),
    }


def write_synthetic_folder(root, count: int, size: int) -> tuple:
    """``count`` seeded synthetic tiles of size² in root/images and their uint16 label maps in
    root/labels, under the same names; returns the two folders."""
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(count):
        image, label_map = generate_tile(np.random.default_rng(i), size=(size, size))
        Image.fromarray(image).save(images / f"t{i}.png")
        Image.fromarray(label_map.astype(np.uint16)).save(labels / f"t{i}.png")
    return images, labels

"""Tests for nucseg_d2.data.mapper: targets stay aligned with the image through augmentation."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BitMasks
from PIL import Image

from nucseg_d2.config import NucleiConfigError, add_nucseg_config, validate_nucseg_config
from nucseg_d2.data.augment import LabelResizeTransform, RandomRotation90, Rot90Transform
from nucseg_d2.data.mapper import (
    NucleiDatasetMapper,
    instances_from_label_map,
    remove_small_fragments,
)
from nucseg_d2.data.readers import NucleiDataError

BACKGROUND_COLOUR = (255, 255, 255)


def _colour_of(label_id):
    """Distinct, non-white RGB colour per id (ids < 200)."""
    return (label_id, (37 * label_id) % 251, 200 - label_id)


def _write_record(tmp_path, label_map, image=None, name="tile"):
    """Write image + uint16 label PNG; the default image paints each nucleus in its id's colour."""
    label_map = np.asarray(label_map)
    if image is None:
        image = np.empty(label_map.shape + (3,), dtype=np.uint8)
        image[:] = BACKGROUND_COLOUR
        for label_id in np.unique(label_map[label_map > 0]):
            image[label_map == label_id] = _colour_of(int(label_id))
    image_path = tmp_path / f"{name}.png"
    label_path = tmp_path / f"{name}_label.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(label_map.astype(np.uint16)).save(label_path)
    return {
        "file_name": str(image_path),
        "label_file": str(label_path),
        "label_format": "label_map",
        "height": label_map.shape[0],
        "width": label_map.shape[1],
        "image_id": name,
    }


def _layout_label_map(h=36, w=52):
    """Asymmetric layout of nuclei of different shapes and sizes, some at the borders."""
    label_map = np.zeros((h, w), dtype=np.int32)
    rows, cols = np.mgrid[0:h, 0:w]
    label_map[(rows - 8) ** 2 / 25 + (cols - 10) ** 2 / 64 <= 1] = 3
    label_map[(rows - 25) ** 2 + (cols - 40) ** 2 <= 30] = 17
    label_map[0:6, 44:52] = 5  # touches the top-right corner
    label_map[20:34, 2:6] = 9  # tall thin nucleus
    label_map[18:30, 14:26] = 12
    label_map[22:26, 18:22] = 40  # nucleus inside another's box: boxes overlap, masks don't
    label_map[30:32, 30:31] = 2  # 2-pixel speck: below min fragment area
    return label_map


def _cfg(**aug):
    cfg = get_cfg()
    add_nucseg_config(cfg)
    cfg.INPUT.FORMAT = "RGB"  # Detectron2's default is BGR
    cfg.INPUT.MIN_FRAGMENT_AREA = 4
    for key, value in aug.items():
        cfg.INPUT.AUG[key] = value
    return cfg


def _check_alignment(output, image_format="RGB"):
    """Assert masks, boxes, sem_seg and image colours agree; return the instance colours."""
    image = output["image"].permute(1, 2, 0).numpy()
    if image_format == "BGR":
        image = image[..., ::-1]
    instances = output["instances"]
    masks = instances.gt_masks.tensor.numpy()
    sem_seg = output["sem_seg"].numpy()
    assert masks.shape[1:] == image.shape[:2] == sem_seg.shape
    assert output["sem_seg"].dtype == torch.int64
    np.testing.assert_array_equal(
        instances.gt_boxes.tensor.numpy(), instances.gt_masks.get_bounding_boxes().tensor.numpy()
    )
    np.testing.assert_array_equal(masks.any(axis=0), sem_seg == 1)
    assert masks.sum(axis=0).max(initial=0) <= 1  # instances never overlap
    assert (instances.gt_classes == 0).all() and instances.gt_classes.dtype == torch.int64
    colours = []
    for mask in masks:
        colour = image[mask][0]
        # The mask is exactly the set of pixels painted in its nucleus' colour.
        np.testing.assert_array_equal((image == colour).all(axis=-1), mask)
        colours.append(tuple(int(c) for c in colour))
    assert len(set(colours)) == len(colours)
    return colours


def _train_mapper(cfg):
    return NucleiDatasetMapper(cfg, is_train=True)


@pytest.mark.parametrize("crop", [False, True])
def test_training_mapper_keeps_masks_and_image_aligned_over_random_geometry(tmp_path, crop):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    cfg = _cfg()
    if crop:
        cfg.INPUT.CROP.ENABLED = True
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.CROP.SIZE = [24, 30]
    mapper = _train_mapper(cfg)
    shapes = set()
    for seed in range(16):
        np.random.seed(seed)
        output = mapper(record)
        colours = _check_alignment(output)
        shapes.add(tuple(output["image"].shape[1:]))
        if not crop:
            # Everything but the 2-pixel speck survives, whatever the flips/rotation.
            expected = {_colour_of(i) for i in (3, 5, 9, 12, 17, 40)}
            assert set(colours) == expected
    # Rotations by 90 degrees swap height and width.
    assert shapes == ({(24, 30), (30, 24)} if crop else {(36, 52), (52, 36)})


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_forced_geometry_aligns_masks_for_both_formats(tmp_path, k, image_format):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    augs = [
        T.RandomFlip(prob=1.0, horizontal=True, vertical=False),
        T.RandomFlip(prob=1.0, horizontal=False, vertical=True),
        RandomRotation90(ks=(k,)),
    ]
    mapper = NucleiDatasetMapper(
        is_train=True, augmentations=augs, image_format=image_format, min_fragment_area=4
    )
    output = mapper(record)
    _check_alignment(output, image_format)
    expected_labels = np.rot90(label_map[::-1, ::-1], k)
    expected_labels = remove_small_fragments(expected_labels, 4)
    np.testing.assert_array_equal(output["sem_seg"].numpy(), expected_labels > 0)


class _MisalignedRot90(Rot90Transform):
    """Bug on purpose: rotates the labels the other way."""

    def apply_segmentation(self, segmentation):
        return np.ascontiguousarray(np.rot90(segmentation, -self.k))


def test_alignment_check_catches_labels_rotated_the_other_way(tmp_path):
    # Square image so the wrong rotation still has the right shape.
    label_map = _layout_label_map(36, 36)
    record = _write_record(tmp_path, label_map)
    mapper = NucleiDatasetMapper(
        is_train=True, augmentations=[_MisalignedRot90(36, 36, 1)], min_fragment_area=4
    )
    with pytest.raises(AssertionError):
        _check_alignment(mapper(record))


def test_round_trip_label_map_to_instances_and_back(tmp_path):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    mapper = NucleiDatasetMapper(is_train=True, augmentations=[], min_fragment_area=4)
    output = mapper(record)
    masks = output["instances"].gt_masks.tensor.numpy()
    kept_ids = [i for i in np.unique(label_map) if i > 0 and (label_map == i).sum() >= 4]
    assert len(masks) == len(kept_ids)
    pasted = np.zeros_like(label_map)
    for label_id, mask in zip(kept_ids, masks):  # instances come in increasing id order
        pasted[mask] = label_id
    expected = label_map.copy()
    expected[expected == 2] = 0  # the 2-pixel speck
    np.testing.assert_array_equal(pasted, expected)
    np.testing.assert_array_equal(output["sem_seg"].numpy(), expected > 0)
    assert output["height"] == label_map.shape[0] and output["width"] == label_map.shape[1]
    assert output["image"].dtype == torch.uint8


def test_crop_keeps_visible_part_of_cut_nuclei_and_drops_slivers_everywhere(tmp_path):
    label_map = np.zeros((20, 30), dtype=np.int32)
    label_map[2:8, 12:18] = 1  # fully inside the crop
    label_map[10:16, 6:14] = 2  # cut by the left edge: 6 x 4 = 24 pixels visible
    label_map[3:9, 24:30] = 3  # cut by the right edge: 6 x 1 = 6 pixels visible, < 8
    label_map[14:19, 26:30] = 4  # entirely outside
    record = _write_record(tmp_path, label_map)
    crop = T.CropTransform(x0=10, y0=0, w=15, h=20, orig_w=30, orig_h=20)
    mapper = NucleiDatasetMapper(is_train=True, augmentations=[crop], min_fragment_area=8)
    output = mapper(record)
    colours = _check_alignment(output)
    assert colours == [_colour_of(1), _colour_of(2)]
    masks = output["instances"].gt_masks.tensor.numpy()
    np.testing.assert_array_equal(masks[1], label_map[:, 10:25] == 2)
    assert masks[1].sum() == 24
    np.testing.assert_array_equal(output["instances"].gt_boxes.tensor[1].numpy(), [0, 10, 4, 16])
    # The sliver of nucleus 3 is gone from sem_seg too, although the image still shows it.
    image = output["image"].permute(1, 2, 0).numpy()
    sliver = (image == _colour_of(3)).all(axis=-1)
    assert sliver.sum() == 6 and not output["sem_seg"].numpy()[sliver].any()


def test_photometric_augmentations_do_not_change_targets(tmp_path):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    off = dict(HFLIP=False, VFLIP=False, ROT90=False)
    plain = _train_mapper(_cfg(**off))(record)
    probs = {
        key + "_PROB": 1.0
        for key in ("GAUSSIAN_BLUR", "GAUSSIAN_NOISE", "EMBOSS", "SHARPEN", "CHANNEL_SHUFFLE", "STAIN_JITTER")
    }
    np.random.seed(0)
    jittered = _train_mapper(_cfg(**off, **probs))(record)
    assert not torch.equal(jittered["image"], plain["image"])
    assert torch.equal(jittered["sem_seg"], plain["sem_seg"])
    assert torch.equal(jittered["instances"].gt_masks.tensor, plain["instances"].gt_masks.tensor)
    assert torch.equal(jittered["instances"].gt_boxes.tensor, plain["instances"].gt_boxes.tensor)


def test_rescale_resizes_image_masks_boxes_and_sem_seg_together(tmp_path):
    label_map = _layout_label_map()
    label_map[label_map == 40] = 300  # an id above uint8's, which Detectron2's resize cannot take
    palette = {label_id: _colour_of(label_id % 200) for label_id in np.unique(label_map) if label_id}
    image = np.full(label_map.shape + (3,), BACKGROUND_COLOUR, np.uint8)
    for label_id, colour in palette.items():
        image[label_map == label_id] = colour
    record = _write_record(tmp_path, label_map, image=image)
    fixed = dict(HFLIP=False, VFLIP=False, ROT90=False)
    plain = _train_mapper(_cfg(**fixed))(record)
    scaled = _train_mapper(_cfg(**fixed, SCALE_PROB=1.0, SCALE_RANGE=(2.0, 2.0)))(record)
    doubled = np.kron(label_map, np.ones((2, 2), np.int32))
    assert tuple(scaled["image"].shape) == (3, 72, 104)
    np.testing.assert_array_equal(scaled["sem_seg"].numpy(), doubled > 0)
    masks = scaled["instances"].gt_masks.tensor.numpy()
    ids = [int(np.unique(doubled[mask])[0]) for mask in masks]
    scaled_image = scaled["image"].permute(1, 2, 0).numpy()
    for label_id, mask in zip(ids, masks):
        np.testing.assert_array_equal(mask, doubled == label_id)
        # The image moved with the masks: pixels 2 inside a mask (bilinear blends only at edges)
        # hold its nucleus' colour.
        interior = ndimage.binary_erosion(mask, iterations=2)
        assert (scaled_image[interior] == palette[label_id]).all()
    # The 2-pixel speck (id 2) is 8 pixels at twice the size, above MIN_FRAGMENT_AREA 4: kept.
    assert sorted(ids) == [2, 3, 5, 9, 12, 17, 300]
    plain_boxes = {int(np.unique(label_map[m])[0]): b for m, b in
                   zip(plain["instances"].gt_masks.tensor.numpy(), plain["instances"].gt_boxes.tensor.numpy())}
    for label_id, box in zip(ids, scaled["instances"].gt_boxes.tensor.numpy()):
        if label_id in plain_boxes:
            np.testing.assert_array_equal(box, 2 * plain_boxes[label_id])


@pytest.mark.parametrize("scale, crop_size, out_hw", [
    (0.7, [64, 64], (25, 36)),  # 36.4 -> 36: the crop, larger than the image, takes the whole image
    (1.3, [40, 50], (40, 50)),  # 46.8 x 67.6 -> 47 x 68, then cropped
])
def test_rescale_by_non_integer_factor_keeps_masks_boxes_and_sem_seg_consistent(tmp_path, scale, crop_size, out_hw):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    cfg = _cfg(HFLIP=False, VFLIP=False, ROT90=False, SCALE_PROB=1.0, SCALE_RANGE=(scale, scale))
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = crop_size
    resized = LabelResizeTransform(36, 52, round(36 * scale), round(52 * scale)).apply_segmentation(label_map)
    for seed in range(4):
        np.random.seed(seed)
        output = _train_mapper(cfg)(record)
        assert tuple(output["image"].shape[1:]) == out_hw
        instances = output["instances"]
        masks = instances.gt_masks.tensor.numpy()
        np.testing.assert_array_equal(
            instances.gt_boxes.tensor.numpy(), instances.gt_masks.get_bounding_boxes().tensor.numpy())
        np.testing.assert_array_equal(masks.any(axis=0), output["sem_seg"].numpy() == 1)
        # The masks are those of the resized label map in one crop window: each id's pixels there,
        # less ids under MIN_FRAGMENT_AREA (4).
        got = {mask.tobytes() for mask in masks}
        windows = [resized[r:r + out_hw[0], c:c + out_hw[1]] for r in range(resized.shape[0] - out_hw[0] + 1)
                   for c in range(resized.shape[1] - out_hw[1] + 1)]
        assert any(got == {(window == label_id).tobytes() for label_id in np.unique(window)
                           if label_id and (window == label_id).sum() >= 4} for window in windows)
        assert len(masks) >= 3


def test_empty_label_map_gives_valid_empty_instances(tmp_path):
    record = _write_record(tmp_path, np.zeros((12, 17), dtype=np.int32))
    output = _train_mapper(_cfg())(record)
    instances = output["instances"]
    assert len(instances) == 0
    h, w = output["image"].shape[1:]
    assert instances.gt_boxes.tensor.shape == (0, 4)
    assert instances.gt_masks.tensor.shape == (0, h, w)
    assert instances.gt_classes.shape == (0,)
    assert instances.image_size == (h, w)
    assert output["sem_seg"].shape == (h, w) and output["sem_seg"].sum() == 0


def test_bgr_format_reverses_channels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    record = _write_record(tmp_path, np.zeros((9, 11), np.int32), image=image)
    rgb = NucleiDatasetMapper(is_train=False, augmentations=[], image_format="RGB")(record)
    bgr = NucleiDatasetMapper(is_train=False, augmentations=[], image_format="BGR")(record)
    np.testing.assert_array_equal(rgb["image"].permute(1, 2, 0).numpy(), image)
    np.testing.assert_array_equal(bgr["image"].permute(1, 2, 0).numpy(), image[..., ::-1])
    with pytest.raises(ValueError, match="image_format"):
        NucleiDatasetMapper(is_train=False, augmentations=[], image_format="L")


def test_test_mode_has_no_instances_no_resize_and_reads_no_labels(tmp_path):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    record["annotations"] = [{"bbox": [0, 0, 1, 1]}]
    cfg = _cfg()
    cfg.INPUT.CROP.ENABLED = True
    mapper = NucleiDatasetMapper(cfg, is_train=False)
    output = mapper(record)
    assert "instances" not in output and "annotations" not in output
    assert "annotations" in record  # the dataset's record is not modified
    assert tuple(output["image"].shape) == (3,) + label_map.shape  # native size, no crop
    assert "sem_seg" not in output  # evaluators read labels themselves

    raw = {"file_name": record["file_name"], "image_id": "raw"}  # prediction-style record
    output = mapper(raw)
    assert "sem_seg" not in output and "instances" not in output
    assert (output["height"], output["width"]) == label_map.shape


def test_test_mode_resizes_like_the_predictor_when_min_size_test_is_set(tmp_path):
    label_map = _layout_label_map()
    record = _write_record(tmp_path, label_map)
    cfg = _cfg()
    cfg.INPUT.MIN_SIZE_TEST = 2 * min(label_map.shape)
    output = NucleiDatasetMapper(cfg, is_train=False)(record)
    # The network sees the doubled image; height/width stay the original's, so the model's
    # post-processing maps its detections back onto the ground truth's pixels.
    assert tuple(output["image"].shape[1:]) == (2 * label_map.shape[0], 2 * label_map.shape[1])
    assert (output["height"], output["width"]) == label_map.shape
    cfg.INPUT.MIN_SIZE_TEST = -1
    with pytest.raises(NucleiConfigError, match="MIN_SIZE_TEST"):
        validate_nucseg_config(cfg)
    with pytest.raises(ValueError, match="MIN_SIZE_TEST"):  # an unvalidated config, too
        NucleiDatasetMapper(cfg, is_train=False)


def test_add_nucseg_config_analyses_at_native_resolution():
    cfg = get_cfg()
    assert cfg.INPUT.MIN_SIZE_TEST == 800  # Detectron2's default: every image rescaled
    add_nucseg_config(cfg)
    assert cfg.INPUT.MIN_SIZE_TEST == 0 and NucleiDatasetMapper(cfg, is_train=False).augmentations.augs == []


def test_reader_errors_propagate_with_the_file_name(tmp_path):
    record = _write_record(tmp_path, _layout_label_map())
    mapper = _train_mapper(_cfg())
    missing_image = dict(record, file_name=str(tmp_path / "nope.png"))
    with pytest.raises(NucleiDataError, match="nope.png"):
        mapper(missing_image)
    missing_label = dict(record, label_file=str(tmp_path / "nolabel.png"))
    with pytest.raises(NucleiDataError, match="nolabel.png"):
        mapper(missing_label)
    no_label = {k: v for k, v in record.items() if k != "label_file"}
    with pytest.raises(NucleiDataError, match="tile.png"):
        mapper(no_label)
    wrong_size = dict(record, height=record["height"] + 1)
    with pytest.raises(NucleiDataError, match="tile"):
        mapper(wrong_size)
    other = _write_record(tmp_path, np.zeros((5, 7), np.int32), name="small")
    wrong_label = dict(record, label_file=other["label_file"])
    with pytest.raises(NucleiDataError, match=r"small_label.png: label map is 5x7 but image .*tile.png is 36x52"):
        mapper(wrong_label)


def test_training_record_may_leave_its_size_to_the_image(tmp_path):
    # A user's own DatasetCatalog function need not give height and width.
    record = _write_record(tmp_path, _layout_label_map())
    unsized = {key: value for key, value in record.items() if key not in ("height", "width")}
    mapper = NucleiDatasetMapper(is_train=True, augmentations=[], image_format="RGB", min_fragment_area=4)
    with_size, without_size = mapper(record), mapper(unsized)
    assert (without_size["height"], without_size["width"]) == (36, 52)
    assert len(without_size["instances"]) == len(with_size["instances"]) > 0
    assert torch.equal(without_size["instances"].gt_masks.tensor, with_size["instances"].gt_masks.tensor)


def test_from_config_uses_cfg(tmp_path):
    cfg = _cfg()
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_FRAGMENT_AREA = 50
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    assert mapper.is_train and mapper.image_format == "BGR" and mapper.min_fragment_area == 50
    assert len(mapper.augmentations.augs) == 3  # H flip, V flip, rot90 by default
    assert NucleiDatasetMapper(cfg, is_train=False).augmentations.augs == []


# ----------------------------------------------------------------------------- label map helpers


def test_instances_from_label_map_boxes_order_and_min_area():
    label_map = np.zeros((6, 8), dtype=np.int32)
    label_map[1:3, 2:5] = 9
    label_map[4, 7] = 4
    label_map[0, 0] = 6
    label_map[5, 0] = 6  # one id in two pieces stays one instance
    boxes, masks = instances_from_label_map(label_map)
    assert masks.dtype == bool and masks.shape == (3, 6, 8) and boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[7, 4, 8, 5], [0, 0, 1, 6], [2, 1, 5, 3]])
    for label_id, mask in zip((4, 6, 9), masks):
        np.testing.assert_array_equal(mask, label_map == label_id)
    np.testing.assert_array_equal(
        BitMasks(torch.from_numpy(masks)).get_bounding_boxes().tensor.numpy(), boxes
    )
    boxes, masks = instances_from_label_map(label_map, min_area=2)
    assert len(masks) == 2 and masks[0].sum() == 2 and masks[1].sum() == 6


def test_label_map_helpers_handle_huge_sparse_ids():
    label_map = np.zeros((4, 5), dtype=np.int64)
    label_map[0, 0:2] = 2**31 + 5
    label_map[3, 4] = 7
    boxes, masks = instances_from_label_map(label_map)
    np.testing.assert_array_equal(boxes, [[4, 3, 5, 4], [0, 0, 2, 1]])
    cleaned = remove_small_fragments(label_map, 2)
    assert cleaned[3, 4] == 0 and (cleaned[0, 0:2] == 2**31 + 5).all()
    assert label_map[3, 4] == 7  # input untouched


def test_label_map_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="negative"):
        instances_from_label_map(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="integer"):
        instances_from_label_map(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        instances_from_label_map(np.zeros((2, 2, 2), dtype=np.int32))

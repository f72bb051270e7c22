"""Tests for nucseg_d2.data.augment: exact geometry, image-only photometry, cfg builder."""
from fractions import Fraction

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from skimage.color import rgb2hed

from nucseg_d2.config import add_nucseg_config
from nucseg_d2.data.augment import (
    ChannelShuffleTransform,
    ConvolutionTransform,
    GaussianBlurTransform,
    GaussianNoiseTransform,
    LabelResizeTransform,
    RandomChannelShuffle,
    RandomEmboss,
    RandomGaussianBlur,
    RandomGaussianNoise,
    RandomRescale,
    RandomRotation90,
    RandomSharpen,
    RandomStainJitter,
    Rot90Transform,
    StainJitterTransform,
    build_nuclei_augmentations,
    emboss_kernel,
    nearest_source_indices,
    sharpen_kernel,
)

H, W = 5, 7  # non-square so a wrong axis order changes the shape


def _unique_image(h=H, w=W, channels=3):
    """Image whose every value is distinct, so its position after a transform can be found."""
    return np.arange(h * w * channels, dtype=np.int32).reshape(h, w, channels)


def _pixel_centres(h, w):
    rows, cols = np.mgrid[0:h, 0:w]
    return rows.ravel(), cols.ravel()


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_image_and_segmentation_match_np_rot90(k):
    image = _unique_image()
    tfm = Rot90Transform(H, W, k)
    np.testing.assert_array_equal(tfm.apply_image(image), np.rot90(image, k))
    seg = image[..., 0]
    np.testing.assert_array_equal(tfm.apply_segmentation(seg), np.rot90(seg, k))
    assert tfm.apply_image(image).shape[:2] == tfm.output_size()
    assert tfm.apply_image(image).flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_coords_follow_the_pixels(k):
    ids = np.arange(H * W).reshape(H, W)
    rotated = np.rot90(ids, k)
    rows, cols = _pixel_centres(H, W)
    centres = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    moved = Rot90Transform(H, W, k).apply_coords(centres.copy())
    new_cols = (moved[:, 0] - 0.5).astype(int)
    new_rows = (moved[:, 1] - 0.5).astype(int)
    # The pixel that landed at the transformed centre is the one we started from.
    np.testing.assert_array_equal(rotated[new_rows, new_cols], ids[rows, cols])


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_box_equals_rotated_mask_extent(k):
    mask = np.zeros((H, W), dtype=bool)
    mask[1:3, 2:6] = True  # rows 1-2, cols 2-5 -> XYXY box (2, 1, 6, 3)
    box = np.array([[2.0, 1.0, 6.0, 3.0]])
    rotated_mask = np.rot90(mask, k)
    rows, cols = np.nonzero(rotated_mask)
    expected = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    np.testing.assert_allclose(Rot90Transform(H, W, k).apply_box(box)[0], expected)


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1, 5])
def test_rot90_inverse_round_trips(k):
    image = _unique_image()
    tfm = Rot90Transform(H, W, k)
    inverse = tfm.inverse()
    np.testing.assert_array_equal(inverse.apply_image(tfm.apply_image(image)), image)
    coords = np.random.default_rng(0).uniform(0, 5, size=(10, 2))
    np.testing.assert_allclose(inverse.apply_coords(tfm.apply_coords(coords.copy())), coords)


def test_rot90_rejects_wrong_size():
    with pytest.raises(ValueError, match="size"):
        Rot90Transform(H, W, 1).apply_image(np.zeros((W, H, 3), np.uint8))


def test_random_rotation90_draws_every_k_and_keeps_image_and_seg_aligned():
    np.random.seed(0)
    image = (np.arange(H * W).reshape(H, W, 1) * np.ones((1, 1, 3), int)).astype(np.uint8)
    seen = set()
    for _ in range(60):
        aug_input = T.AugInput(image.copy(), sem_seg=image[..., 0].astype(np.int32))
        tfm = RandomRotation90()(aug_input)
        seen.add(getattr(tfm, "k", 0))
        np.testing.assert_array_equal(aug_input.image[..., 0], aug_input.sem_seg)
    assert seen == {0, 1, 2, 3}


def test_label_resize_repeats_each_id_and_keeps_ids_above_uint8():
    label_map = np.array([[1, 2, 3], [4, 0, 70000]], dtype=np.int32)
    resized = LabelResizeTransform(2, 3, 4, 6).apply_segmentation(label_map)
    assert resized.dtype == np.int32
    np.testing.assert_array_equal(resized, np.kron(label_map, np.ones((2, 2), dtype=np.int32)))


def test_label_resize_down_takes_the_pixel_under_each_output_centre():
    # Output centres 0.5, 1.5, 2.5 of 3 map to input 0.67, 2.0, 3.33 of 4: rows/cols 0, 2, 3 (2.0, on
    # the boundary of pixels 1 and 2, takes the later one).
    label_map = np.arange(16, dtype=np.uint16).reshape(4, 4)
    resized = LabelResizeTransform(4, 4, 3, 3).apply_segmentation(label_map)
    np.testing.assert_array_equal(resized, label_map[np.ix_([0, 2, 3], [0, 2, 3])])


def test_nearest_source_indices_break_ties_towards_the_later_pixel_exactly():
    # 26 -> 23: output 11's centre is 11.5 * 26 / 23 = 13.0 exactly, which floating point puts just
    # below 13; and every tie of a size pair in the rescale's range.
    assert nearest_source_indices(26, 23)[11] == 13
    for size in range(1, 120):
        for new_size in range(max(1, size * 4 // 5), size * 5 // 4 + 2):
            expected = [min(int(Fraction(2 * i + 1, 2 * new_size) * size), size - 1) for i in range(new_size)]
            assert nearest_source_indices(size, new_size).tolist() == expected, (size, new_size)


def _has_tie(size, new_size):
    return any((2 * i + 1) * size % (2 * new_size) == 0 for i in range(new_size))


# Sizes where no output centre falls on the boundary of two input pixels, where PIL's rounding
# decides: up, down and both.
@pytest.mark.parametrize("new_hw", [(4, 8), (14, 6), (20, 30), (6, 10)])
def test_label_resize_matches_detectron2_on_uint8_where_detectron2_can(new_hw):
    assert not _has_tie(H * 2, new_hw[0]) and not _has_tie(W * 2, new_hw[1])
    label_map = np.random.default_rng(1).integers(0, 250, size=(H * 2, W * 2)).astype(np.uint8)
    ours = LabelResizeTransform(H * 2, W * 2, *new_hw).apply_segmentation(label_map)
    np.testing.assert_array_equal(ours, T.ResizeTransform(H * 2, W * 2, *new_hw).apply_segmentation(label_map))


def test_label_resize_moves_boxes_with_their_masks_and_inverts():
    label_map = np.zeros((10, 12), dtype=np.int32)
    label_map[2:5, 3:9] = 7
    transform = LabelResizeTransform(10, 12, 20, 18)
    resized = transform.apply_segmentation(label_map)
    rows, cols = np.nonzero(resized == 7)
    box = transform.apply_box(np.array([[3, 2, 9, 5]], dtype=np.float64))
    mask_box = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]])
    # Rows double exactly; at 1.5x a nearest-neighbour edge lies within half an input pixel (0.75).
    np.testing.assert_array_equal(box[:, 1::2], mask_box[:, 1::2])
    np.testing.assert_allclose(box[:, 0::2], mask_box[:, 0::2], atol=0.75)
    assert transform.apply_image(np.zeros((10, 12, 3), np.uint8)).shape == (20, 18, 3)
    np.testing.assert_array_equal(transform.inverse().apply_segmentation(resized), label_map)
    with pytest.raises(ValueError, match=r"built for size \(10, 12\) got a label map of shape \(12, 10\)"):
        transform.apply_segmentation(label_map.T)


def test_random_rescale_draws_log_uniformly_within_its_range():
    image = np.zeros((100, 50, 3), np.uint8)
    np.random.seed(0)
    scales = []
    for _ in range(400):
        transform = RandomRescale((0.5, 2.0)).get_transform(image)
        if isinstance(transform, LabelResizeTransform):
            # Both sides scaled by one factor, each rounded to whole pixels.
            assert abs(transform.new_w / 50 - transform.new_h / 100) <= 0.5 / 50 + 0.5 / 100
            scales.append(transform.new_h / 100)
    scales = np.array(scales)
    assert 0.5 <= scales.min() and scales.max() <= 2.0
    # Log-uniform: as many draws shrink as enlarge, and a quarter fall below 1/sqrt(2).
    assert 0.4 < np.mean(scales < 1.0) < 0.6
    assert 0.17 < np.mean(scales < 2 ** -0.5) < 0.33
    assert isinstance(RandomRescale((1.0, 1.0)).get_transform(image), T.NoOpTransform)
    with pytest.raises(ValueError, match="0 < low <= high"):
        RandomRescale((1.2, 0.9))
    assert repr(RandomRescale((0.8, 1.25))) == "RandomRescale(scale_range=(0.8, 1.25))"


# ----------------------------------------------------------------------------- photometric


def _he_like_image(seed=0, h=24, w=32):
    """Pink background with purple blobs and some noise: plausible H&E colours."""
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), dtype=np.float32)
    image[:] = (235, 170, 210)
    rows, cols = np.mgrid[0:h, 0:w]
    for cy, cx in [(6, 8), (16, 22), (12, 14)]:
        image[(rows - cy) ** 2 + (cols - cx) ** 2 < 16] = (90, 50, 140)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


PHOTOMETRIC_TRANSFORMS = [
    GaussianBlurTransform(1.0),
    GaussianNoiseTransform(5.0, seed=3),
    ConvolutionTransform(emboss_kernel(0.5)),
    ConvolutionTransform(sharpen_kernel(0.5)),
    ChannelShuffleTransform((2, 0, 1)),
    StainJitterTransform((1.2, 0.8, 1.0), (0.02, -0.02, 0.0)),
]


@pytest.mark.parametrize("tfm", PHOTOMETRIC_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_photometric_transforms_change_only_the_image(tfm):
    image = _he_like_image()
    label_map = np.zeros(image.shape[:2], dtype=np.int32)
    label_map[3:9, 4:12] = 7
    aug_input = T.AugInput(image.copy(), sem_seg=label_map.copy())
    aug_input.transform(tfm)
    assert aug_input.image.dtype == np.uint8 and aug_input.image.shape == image.shape
    assert not np.array_equal(aug_input.image, image)
    np.testing.assert_array_equal(aug_input.sem_seg, label_map)
    coords = np.array([[1.5, 2.5], [30.0, 20.0]])
    np.testing.assert_array_equal(tfm.apply_coords(coords.copy()), coords)
    np.testing.assert_array_equal(tfm.apply_box(np.array([[1.0, 2.0, 5.0, 9.0]])), [[1, 2, 5, 9]])
    assert isinstance(tfm.inverse(), T.NoOpTransform)


def test_gaussian_noise_has_the_standard_deviation_asked_for():
    grey = np.full((64, 64, 3), 128, np.uint8)  # mid-grey: clipping at 0 or 255 plays no part
    for std in (2.0, 5.0, 10.0):
        noise = GaussianNoiseTransform(std, seed=5).apply_image(grey).astype(float) - 128
        assert abs(noise.mean()) < 0.3 and abs(noise.std() - std) < 0.05 * std + 0.3  # rounding adds 1/12


def test_transforms_are_deterministic_once_drawn():
    # Detectron2 may re-apply a drawn transform to other data; the noise must not change.
    image = _he_like_image()
    tfm = GaussianNoiseTransform(5.0, seed=11)
    np.testing.assert_array_equal(tfm.apply_image(image), tfm.apply_image(image))


def test_blur_smooths_and_kernels_keep_flat_regions():
    image = _he_like_image()
    blurred = GaussianBlurTransform(1.5).apply_image(image)
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(
        np.diff(image.astype(float), axis=1)
    ).mean()
    flat = np.full((8, 9, 3), 120, dtype=np.uint8)
    for kernel in (emboss_kernel(0.7), sharpen_kernel(0.7)):
        assert kernel.sum() == pytest.approx(1.0)
        np.testing.assert_array_equal(ConvolutionTransform(kernel).apply_image(flat), flat)


def test_sharpen_increases_edge_contrast():
    step = np.zeros((8, 10, 3), dtype=np.uint8)
    step[:, 5:] = 200
    step[:, :5] = 50
    sharpened = ConvolutionTransform(sharpen_kernel(0.5)).apply_image(step)
    assert sharpened[0, 4, 0] < 50 and sharpened[0, 5, 0] > 200  # overshoot at the edge


def test_channel_shuffle_is_a_permutation():
    image = _he_like_image()
    np.random.seed(1)
    seen = set()
    for _ in range(40):
        tfm = RandomChannelShuffle().get_transform(image)
        out = tfm.apply_image(image)
        assert sorted(tfm.permutation) == [0, 1, 2]
        for i, source in enumerate(tfm.permutation):
            np.testing.assert_array_equal(out[..., i], image[..., source])
        seen.add(tfm.permutation)
    assert len(seen) == 6


def test_stain_jitter_identity_keeps_the_image():
    # Also for colours outside the H&E gamut, where rgb2hed's clamping would not round trip.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    out = StainJitterTransform((1, 1, 1), (0, 0, 0)).apply_image(image)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_stain_jitter_scales_haematoxylin():
    image = _he_like_image()
    out = StainJitterTransform((1.5, 1.0, 1.0), (0, 0, 0)).apply_image(image)
    nucleus = (slice(4, 9), slice(6, 11))
    assert rgb2hed(out)[nucleus][..., 0].mean() > rgb2hed(image)[nucleus][..., 0].mean() * 1.2


@pytest.mark.parametrize("seed", range(5))
def test_stain_jitter_stays_uint8_in_range_even_when_extreme(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    image[0, 0] = 0
    image[0, 1] = 255
    np.random.seed(seed)
    for tfm in (
        RandomStainJitter(scale=0.9, shift=0.5).get_transform(image),
        StainJitterTransform((3, 3, 3), (1, 1, 1)),
        StainJitterTransform((0, 0, 0), (-1, -1, -1)),
    ):
        out = tfm.apply_image(image)
        assert out.dtype == np.uint8 and out.shape == image.shape
    # No stain at all, optical density -1 everywhere: exp(+OD) is brighter than white and must be
    # clipped to 255, not wrap around.
    white = StainJitterTransform((0, 0, 0), (-1, -1, -1)).apply_image(image)
    assert (white == 255).all()


def test_random_augmentations_draw_within_their_ranges():
    image = _he_like_image()
    np.random.seed(0)
    for _ in range(20):
        assert 0.5 <= RandomGaussianBlur((0.5, 1.5)).get_transform(image).sigma <= 1.5
        assert 2.0 <= RandomGaussianNoise((2.0, 10.0)).get_transform(image).std <= 10.0
        jitter = RandomStainJitter(0.05, 0.01).get_transform(image)
        assert np.all(np.abs(jitter.scale - 1) <= 0.05) and np.all(np.abs(jitter.shift) <= 0.01)
    for aug in (RandomEmboss((0.2, 0.5)), RandomSharpen((0.2, 0.5))):
        assert aug.get_transform(image).kernel.sum() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- builder


def _cfg():
    cfg = get_cfg()
    add_nucseg_config(cfg)
    return cfg


def test_build_augmentations_test_mode_is_empty():
    assert build_nuclei_augmentations(_cfg(), is_train=False) == []


def test_build_augmentations_follows_cfg():
    cfg = _cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [16, 16]
    cfg.INPUT.AUG.GAUSSIAN_BLUR_PROB = 0.3
    cfg.INPUT.AUG.STAIN_JITTER_PROB = 0.5
    augs = build_nuclei_augmentations(cfg, is_train=True)
    assert isinstance(augs[0], T.RandomCrop)
    flips = [a for a in augs if isinstance(a, T.RandomFlip)]
    assert sorted((f.horizontal, f.vertical) for f in flips) == [(False, True), (True, False)]
    assert any(isinstance(a, RandomRotation90) for a in augs)
    applied = {type(a.aug): a.prob for a in augs if isinstance(a, T.RandomApply)}
    assert applied == {RandomGaussianBlur: 0.3, RandomStainJitter: 0.5}

    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.AUG.HFLIP = cfg.INPUT.AUG.VFLIP = cfg.INPUT.AUG.ROT90 = False
    cfg.INPUT.AUG.GAUSSIAN_BLUR_PROB = cfg.INPUT.AUG.STAIN_JITTER_PROB = 0.0
    assert build_nuclei_augmentations(cfg, is_train=True) == []


def test_build_augmentations_rescales_before_the_crop_only_when_asked():
    cfg = _cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [16, 16]
    assert not any(isinstance(getattr(a, "aug", None), RandomRescale) for a in build_nuclei_augmentations(cfg, True))
    cfg.INPUT.AUG.SCALE_PROB = 0.4
    cfg.INPUT.AUG.SCALE_RANGE = (1.5, 1.5)
    augs = build_nuclei_augmentations(cfg, is_train=True)
    assert isinstance(augs[0], T.RandomApply) and augs[0].prob == 0.4
    assert (augs[0].aug.low, augs[0].aug.high) == (1.5, 1.5)
    assert isinstance(augs[1], T.RandomCrop)
    # The crop comes after the rescale, so a rescaled image still yields crops of the configured size.
    cfg.INPUT.AUG.SCALE_PROB = 1.0
    cfg.INPUT.AUG.ROT90 = False
    image = np.zeros((12, 12, 3), np.uint8)
    aug_input = T.AugInput(image, sem_seg=np.ones((12, 12), np.int32))
    T.AugmentationList(build_nuclei_augmentations(cfg, is_train=True))(aug_input)
    assert aug_input.image.shape[:2] == (16, 16) == aug_input.sem_seg.shape
    cfg.INPUT.AUG.SCALE_RANGE = (1.0, 1.0)
    assert not any(isinstance(getattr(a, "aug", None), RandomRescale) for a in build_nuclei_augmentations(cfg, True))


def test_build_augmentations_passes_each_configured_range_to_its_augmentation():
    # Degenerate ranges, each value distinct, so a drawn transform shows which key reached it.
    cfg = _cfg()
    for key in ("GAUSSIAN_BLUR", "GAUSSIAN_NOISE", "EMBOSS", "SHARPEN", "STAIN_JITTER"):
        cfg.INPUT.AUG[key + "_PROB"] = 1.0
    cfg.INPUT.AUG.GAUSSIAN_BLUR_SIGMA = (2.0, 2.0)
    cfg.INPUT.AUG.GAUSSIAN_NOISE_STD = (7.0, 7.0)
    cfg.INPUT.AUG.EMBOSS_STRENGTH = (0.3, 0.3)
    cfg.INPUT.AUG.SHARPEN_STRENGTH = (0.4, 0.4)
    cfg.INPUT.AUG.STAIN_JITTER_SCALE = 0.2
    cfg.INPUT.AUG.STAIN_JITTER_SHIFT = 0.03
    cfg.INPUT.AUG.HFLIP = cfg.INPUT.AUG.VFLIP = cfg.INPUT.AUG.ROT90 = False
    image = _he_like_image()
    np.random.seed(0)
    drawn = {type(a.aug): a.aug.get_transform(image) for a in build_nuclei_augmentations(cfg, is_train=True)}
    assert drawn[RandomGaussianBlur].sigma == 2.0
    assert drawn[RandomGaussianNoise].std == 7.0
    np.testing.assert_allclose(drawn[RandomEmboss].kernel, emboss_kernel(0.3, 1.0))
    np.testing.assert_allclose(drawn[RandomSharpen].kernel, sharpen_kernel(0.4, 1.0))
    # The defaults are 0.05 and 0.01: 20 draws of 3 reach past them, never past the configured values.
    stain_jitter = [a.aug for a in build_nuclei_augmentations(cfg, is_train=True)
                    if isinstance(a.aug, RandomStainJitter)][0]
    jitters = [stain_jitter.get_transform(image) for _ in range(20)]
    scale_deviation = np.abs(np.array([j.scale for j in jitters]) - 1.0)
    shift = np.abs(np.array([j.shift for j in jitters]))
    assert drawn[RandomStainJitter].scale.shape == (3,)
    assert 0.05 < scale_deviation.max() <= 0.2 and 0.01 < shift.max() <= 0.03


@pytest.mark.parametrize("image_hw", [(10, 12), (40, 50), (12, 40)])
def test_crop_works_on_images_smaller_than_the_crop(image_hw):
    cfg = _cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [16, 24]
    cfg.INPUT.AUG.ROT90 = False
    augs = build_nuclei_augmentations(cfg, is_train=True)
    image = np.zeros(image_hw + (3,), dtype=np.uint8)
    aug_input = T.AugInput(image, sem_seg=np.zeros(image_hw, np.int32))
    T.AugmentationList(augs)(aug_input)
    expected = (min(16, image_hw[0]), min(24, image_hw[1]))
    assert aug_input.image.shape[:2] == expected == aug_input.sem_seg.shape


def test_all_photometric_on_keeps_segmentation():
    cfg = _cfg()
    for key in ("GAUSSIAN_BLUR", "GAUSSIAN_NOISE", "EMBOSS", "SHARPEN", "CHANNEL_SHUFFLE", "STAIN_JITTER"):
        cfg.INPUT.AUG[key + "_PROB"] = 1.0
    cfg.INPUT.AUG.HFLIP = cfg.INPUT.AUG.VFLIP = cfg.INPUT.AUG.ROT90 = False
    augs = build_nuclei_augmentations(cfg, is_train=True)
    # Stain jitter unmixes H&E from true RGB, so it must run before the channel shuffle.
    assert [type(a.aug) for a in augs] == [
        RandomStainJitter, RandomGaussianBlur, RandomGaussianNoise, RandomEmboss, RandomSharpen, RandomChannelShuffle
    ]
    image = _he_like_image()
    label_map = np.random.default_rng(0).integers(0, 5, size=image.shape[:2]).astype(np.int32)
    np.random.seed(0)
    aug_input = T.AugInput(image.copy(), sem_seg=label_map.copy())
    T.AugmentationList(augs)(aug_input)
    np.testing.assert_array_equal(aug_input.sem_seg, label_map)
    assert aug_input.image.dtype == np.uint8 and not np.array_equal(aug_input.image, image)

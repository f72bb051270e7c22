"""Synthetic H&E tile generator: determinism, label-map validity, appearance, and the cache."""
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed

from nucseg_d2.data.synthetic import GENERATOR_VERSION, MIN_NUCLEUS_AREA, ensure_synthetic_split, generate_tile


def _tile(seed, index, size=(256, 256)):
    return generate_tile(np.random.default_rng([seed, index]), size)


@pytest.fixture(scope="module")
def tiles():
    return [_tile(7, i) for i in range(20)]


def _touching_pairs(labels):
    """Pairs of distinct nucleus ids that share a 4-connected pixel edge."""
    pairs = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        contact = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[contact].tolist(), b[contact].tolist())}
    return pairs


def test_same_seed_gives_identical_tiles():
    image_a, labels_a = _tile(3, 5)
    image_b, labels_b = _tile(3, 5)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(labels_a, labels_b)


def test_different_seeds_give_different_tiles():
    image_a, labels_a = _tile(3, 5)
    image_b, labels_b = _tile(4, 5)
    image_c, _ = _tile(3, 6)
    assert not np.array_equal(image_a, image_b)
    assert not np.array_equal(labels_a, labels_b)
    assert not np.array_equal(image_a, image_c)


@pytest.mark.parametrize("size", [(256, 256), (96, 160)])
def test_shapes_and_dtypes(size):
    image, labels = _tile(0, 0, size)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert labels.shape == size and labels.dtype == np.int32


def test_label_ids_are_contiguous(tiles):
    for _, labels in tiles:
        ids = np.unique(labels)
        assert ids[0] == 0
        np.testing.assert_array_equal(ids[1:], np.arange(1, labels.max() + 1))


def test_each_nucleus_is_one_component_of_sufficient_area(tiles):
    for _, labels in tiles:
        areas = np.bincount(labels.ravel())[1:]
        assert areas.min() >= MIN_NUCLEUS_AREA
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            _, num_parts = ndimage.label(labels[box] == index)
            assert num_parts == 1, f"nucleus {index} is split into {num_parts} parts"


def test_nuclei_are_darker_and_more_haematoxylin_than_background(tiles):
    for image, labels in tiles:
        nuclear = labels > 0
        haematoxylin = rgb2hed(image)[..., 0]
        assert haematoxylin[nuclear].mean() > haematoxylin[~nuclear].mean() + 0.02
        brightness = image.astype(float).mean(axis=2)
        assert brightness[nuclear].mean() < brightness[~nuclear].mean() - 25


def test_nuclei_are_more_blue_than_red_relative_to_background(tiles):
    # Purple haematoxylin vs pink eosin: blue-minus-red is higher inside nuclei.
    for image, labels in tiles:
        nuclear = labels > 0
        blue_minus_red = image[..., 2].astype(float) - image[..., 0]
        assert blue_minus_red[nuclear].mean() > blue_minus_red[~nuclear].mean() + 8


def test_density_spans_sparse_and_crowded(tiles):
    counts = [int(labels.max()) for _, labels in tiles]
    assert min(counts) >= 5
    assert min(counts) <= 25
    assert max(counts) >= 50
    assert max(counts) <= 120


def test_some_nuclei_touch(tiles):
    touching_tiles = sum(bool(_touching_pairs(labels)) for _, labels in tiles)
    assert touching_tiles >= 5


def test_split_is_written_once_and_reused(tmp_path):
    pairs = ensure_synthetic_split(tmp_path, "train", 3, (64, 80), seed=5)
    assert len(pairs) == 3
    split_dir = tmp_path / f"train_v{GENERATOR_VERSION}_s5_64x80"
    for index, (image_path, label_path) in enumerate(pairs):
        assert image_path == str(split_dir / f"img_{index:04d}.png")
        assert label_path == str(split_dir / f"lab_{index:04d}.png")
    mtimes = {p: os.stat(p).st_mtime_ns for pair in pairs for p in pair}

    again = ensure_synthetic_split(tmp_path, "train", 3, (64, 80), seed=5)
    assert again == pairs
    assert {p: os.stat(p).st_mtime_ns for pair in again for p in pair} == mtimes
    assert not [name for name in os.listdir(split_dir) if name.endswith(".tmp")]


def test_split_regenerates_missing_files_and_extends(tmp_path):
    pairs = ensure_synthetic_split(tmp_path, "val", 2, 48, seed=1)
    first_image = np.asarray(Image.open(pairs[1][0]))
    os.remove(pairs[1][1])
    longer = ensure_synthetic_split(tmp_path, "val", 4, 48, seed=1)
    assert longer[:2] == pairs
    assert all(os.path.isfile(p) for pair in longer for p in pair)
    # Tile i does not depend on how many tiles were asked for.
    np.testing.assert_array_equal(np.asarray(Image.open(longer[1][0])), first_image)
    np.testing.assert_array_equal(np.asarray(Image.open(longer[3][0])), _tile(1, 3, (48, 48))[0])


def test_interrupted_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    import nucseg_d2.data.synthetic as synthetic

    real_save = Image.Image.save

    def save_then_crash(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        raise KeyboardInterrupt("simulated interruption after the bytes were written")

    monkeypatch.setattr(Image.Image, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic_split(tmp_path, "train", 1, 32, seed=0)
    split_dir = tmp_path / f"train_v{synthetic.GENERATOR_VERSION}_s0_32x32"
    assert os.listdir(split_dir) == []

    monkeypatch.setattr(Image.Image, "save", real_save)
    (image_path, label_path), = synthetic.ensure_synthetic_split(tmp_path, "train", 1, 32, seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(image_path)), _tile(0, 0, (32, 32))[0])


def test_written_pngs_round_trip_exactly(tmp_path):
    (image_path, label_path), = ensure_synthetic_split(tmp_path, "test", 1, (64, 64), seed=9)
    image, labels = _tile(9, 0, (64, 64))

    with Image.open(image_path) as stored:
        assert stored.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(stored), image)
    with Image.open(label_path) as stored:
        stored_labels = np.asarray(stored)
    assert stored_labels.dtype == np.uint16
    np.testing.assert_array_equal(stored_labels, labels)

    import skimage.io

    read_back = skimage.io.imread(label_path)
    assert read_back.dtype == np.uint16
    np.testing.assert_array_equal(read_back, labels)


def test_command_line_writes_samples(tmp_path):
    from nucseg_d2.data.synthetic import main

    main([str(tmp_path), "--num", "2", "--size", "64"])
    names = sorted(os.listdir(tmp_path))
    assert names == ["img_0000.png", "img_0001.png", "lab_0000.png", "lab_0001.png",
                     "overlay_0000.png", "overlay_0001.png"]

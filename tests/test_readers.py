"""Readers: each file format on hand-made files, and on the real data when it is present."""
import warnings

import cv2
import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from nucseg_d2.data.readers import (
    NucleiDataError,
    load_label_map,
    read_cpm17_mat,
    read_label_map,
    read_monuseg_xml,
    read_rgb_image,
    composite_on_white,
    read_tnbc_gt,
)

from real_data import REAL_DATA_ROOT  # noqa: E402  (tests/ helper)

REAL_ROOT = REAL_DATA_ROOT
needs_tnbc = pytest.mark.skipif(not (REAL_ROOT / "tnbc").is_dir(), reason="real TNBC data absent")
needs_kumar = pytest.mark.skipif(
    not (REAL_ROOT / "kumar").is_dir(), reason="real Kumar data absent"
)

XML_IDS = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1"]


def _aperio_xml(regions, negative=()):
    """Aperio XML text with one Region per list of (x, y) vertices; the regions numbered (from 1)
    in ``negative`` are exclusions (NegativeROA="1")."""
    body = "".join(
        f'<Region Id="{i}" NegativeROA="{int(i in negative)}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for i, vertices in enumerate(regions, 1)
    )
    return f'<Annotations><Annotation Id="1"><Regions>{body}</Regions></Annotation></Annotations>'


def _match_ious(reference, candidate):
    """Per reference nucleus, IoU with the candidate nucleus overlapping it most (0 if none)."""
    reference_ids = np.unique(reference)[1:]
    both = (reference > 0) & (candidate > 0)
    pair_code = reference[both].astype(np.int64) * (int(candidate.max()) + 1) + candidate[both]
    codes, intersections = np.unique(pair_code, return_counts=True)
    pair_ref, pair_cand = np.divmod(codes, int(candidate.max()) + 1)
    ref_area = np.bincount(reference.ravel())
    cand_area = np.bincount(candidate.ravel())
    best = {}
    for r, c, inter in zip(pair_ref, pair_cand, intersections):
        if inter > best.get(r, (0, 0))[1]:
            best[r] = (c, inter)
    ious = []
    for r in reference_ids:
        if r not in best:
            ious.append(0.0)
            continue
        c, inter = best[r]
        ious.append(inter / (ref_area[r] + cand_area[c] - inter))
    return np.array(ious)


# ------------------------------------------------------------------------------ read_rgb_image
def test_rgba_png_drops_alpha_without_warning(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    rgba[1, 2, :3] = (200, 100, 50)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "tile.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_rgb_image(tmp_path / "tile.png")
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert image[0, 0].tolist() == [10, 20, 30]
    assert image[1, 2].tolist() == [200, 100, 50]


def test_greyscale_png_is_replicated_with_warning(tmp_path):
    grey = np.array([[0, 7], [128, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    with pytest.warns(UserWarning, match="greyscale"):
        image = read_rgb_image(tmp_path / "grey.png")
    assert image.shape == (2, 2, 3)
    assert (image == grey[..., None]).all()


def test_16bit_grey_png_is_scaled_with_warnings(tmp_path):
    grey16 = np.array([[0, 65535], [257, 500]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with pytest.warns(UserWarning) as caught:
        image = read_rgb_image(tmp_path / "grey16.png")
    messages = " ".join(str(w.message) for w in caught)
    assert "16-bit" in messages and "greyscale" in messages
    # round(v * 255 / 65535): 0 -> 0, 65535 -> 255, 257 -> 1, 500 -> 1.95 -> 2
    assert image[..., 0].tolist() == [[0, 255], [1, 2]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_image_is_scaled_not_truncated(tmp_path, suffix):
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (500, 65280, 65535)
    path = str(tmp_path / f"rgb16{suffix}")
    if suffix == ".png":
        cv2.imwrite(path, rgb16[..., ::-1])  # OpenCV writes BGR
    else:
        tifffile.imwrite(path, rgb16, compression="lzw")
    with pytest.warns(UserWarning, match="16-bit"):
        image = read_rgb_image(path)
    # Scaled: 500 -> 2, 65280 -> 254; keeping the high byte (Pillow's default) would give 1, 255.
    assert image[0, 0].tolist() == [2, 254, 255]


def test_16bit_colour_png_is_found_with_pillows_older_plain_tuple_tiles(tmp_path, monkeypatch):
    # Pillow before _Tile stored image.tile entries as plain tuples (no .args).
    import nucseg_d2.data.readers as readers

    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (500, 65280, 65535)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save(tmp_path / "rgb8.png")
    real_open = Image.open

    def open_with_tuple_tiles(*args, **kwargs):
        image = real_open(*args, **kwargs)
        image.tile = [tuple(tile) for tile in image.tile]
        return image

    monkeypatch.setattr(readers.Image, "open", open_with_tuple_tiles)
    assert read_rgb_image(tmp_path / "rgb8.png")[0, 0].tolist() == [7, 7, 7]
    with pytest.warns(UserWarning, match="16-bit"):
        assert read_rgb_image(tmp_path / "rgb16.png")[0, 0].tolist() == [2, 254, 255]


@pytest.mark.parametrize("colormap_bits", [16, 8])
def test_palette_tiff_image_reads_through_its_colormap(tmp_path, colormap_bits):
    full = 65535 if colormap_bits == 16 else 255  # the TIFF spec's 16-bit, or a writer's 8-bit entries
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, 1] = full  # index 1: red
    colormap[2, 2] = full  # index 2: blue
    colormap[:, 3] = full // 2  # index 3: mid grey: 32767 -> 127 (round(32767 * 255 / 65535)), 127 -> 127
    indices = np.array([[0, 1], [2, 3]], np.uint8)
    tifffile.imwrite(tmp_path / "indexed.tif", indices, photometric="palette", colormap=colormap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "greyscale replicated": it is colour
        image = read_rgb_image(tmp_path / "indexed.tif")
    assert image.tolist() == [[[0, 0, 0], [255, 0, 0]], [[0, 0, 255], [127, 127, 127]]]
    # A label map keeps the indices, as palette PNG label maps do.
    assert read_label_map(tmp_path / "indexed.tif").tolist() == [[0, 1], [2, 3]]


def test_tiff_stack_of_pages_is_refused_not_read_as_channels(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 8, 9), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((2, 8, 9, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "channels.tif", np.zeros((3, 8, 9), np.uint8), imagej=True)  # ImageJ: axes CYX
    for name in ("stack.tif", "pages.tif", "channels.tif"):
        with pytest.raises(NucleiDataError, match=rf"{name}: TIFF holds an array of shape .*expected one 2-D image"):
            read_rgb_image(tmp_path / name)
        with pytest.raises(NucleiDataError, match=rf"{name}: TIFF holds"):
            read_label_map(tmp_path / name)
    # A planar (channel-first) RGB TIFF is one image.
    planar = np.zeros((3, 8, 9), np.uint8)
    planar[0] = 200
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert read_rgb_image(tmp_path / "planar.tif")[0, 0].tolist() == [200, 0, 0]


def test_transparent_pixels_become_white_glass(tmp_path):
    # Straight alpha: colour 100 at alpha 0, 51, 255 gives 255, 100 * 0.2 + 255 * 0.8 = 224, 100.
    rgba = np.full((1, 3, 4), 100, np.uint8)
    rgba[0, :, 3] = (0, 51, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "crop.png")
    with pytest.warns(UserWarning, match="crop.png: transparent pixels composited onto white"):
        image = read_rgb_image(tmp_path / "crop.png")
    assert image[0].tolist() == [[255] * 3, [224] * 3, [100] * 3]
    # TIFF associated (premultiplied) alpha: stored colour 20 at alpha 51 is 20 + 255 * 0.8 = 224.
    premultiplied = rgba.copy()
    premultiplied[0, :, :3] = np.array([0, 20, 100])[:, None]
    tifffile.imwrite(tmp_path / "assoc.tif", premultiplied, photometric="rgb", extrasamples=["assocalpha"])
    with pytest.warns(UserWarning, match="transparent"):
        assert read_rgb_image(tmp_path / "assoc.tif")[0].tolist() == [[255] * 3, [224] * 3, [100] * 3]
    # Grey + alpha, tagged: composited, then replicated.
    tifffile.imwrite(tmp_path / "grey_alpha.tif", rgba[..., 2:], photometric="minisblack",
                     planarconfig="contig", extrasamples=["unassalpha"])
    with pytest.warns(UserWarning, match="greyscale"):
        assert read_rgb_image(tmp_path / "grey_alpha.tif")[0].tolist() == [[255] * 3, [224] * 3, [100] * 3]
    assert composite_on_white(rgba[..., :3]).tolist() == rgba[..., :3].tolist()


def test_extra_channels_not_tagged_as_alpha(tmp_path):
    two = np.full((2, 2, 2), 90, np.uint8)
    two[..., 1] = 0  # would make the image white if taken for alpha
    tifffile.imwrite(tmp_path / "two.tif", two, photometric="minisblack", planarconfig="contig")
    with pytest.raises(NucleiDataError, match="two.tif: 2 channels, the second not tagged as alpha"):
        read_rgb_image(tmp_path / "two.tif")
    four = np.full((2, 2, 4), 90, np.uint8)
    four[..., 3] = 0
    tifffile.imwrite(tmp_path / "four.tif", four, photometric="rgb", extrasamples=["unspecified"])
    with pytest.warns(UserWarning, match="4th channel not tagged as alpha, ignored"):
        assert (read_rgb_image(tmp_path / "four.tif") == 90).all()


def test_8bit_data_in_16bit_file_is_not_darkened_and_signed_8bit_is_refused(tmp_path):
    values = np.array([[0, 17], [128, 255]], np.uint16)
    tifffile.imwrite(tmp_path / "low16.tif", np.repeat(values[..., None], 3, axis=2), photometric="rgb")
    with pytest.warns(UserWarning, match=r"16-bit image \(uint16\) with values <= 255 read as 8-bit values"):
        image = read_rgb_image(tmp_path / "low16.tif")
    assert image[..., 0].tolist() == values.tolist()
    tifffile.imwrite(tmp_path / "signed.tif", np.full((2, 2, 3), 5, np.int8), photometric="rgb")
    with pytest.raises(NucleiDataError, match="signed.tif: unsupported image dtype int8"):
        read_rgb_image(tmp_path / "signed.tif")


def test_16bit_alpha_is_judged_apart_from_8bit_valued_colour(tmp_path):
    rgba16 = np.zeros((1, 2, 4), np.uint16)
    rgba16[0, :, :3] = [[0, 100, 200], [17, 50, 255]]
    rgba16[0, :, 3] = (65535, 0)  # opaque, transparent
    tifffile.imwrite(tmp_path / "rgba16.tif", rgba16, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.warns(UserWarning) as caught:
        image = read_rgb_image(tmp_path / "rgba16.tif")
    messages = " ".join(str(w.message) for w in caught)
    assert "16-bit image (uint16) with values <= 255 read as 8-bit" in messages
    assert "16-bit alpha channel (uint16) scaled" in messages
    # Colour kept (scaling it with the alpha's 65535 would give 0, 39, 78); the transparent pixel white.
    assert image[0].tolist() == [[0, 100, 200], [255, 255, 255]]


def test_lzw_tiff_rgb_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tile.tif", rgb, compression="lzw", photometric="rgb")
    assert (read_rgb_image(tmp_path / "tile.tif") == rgb).all()


def test_unreadable_images_raise_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.tif").write_bytes(b"not a tiff at all")
    for name in ["truncated.png", "garbage.tif", "missing.png"]:
        with pytest.raises(NucleiDataError, match=name):
            read_rgb_image(tmp_path / name)


def test_image_past_pillows_size_guard_says_how_to_read_it(tmp_path, monkeypatch):
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (179 Mpx by default: a 20000² PNG export);
    # the limit is lowered so that a 64x64 PNG stands for one. Its TIFF twin reads.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "large.png")
    tifffile.imwrite(tmp_path / "large.tif", pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(NucleiDataError, match=r"large.png: .*4096 pixels.*MAX_IMAGE_PIXELS.*saved as TIFF"):
        read_rgb_image(tmp_path / "large.png")
    np.testing.assert_array_equal(read_rgb_image(tmp_path / "large.tif"), pixels)


@needs_tnbc
def test_real_tnbc_rgba_slide():
    image = read_rgb_image(REAL_ROOT / "tnbc" / "Slide_01" / "01_1.png")
    with Image.open(REAL_ROOT / "tnbc" / "Slide_01" / "01_1.png") as original:
        assert original.mode == "RGBA"
        expected = np.asarray(original)[..., :3]
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert (image == expected).all()


@needs_kumar
def test_real_kumar_lzw_tiff_matches_pillow_decoder():
    path = REAL_ROOT / "kumar" / "images" / "TCGA-A7-A13E-01Z-00-DX1.tif"
    image = read_rgb_image(path)
    with Image.open(path) as original:  # an independent LZW decoder
        expected = np.asarray(original.convert("RGB"))
    assert image.shape == (1000, 1000, 3)
    assert (image == expected).all()


# ------------------------------------------------------------------------------ read_label_map
def test_uint16_png_label_map_with_id_gaps(tmp_path):
    labels = np.array([[0, 2, 2], [7, 0, 65535]], np.uint16)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    label_map = read_label_map(tmp_path / "labels.png")
    assert label_map.dtype == np.int32
    assert label_map.tolist() == [[0, 2, 2], [7, 0, 65535]]


def test_uint32_tiff_and_palette_png_label_maps(tmp_path):
    labels = np.array([[0, 100000], [3, 3]], np.uint32)
    tifffile.imwrite(tmp_path / "labels.tif", labels, compression="lzw")
    assert read_label_map(tmp_path / "labels.tif").tolist() == [[0, 100000], [3, 3]]
    palette = Image.fromarray(np.array([[0, 5], [9, 0]], np.uint8), "L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 7 % 256, i, 255 - i)])
    palette.save(tmp_path / "palette.png")
    # Ids are the palette indices, not the colours.
    assert read_label_map(tmp_path / "palette.png").tolist() == [[0, 5], [9, 0]]


def test_npy_label_maps_float_and_int64(tmp_path):
    np.save(tmp_path / "float.npy", np.array([[0.0, 4.0], [4.0, 1.0]], np.float32))
    with pytest.warns(UserWarning, match=r"float\.npy: float label map read as integer ids"):
        assert read_label_map(tmp_path / "float.npy").tolist() == [[0, 4], [4, 1]]
    huge = np.array([[0, 2**40]], np.int64)
    np.save(tmp_path / "huge.npy", huge)
    loaded = read_label_map(tmp_path / "huge.npy")
    assert loaded.dtype == np.int64 and loaded[0, 1] == 2**40
    # Past int64 a cast would wrap to negative ids: renumbered in order, 0 kept, each nucleus kept.
    beyond = np.array([[0, 2**63 + 5, 7], [2**64 - 1, 2**63 + 5, 0]], np.uint64)
    np.save(tmp_path / "beyond.npy", beyond)
    loaded = read_label_map(tmp_path / "beyond.npy")
    assert loaded.dtype == np.int64 and loaded.tolist() == [[0, 2, 1], [3, 2, 0]]
    np.save(tmp_path / "beyond_full.npy", np.where(beyond == 0, np.uint64(1), beyond))  # no background
    assert read_label_map(tmp_path / "beyond_full.npy").tolist() == [[1, 3, 2], [4, 3, 1]]


@pytest.mark.parametrize(
    "name, values, problem",
    [
        ("fractional.npy", np.array([[0.0, 1.5]]), "non-integral"),
        ("nan.npy", np.array([[0.0, np.nan]]), "NaN"),
        ("negative.npy", np.array([[0, -3]], np.int32), "negative"),
        ("volume.npy", np.zeros((2, 2, 2), np.int32), "2-D"),
    ],
)
def test_bad_label_maps_raise_naming_file_and_problem(tmp_path, name, values, problem):
    np.save(tmp_path / name, values)
    with pytest.raises(NucleiDataError, match=problem) as error:
        read_label_map(tmp_path / name)
    assert name in str(error.value)


def test_binary_mask_given_as_label_map_is_refused_or_flagged(tmp_path):
    two_blobs = np.zeros((6, 6), np.uint8)
    two_blobs[0:2, 0:2] = two_blobs[4:6, 4:6] = 255
    Image.fromarray(two_blobs).save(tmp_path / "mask.png")
    np.save(tmp_path / "mask.npy", two_blobs > 0)
    for name in ("mask.png", "mask.npy"):
        with pytest.raises(NucleiDataError, match=r"binary mask.* 2 separate pieces.*tnbc_binary") as error:
            read_label_map(tmp_path / name)
        assert name in str(error.value)
    # One id of another value in pieces may be one nucleus cut by a crop: read, with a warning.
    Image.fromarray(two_blobs // 255).save(tmp_path / "one_id.png")
    with pytest.warns(UserWarning, match="one_id.png: looks like a binary mask"):
        assert read_label_map(tmp_path / "one_id.png").max() == 1
    # One nucleus in one piece, or several ids: a label map, silently.
    one_blob = np.where(np.arange(36).reshape(6, 6) < 12, 255, 0).astype(np.uint8)
    Image.fromarray(one_blob).save(tmp_path / "one_nucleus.png")
    Image.fromarray(np.where(two_blobs > 0, np.arange(36).reshape(6, 6) // 18 + 1, 0).astype(np.uint8)).save(
        tmp_path / "two_nuclei.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_label_map(tmp_path / "one_nucleus.png").max() == 255
        assert read_label_map(tmp_path / "two_nuclei.png").max() == 2


@pytest.mark.parametrize("photometric", ["separated", "miniswhite"])
def test_cmyk_and_inverted_grey_tiff_images_are_refused(tmp_path, photometric):
    shape = (4, 4, 4) if photometric == "separated" else (4, 4)
    tifffile.imwrite(tmp_path / "odd.tif", np.zeros(shape, np.uint8), photometric=photometric)
    with pytest.raises(NucleiDataError, match=r"odd.tif: (SEPARATED|MINISWHITE) TIFF colour space"):
        read_rgb_image(tmp_path / "odd.tif")


def test_label_maps_keep_their_values_whatever_the_photometric_tag(tmp_path):
    ids = np.array([[0, 3], [5, 0]], np.uint8)
    tifffile.imwrite(tmp_path / "fiji.tif", ids, photometric="miniswhite")  # an inverting LUT
    assert read_label_map(tmp_path / "fiji.tif").tolist() == [[0, 3], [5, 0]]


def test_colour_label_map_with_differing_channels_is_rejected(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(NucleiDataError, match="colour.png"):
        read_label_map(tmp_path / "colour.png")
    grey_in_rgb = np.repeat(np.array([[0, 4]], np.uint8)[..., None], 3, axis=2)
    Image.fromarray(grey_in_rgb).save(tmp_path / "grey.png")
    assert read_label_map(tmp_path / "grey.png").tolist() == [[0, 4]]


@needs_kumar
def test_real_kumar_label_png():
    label_map = read_label_map(REAL_ROOT / "kumar" / "labels" / "TCGA-A7-A13E-01Z-00-DX1.png")
    assert label_map.dtype == np.int32 and label_map.shape == (1000, 1000)
    ids = np.unique(label_map)
    assert ids[0] == 0 and len(ids) - 1 == 314  # nuclei in this image (its XML has 314 regions)


# ------------------------------------------------------------------------------ read_tnbc_gt
def test_tnbc_gt_uses_4_connectivity(tmp_path):
    gt = np.array(
        [
            [255, 0, 0, 0],
            [0, 255, 0, 255],
            [0, 0, 0, 255],
        ],
        np.uint8,
    )
    Image.fromarray(gt, "L").save(tmp_path / "gt.png")
    label_map = read_tnbc_gt(tmp_path / "gt.png")
    # The two diagonal pixels are separate nuclei under 4-connectivity (one under 8-connectivity).
    assert label_map.tolist() == [[1, 0, 0, 0], [0, 2, 0, 3], [0, 0, 0, 3]]


def test_tnbc_gt_grey_plus_alpha_reads_the_grey_not_the_alpha(tmp_path):
    grey_alpha = np.zeros((3, 4, 2), np.uint8)
    grey_alpha[..., 1] = 255  # opaque everywhere: read as foreground it would be one nucleus
    grey_alpha[0, 0, 0] = grey_alpha[2, 2:4, 0] = 255
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "gt_la.png")
    assert read_tnbc_gt(tmp_path / "gt_la.png").tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]]


@pytest.mark.parametrize("foreground", [1, 255, 65535])
def test_tnbc_gt_accepts_any_single_foreground_value(tmp_path, foreground):
    mask = np.zeros((4, 6), np.uint16)
    mask[0:2, 0:2] = mask[2:4, 4:6] = foreground
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    assert read_tnbc_gt(tmp_path / "mask.tif").tolist() == [
        [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 2, 2], [0, 0, 0, 0, 2, 2]]


@pytest.mark.parametrize("values, problem", [
    (np.array([[0, 1], [2, 2]], np.uint8), r"not a binary mask \(2 distinct foreground values, e.g. \[1, 2\]\)"),
    (np.array([[0, 0.7], [0.7, 0]], np.float32), "binary mask of dtype float32"),
    (np.array([[0, -3], [0, 0]], np.int16), "negative values"),
])
def test_tnbc_gt_refuses_what_is_not_a_binary_mask(tmp_path, values, problem):
    tifffile.imwrite(tmp_path / "gt.tif", values)
    with pytest.raises(NucleiDataError, match="gt.tif: .*" + problem):
        read_tnbc_gt(tmp_path / "gt.tif")


@needs_tnbc
def test_real_tnbc_gt_component_count():
    total = 0
    for gt_path in sorted((REAL_ROOT / "tnbc").glob("GT_*/*.png")):
        label_map = read_tnbc_gt(gt_path)
        assert label_map.shape == (512, 512)
        total += int(label_map.max())
    assert total == 4056  # ../shared/data/SOURCES.md: about 4,056 nuclei with 4-connectivity


# ------------------------------------------------------------------------------ read_monuseg_xml
def test_monuseg_xml_rasterises_regions_in_order(tmp_path):
    square = [(2.5, 1.5), (5.5, 1.5), (5.5, 4.5), (2.5, 4.5)]  # X = 2.5..5.5, Y = 1.5..4.5
    overlapping = [(4.5, 3.5), (7.5, 3.5), (7.5, 5.5), (4.5, 5.5)]  # X = 4.5..7.5, Y = 3.5..5.5
    line = [(0, 0), (3, 0)]  # fewer than 3 vertices: no id
    (tmp_path / "a.xml").write_text(_aperio_xml([square, line, overlapping]))
    label_map = read_monuseg_xml(tmp_path / "a.xml", 6, 8)
    expected = np.zeros((6, 8), np.int32)
    # MATLAB coordinates: 0-based pixel (r, c) has its centre at (Y, X) = (r + 1, c + 1).
    expected[1:4, 2:5] = 1  # rows 1..3 (centres Y 2..4), columns 2..4 (X 3..5)
    expected[3:5, 4:7] = 2  # the later region wins the overlap
    assert (label_map == expected).all()


def test_monuseg_xml_negative_regions_are_cleared_not_numbered(tmp_path):
    square = [(1.5, 1.5), (6.5, 1.5), (6.5, 6.5), (1.5, 6.5)]  # pixels 1..5 x 1..5
    hole = [(2.5, 2.5), (4.5, 2.5), (4.5, 4.5), (2.5, 4.5)]  # pixels 2..3 x 2..3
    later = [(5.5, 5.5), (7.5, 5.5), (7.5, 7.5), (5.5, 7.5)]  # pixels 5..6 x 5..6
    (tmp_path / "hole.xml").write_text(_aperio_xml([square, hole, later], negative=(2,)))
    label_map = read_monuseg_xml(tmp_path / "hole.xml", 8, 8)
    expected = np.zeros((8, 8), np.int32)
    expected[1:6, 1:6] = 1
    expected[2:4, 2:4] = 0  # the exclusion is cleared, even though drawn before region 3
    expected[5:7, 5:7] = 2  # the exclusion took no id
    assert (label_map == expected).all()


def test_xml_without_regions_warns(tmp_path):
    (tmp_path / "empty.xml").write_text(_aperio_xml([]))
    with pytest.warns(UserWarning, match="empty.xml: no nucleus polygon"):
        assert not read_monuseg_xml(tmp_path / "empty.xml", 4, 4).any()


def test_unreadable_xml_is_named_not_a_traceback(tmp_path, monkeypatch):
    import nucseg_d2.data.readers as readers

    path = tmp_path / "locked.xml"
    path.write_text(_aperio_xml([[(1, 1), (3, 1), (3, 3)]]))

    def refuse(source, *args, **kwargs):  # as reading a file without read permission (tests may run as root)
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(readers.ET, "parse", refuse)
    with pytest.raises(NucleiDataError, match=r"locked.xml: cannot read \(Permission denied\)"):
        read_monuseg_xml(path, 4, 4)


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("cut.xml", _aperio_xml([[(1, 1), (3, 1), (3, 3)]])[:-30], "malformed XML"),
        ("noy.xml", '<Annotations><Annotation><Regions><Region><Vertices><Vertex X="1"/>'
         "</Vertices></Region></Regions></Annotation></Annotations>", "X/Y"),
        ("other.xml", "<svg><path/></svg>", "Aperio"),
    ],
)
def test_bad_xml_raises_naming_file(tmp_path, name, text, problem):
    (tmp_path / name).write_text(text)
    with pytest.raises(NucleiDataError, match=problem) as error:
        read_monuseg_xml(tmp_path / name, 10, 10)
    assert name in str(error.value)


@needs_kumar
@pytest.mark.parametrize("image_id", XML_IDS)
def test_real_xml_matches_kumar_label_map(image_id):
    reference = read_label_map(REAL_ROOT / "kumar" / "labels" / f"{image_id}.png")
    rasterised = read_monuseg_xml(REAL_ROOT / "kumar" / "xml" / f"{image_id}.xml", *reference.shape)
    assert len(np.unique(rasterised)) == len(np.unique(reference))  # one region per nucleus
    ious = _match_ious(reference, rasterised)
    # SOURCES.md: median 0.87-0.92 (the XML about 1 px wider); MATLAB's 1-based pixel centres give
    # 0.99-1.00 on these three, centres at r + 0.5 gave 0.91-0.94.
    assert np.median(ious) >= 0.98
    assert (ious >= 0.5).mean() >= 0.95


# ------------------------------------------------------------------------------ read_cpm17_mat
def test_cpm17_mat(tmp_path):
    inst_map = np.array([[0, 1, 1], [0, 0, 5]], np.uint16)
    scipy.io.savemat(tmp_path / "image_00.mat", {"inst_map": inst_map, "type_map": inst_map > 0})
    assert read_cpm17_mat(tmp_path / "image_00.mat").tolist() == inst_map.tolist()
    assert read_label_map(tmp_path / "image_00.mat").tolist() == inst_map.tolist()  # by suffix


def test_cpm17_mat_reads_float64_ids_as_the_release_stores_them_without_a_warning(tmp_path, recwarn):
    inst_map = np.array([[0, 2, 2], [7, 0, 0]], np.float64)  # not square: a transpose would show
    scipy.io.savemat(tmp_path / "image_01.mat", {"inst_map": inst_map})
    label_map = read_cpm17_mat(tmp_path / "image_01.mat")
    assert label_map.dtype == np.int32 and label_map.tolist() == [[0, 2, 2], [7, 0, 0]]
    assert not [w for w in recwarn if "float label map" in str(w.message)]
    scipy.io.savemat(tmp_path / "half.mat", {"inst_map": inst_map + 0.5})
    with pytest.raises(NucleiDataError, match=r"half\.mat: float label map has non-integral ids"):
        read_cpm17_mat(tmp_path / "half.mat")


def test_cpm17_mat_v73_is_named_with_what_to_do(tmp_path):
    # The 128-byte header of a MATLAB v7.3 (HDF5) file: version 0x0200, as scipy checks it.
    header = b"MATLAB 7.3 MAT-file, HDF5 schema 1.00 .".ljust(116, b" ") + bytes(8) + b"\x00\x02IM"
    (tmp_path / "v73.mat").write_bytes(header + bytes(512))
    with pytest.raises(NucleiDataError, match=r"v73\.mat: MATLAB v7\.3 \(HDF5\) \.mat files are not supported.*-v7"):
        read_cpm17_mat(tmp_path / "v73.mat")


def test_cpm17_mat_errors_name_the_file(tmp_path):
    scipy.io.savemat(tmp_path / "no_key.mat", {"type_map": np.zeros((2, 2))})
    with pytest.raises(NucleiDataError, match=r"no_key\.mat.*inst_map.*type_map"):
        read_cpm17_mat(tmp_path / "no_key.mat")
    (tmp_path / "broken.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(NucleiDataError, match="broken.mat"):
        read_cpm17_mat(tmp_path / "broken.mat")


# ------------------------------------------------------------------------------ load_label_map
def test_load_label_map_dispatches_and_checks_size(tmp_path):
    Image.fromarray(np.array([[0, 255], [0, 0]], np.uint8), "L").save(tmp_path / "gt.png")
    Image.fromarray(np.array([[0, 9], [7, 0]], np.uint16)).save(tmp_path / "ids.png")
    (tmp_path / "ids.xml").write_text(_aperio_xml([[(0.5, 0.5), (1.5, 0.5), (1.5, 1.5), (0.5, 1.5)]]))
    scipy.io.savemat(tmp_path / "ids.mat", {"inst_map": np.array([[3, 0], [0, 0]])})
    record = {"file_name": str(tmp_path / "image.png"), "height": 2, "width": 2}
    cases = {
        ("gt.png", "tnbc_binary"): [[0, 1], [0, 0]],
        ("ids.png", "label_map"): [[0, 9], [7, 0]],
        ("ids.xml", "monuseg_xml"): [[1, 0], [0, 0]],
        ("ids.mat", "cpm17_mat"): [[3, 0], [0, 0]],
    }
    for (label_name, label_format), expected in cases.items():
        label_file = str(tmp_path / label_name)
        label_map = load_label_map(dict(record, label_file=label_file, label_format=label_format))
        assert label_map.tolist() == expected, label_format
    taller = dict(record, label_file=str(tmp_path / "ids.png"), label_format="label_map", height=3)
    mismatch = r"ids\.png: label map is 2x2 but image .*image\.png is 3x2"
    with pytest.raises(NucleiDataError, match=mismatch):
        load_label_map(taller)
    with pytest.raises(NucleiDataError, match="unknown label_format"):
        load_label_map(dict(record, label_file=str(tmp_path / "ids.png"), label_format="polygons"))

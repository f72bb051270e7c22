"""Tests of nucseg_d2.predict.writers: each output read back with the tool its users open it with
(tifffile as napari does, json as QuPath's importer, pycocotools, csv/pyarrow)."""
import csv
import json
import os
import tracemalloc
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import skimage.io
import tifffile
import tiffslide
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage
from skimage.color import rgb2hed

from nucseg_d2.data.readers import read_label_map
from nucseg_d2.data.synthetic import generate_tile
from nucseg_d2.predict import writers
from nucseg_d2.predict.result import PredictionResult
from nucseg_d2.predict.tiling import open_label_map_file
from nucseg_d2.predict.writers import (
    OVERLAY_COLOR,
    nucleus_outline,
    nucleus_polygons,
    rle_from_crop,
    write_coco_json,
    write_geojson,
    write_label_tiff,
    write_nucleus_table,
    write_overlay_png,
)


@pytest.fixture(scope="module")
def synthetic_tile():
    image, labels = generate_tile(np.random.default_rng(7), (192, 224))
    return image, labels.astype(np.uint16)


def _result(labels, **kwargs):
    num = int(labels.max())
    return PredictionResult(labels, np.linspace(0.99, 0.5, num).astype(np.float32), **kwargs)


def _ring_area(ring):
    x, y = np.asarray(ring, float).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _leftover_temp_files(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# --------------------------------------------------------------------------- label TIFF


def test_label_tiff_round_trip_is_compressed_uint16(tmp_path, synthetic_tile):
    _, labels = synthetic_tile
    path = tmp_path / "labels.tif"
    write_label_tiff(path, labels.astype(np.int32))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert not page.is_tiled  # small maps in strips: every reader, ImageJ's included
        data = page.asarray()
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data, labels)


def test_label_tiff_records_where_it_lies_on_the_slide(tmp_path):
    labels = np.zeros((8, 8), np.int32)
    labels[2:4, 2:5] = 1
    path = tmp_path / "region_labels.tif"
    write_label_tiff(path, labels, mpp=0.5, origin=(1000, 2000), downsample=2.0)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        # 0.5 µm per pixel = 20,000 pixels per cm.
        assert tags["XResolution"].value == tags["YResolution"].value == (20000, 1)
        assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        placement = json.loads(tif.pages[0].description)["nucseg_d2"]
    assert placement == {"origin_level0": [1000, 2000], "downsample": 2.0, "mpp": 0.5}
    write_label_tiff(tmp_path / "plain.tif", labels)  # an image of unknown scale: no resolution
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        assert "XResolution" not in tif.pages[0].tags or tif.pages[0].tags["ResolutionUnit"].value == 1
        assert json.loads(tif.pages[0].description)["nucseg_d2"]["mpp"] is None
    with pytest.raises(ValueError, match="µm per pixel"):
        write_label_tiff(tmp_path / "bad.tif", labels, mpp=0)
    assert not (tmp_path / "bad.tif").exists()


def test_label_tiff_switches_to_uint32_past_65535_ids(tmp_path):
    ids_up_to_65535 = np.arange(256 * 256, dtype=np.int64).reshape(256, 256)  # 0..65535
    write_label_tiff(tmp_path / "u16.tif", ids_up_to_65535)
    assert tifffile.imread(tmp_path / "u16.tif").dtype == np.uint16
    ids_up_to_65536 = ids_up_to_65535 + 1  # 1..65536: one id too many for uint16
    write_label_tiff(tmp_path / "u32.tif", ids_up_to_65536)
    data = tifffile.imread(tmp_path / "u32.tif")
    assert data.dtype == np.uint32
    np.testing.assert_array_equal(data, ids_up_to_65536)


def test_large_label_tiff_is_tiled(tmp_path):
    labels = np.zeros((64, 2100), np.uint16)
    labels[10:20, 2050:2060] = 3
    write_label_tiff(tmp_path / "big.tif", labels)
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        np.testing.assert_array_equal(tif.pages[0].asarray(), labels)


def test_large_label_tiff_has_a_pyramid_that_slide_readers_open(tmp_path):
    """Reduced levels halve down to 1024 px a side (3000 -> 1500 -> 750); each is every 2nd / 4th
    pixel of the map, ids unblended, at its own µm per pixel; plain readers still get the map."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 70000, size=(3000, 2500)).astype(np.uint32)  # uint32: past 65,535 ids
    write_label_tiff(tmp_path / "slide_labels.tif", labels, mpp=0.25, origin=(100, 200))
    for read in (tifffile.imread, read_label_map, lambda p: cv2.imread(str(p), cv2.IMREAD_UNCHANGED),
                 skimage.io.imread):  # readers of one image still get the full map alone
        np.testing.assert_array_equal(read(tmp_path / "slide_labels.tif"), labels)
    with tifffile.TiffFile(tmp_path / "slide_labels.tif") as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(3000, 2500), (1500, 1250), (750, 625)]
        for level, factor in zip(levels[1:], (2, 4)):
            np.testing.assert_array_equal(level.asarray(), labels[::factor, ::factor])
            page = level.pages[0]
            assert page.is_tiled and page.subfiletype == 1 and page.dtype == np.uint32
            assert page.get_resolution(tifffile.RESUNIT.CENTIMETER) == pytest.approx((1e4 / (0.25 * factor),) * 2)
        assert json.loads(tif.pages[0].description)["nucseg_d2"]["origin_level0"] == [100, 200]
    with Image.open(tmp_path / "slide_labels.tif") as picture:
        assert picture.n_frames == 3  # readers that list pages see the levels as further pages
    slide = tiffslide.TiffSlide(str(tmp_path / "slide_labels.tif"))
    try:
        assert slide.level_dimensions == ((2500, 3000), (1250, 1500), (625, 750))
        level1 = slide.read_region((0, 0), 1, (1250, 1500), as_array=True)
        np.testing.assert_array_equal(level1[..., 0], labels[::2, ::2])  # the ids themselves
    finally:
        slide.close()
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(tmp_path / "slide_labels.tif")) as slide:  # the geometry only: see the docs
        assert slide.level_dimensions == ((2500, 3000), (1250, 1500), (625, 750))


def test_label_tiff_levels_are_narrowed_like_the_full_map(tmp_path):
    labels = np.zeros((2049, 2100), np.uint32)  # the store's dtype past 65,535 detections, fewer painted
    labels[1000:1010, 2000:2010] = 65535
    write_label_tiff(tmp_path / "labels.tif", labels)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        levels = tif.series[0].levels
        assert [level.dtype for level in levels] == [np.uint16] * 3
        np.testing.assert_array_equal(levels[2].asarray(), labels[::4, ::4])


def test_a_thin_label_tiff_keeps_one_pyramid(tmp_path):
    """Halving stops at the shorter side, so every level is smaller than the last on both axes."""
    for shape, level_shapes in (((3, 5000), [(3, 5000), (2, 2500)]), ((1, 5000), [(1, 5000)])):
        write_label_tiff(tmp_path / "thin.tif", np.ones(shape, np.uint16))
        with tifffile.TiffFile(tmp_path / "thin.tif") as tif:
            assert len(tif.series) == 1 and [level.shape for level in tif.series[0].levels] == level_shapes


def test_only_a_tiled_label_tiff_has_a_pyramid_unless_asked_not_to(tmp_path):
    write_label_tiff(tmp_path / "tile_labels.tif", np.ones((2048, 2048), np.uint16))
    write_label_tiff(tmp_path / "tiled_labels.tif", np.ones((2049, 2049), np.uint16))
    write_label_tiff(tmp_path / "flat_labels.tif", np.ones((2049, 2049), np.uint16), pyramid=False)
    for name, tiled, num_pages in (("tile_labels.tif", False, 1), ("tiled_labels.tif", True, 3),
                                   ("flat_labels.tif", True, 1)):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert len(tif.pages) == len(tif.series[0].levels) == num_pages and tif.pages[0].is_tiled == tiled


def test_an_empty_label_map_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="empty.tif.*non-empty"):
        write_label_tiff(tmp_path / "empty.tif", np.zeros((0, 3000), np.uint16))


def test_writers_never_copy_a_memory_mapped_slide_label_map(tmp_path, synthetic_tile):
    """A whole slide's label map, memory-mapped from disk because it may exceed the RAM, is
    written in tiles, nuclei and blocks: no writer's Python-side peak reaches a quarter of it.
    The map is uint32 (the store's dtype when it held more than 65,535 detections) with fewer ids
    painted, so the label TIFF narrows it to uint16, tile by tile."""
    image, labels = synthetic_tile
    height, width = 6000, 6000
    label_map = open_label_map_file(str(tmp_path / "map.npy"), height, width, np.uint32)
    offset = 0
    # Corners included: the tiles at the right and bottom edges are incomplete (6000 = 23 * 256 + 112).
    for y0, x0 in ((0, 0), (3000, 2900), (height - 192, width - 224)):
        label_map[y0 : y0 + 192, x0 : x0 + 224] = np.where(labels > 0, labels.astype(np.uint32) + offset, 0)
        offset += int(labels.max())
    result = _result(label_map, mpp=0.25)

    def rgb(y0, y1, x0, x1):
        return np.full((y1 - y0, x1 - x0, 3), 120, np.uint8)

    peaks = {}
    for name, write in [
        ("labels", lambda: write_label_tiff(tmp_path / "slide_labels.tif", label_map)),
        ("geojson", lambda: write_geojson(tmp_path / "slide.geojson", result)),
        ("coco", lambda: write_coco_json(tmp_path / "slide_coco.json", result, 1, "slide.svs")),
        ("csv", lambda: write_nucleus_table(tmp_path / "slide_nuclei.csv", result, rgb)),
        ("overlay", lambda: write_overlay_png(tmp_path / "slide_overlay.png", result,
                                              np.zeros((1024, 1024, 3), np.uint8))),
    ]:
        tracemalloc.start()
        try:
            write()
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert max(peaks.values()) < label_map.nbytes / 4, peaks
    # Below a copy of the first reduced level (a quarter of the map, uint16: an eighth of its bytes).
    assert peaks["labels"] < label_map.nbytes / 16, peaks
    written = tifffile.imread(tmp_path / "slide_labels.tif")
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, label_map)
    features = json.loads((tmp_path / "slide.geojson").read_text())["features"]
    assert len(features) == offset == len(json.loads((tmp_path / "slide_coco.json").read_text()))
    with open(tmp_path / "slide_nuclei.csv") as stream:
        assert len(list(csv.DictReader(stream))) == offset


def _map_full_of_nuclei(size):
    """A size x size uint32 label map tiled with synthetic nuclei, ids 1..N."""
    label_map, next_id = np.zeros((size, size), np.uint32), 0
    rng = np.random.default_rng(5)
    for y0 in range(0, size, 192):
        for x0 in range(0, size, 224):
            _, labels = generate_tile(rng, (192, 224))
            crop = labels[: size - y0, : size - x0].astype(np.uint32)
            label_map[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = np.where(crop > 0, crop + next_id, 0)
            next_id += int(labels.max())
    _, compact = np.unique(label_map, return_inverse=True)  # ids cut off at the edges: renumber
    return compact.reshape(size, size).astype(np.uint32)


def test_the_nucleus_table_memory_follows_its_block_not_the_map(tmp_path):
    """regionprops_table over a whole map keeps every nucleus's pixel coordinates at once (~10
    bytes per nucleus pixel: gigabytes for a slide); the table measures block by block instead,
    with the same values."""
    from skimage.measure import regionprops_table

    def grey(y0, y1, x0, x1):
        return np.full((y1 - y0, x1 - x0, 3), 120, np.uint8)

    peaks = []
    for size in (768, 1536):  # 4x the pixels and nuclei
        label_map = _map_full_of_nuclei(size)
        result = _result(label_map)
        tracemalloc.start()
        try:
            columns = writers.nucleus_table(result, grey, block_size=256)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # Per nucleus a few hundred bytes of boxes and columns remain (1.5 -> 2.5 MB here); the
    # whole-map regionprops_table grew with the nuclei's pixels (1.6 -> 6.3 MB).
    assert peaks[1] < 2.5 * peaks[0], peaks
    whole = regionprops_table(label_map, properties=writers._GEOMETRY_PROPERTIES)
    np.testing.assert_array_equal(columns["id"], whole["label"])
    np.testing.assert_allclose(columns["centroid_y"], whole["centroid-0"] + 0.5, rtol=0, atol=1e-9)
    np.testing.assert_allclose(columns["centroid_x"], whole["centroid-1"] + 0.5, rtol=0, atol=1e-9)
    for name, key in (("area_px", "area"), ("perimeter_px", "perimeter"), ("solidity", "solidity"),
                      ("eccentricity", "eccentricity"), ("major_axis_px", "axis_major_length")):
        np.testing.assert_array_equal(columns[name], whole[key], err_msg=name)


@pytest.mark.parametrize("side, pages_written", [(8, 0), (2100, 1)])  # a strip TIFF; a tiled one, at a level
def test_failed_write_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, side, pages_written):
    path = tmp_path / "labels.tif"
    write_label_tiff(path, np.ones((8, 8), np.uint16))
    before = path.read_bytes()

    write_page = writers.tifffile.TiffWriter.write
    pages = []

    def fail_after(self, *args, **kwargs):  # the pages before are in the temp file by then
        if len(pages) == pages_written:
            raise OSError("disk full")
        pages.append(write_page(self, *args, **kwargs))

    monkeypatch.setattr(writers.tifffile.TiffWriter, "write", fail_after)
    with pytest.raises(OSError, match="labels.tif.*disk full"):
        write_label_tiff(path, np.full((side, side), 2, np.uint16))
    assert path.read_bytes() == before
    assert _leftover_temp_files(tmp_path) == []


def test_unwritable_destination_error_names_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "out.geojson"
    with pytest.raises(OSError, match=str(target)):
        write_geojson(target, _result(np.ones((4, 4), np.uint16)))


def test_rejects_ids_without_scores(tmp_path):
    labels = np.array([[0, 1], [2, 3]], np.uint16)
    with pytest.raises(ValueError, match="out.json.*ids up to 3 but only 2 scores"):
        write_coco_json(tmp_path / "out.json", PredictionResult(labels, np.ones(2, np.float32)), 1, "x")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- GeoJSON


def _square_result(**kwargs):
    labels = np.zeros((10, 12), np.uint16)
    labels[2:5, 3:7] = 1  # rows 2..4, columns 3..6: pixel edges x 3..7, y 2..5
    labels[7:9, 9:11] = 2
    return PredictionResult(labels, np.array([0.9, 0.6], np.float32), **kwargs)


def test_geojson_square_has_exact_pixel_edge_corners(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slide.svs").write_bytes(b"")  # a real file: its path is made real for the ids
    path = tmp_path / "nuclei.geojson"
    assert write_geojson(path, _square_result(source="slide.svs")) == 2
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    feature = collection["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon" and len(feature["geometry"]["coordinates"]) == 1
    assert ring[0] == ring[-1] and len(ring) == 5
    assert sorted(map(tuple, ring[:-1])) == [(3, 2), (3, 5), (7, 2), (7, 5)]
    properties = feature["properties"]
    assert properties["objectType"] == "detection"
    assert properties["classification"]["name"] == "Nucleus"
    assert len(properties["classification"]["color"]) == 3
    assert properties["measurements"] == {"score": pytest.approx(0.9), "label_id": 1}
    assert properties["isLocked"] is False
    assert uuid.UUID(feature["id"]).version == 5
    # Same input, same ids: re-importing into QuPath does not create new objects' identities.
    write_geojson(tmp_path / "again.geojson", _square_result(source="slide.svs"))
    assert json.loads((tmp_path / "again.geojson").read_text())["features"][0]["id"] == feature["id"]
    # The same file however its path is written; another region or level of it gets other ids.
    for kwargs, same in (({"source": os.path.abspath("slide.svs")}, True), ({"source": "./slide.svs"}, True),
                         ({"source": "slide.svs", "origin": (0, 512)}, False),
                         ({"source": "slide.svs", "downsample": 4.0}, False), ({"source": "other.svs"}, False),
                         ({"source": None}, False)):
        write_geojson(tmp_path / "other.geojson", _square_result(**kwargs))
        other_id = json.loads((tmp_path / "other.geojson").read_text())["features"][0]["id"]
        assert (other_id == feature["id"]) == same, kwargs


def test_geojson_applies_downsample_and_origin(tmp_path):
    path = tmp_path / "nuclei.geojson"
    write_geojson(path, _square_result(downsample=2.0, origin=(100, 50)))
    ring = json.loads(path.read_text())["features"][0]["geometry"]["coordinates"][0]
    assert sorted(map(tuple, ring[:-1])) == [(106, 54), (106, 60), (114, 54), (114, 60)]
    write_geojson(path, _square_result(downsample=1.5, origin=(0.25, 0)))
    ring = json.loads(path.read_text())["features"][0]["geometry"]["coordinates"][0]
    assert sorted(map(tuple, ring[:-1])) == [(4.75, 3), (4.75, 7.5), (10.75, 3), (10.75, 7.5)]


def test_geojson_exterior_follows_right_hand_rule(tmp_path):
    path = tmp_path / "nuclei.geojson"
    write_geojson(path, _square_result())
    for feature in json.loads(path.read_text())["features"]:
        x, y = np.asarray(feature["geometry"]["coordinates"][0], float)[:-1].T
        # RFC 7946: exterior counter-clockwise = positive shoelace on the coordinates as written.
        assert 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0


def test_outline_with_hole_and_two_pieces():
    ring_nucleus = np.zeros((9, 9), bool)
    ring_nucleus[1:8, 1:8] = True
    ring_nucleus[3:6, 4:6] = False  # a 3x2 hole
    exterior, hole = nucleus_outline(ring_nucleus)
    assert _ring_area(exterior[:-1]) - _ring_area(hole[:-1]) == ring_nucleus.sum()
    signed = [0.5 * (np.dot(r[:-1, 0], np.roll(r[:-1, 1], -1)) - np.dot(r[:-1, 1], np.roll(r[:-1, 0], -1)))
              for r in (exterior, hole)]
    assert signed[0] > 0 > signed[1]  # hole wound the other way
    assert sorted(map(tuple, hole[:-1])) == [(4, 3), (4, 6), (6, 3), (6, 6)]

    two_pieces = np.zeros((10, 10), bool)
    two_pieces[1:3, 1:3] = True  # 4 pixels
    two_pieces[5:9, 4:9] = True  # 20 pixels: the one kept
    (exterior,) = nucleus_outline(two_pieces)
    assert sorted(map(tuple, exterior[:-1])) == [(4, 5), (4, 9), (9, 5), (9, 9)]

    # A pixel touching the nucleus only at a corner is a separate piece: a ring around both
    # would pass the corner (2, 2) twice, an invalid polygon.
    corner_touch = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    (exterior,) = nucleus_outline(corner_touch)
    assert sorted(map(tuple, exterior[:-1])) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    # Two one-pixel holes meeting at a corner: two simple hole rings sharing that point.
    two_holes = np.ones((4, 4), bool)
    two_holes[1, 1] = two_holes[2, 2] = False
    exterior, *holes = nucleus_outline(two_holes)
    assert len(holes) == 2 and all(len({tuple(p) for p in h[:-1]}) == len(h) - 1 == 4 for h in holes)
    assert _ring_area(exterior[:-1]) - sum(_ring_area(h[:-1]) for h in holes) == 14

    one_pixel = np.zeros((3, 3), bool)
    one_pixel[1, 1] = True
    (exterior,) = nucleus_outline(one_pixel)
    assert _ring_area(exterior[:-1]) == 1
    assert nucleus_outline(np.zeros((3, 3), bool)) == []


def _polygons_of(geometry):
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def _polygon_area(rings):
    return _ring_area(rings[0][:-1]) - sum(_ring_area(hole[:-1]) for hole in rings[1:])


def test_every_piece_of_a_nucleus_becomes_a_polygon():
    three_pieces = np.zeros((10, 10), bool)
    three_pieces[1:3, 1:3] = True  # 4 pixels
    three_pieces[5:9, 4:9] = True  # 20 pixels: listed first
    three_pieces[3, 3] = True  # 1 pixel touching the first square at its corner (3, 3) only
    polygons = nucleus_polygons(three_pieces)
    assert [len(rings) for rings in polygons] == [1, 1, 1]
    assert [_polygon_area(rings) for rings in polygons] == [20, 4, 1]
    assert sorted(map(tuple, polygons[0][0][:-1])) == [(4, 5), (4, 9), (9, 5), (9, 9)]
    assert sorted(map(tuple, polygons[1][0][:-1])) == [(1, 1), (1, 3), (3, 1), (3, 3)]
    assert sorted(map(tuple, polygons[2][0][:-1])) == [(3, 3), (3, 4), (4, 3), (4, 4)]
    # The largest piece's polygon is nucleus_outline's, holes included.
    ring_nucleus = np.zeros((12, 12), bool)
    ring_nucleus[4:11, 4:11] = True
    ring_nucleus[6:9, 7:9] = False
    ring_nucleus[0, 0] = True
    largest, speck = nucleus_polygons(ring_nucleus)
    assert len(largest) == 2 and all(np.array_equal(a, b) for a, b in zip(largest, nucleus_outline(ring_nucleus)))
    assert _polygon_area(largest) == 43 and _polygon_area(speck) == 1
    assert nucleus_polygons(np.zeros((3, 3), bool)) == []


def test_geojson_writes_a_nucleus_in_pieces_as_one_multipolygon(tmp_path):
    labels = np.zeros((10, 12), np.uint16)
    labels[5:9, 4:9] = 1
    labels[1:3, 1:3] = 1  # the same nucleus, in a second piece
    labels[1:3, 9:11] = 2
    path = tmp_path / "nuclei.geojson"
    assert write_geojson(path, PredictionResult(labels, np.array([0.9, 0.8], np.float32), origin=(100, 0)),
                         simplify_tolerance=0) == 2
    first, second = json.loads(path.read_text())["features"]
    assert first["geometry"]["type"] == "MultiPolygon" and second["geometry"]["type"] == "Polygon"
    big, small = first["geometry"]["coordinates"]
    assert sorted(map(tuple, big[0][:-1])) == [(104, 5), (104, 9), (109, 5), (109, 9)]
    assert sorted(map(tuple, small[0][:-1])) == [(101, 1), (101, 3), (103, 1), (103, 3)]
    x, y = np.asarray(small[0], float)[:-1].T
    assert 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0  # RFC 7946 winding


def test_exact_outlines_enclose_exactly_the_nucleus_pixels(tmp_path, synthetic_tile):
    _, labels = synthetic_tile
    # Paint a stripe of one nucleus over another, so that some nuclei fall into pieces.
    ids = np.unique(labels)[1:]
    labels = labels.copy()
    boxes = ndimage.find_objects(labels)
    for victim, painter in zip(ids[::7], ids[1::7]):
        rows, cols = boxes[victim - 1]
        stripe = labels[(rows.start + rows.stop) // 2, cols]  # a view: painting it paints labels
        stripe[stripe == victim] = painter
    path = tmp_path / "nuclei.geojson"
    count = write_geojson(path, _result(labels), simplify_tolerance=0)
    features = json.loads(path.read_text())["features"]
    assert count == len(features) == len(np.unique(labels)) - 1
    multi = 0
    for feature in features:
        label_id = feature["properties"]["measurements"]["label_id"]
        polygons = _polygons_of(feature["geometry"])
        assert sum(_polygon_area(rings) for rings in polygons) == np.sum(labels == label_id), label_id
        multi += len(polygons) > 1
    assert multi >= 2


def test_light_simplification_keeps_area_close(tmp_path, synthetic_tile):
    _, labels = synthetic_tile
    write_geojson(tmp_path / "exact.geojson", _result(labels), simplify_tolerance=0)
    write_geojson(tmp_path / "light.geojson", _result(labels), simplify_tolerance=0.5)
    exact = json.loads((tmp_path / "exact.geojson").read_text())["features"]
    light = json.loads((tmp_path / "light.geojson").read_text())["features"]
    exact_vertices = sum(len(_polygons_of(f["geometry"])[0][0]) for f in exact)
    light_vertices = sum(len(_polygons_of(f["geometry"])[0][0]) for f in light)
    assert light_vertices < 0.8 * exact_vertices
    for a, b in zip(exact, light):
        area_exact = _ring_area(_polygons_of(a["geometry"])[0][0])
        assert _ring_area(_polygons_of(b["geometry"])[0][0]) == pytest.approx(area_exact, rel=0.15, abs=2)


# --------------------------------------------------------------------------- COCO


def test_rle_from_crop_is_byte_identical_to_pycocotools(synthetic_tile):
    _, labels = synthetic_tile
    height, width = labels.shape
    for label_id, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        if rows is None:
            continue
        full = labels == label_id
        expected = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))
        got = rle_from_crop(full[rows, cols], rows.start, cols.start, height, width)
        assert got["counts"] == expected["counts"].decode("ascii")
        assert got["size"] == [height, width]
    # A nucleus in the last pixel has no trailing background run; an empty mask is one run.
    corner = np.zeros((4, 5), np.uint8)
    corner[3, 4] = 1
    expected = mask_util.encode(np.asfortranarray(corner))["counts"].decode("ascii")
    assert rle_from_crop(corner[3:, 4:].astype(bool), 3, 4, 4, 5)["counts"] == expected


def test_coco_results_decode_to_the_label_map_and_score_ap_1(tmp_path, synthetic_tile, capsys):
    _, labels = synthetic_tile
    result = _result(labels)
    path = tmp_path / "coco.json"
    image_entry = write_coco_json(path, result, image_id=3, file_name="tile.png")
    assert image_entry == {"id": 3, "file_name": "tile.png", "height": 192, "width": 224}
    detections = json.loads(path.read_text())
    assert len(detections) == labels.max()
    rebuilt = np.zeros_like(labels)
    for label_id, detection in enumerate(detections, start=1):
        assert detection["category_id"] == 1 and detection["image_id"] == 3
        assert detection["score"] == pytest.approx(result.scores[label_id - 1])
        mask = mask_util.decode(detection["segmentation"]).astype(bool)
        x, y, w, h = detection["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
        assert detection["area"] == mask.sum()
        rebuilt[mask] = label_id
    np.testing.assert_array_equal(rebuilt, labels)

    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [image_entry],
        "categories": [{"id": 1, "name": "nucleus"}],
        "annotations": [dict(d, id=i, iscrowd=0) for i, d in enumerate(detections, start=1)],
    }
    ground_truth.createIndex()
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(path)), "segm")
    assert len(detections) <= evaluation.params.maxDets[-1]  # AP counts up to 100 detections
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_empty_prediction_writes_empty_list(tmp_path):
    empty = PredictionResult(np.zeros((5, 5), np.uint16), np.zeros(0, np.float32))
    write_coco_json(tmp_path / "coco.json", empty, 1, "x.png")
    assert json.loads((tmp_path / "coco.json").read_text()) == []


# --------------------------------------------------------------------------- nucleus table


def _two_nucleus_image():
    labels = np.zeros((6, 8), np.uint16)
    labels[1:3, 1:3] = 1  # 2x2 square, centroid (row 1.5, col 1.5)
    labels[3:5, 4:7] = 2  # 2x3 rectangle, centroid (row 3.5, col 5)
    image = np.full((6, 8, 3), 240, np.uint8)
    image[1:3, 1:3] = (100, 50, 150)
    image[1, 1] = (60, 30, 110)  # nucleus 1: three pixels of one colour, one of another
    image[3:5, 4:7] = (200, 120, 180)
    return image, labels


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_nucleus_table_by_hand(tmp_path):
    image, labels = _two_nucleus_image()
    result = PredictionResult(labels, np.array([0.9, 0.7], np.float32), downsample=2.0,
                              origin=(1000, 500), mpp=0.5)
    path = tmp_path / "nuclei.csv"
    assert write_nucleus_table(path, result, lambda y0, y1, x0, x1: image[y0:y1, x0:x1]) == 2
    first, second = _read_csv(path)
    assert int(first["id"]) == 1 and int(second["id"]) == 2
    # Pixel-edge convention: the 2x2 square spans edges 1..3, centre 2 -> 2*2 + origin.
    assert float(first["centroid_x"]) == pytest.approx(1004)
    assert float(first["centroid_y"]) == pytest.approx(504)
    assert float(second["centroid_x"]) == pytest.approx(2 * 5.5 + 1000)
    assert float(second["centroid_y"]) == pytest.approx(2 * 4 + 500)
    assert int(first["area_px"]) == 4 and int(second["area_px"]) == 6
    assert float(first["area_um2"]) == pytest.approx(1.0)  # 4 px * 0.25 µm²
    assert float(second["major_axis_um"]) == pytest.approx(0.5 * float(second["major_axis_px"]))
    assert float(first["eccentricity"]) == pytest.approx(0.0, abs=1e-9)
    assert float(first["solidity"]) == pytest.approx(1.0)
    assert float(first["score"]) == pytest.approx(0.9) and float(second["score"]) == pytest.approx(0.7)
    assert float(first["mean_r"]) == pytest.approx((60 + 3 * 100) / 4)
    assert float(first["mean_g"]) == pytest.approx((30 + 3 * 50) / 4)
    assert float(first["mean_b"]) == pytest.approx((110 + 3 * 150) / 4)
    assert float(second["mean_r"]) == 200 and float(second["mean_b"]) == 180
    dark_hed = rgb2hed(np.array([[[60, 30, 110]]], np.uint8))[0, 0]
    light_hed = rgb2hed(np.array([[[100, 50, 150]]], np.uint8))[0, 0]
    assert float(first["mean_haematoxylin"]) == pytest.approx((dark_hed[0] + 3 * light_hed[0]) / 4)
    assert float(first["mean_eosin"]) == pytest.approx((dark_hed[1] + 3 * light_hed[1]) / 4)


def test_nucleus_table_without_mpp_has_no_micron_columns(tmp_path):
    image, labels = _two_nucleus_image()
    path = tmp_path / "nuclei.csv"
    write_nucleus_table(path, PredictionResult(labels, np.ones(2, np.float32)),
                        lambda y0, y1, x0, x1: image[y0:y1, x0:x1])
    columns = list(_read_csv(path)[0])
    assert "area_px" in columns and not [c for c in columns if c.endswith(("_um", "_um2"))]


def test_block_by_block_equals_single_block_and_skips_background(tmp_path, synthetic_tile):
    image, labels = synthetic_tile
    labels = labels.copy()
    labels[:, 150:] = 0  # the right-hand blocks hold no nucleus and must not be read
    reads = []

    def read_rgb(y0, y1, x0, x1):
        reads.append((y0, y1, x0, x1))
        return image[y0:y1, x0:x1]

    write_nucleus_table(tmp_path / "whole.csv", _result(labels), read_rgb)
    assert reads == [(0, 192, 0, 224)]
    reads.clear()
    write_nucleus_table(tmp_path / "blocks.csv", _result(labels), read_rgb, block_size=50)
    blocks_with_nuclei = [(y0, min(y0 + 50, 192), x0, min(x0 + 50, 224))
                          for y0 in range(0, 192, 50) for x0 in range(0, 224, 50)
                          if labels[y0:y0 + 50, x0:x0 + 50].any()]
    assert reads == blocks_with_nuclei and all(x0 < 150 for _, _, x0, _ in reads)
    whole, blocks = _read_csv(tmp_path / "whole.csv"), _read_csv(tmp_path / "blocks.csv")
    assert len(whole) == len(blocks) == len(np.unique(labels)) - 1
    for row_whole, row_blocks in zip(whole, blocks):
        assert row_whole.keys() == row_blocks.keys()
        for key in row_whole:
            assert float(row_blocks[key]) == pytest.approx(float(row_whole[key]), rel=1e-12, abs=1e-12)


def test_nucleus_table_parquet_matches_csv(tmp_path, synthetic_tile):
    pq = pytest.importorskip("pyarrow.parquet")
    image, labels = synthetic_tile
    read_rgb = lambda y0, y1, x0, x1: image[y0:y1, x0:x1]  # noqa: E731
    write_nucleus_table(tmp_path / "nuclei.csv", _result(labels, mpp=0.25), read_rgb)
    write_nucleus_table(tmp_path / "nuclei.parquet", _result(labels, mpp=0.25), read_rgb)
    table = pq.read_table(tmp_path / "nuclei.parquet").to_pydict()
    rows = _read_csv(tmp_path / "nuclei.csv")
    assert list(table) == list(rows[0])
    assert "image" not in table  # named only when the caller gives the name
    assert table["id"] == [int(r["id"]) for r in rows]
    np.testing.assert_allclose(table["mean_haematoxylin"], [float(r["mean_haematoxylin"]) for r in rows])


def test_nucleus_table_names_its_image_on_every_row(tmp_path, synthetic_tile):
    pq = pytest.importorskip("pyarrow.parquet")
    image, labels = synthetic_tile
    read_rgb = lambda y0, y1, x0, x1: image[y0:y1, x0:x1]  # noqa: E731
    for suffix in ("csv", "parquet"):
        write_nucleus_table(tmp_path / f"plain.{suffix}", _result(labels), read_rgb)
        write_nucleus_table(tmp_path / f"named.{suffix}", _result(labels), read_rgb, image="slide 1, ö.svs")
    named, plain = _read_csv(tmp_path / "named.csv"), _read_csv(tmp_path / "plain.csv")
    assert list(named[0]) == ["image"] + list(plain[0])  # first, as in QuPath's measurement exports
    assert [row.pop("image") for row in named] == ["slide 1, ö.svs"] * len(plain) and named == plain
    table = pq.read_table(tmp_path / "named.parquet")
    assert table.column_names == ["image"] + pq.read_table(tmp_path / "plain.parquet").column_names
    assert table.column("image").to_pylist() == ["slide 1, ö.svs"] * len(plain)
    empty = _result(np.zeros_like(labels))
    write_nucleus_table(tmp_path / "empty.parquet", empty, read_rgb, image="blank.png")
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_read_rgb_of_the_wrong_size_is_reported(tmp_path):
    image, labels = _two_nucleus_image()
    with pytest.raises(ValueError, match=r"read_rgb\(0, 6, 0, 8\) returned shape"):
        write_nucleus_table(tmp_path / "t.csv", PredictionResult(labels, np.ones(2, np.float32)),
                            lambda y0, y1, x0, x1: image[:2])
    assert _leftover_temp_files(tmp_path) == [] and not (tmp_path / "t.csv").exists()


# --------------------------------------------------------------------------- overlay PNG


def test_overlay_png_on_a_smaller_thumbnail(tmp_path, synthetic_tile):
    image, labels = synthetic_tile
    thumbnail = image[::2, ::2].copy()
    path = tmp_path / "overlay.png"
    write_overlay_png(path, _result(labels), thumbnail)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == thumbnail.shape
    painted = np.all(picture == OVERLAY_COLOR, axis=-1)
    small_labels = labels[1::2, 1::2]  # nearest resize samples pixel centres
    assert painted.any()
    # Contours lie on nuclei (inner boundaries); background keeps the thumbnail's pixels.
    assert np.all(small_labels[painted] > 0)
    background = ndimage.binary_dilation(small_labels > 0, iterations=2, border_value=0)
    np.testing.assert_array_equal(picture[~background], thumbnail[~background])

"""Prediction outputs that other tools open directly: label TIFF (napari, Fiji), QuPath GeoJSON,
COCO results JSON (pycocotools), a per-nucleus table (CSV/Parquet) and an overlay PNG.

Every writer is atomic: it writes a temp file in the destination folder, flushes it to disk and
renames it over the destination with ``os.replace``, so a reader (or a re-run after a crash)
sees either the previous file or the complete new one, never a half-written file.

Coordinates. A :class:`~nucseg_d2.predict.result.PredictionResult` lives at the analysed
resolution; outputs meant for slide viewers use full-resolution level-0 coordinates with pixel
*edges* on integers: analysed pixel (row r, column c) covers level-0
``[c * d + x0, (c + 1) * d + x0) x [r * d + y0, (r + 1) * d + y0)`` for downsample d and
origin (x0, y0). Scaling edges (not centres) keeps outlines and centroids aligned at any d.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries

from ..data.records import rle_from_crop
from ..modeling.postprocess import label_map_dtype
from ..utils import atomic_path
from .result import PredictionResult

__all__ = [
    "NUCLEUS_CLASS_NAME",
    "NUCLEUS_CLASS_COLOR",
    "OVERLAY_COLOR",
    "write_label_tiff",
    "label_tiff_pyramid_factors",
    "write_label_map_image",
    "write_geojson",
    "write_coco_json",
    "write_nucleus_table",
    "write_overlay_png",
    "nucleus_outline",
    "nucleus_polygons",
    "rle_from_crop",
    "nucleus_table",
    "overlay_contours",
]

NUCLEUS_CLASS_NAME = "Nucleus"
NUCLEUS_CLASS_COLOR = (32, 200, 64)
# Bright yellow reads well on both haematoxylin (purple) and eosin (pink).
OVERLAY_COLOR = (255, 255, 0)
COCO_CATEGORY_ID = 1  # COCO category ids start at 1; "nucleus"
COCO_MAX_PIXELS = 2**32  # COCO RLE run lengths are 32-bit

# Images larger than this (either side) are written as 256x256 tiles (napari, Bio-Formats read
# them lazily); smaller ones as strips, which every TIFF reader, ImageJ's own included, opens.
_TILED_TIFF_MIN_SIDE = 2048
_TIFF_TILE = (256, 256)
# A tiled map also gets reduced levels, each half the last, down to this larger side: a viewer then
# draws a whole slide's overview from a small level instead of reading every full-size tile.
_PYRAMID_TOP_SIDE = 1024
# Fixed namespace so a nucleus gets the same UUID each time the same input is predicted.
_GEOJSON_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/nucseg-d2/geojson")


def _check_result(result: PredictionResult, path) -> Tuple[np.ndarray, np.ndarray, int]:
    """(label map, scores, N = largest id), after checking that every id has a score."""
    label_map = np.asarray(result.label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"{path}: label_map must be a 2-D integer array, got "
                         f"{label_map.dtype} {label_map.shape}")
    scores = np.asarray(result.scores, dtype=np.float32).reshape(-1)
    num_labels = int(label_map.max()) if label_map.size else 0
    if label_map.dtype.kind == "i" and label_map.size and label_map.min() < 0:
        raise ValueError(f"{path}: label_map has negative ids")
    if num_labels > scores.size:
        raise ValueError(f"{path}: label_map has ids up to {num_labels} but only {scores.size} scores")
    return label_map, scores, num_labels


def _nucleus_boxes(label_map: np.ndarray, num_labels: int) -> List[Optional[Tuple[slice, slice]]]:
    """Bounding slices per id 1..N (None for an absent id), in one pass over the map."""
    if num_labels == 0:
        return []
    return ndimage.find_objects(label_map, max_label=num_labels)


def _level0(values: np.ndarray, downsample: float, offset: float) -> np.ndarray:
    return np.asarray(values, np.float64) * float(downsample) + float(offset)


# --------------------------------------------------------------------------- label TIFF


def write_label_tiff(path, label_map, mpp: Optional[float] = None, origin: Tuple[int, int] = (0, 0),
                     downsample: float = 1.0, pyramid: bool = True) -> None:
    """Instance label map as a zlib-compressed TIFF: uint16, or uint32 past 65,535 ids.

    Large maps are tiled (256x256), with a pyramid of reduced-resolution pages after the full
    one (every 2nd, 4th, ... pixel of each axis, down to 1024 px a side; ids are never blended),
    as in a whole-slide TIFF: tiffslide / OpenSlide read them as levels, ``tifffile`` as
    ``series[0].levels``, and plain readers (``tifffile.imread``) get the full map as before;
    ``pyramid=False`` leaves them out.
    BigTIFF is used past ~4 GiB (~3 GiB for the full map with its levels). napari opens it (as an image;
    "Convert to labels", or ``napari.Viewer().add_labels(tifffile.imread(path))``), Fiji too
    (uint32 maps through Bio-Formats, since ImageJ has no 32-bit integer type). Where the map
    lies on the slide is recorded, so it can be laid over the slide and measured: ``mpp`` (µm per
    pixel of the map, when known) as the TIFF resolution in pixels per centimetre, and a JSON
    ImageDescription ``{"nucseg_d2": {"origin_level0": [x0, y0], "downsample": d, "mpp": m}}``
    (level-0 pixel = origin + map pixel * downsample, as the GeoJSON's coordinates).
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer) or not label_map.size:
        raise ValueError(f"{path}: a label map must be a non-empty 2-D integer array, got "
                         f"{label_map.dtype} {label_map.shape}")
    max_id = int(label_map.max())
    # min() only for signed types: each pass over a slide's map on disk is a full read.
    negative = label_map.dtype.kind == "i" and label_map.min() < 0
    if negative or max_id > np.iinfo(np.uint32).max:
        raise ValueError(f"{path}: label ids must lie in 0..{np.iinfo(np.uint32).max}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"{path}: µm per pixel must be a positive number, got {mpp}")
    dtype = np.dtype(label_map_dtype(max_id))
    tiled = max(label_map.shape) > _TILED_TIFF_MIN_SIDE
    if tiled and label_map.dtype != dtype:
        # Narrowed tile by tile: a whole copy of a slide's (memory-mapped) map may not fit in RAM.
        # One worker: tifffile's threads would take thousands of converted tiles ahead.
        data, layout = _tiles(label_map, dtype), {"shape": label_map.shape, "dtype": dtype, "maxworkers": 1}
    else:
        data, layout = label_map.astype(dtype, copy=False), {}
    factors = label_tiff_pyramid_factors(label_map.shape) if pyramid else []
    placement = {"origin_level0": [int(origin[0]), int(origin[1])], "downsample": float(downsample),
                 "mpp": None if mpp is None else float(mpp)}
    page = {"photometric": "minisblack", "compression": "zlib", "tile": _TIFF_TILE if tiled else None,
            "metadata": None}
    # The reduced levels add at most a third to the full map's bytes.
    bigtiff = label_map.size * dtype.itemsize * (4 / 3 if factors else 1) > 2**32 - 2**25
    with atomic_path(path) as temp_path, tifffile.TiffWriter(temp_path, bigtiff=bigtiff) as tiff:
        tiff.write(data, **layout, **page, description=json.dumps({"nucseg_d2": placement}),
                   **_tiff_resolution(mpp))
        for factor in factors:
            level = label_map[::factor, ::factor]  # a view: a memory-mapped map is read tile by tile
            tiff.write(_tiles(level, dtype), shape=level.shape, dtype=dtype, maxworkers=1, subfiletype=1, **page,
                       **_tiff_resolution(None if mpp is None else mpp * factor))


def label_tiff_pyramid_factors(shape: Tuple[int, int]) -> List[int]:
    """Downsampling factors 2, 4, ... of the reduced levels :func:`write_label_tiff` gives a map
    of ``shape`` (none unless it is tiled), the last one's larger side at most
    :data:`_PYRAMID_TOP_SIDE`; a factor past the shorter side would repeat its last level's
    height (or width) of 1, which readers take for another image rather than a level."""
    if max(shape) <= _TILED_TIFF_MIN_SIDE:
        return []
    factors, factor = [], 2
    # Halve while the last level's larger side (ceil of side / (factor / 2)) is over the top side.
    while -(-max(shape) // (factor // 2)) > _PYRAMID_TOP_SIDE and factor <= min(shape):
        factors.append(factor)
        factor *= 2
    return factors


def _tiff_resolution(mpp: Optional[float]) -> dict:
    return {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def _tiles(label_map: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``label_map``'s TIFF tiles in file order (rows of tiles), converted to ``dtype``; tifffile
    zero-pads the incomplete ones at the right and bottom edges."""
    tile_height, tile_width = _TIFF_TILE
    for y0 in range(0, label_map.shape[0], tile_height):
        for x0 in range(0, label_map.shape[1], tile_width):
            yield label_map[y0 : y0 + tile_height, x0 : x0 + tile_width].astype(dtype)


def write_label_map_image(stem, label_map) -> str:
    """``stem.png`` (uint16, what the metrics CLI and most viewers read) or, past 65,535 ids
    which PNG cannot hold, ``stem.tif`` (uint32, :func:`write_label_tiff`, without levels: these
    maps are for scoring); returns the path."""
    label_map = np.asarray(label_map)
    if label_map_dtype(int(label_map.max()) if label_map.size else 0) != np.uint16:
        path = os.fspath(stem) + ".tif"
        write_label_tiff(path, label_map, pyramid=False)
        return path
    path = os.fspath(stem) + ".png"
    with atomic_path(path) as temp_path:
        # Zlib's highest level: about 10 % smaller than the default on 1000² Kumar maps, which
        # counts where results/ travels to a GPU within a size limit (docs/REPRODUCING.md).
        Image.fromarray(label_map.astype(np.uint16)).save(temp_path, format="PNG", optimize=True)
    return path


# --------------------------------------------------------------------------- GeoJSON (QuPath)


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _snap_to_pixel_corners(contour: np.ndarray, simplify_tolerance: float) -> np.ndarray:
    """Pixel-corner ring (K, 2) of (x, y) from a contour traced on the 2x-upsampled mask.

    In the 2x grid each pixel is 2x2 sub-pixels; a traced boundary sub-pixel maps to the corner of
    its pixel nearest to it (sub-pixel index u -> corner (u + 1) // 2), which is on the crack
    between foreground and background. The result steps only along pixel edges, so its area is
    the exact pixel count (cv2 on the mask itself traces pixel centres, half a pixel inside).
    """
    corners = (contour.reshape(-1, 2) + 1) // 2
    keep = np.any(corners != np.roll(corners, 1, axis=0), axis=1)  # drop repeats
    corners = corners[keep] if keep.any() else corners[:1]
    if len(corners) >= 3:
        # Drop vertices where the direction does not change (the middle of straight runs).
        incoming = corners - np.roll(corners, 1, axis=0)
        outgoing = np.roll(corners, -1, axis=0) - corners
        turns = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0] != 0
        corners = corners[turns]
    if simplify_tolerance > 0 and len(corners) > 4:
        simplified = cv2.approxPolyDP(corners.astype(np.int32).reshape(-1, 1, 2),
                                      simplify_tolerance, closed=True).reshape(-1, 2)
        if len(simplified) >= 3 and abs(_signed_area(simplified)) > 0:
            corners = simplified
    return corners


def _piece_rings(piece: np.ndarray, simplify_tolerance: float) -> List[np.ndarray]:
    """``[exterior, hole, ...]`` closed rings of one 4-connected piece (see nucleus_polygons)."""
    upsampled = np.pad(np.repeat(np.repeat(piece, 2, axis=0), 2, axis=1), 1).astype(np.uint8)
    contours, hierarchy = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    hierarchy = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    # The 1-pixel padding shifts the sub-pixel indices by one.
    rings = [_snap_to_pixel_corners(contour - 1, simplify_tolerance) for contour in contours]
    # One 4-connected piece has exactly one outer contour; every other contour is a hole in it.
    (exterior_index,) = [i for i in range(len(contours)) if hierarchy[i, 3] < 0]
    exterior = rings[exterior_index]
    holes = [rings[i] for i in range(len(contours))
             if hierarchy[i, 3] == exterior_index and len(rings[i]) >= 3 and _signed_area(rings[i])]
    closed = []
    for ring, want_positive in [(exterior, True)] + [(hole, False) for hole in holes]:
        # RFC 7946 orientation is about the numbers themselves (positive shoelace = CCW), as
        # shapely's orient() and GeoJSON validators check it; on screen, y down, it looks CW.
        if (_signed_area(ring) > 0) != want_positive:
            ring = ring[::-1]
        closed.append(np.vstack([ring, ring[:1]]))
    return closed


def nucleus_polygons(mask: np.ndarray, simplify_tolerance: float = 0.0) -> List[List[np.ndarray]]:
    """Outline of one nucleus mask as polygons of (x, y) pixel-corner coordinates.

    One polygon ``[exterior, hole, ...]`` per 4-connected piece of the mask, the largest piece
    first (a predicted nucleus partly painted over by a neighbour can fall into pieces; pieces
    touching only at a corner are separate polygons, since one ring around both would pass that
    corner twice, an invalid polygon for QuPath and shapely). No ring passes a point twice. Rings
    are closed (last point = first), exteriors counter-clockwise and holes clockwise in the
    coordinates' own axes (RFC 7946's right-hand rule; clockwise on screen, where y points down).
    With ``simplify_tolerance`` 0 the rings follow pixel edges exactly and the polygons' areas add
    up to the mask's pixel count; a positive value (pixels) applies Douglas-Peucker, which keeps a
    subset of the corners. Empty mask: ``[]``.
    """
    mask = np.asarray(mask, bool)
    pieces, num_pieces = ndimage.label(mask)
    if num_pieces <= 1:
        return [_piece_rings(mask, simplify_tolerance)] if num_pieces else []
    sizes = ndimage.sum_labels(mask, pieces, range(1, num_pieces + 1))
    boxes = ndimage.find_objects(pieces)
    polygons = []
    for piece_id in 1 + np.argsort(-sizes, kind="stable"):
        rows, cols = boxes[piece_id - 1]
        piece_rings = _piece_rings(pieces[rows, cols] == piece_id, simplify_tolerance)
        polygons.append([ring + (cols.start, rows.start) for ring in piece_rings])
    return polygons


def nucleus_outline(mask: np.ndarray, simplify_tolerance: float = 0.0) -> List[np.ndarray]:
    """``[exterior, hole, ...]`` of the mask's largest 4-connected piece only (smaller pieces, also
    those touching it only at a corner, are dropped); ``[]`` for an empty mask. Rings as in
    :func:`nucleus_polygons`, which keeps every piece."""
    polygons = nucleus_polygons(mask, simplify_tolerance)
    return polygons[0] if polygons else []


def _coordinates_json(ring: np.ndarray) -> list:
    # Integers stay integers (a third shorter than "12.0"); others keep 1/1000 pixel.
    if np.all(ring == np.round(ring)):
        return ring.astype(np.int64).tolist()
    return np.round(ring, 3).tolist()


def write_geojson(path, result: PredictionResult, simplify_tolerance: float = 0.5,
                  class_name: str = NUCLEUS_CLASS_NAME,
                  class_color: Sequence[int] = NUCLEUS_CLASS_COLOR) -> int:
    """QuPath-ready GeoJSON FeatureCollection of nucleus polygons; returns the number written.

    One Feature per nucleus: a Polygon in level-0 slide coordinates (pixel edges on integers;
    exterior and holes, closed rings), or a MultiPolygon, largest piece first, for a nucleus in
    several 4-connected pieces (:func:`nucleus_polygons`); ``properties`` as QuPath 0.4+ exports
    detections (``objectType`` "detection", ``classification`` {name, color}, numeric
    ``measurements`` {score, label_id} and ``isLocked``), and a UUID ``id`` that is the same on
    every run for the same source file (however its path is written), region (origin and
    downsample) and label id, and differs between regions or levels of one slide (imported into
    one QuPath image, equal ids would clash). ``simplify_tolerance`` is in analysed-level pixels (0: exact
    pixel-edge outlines, area = the nucleus's pixel count). Written as a stream, one feature per
    line, so a slide's million nuclei never sit in memory as Python dicts.
    """
    label_map, scores, num_labels = _check_result(result, path)
    origin_x, origin_y = (float(v) for v in result.origin)
    downsample = float(result.downsample)
    classification = {"name": class_name, "color": [int(c) for c in class_color]}
    # A file's real path, so that ./a.svs and /data/a.svs agree; another label is kept as it is.
    source = result.source or ""
    source = os.path.realpath(source) if source and os.path.exists(source) else source
    id_prefix = f"{source}:{origin_x!r}:{origin_y!r}:{downsample!r}:"
    count = 0
    with atomic_path(path) as temp_path, open(temp_path, "w", encoding="utf-8") as stream:
        stream.write('{"type": "FeatureCollection", "features": [')
        for label_id, box in enumerate(_nucleus_boxes(label_map, num_labels), start=1):
            if box is None:
                continue
            rows, cols = box
            polygons = [[_coordinates_json(np.column_stack([
                _level0(ring[:, 0] + cols.start, downsample, origin_x),
                _level0(ring[:, 1] + rows.start, downsample, origin_y)])) for ring in rings]
                for rings in nucleus_polygons(label_map[rows, cols] == label_id, simplify_tolerance)]
            geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                        else {"type": "MultiPolygon", "coordinates": polygons})
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid5(_GEOJSON_ID_NAMESPACE, f"{id_prefix}{label_id}")),
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": classification,
                    "measurements": {"score": float(scores[label_id - 1]), "label_id": label_id},
                    "isLocked": False,
                },
            }
            stream.write(("\n" if count == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            count += 1
        stream.write("\n]}\n")
    return count


# --------------------------------------------------------------------------- COCO results


def write_coco_json(path, result: PredictionResult, image_id, file_name: str) -> dict:
    """COCO results list (RLE masks, XYWH boxes, scores, category 1 "nucleus") for one image.

    The file is the list that ``COCO.loadRes(path)`` and Detectron2 results use, at the analysed
    resolution. Returns this image's COCO ``images`` entry ({id, file_name, height, width}) so a
    batch can write a matching image list. COCO RLE counts are 32-bit: images of 2^32 pixels or
    more (whole slides at full resolution) raise ValueError; use the GeoJSON for those.
    """
    label_map, scores, num_labels = _check_result(result, path)
    height, width = label_map.shape
    if height * width >= COCO_MAX_PIXELS:
        raise ValueError(f"{path}: {height}x{width} pixels is too large for COCO RLE "
                         "(32-bit run lengths); write the GeoJSON instead, or analyse a lower level")
    annotations = []
    for label_id, box in enumerate(_nucleus_boxes(label_map, num_labels), start=1):
        if box is None:
            continue
        rows, cols = box
        crop = label_map[rows, cols] == label_id
        annotations.append({
            "image_id": image_id,
            "category_id": COCO_CATEGORY_ID,
            "segmentation": rle_from_crop(crop, rows.start, cols.start, height, width),
            "bbox": [float(cols.start), float(rows.start),
                     float(cols.stop - cols.start), float(rows.stop - rows.start)],
            "area": int(np.count_nonzero(crop)),
            "score": float(scores[label_id - 1]),
        })
    with atomic_path(path) as temp_path, open(temp_path, "w", encoding="utf-8") as stream:
        json.dump(annotations, stream, separators=(",", ":"))
    return {"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)}


# --------------------------------------------------------------------------- per-nucleus table

_GEOMETRY_PROPERTIES = ("label", "centroid", "area", "perimeter", "eccentricity", "solidity",
                        "axis_major_length", "axis_minor_length")
_INTENSITY_COLUMNS = ("mean_r", "mean_g", "mean_b", "mean_haematoxylin", "mean_eosin")


def _intensity_means(label_map: np.ndarray, num_labels: int, read_rgb, block_size: int) -> np.ndarray:
    """(N + 1, 5) mean R, G, B, haematoxylin, eosin per id, reading the image block by block.

    Sums and pixel counts per id are accumulated with ``np.bincount`` per block, so only one
    block of the image is in memory; blocks without nuclei are not read at all.
    """
    sums = np.zeros((num_labels + 1, len(_INTENSITY_COLUMNS)))
    counts = np.zeros(num_labels + 1)
    height, width = label_map.shape
    for y0 in range(0, height, block_size):
        for x0 in range(0, width, block_size):
            y1, x1 = min(y0 + block_size, height), min(x0 + block_size, width)
            labels = label_map[y0:y1, x0:x1]
            foreground = labels > 0
            if not foreground.any():
                continue
            rgb = np.asarray(read_rgb(y0, y1, x0, x1))
            if rgb.shape != (y1 - y0, x1 - x0, 3):
                raise ValueError(f"read_rgb({y0}, {y1}, {x0}, {x1}) returned shape {rgb.shape}, "
                                 f"expected {(y1 - y0, x1 - x0, 3)}")
            ids = labels[foreground].astype(np.intp)
            pixels = rgb[foreground]
            hed = rgb2hed(pixels[None])[0]  # (P, 3) haematoxylin, eosin, DAB
            channels = [pixels[:, 0], pixels[:, 1], pixels[:, 2], hed[:, 0], hed[:, 1]]
            for column, values in enumerate(channels):
                sums[:, column] += np.bincount(ids, weights=values.astype(np.float64),
                                               minlength=num_labels + 1)
            counts += np.bincount(ids, minlength=num_labels + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _geometry_columns(label_map: np.ndarray, num_labels: int, block_size: int) -> Dict[str, np.ndarray]:
    """``regionprops_table`` of :data:`_GEOMETRY_PROPERTIES`, rows by id, measured block by block.

    Over a whole slide's map, ``regionprops_table`` keeps every region's pixel coordinates at once
    (about 10 bytes per nucleus pixel: gigabytes). Here the nuclei whose boxes start in one
    ``block_size`` block are measured together, in the crop that holds their boxes with the other
    ids masked out, so memory follows the block. A region's properties come from its own box, so
    they are those of the whole map; centroids are shifted back by the crop's corner.
    """
    groups: Dict[Tuple[int, int], List[int]] = {}
    boxes = _nucleus_boxes(label_map, num_labels)
    for label_id, box in enumerate(boxes, start=1):
        if box is not None:
            groups.setdefault((box[0].start // block_size, box[1].start // block_size), []).append(label_id)
    parts = []
    for ids in groups.values():
        y0, x0 = min(boxes[i - 1][0].start for i in ids), min(boxes[i - 1][1].start for i in ids)
        y1, x1 = max(boxes[i - 1][0].stop for i in ids), max(boxes[i - 1][1].stop for i in ids)
        crop = label_map[y0:y1, x0:x1]
        part = regionprops_table(np.where(np.isin(crop, ids), crop, 0), properties=_GEOMETRY_PROPERTIES)
        part["centroid-0"] = part["centroid-0"] + y0
        part["centroid-1"] = part["centroid-1"] + x0
        parts.append(part)
    if not parts:
        return regionprops_table(np.zeros((1, 1), label_map.dtype), properties=_GEOMETRY_PROPERTIES)
    columns = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = np.argsort(columns["label"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def nucleus_table(result: PredictionResult, read_rgb: Callable, block_size: int = 2048,
                  path="<table>") -> Dict[str, np.ndarray]:
    """The columns of :func:`write_nucleus_table`, as {name: 1-D array}, one row per nucleus.
    Memory follows ``block_size``, not the map: geometry and intensities are gathered block by block."""
    label_map, scores, num_labels = _check_result(result, path)
    geometry = _geometry_columns(label_map, num_labels, block_size)
    ids = np.asarray(geometry["label"], np.int64)
    downsample = float(result.downsample)
    origin_x, origin_y = (float(v) for v in result.origin)
    columns: Dict[str, np.ndarray] = {
        "id": ids,
        # regionprops centroids are in pixel-index units (pixel centres on integers): +0.5 to
        # the edge convention of the outlines, then to level 0.
        "centroid_x": _level0(geometry["centroid-1"] + 0.5, downsample, origin_x),
        "centroid_y": _level0(geometry["centroid-0"] + 0.5, downsample, origin_y),
        "area_px": np.asarray(geometry["area"], np.int64),
        "perimeter_px": geometry["perimeter"],
        "eccentricity": geometry["eccentricity"],
        "solidity": geometry["solidity"],
        "major_axis_px": geometry["axis_major_length"],
        "minor_axis_px": geometry["axis_minor_length"],
    }
    if result.mpp is not None:
        mpp = float(result.mpp)
        columns["area_um2"] = columns["area_px"] * mpp**2
        for name in ("perimeter", "major_axis", "minor_axis"):
            columns[f"{name}_um"] = columns[f"{name}_px"] * mpp
    columns["score"] = scores[ids - 1].astype(np.float64)
    means = _intensity_means(label_map, num_labels, read_rgb, block_size)[ids]
    for index, name in enumerate(_INTENSITY_COLUMNS):
        columns[name] = means[:, index]
    return columns


def write_nucleus_table(path, result: PredictionResult, read_rgb: Callable,
                        block_size: int = 2048, image: Optional[str] = None) -> int:
    """Per-nucleus morphology and stain table, CSV (or Parquet for a ``.parquet`` path).

    Columns: ``image`` (the given ``image``, e.g. the source file's name, on every row, so that
    tables of several slides can be concatenated, as QuPath's measurement exports; only when
    given); ``id``; ``centroid_x``, ``centroid_y`` (level-0 coordinates, as the GeoJSON);
    ``area_px``, ``perimeter_px``, ``eccentricity``, ``solidity``, ``major_axis_px``,
    ``minor_axis_px`` (skimage regionprops at the analysed level), plus ``area_um2``,
    ``perimeter_um``, ``major_axis_um``, ``minor_axis_um`` when ``result.mpp`` is known;
    ``score``; ``mean_r``, ``mean_g``, ``mean_b`` (0-255) and ``mean_haematoxylin``,
    ``mean_eosin`` (``skimage.color.rgb2hed`` stain concentrations).
    ``read_rgb(y0, y1, x0, x1)`` returns the analysed-level RGB region; it is called once per
    ``block_size`` block that holds nuclei. Returns the number of rows.
    """
    parquet = os.fspath(path).lower().endswith(".parquet")
    if parquet:
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError as err:
            raise ImportError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow), "
                              "or use a .csv path") from err
    columns = nucleus_table(result, read_rgb, block_size, path)
    num_rows = len(columns["id"])
    with atomic_path(path) as temp_path:
        if parquet:
            table = pyarrow.table(columns)
            if image is not None:  # dictionary-encoded: 4 bytes per row, not a copy of the name
                names = pyarrow.DictionaryArray.from_arrays(np.zeros(num_rows, np.int32), [image])
                table = table.add_column(0, "image", names)
            pyarrow.parquet.write_table(table, temp_path)
        else:
            with open(temp_path, "w", newline="", encoding="utf-8") as stream:
                writer = csv.writer(stream)
                leading = {} if image is None else {"image": itertools.repeat(image, num_rows)}
                writer.writerow([*leading, *columns])
                # tolist() gives Python ints/floats, whose str() is the shortest exact repr.
                writer.writerows(zip(*leading.values(), *(values.tolist() for values in columns.values())))
    return num_rows


# --------------------------------------------------------------------------- overlay PNG


def _resize_nearest(label_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by index sampling (memory of the output only)."""
    rows = np.minimum(((np.arange(height) + 0.5) * label_map.shape[0] / height).astype(np.int64),
                      label_map.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * label_map.shape[1] / width).astype(np.int64),
                      label_map.shape[1] - 1)
    return label_map[rows[:, None], cols[None, :]]


def overlay_contours(thumbnail: np.ndarray, label_map: np.ndarray,
                     color: Sequence[int] = OVERLAY_COLOR) -> np.ndarray:
    """``thumbnail`` (RGB uint8) with the nuclei's inner boundaries painted in ``color``."""
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"thumbnail must be an RGB image (H, W, 3), got shape {thumbnail.shape}")
    small = _resize_nearest(np.asarray(label_map), *thumbnail.shape[:2])
    picture = thumbnail.astype(np.uint8, copy=True)
    picture[find_boundaries(small, mode="inner")] = color
    return picture


def write_overlay_png(path, result: PredictionResult, thumbnail: np.ndarray,
                      color: Sequence[int] = OVERLAY_COLOR) -> None:
    """PNG of nucleus contours over ``thumbnail``, an RGB image of the whole analysed region at
    any size (the label map is resized to it with nearest neighbour)."""
    label_map, _, _ = _check_result(result, path)
    picture = overlay_contours(thumbnail, label_map, color)
    with atomic_path(path) as temp_path:
        Image.fromarray(picture).save(temp_path, format="PNG")

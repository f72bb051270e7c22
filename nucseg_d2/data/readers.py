"""Readers for H&E images and nuclei annotations.

Formats: images (PNG/TIFF/...), label maps, TNBC binary GT, MoNuSeg XML, CPM-17 .mat.

Every bad input raises :class:`NucleiDataError` with the file name and the problem in the message.
"""
import os
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import scipy.io
import scipy.ndimage
import skimage.draw
import tifffile
from PIL import Image

__all__ = [
    "NucleiDataError",
    "read_rgb_image",
    "composite_on_white",
    "read_label_map",
    "read_tnbc_gt",
    "read_monuseg_xml",
    "read_cpm17_mat",
    "load_label_map",
    "LABEL_FORMATS",
    "LABEL_MAP_SUFFIXES",
]

LABEL_FORMATS = ("label_map", "tnbc_binary", "monuseg_xml", "cpm17_mat")

# The files read_label_map reads: data sets and the folder evaluator pair label maps by these.
LABEL_MAP_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".mat")
_TIFF_SUFFIXES = (".tif", ".tiff")
_MODES_KEPT = ("RGB", "RGBA", "L", "LA", "I", "F")  # Pillow modes numpy reads as they are
_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max
# Label maps and masks keep their stored values whatever the photometric tag (Fiji saves masks
# with an inverting LUT as MINISWHITE); an image's colours would be wrong.
TIFF_PHOTOMETRICS_REFUSED_FOR_IMAGES = (
    tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.SEPARATED, tifffile.PHOTOMETRIC.CIELAB,
    tifffile.PHOTOMETRIC.ICCLAB, tifffile.PHOTOMETRIC.ITULAB,
)
# The foreground value of binary masks saved as 8- or 16-bit images.
_BINARY_MASK_VALUES = (255, 65535)


class NucleiDataError(ValueError):
    """A data file is missing, unreadable or not in the expected format."""


def _require_file(path):
    if not os.path.isfile(path):
        raise NucleiDataError(f"{path}: file not found")


def _read_pixels(path, palette_as_indices=False, refused_tiff_photometrics=()):
    """Decode an image file to a numpy array without changing its bit depth or channels."""
    _require_file(path)
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in _TIFF_SUFFIXES:
            # tifffile (+imagecodecs for LZW) keeps 16-bit colour, which Pillow cannot.
            with tifffile.TiffFile(path) as tif:
                photometric = tif.pages[0].photometric
                if photometric in refused_tiff_photometrics:
                    raise_unsupported_tiff_colour_space(path, photometric)
                series = tif.series[0]
                pixels, axes = series.asarray(), series.axes
                colormap = tif.pages[0].colormap
            # Only samples (S) are a colour image's channels; ImageJ/OME channels (C) are planes.
            if axes[0] == "S" and len(axes) == 3 and pixels.shape[0] <= 4:
                pixels, axes = np.moveaxis(pixels, 0, -1), axes[1:] + "S"  # planar: channel-first
            if axes not in ("YX", "YXS"):
                # A stack of pages, planes or ImageJ/OME channels (axes Q, I, Z, T, C...) would
                # otherwise pass as colour channels.
                raise NucleiDataError(f"{path}: TIFF holds an array of shape {pixels.shape} (axes {axes}); "
                                      "expected one 2-D image, grey or colour")
            if photometric == tifffile.PHOTOMETRIC.PALETTE and not palette_as_indices:
                # Indexed colour: the values are palette indices, as in palette PNGs.
                return _palette_to_rgb(pixels, colormap, path)
            return pixels
        with Image.open(path) as image:
            # Pillow keeps only the high byte of 16-bit colour PNGs; OpenCV returns all 16 bits.
            # (The raw mode is only visible before load() clears image.tile.)
            # tile[0][3] is the decoder's args in both Pillow's tuples and its later _Tile.
            if image.mode in ("RGB", "RGBA") and image.tile and ";16" in str(image.tile[0][3]):
                return _read_16bit_colour_png(path)
            image.load()  # decodes everything, so truncated files fail here
            if image.mode == "1":
                image = image.convert("L")
            elif image.mode == "P" and palette_as_indices:
                return np.asarray(image)  # palette label maps store ids as palette indices
            elif image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            elif image.mode not in _MODES_KEPT and not image.mode.startswith("I;16"):
                image = image.convert("RGB")  # CMYK, YCbCr, ...
            return np.asarray(image)
    except NucleiDataError:
        raise
    except Image.DecompressionBombError as err:
        raise NucleiDataError(
            f"{path}: {err} Pillow refuses images this large unless PIL.Image.MAX_IMAGE_PIXELS is raised; "
            "saved as TIFF it is read without that limit (a tiled TIFF tile by tile, as a slide)"
        ) from err
    except Exception as err:  # any decoder error means the file is unreadable
        raise NucleiDataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def raise_unsupported_tiff_colour_space(path, photometric):
    # tifffile returns the raw samples: CMYK inks or inverted grey would pass as RGB or grey
    # with wrong colours.
    raise NucleiDataError(f"{path}: {photometric.name} TIFF colour space is not supported; "
                          "save the image as RGB or greyscale")


def _palette_to_rgb(indices, colormap, path):
    """Indexed-colour pixels through a TIFF colormap (3, 2**bits), stored 16-bit per the TIFF
    specification, or 8-bit by writers that ignore it."""
    if colormap is None or indices.ndim != 2 or indices.max(initial=0) >= colormap.shape[1]:
        raise NucleiDataError(f"{path}: palette TIFF whose indices do not fit its colormap")
    colormap = np.asarray(colormap)
    if colormap.max() > 255:
        colormap = np.round(colormap.astype(np.float32) * (255.0 / 65535.0))
    return np.ascontiguousarray(np.moveaxis(colormap.astype(np.uint8)[:, indices], 0, -1))


def _read_16bit_colour_png(path):
    import cv2

    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise NucleiDataError(f"{path}: cannot decode 16-bit colour PNG")
    if pixels.shape[2] == 4:
        return pixels[..., [2, 1, 0, 3]]
    return pixels[..., ::-1]


def composite_on_white(pixels, premultiplied=False):
    """(H, W, C) uint8, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) -> (H, W, 3) RGB.

    Transparent pixels (outside the scanned tissue, in crops and slides) become white, i.e.
    glass, which tissue masks and models see as background; black would look like dense stain.
    ``premultiplied``: the colour was stored multiplied by alpha (TIFF associated alpha).
    """
    if pixels.shape[2] in (2, 4) and pixels[..., -1].min() < 255:
        alpha = pixels[..., -1:].astype(np.float32) / 255.0
        colour = pixels[..., :-1].astype(np.float32)
        if not premultiplied:
            colour = colour * alpha
        pixels = np.round(np.clip(colour + 255.0 * (1.0 - alpha), 0, 255)).astype(np.uint8)
    if pixels.shape[2] in (1, 2):
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _tiff_alpha(path):
    """How a 2- or 4-channel TIFF's last channel is tagged: 'straight', 'premultiplied' or None
    (an unspecified extra channel, which is not transparency)."""
    with tifffile.TiffFile(path) as tif:
        extras = tuple(tif.pages[0].extrasamples or ())
    return {1: "premultiplied", 2: "straight"}.get(int(extras[-1])) if extras else None


def read_rgb_image(path):
    """Read an image as (H, W, 3) uint8 RGB; see docs/INTERFACES.md for the conversions applied."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".npy", ".mat", ".xml"):
        raise NucleiDataError(f"{path}: not an image file")
    pixels = _read_pixels(path, refused_tiff_photometrics=TIFF_PHOTOMETRICS_REFUSED_FOR_IMAGES)
    if pixels.dtype.kind == "f" or pixels.dtype == bool:
        raise NucleiDataError(
            f"{path}: unsupported image dtype {pixels.dtype} (expected 8- or 16-bit)"
        )
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise NucleiDataError(f"{path}: unsupported image shape {pixels.shape}")
    premultiplied = False
    if suffix in _TIFF_SUFFIXES and pixels.shape[2] in (2, 4):
        alpha = _tiff_alpha(path)
        if alpha is None and pixels.shape[2] == 2:
            raise NucleiDataError(f"{path}: 2 channels, the second not tagged as alpha; expected grey, "
                                  "grey + alpha, RGB or RGBA")
        if alpha is None:
            warnings.warn(f"{path}: 4th channel not tagged as alpha, ignored")
            pixels = pixels[..., :3]
        premultiplied = alpha == "premultiplied"
    if pixels.dtype != np.uint8:
        if pixels.dtype.itemsize == 1 or pixels.dtype.kind not in "ui" or pixels.min() < 0 \
                or pixels.max() > 65535:
            raise NucleiDataError(
                f"{path}: unsupported image dtype {pixels.dtype} (expected 8-bit, or 16-bit with values "
                f"0..65535; values {pixels.min()}..{pixels.max()})"
            )
        # Colour and alpha are judged apart: a full 16-bit alpha (65535) beside colour of 8-bit
        # values must not have the colour scaled down to near black.
        colour_channels = pixels.shape[2] - 1 if pixels.shape[2] in (2, 4) else pixels.shape[2]
        pixels = np.concatenate(
            [_to_8_bit(pixels[..., :colour_channels], path, "image"),
             _to_8_bit(pixels[..., colour_channels:], path, "alpha channel")], axis=2)
    if pixels.shape[2] in (2, 4) and pixels[..., -1].min() < 255:
        warnings.warn(f"{path}: transparent pixels composited onto white")
    if pixels.shape[2] in (1, 2):
        warnings.warn(f"{path}: greyscale image replicated to 3 RGB channels")
    return composite_on_white(pixels, premultiplied=premultiplied)


def _to_8_bit(values, path, what):
    """16-bit ``values`` as uint8: kept when all are <= 255 (8-bit data in a 16-bit file, which
    scaling by 255/65535 would make black), else scaled as round(value * 255 / 65535)."""
    if values.size == 0:
        return values.astype(np.uint8)
    if values.max() <= 255:
        warnings.warn(f"{path}: 16-bit {what} ({values.dtype}) with values <= 255 read as 8-bit values")
        return values.astype(np.uint8)
    warnings.warn(f"{path}: 16-bit {what} ({values.dtype}) scaled to 8-bit as round(value * 255 / 65535)")
    return np.round(values.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


def _as_label_map(values, path, warn_float=True):
    """Validate a decoded label map and return it as int32 (int64 past 2^31).

    ``warn_float=False`` for formats whose official releases store ids as floats (CPM-17's .mat)."""
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] in (1, 3, 4):
        # Label maps saved as grey-in-RGB(A): accept only when all colour channels agree.
        colour = values[..., : min(3, values.shape[2])]
        if not (colour == colour[..., :1]).all():
            raise NucleiDataError(
                f"{path}: label map has {values.shape[2]} differing channels; "
                "expected one channel of ids"
            )
        values = colour[..., 0]
    if values.ndim != 2:
        raise NucleiDataError(f"{path}: label map must be 2-D, got shape {values.shape}")
    saved_as_bool = values.dtype == bool
    if saved_as_bool:
        values = values.astype(np.uint8)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise NucleiDataError(f"{path}: float label map contains NaN or infinite values")
        if not (values == np.round(values)).all():
            raise NucleiDataError(f"{path}: float label map has non-integral ids")
        if warn_float:
            # Accepted, but loudly: a binary 0.0/1.0 mask saved as float would read as one nucleus.
            warnings.warn(f"{path}: float label map read as integer ids; save label maps as integers")
    elif values.dtype.kind not in "ui":
        raise NucleiDataError(f"{path}: unsupported label map dtype {values.dtype}")
    if values.size and values.min() < 0:
        raise NucleiDataError(f"{path}: label map has negative ids (min {values.min()})")
    max_id = int(values.max()) if values.size else 0
    _check_not_a_binary_mask(values, max_id, path, saved_as_bool)
    if max_id > _INT64_MAX:
        # uint64 ids past int64 would wrap to negative ones; ranks keep 0, the order and each nucleus.
        ids, ranks = np.unique(values, return_inverse=True)
        return (ranks.reshape(values.shape) + (ids[0] != 0)).astype(np.int64)
    if max_id > _INT32_MAX:
        return values.astype(np.int64)
    return values.astype(np.int32)


def _check_not_a_binary_mask(values, max_id, path, saved_as_bool):
    """A binary mask read as a label map would be one nucleus per image: refuse the unmistakable
    case (a bool array, or one id of 255 / 65535, in separate pieces), warn for one id of other
    value in separate pieces (one nucleus split by a crop reads the same)."""
    if max_id == 0 or np.count_nonzero(values) != np.count_nonzero(values == max_id):
        return
    _, num_pieces = scipy.ndimage.label(values > 0, structure=np.ones((3, 3)))  # 8-connected
    if num_pieces < 2:
        return
    problem = (f"{path}: looks like a binary mask, not a label map with one id per nucleus "
               f"(its only id, {max_id}, covers {num_pieces} separate pieces)")
    remedy = ("label its connected components (e.g. skimage.measure.label), or use "
              "label_format='tnbc_binary' for binary nucleus masks")
    if saved_as_bool or max_id in _BINARY_MASK_VALUES:
        raise NucleiDataError(f"{problem}; {remedy}")
    warnings.warn(f"{problem}: read as one nucleus; if it is a mask, {remedy}")


def read_label_map(path):
    """Read an instance label map (PNG/TIFF of any integer dtype, ``.npy``, ``.mat``) as int32, or
    int64 for ids past int32 (ids past int64, uint64 only, are renumbered 1, 2, ... in their order)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".mat":
        return read_cpm17_mat(path)
    if suffix == ".npy":
        _require_file(path)
        try:
            values = np.load(path, allow_pickle=False)
        except Exception as err:
            raise NucleiDataError(
                f"{path}: cannot load .npy ({type(err).__name__}: {err})"
            ) from err
        return _as_label_map(values, path)
    return _as_label_map(_read_pixels(path, palette_as_indices=True), path)


def read_tnbc_gt(path):
    """Read a TNBC binary (0/255) GT mask; nuclei are its 4-connected components.

    Any one foreground value is accepted (0/1, 0/255, 0/65535); more than one means an instance
    label map, whose touching nuclei would merge here, so it is refused.
    """
    path = os.fspath(path)
    pixels = _read_pixels(path)
    if pixels.ndim == 3:
        # Grey + alpha (a GIMP export) keeps channel 0, RGB(A) the strongest colour: never alpha,
        # whose opaque 255 would make the whole image one nucleus.
        colour_channels = 1 if pixels.shape[2] <= 2 else 3
        pixels = pixels[..., :colour_channels].max(axis=2)
    if pixels.ndim != 2:
        raise NucleiDataError(f"{path}: binary mask must be 2-D, got shape {pixels.shape}")
    if pixels.dtype.kind not in "uib":
        raise NucleiDataError(f"{path}: binary mask of dtype {pixels.dtype}; expected integers 0 and one "
                              "foreground value")
    foreground_values = np.unique(pixels[pixels != 0])
    if foreground_values.size and foreground_values.min() < 0:
        raise NucleiDataError(f"{path}: binary mask has negative values (min {foreground_values.min()})")
    if foreground_values.size > 1:
        raise NucleiDataError(
            f"{path}: not a binary mask ({foreground_values.size} distinct foreground values, e.g. "
            f"{foreground_values[:3].tolist()}); for an instance label map use label_format='label_map'")
    foreground = pixels > 0
    label_map, _ = scipy.ndimage.label(foreground)  # default structure = 4-connectivity
    return label_map.astype(np.int32)


def read_monuseg_xml(path, height, width):
    """Rasterise Aperio XML region polygons into a (height, width) label map, ids 1..N in order.

    Later regions overwrite earlier ones where polygons overlap. Negative regions
    (``NegativeROA="1"``, Aperio's exclusions) are not nuclei: they take no id, and their pixels
    are cleared after all nuclei are drawn (a nucleus wholly inside one leaves its id unused).
    Vertices are read as MATLAB pixel coordinates, as MoNuSeg's are (see below).
    """
    path = os.fspath(path)
    _require_file(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise NucleiDataError(f"{path}: malformed XML ({err})") from err
    except OSError as err:  # unreadable (permissions, a failing disk): named like every bad input
        raise NucleiDataError(f"{path}: cannot read ({err.strerror or err})") from err
    if root.tag != "Annotations" and root.find(".//Annotation") is None:
        raise NucleiDataError(
            f"{path}: not an Aperio annotation file (root <{root.tag}>, no <Annotation>)"
        )
    label_map = np.zeros((int(height), int(width)), dtype=np.int32)
    next_id = 1
    excluded = []
    for region in root.iter("Region"):
        vertices = region.findall("./Vertices/Vertex")
        try:
            xs = np.array([float(v.attrib["X"]) for v in vertices])
            ys = np.array([float(v.attrib["Y"]) for v in vertices])
        except (KeyError, ValueError) as err:
            region_id = region.get("Id", "?")
            raise NucleiDataError(
                f"{path}: region {region_id} has a vertex without numeric X/Y"
            ) from err
        if len(vertices) < 3:
            continue  # a point or a line encloses no pixels
        # MoNuSeg's vertices are MATLAB pixel coordinates: 1-based, pixel centres at whole
        # numbers, so 0-based pixel (r, c) is filled when (r + 1, c + 1) is inside the polygon or
        # on its boundary (skimage's rule; poly2mask decides boundary pixels its own way). Measured
        # against the Kumar label maps on the three XML files here (median IoU per nucleus):
        # 0.99-1.00 with this offset, 0.91-0.94 reading pixel centres at r + 0.5, 0.83-0.88 at r.
        rows, cols = skimage.draw.polygon(ys - 1.0, xs - 1.0, shape=label_map.shape)
        if region.get("NegativeROA", "0").strip() == "1":
            excluded.append((rows, cols))
            continue
        label_map[rows, cols] = next_id
        next_id += 1
    for rows, cols in excluded:
        label_map[rows, cols] = 0
    if next_id == 1:
        # An image without nuclei is possible, but so is an export in another schema.
        warnings.warn(f"{path}: no nucleus polygon (<Region> with 3 or more vertices): empty label map")
    return label_map


def read_cpm17_mat(path):
    """Read the ``inst_map`` array of a CPM-17 ``.mat`` label file."""
    path = os.fspath(path)
    _require_file(path)
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as err:  # scipy reads MATLAB formats up to v7, not v7.3 (HDF5)
        raise NucleiDataError(
            f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; save it again in MATLAB with "
            f"save(..., '-v7'), or rewrite inst_map with h5py and scipy.io.savemat ({err})"
        ) from err
    except Exception as err:
        raise NucleiDataError(
            f"{path}: cannot load .mat file ({type(err).__name__}: {err})"
        ) from err
    if "inst_map" not in contents:
        keys = sorted(k for k in contents if not k.startswith("__"))
        raise NucleiDataError(f"{path}: no 'inst_map' in .mat file (keys: {keys})")
    # HoVer-Net's release of CPM-17 stores inst_map as float64: not worth a warning per file.
    return _as_label_map(contents["inst_map"], path, warn_float=False)


def load_label_map(record):
    """Load ``record["label_file"]`` by ``record["label_format"]``; check it is height x width."""
    label_file = record["label_file"]
    label_format = record.get("label_format", "label_map")
    height, width = int(record["height"]), int(record["width"])
    if label_format == "label_map":
        label_map = read_label_map(label_file)
    elif label_format == "tnbc_binary":
        label_map = read_tnbc_gt(label_file)
    elif label_format == "monuseg_xml":
        label_map = read_monuseg_xml(label_file, height, width)
    elif label_format == "cpm17_mat":
        label_map = read_cpm17_mat(label_file)
    else:
        raise NucleiDataError(
            f"{label_file}: unknown label_format {label_format!r} (one of {LABEL_FORMATS})"
        )
    if label_map.shape != (height, width):
        raise NucleiDataError(
            f"{label_file}: label map is {label_map.shape[0]}x{label_map.shape[1]} but image "
            f"{record.get('file_name', '?')} is {height}x{width}"
        )
    return label_map

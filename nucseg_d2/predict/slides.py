"""Image sources for prediction: plain images in memory, whole-slide images read tile by tile.

Every source exposes the *analysed region* (one pyramid level, optionally cropped to a region
of interest) through ``read(y0, y1, x0, x1)`` in that region's pixel coordinates, plus the
``downsample``/``origin``/``mpp`` that map them back to full-resolution slide coordinates.

Whole-slide formats (``.svs .ndpi .mrxs .scn .bif ...``), pyramidal ``.tif`` and large 8-bit
``.tif`` files in tiles or small strips, of colours the slide reader reads as stored, are read
through tiffslide (pure Python on tifffile) or, for formats tiffslide cannot read (``.mrxs``,
``.vms``, ...) or when asked, OpenSlide. Other files are decoded whole by
:func:`nucseg_d2.data.readers.read_rgb_image` (RGBA, greyscale and 16-bit conversions).
"""
import math
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple

import cv2
import numpy as np
import tifffile

from ..data.readers import (
    TIFF_PHOTOMETRICS_REFUSED_FOR_IMAGES, NucleiDataError, composite_on_white, raise_unsupported_tiff_colour_space,
    read_rgb_image,
)
from .tiling import Tile

__all__ = [
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "ImageSource",
    "ArraySource",
    "ResampledImageSource",
    "SlideSource",
    "TissueMask",
    "open_image",
    "is_slide_file",
    "choose_level",
    "tissue_mask_from_thumbnail",
    "write_pyramidal_tiff",
]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
_TIFF_PHOTOMETRICS_REFUSED_FOR_SLIDES = TIFF_PHOTOMETRICS_REFUSED_FOR_IMAGES + (tifffile.PHOTOMETRIC.PALETTE,)
# tiffslide reads TIFF-based formats only; the others (MIRAX, Hamamatsu VMS, ...) need OpenSlide.
_TIFFSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff", ".svslide")

# A level whose µm/px is within this fraction of the target counts as "at the target":
# scanners record e.g. 0.2527 for a nominal 0.25.
MPP_TOLERANCE = 0.1
# Enlarging a scan more than this to reach the asked µm/px no longer shows nuclei as the model
# learnt them (a 10x scan at 1 µm/px may still be enlarged to 0.25).
_MAX_ENLARGEMENT = 4.0
# cv2.remap's bilinear weights are in 1/32 pixel steps (INTER_TAB_SIZE).
_REMAP_STEPS = 32
# Reading thumbnails block by block keeps their memory independent of the slide size.
_THUMBNAIL_BLOCK = 2048


class ImageSource:
    """The analysed region of one input, read in blocks.

    Attributes: ``path`` (or None), ``height``/``width`` (analysed-level pixels), ``level``,
    ``downsample`` (level-0 px per analysed px), ``origin`` ((x0, y0) in level-0 px), ``mpp``
    (µm/px at the analysed level, or None), ``is_slide``, ``resampled``.
    """

    path: Optional[str] = None
    height: int
    width: int
    level: int = 0
    downsample: float = 1.0
    origin: Tuple[int, int] = (0, 0)
    mpp: Optional[float] = None
    is_slide: bool = False
    resampled: bool = False  # analysed on a grid of the asked µm/px, not the file's own pixels

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(y1 - y0, x1 - x0, 3) uint8 RGB of the analysed region."""
        raise NotImplementedError

    def thumbnail(self, max_side: int = 2048) -> np.ndarray:
        """The whole analysed region as RGB, shrunk so its longer side is at most ``max_side``."""
        raise NotImplementedError

    def tissue_mask(self, margin: int = 0, max_side: int = 2048) -> "TissueMask":
        """Tissue (vs glass) of the analysed region, from its thumbnail; see tissue_mask_from_thumbnail."""
        thumb = self.thumbnail(max_side)
        return tissue_mask_from_thumbnail(thumb, self.height, self.width, margin)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(ImageSource):
    """An in-memory RGB image (a decoded PNG/JPEG/TIFF, or an array given to the predictor)."""

    def __init__(self, image: np.ndarray, path: Optional[str] = None,
                 origin: Tuple[int, int] = (0, 0), mpp: Optional[float] = None):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise NucleiDataError(
                f"{path or 'image'}: expected an (H, W, 3) uint8 RGB array, got {image.dtype} "
                f"{image.shape}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise NucleiDataError(f"{path or 'image'}: image is empty ({image.shape[0]}x{image.shape[1]})")
        self.image = image
        self.path = path
        self.height, self.width = image.shape[:2]
        self.origin = origin
        self.mpp = mpp

    def read(self, y0, y1, x0, x1):
        return self.image[y0:y1, x0:x1]

    def thumbnail(self, max_side: int = 2048):
        scale = min(1.0, max_side / max(self.height, self.width))
        if scale == 1.0:
            return self.image
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        return cv2.resize(self.image, size, interpolation=cv2.INTER_AREA)


def check_target_mpp(mpp: Optional[float]) -> None:
    """ValueError unless ``mpp`` (a target µm per pixel, or None) is a positive number."""
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"a target µm/px must be a positive number, got {mpp}")


def check_enlargement(path, source_mpp: float, target_mpp: float, what: str) -> None:
    """Whether ``what`` (at ``source_mpp``) may be resampled to ``target_mpp``: enlarging adds no
    detail (a warning says so), and past :data:`_MAX_ENLARGEMENT` it stops being a picture of
    nuclei at the training scale at all (NucleiDataError)."""
    enlargement = source_mpp / target_mpp
    if enlargement > _MAX_ENLARGEMENT:
        raise NucleiDataError(
            f"{path}: {what} at {source_mpp:.3f} µm/px would be enlarged {enlargement:.1f}x to {target_mpp} µm/px "
            f"(at most {_MAX_ENLARGEMENT:g}x); analyse it at its own resolution (no --mpp) or ask for a coarser one")
    if enlargement > 1:
        warnings.warn(f"{path}: {what} at {source_mpp:.3f} µm/px is enlarged to {target_mpp} µm/px "
                      "(no finer scan: enlarging adds no detail)")


def resampled_block(read_source: Callable[[int, int, int, int], np.ndarray], source_width: int,
                    source_height: int, start: Tuple[float, float], step: float,
                    y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels [y0:y1, x0:x1] of a grid laid over a source picture, sampled bilinearly.

    Grid pixel (r, c) is the source's value at its centre, source pixel-index position
    (``start[0] + (c + 0.5) * step - 0.5``, ``start[1] + (r + 0.5) * step - 0.5``) (source
    pixel centres on integers; ``step`` source px per grid px); past the source's edge the edge
    pixel repeats. ``read_source(x0, y0, width, height)`` returns a block of the source. Each
    pixel's value depends on its own position only, never on the block asked for, so overlapping
    tiles agree where they overlap: the source block is padded for the interpolation and, when
    shrinking (step > 1), for a Gaussian anti-aliasing blur of sigma (step - 1) / 2 (as skimage's
    rescale), whose border the samples never reach; positions are rounded to OpenCV's 1/32-px
    interpolation grid first, so that no block's float32 rounding moves one.
    """
    sigma = (step - 1) / 2 if step > 1 else 0.0
    cols = start[0] + (np.arange(x0, x1) + 0.5) * step - 0.5
    rows = start[1] + (np.arange(y0, y1) + 0.5) * step - 0.5
    cols, rows = np.round(cols * _REMAP_STEPS) / _REMAP_STEPS, np.round(rows * _REMAP_STEPS) / _REMAP_STEPS
    pad = 2 + math.ceil(3 * sigma)  # OpenCV's 8-bit Gaussian kernel reaches 3 sigma
    bx0, bx1 = max(0, math.floor(cols[0]) - pad), min(source_width, math.floor(cols[-1]) + 2 + pad)
    by0, by1 = max(0, math.floor(rows[0]) - pad), min(source_height, math.floor(rows[-1]) + 2 + pad)
    block = read_source(bx0, by0, bx1 - bx0, by1 - by0)
    if sigma > 0:
        block = cv2.GaussianBlur(block, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
    map_x = np.clip(cols - bx0, 0, bx1 - bx0 - 1).astype(np.float32)
    map_y = np.clip(rows - by0, 0, by1 - by0 - 1).astype(np.float32)
    map_x, map_y = (np.ascontiguousarray(m) for m in np.broadcast_arrays(map_x[None, :], map_y[:, None]))
    return cv2.remap(block, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _resampled_size(x0: int, y0: int, x1: int, y1: int, full_width: int, full_height: int,
                    downsample: float) -> Tuple[int, int]:
    """(width, height) of the grid over the region: every grid pixel the region touches, none
    past the picture's edge."""
    width = max(1, min(math.ceil((x1 - x0) / downsample), int((full_width - x0) / downsample)))
    height = max(1, min(math.ceil((y1 - y0) / downsample), int((full_height - y0) / downsample)))
    return width, height


class ResampledImageSource(ImageSource):
    """A region of a decoded image on a grid of another µm/px, resampled block by block as it is
    read (:func:`resampled_block`, as slides are), so an enlarged image is never held whole."""

    resampled = True

    def __init__(self, image: np.ndarray, region: Tuple[int, int, int, int], downsample: float,
                 mpp: float, path: Optional[str] = None):
        self.image, self.path, self.mpp, self.downsample = image, path, float(mpp), float(downsample)
        x0, y0, x1, y1 = region
        self.origin = (x0, y0)
        self.width, self.height = _resampled_size(x0, y0, x1, y1, image.shape[1], image.shape[0], downsample)

    def read(self, y0, y1, x0, x1):
        def read_image(bx0, by0, width, height):
            return self.image[by0 : by0 + height, bx0 : bx0 + width]

        return resampled_block(read_image, self.image.shape[1], self.image.shape[0], self.origin,
                               self.downsample, y0, y1, x0, x1)

    def thumbnail(self, max_side: int = 2048):
        scale = min(1.0, max_side / max(self.height, self.width))  # thumbnail px per analysed px
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        x0, y0 = self.origin
        covered = self.image[y0 : y0 + math.ceil(self.height * self.downsample),
                             x0 : x0 + math.ceil(self.width * self.downsample)]
        shrinking = size[0] < covered.shape[1]
        return cv2.resize(covered, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def choose_level(level_mpps: Sequence[Optional[float]], target_mpp: float) -> int:
    """The coarsest level whose µm/px is at or finer than ``target_mpp`` (within 10%).

    Finer-than-target levels keep every detail the model was trained on; level 0 when even
    it is coarser than the target.
    """
    candidates = [i for i, m in enumerate(level_mpps)
                  if m is not None and m <= target_mpp * (1.0 + MPP_TOLERANCE)]
    return max(candidates, key=lambda i: level_mpps[i]) if candidates else 0


def _open_backend(path: str, backend: str):
    """(slide object, backend name) with OpenSlide-like attributes."""
    suffix = os.path.splitext(path)[1].lower()
    errors = []
    order = {"auto": ("tiffslide", "openslide") if suffix in _TIFFSLIDE_SUFFIXES else ("openslide",),
             "tiffslide": ("tiffslide",), "openslide": ("openslide",)}.get(backend)
    if order is None:
        raise ValueError(f"unknown slide backend {backend!r} (auto, tiffslide or openslide)")
    for name in order:
        try:
            if name == "tiffslide":
                import tiffslide

                return tiffslide.TiffSlide(path), name
            import openslide

            return openslide.OpenSlide(path), name
        except ImportError:
            package = "tiffslide" if name == "tiffslide" else "openslide-python openslide-bin"
            errors.append(f"{name} is not installed (pip install {package})")
        except Exception as err:  # each library has its own "unsupported/corrupt" errors
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise NucleiDataError(f"{path}: cannot open as a slide ({'; '.join(errors)})")


def _clip_roi(roi, width: int, height: int, path, what: str) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of ``roi`` = (x, y, w, h) clipped to a width x height picture (the whole
    picture when ``roi`` is None); NucleiDataError naming ``path`` when nothing is left."""
    roi = (0, 0, width, height) if roi is None else tuple(int(v) for v in roi)
    if len(roi) != 4:
        raise NucleiDataError(f"{path}: a region of interest is (x, y, w, h), got {roi}")
    x, y, w, h = roi
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise NucleiDataError(
            f"{path}: region of interest {roi} (x, y, w, h) lies outside the {width}x{height} {what}"
        )
    return x0, y0, x1, y1


def level0_position(level_pixel: int, downsample: float) -> int:
    """The level-0 coordinate that reads ``level_pixel`` of a level with this ``downsample``.

    Downsamples are ratios of level sizes (4.000135, not 4), and tiffslide truncates
    ``level0 / downsample``: rounding ``level_pixel * downsample`` may land just below it and
    read the pixel before. The smallest level-0 pixel at or after it maps back exactly;
    OpenSlide resamples the fractional position instead, shifted by less than one level-0 px.
    """
    level0 = math.ceil(level_pixel * downsample)
    while int(level0 / downsample) < level_pixel:  # float rounding below an integer
        level0 += 1
    return level0


class SlideSource(ImageSource):
    """One pyramid level of a whole-slide image, optionally cropped to a region of interest.

    Args:
        path: the slide file.
        level: pyramid level to analyse; mutually exclusive with ``mpp``.
        mpp: target µm/px: picks the coarsest level at or finer than it (see choose_level),
            used as it is when within 10 % of the target; else the region is resampled from that
            level to exactly ``mpp`` (bilinear, anti-aliased when shrinking; see
            :func:`resampled_block`), so nuclei appear at the size the model was trained on.
            ``resampled`` tells.
        roi: (x, y, w, h) in level-0 pixels; clipped to the slide.
        backend: "auto", "tiffslide" or "openslide".
    """

    is_slide = True
    resampled = False
    _stripped = False  # a single-level TIFF in strips: read through a band of rows
    _band = None  # (first row, end row, stored samples) of that band
    _premultiplied = False  # the TIFF's alpha is associated

    def __init__(self, path, level: Optional[int] = None, mpp: Optional[float] = None,
                 roi: Optional[Sequence[int]] = None, backend: str = "auto"):
        if level is not None and mpp is not None:
            raise ValueError("give either a pyramid level or a target mpp, not both")
        check_target_mpp(mpp)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise NucleiDataError(f"{self.path}: file not found")
        self._slide, self.backend = _open_backend(self.path, backend)
        try:
            self._setup(level, mpp, roi)
        except BaseException:
            self._slide.close()
            raise

    def _setup(self, level, mpp, roi):
        slide = self._slide
        if self.backend == "tiffslide":
            first_page = slide.ts_tifffile.pages[0]
            self._stripped = slide.level_count == 1 and not first_page.is_tiled
            self._premultiplied = tuple(first_page.extrasamples or ())[-1:] == (tifffile.EXTRASAMPLE.ASSOCALPHA,)
            # tiffslide returns the stored samples: palette indices, CMYK inks or inverted grey
            # would pass as grey or RGB(A) with wrong colours.
            photometric = slide.ts_tifffile.pages[0].photometric
            if photometric in _TIFF_PHOTOMETRICS_REFUSED_FOR_SLIDES:
                raise_unsupported_tiff_colour_space(self.path, photometric)
        props = slide.properties
        prefix = "tiffslide" if self.backend == "tiffslide" else "openslide"
        base_mpp = props.get(f"{prefix}.mpp-x")
        base_mpp = float(base_mpp) if base_mpp not in (None, "") else None
        if base_mpp is not None and not _CREDIBLE_MPP[0] <= base_mpp <= _CREDIBLE_MPP[1]:
            # libvips writes 10 px/cm (1000 µm/px) into TIFFs it knows no resolution for.
            warnings.warn(f"{self.path}: the slide's recorded {base_mpp:g} µm/px is no microscope's; "
                          "treated as unknown")
            base_mpp = None
        downsamples = [float(d) for d in slide.level_downsamples]
        if mpp is not None:
            if base_mpp is None:
                warnings.warn(f"{self.path}: the slide records no µm/px; analysing level 0 "
                              f"instead of {mpp} µm/px")
                level = 0
            else:
                level = choose_level([base_mpp * d for d in downsamples], mpp)
                chosen = base_mpp * downsamples[level]
                if abs(chosen - mpp) > mpp * MPP_TOLERANCE:
                    check_enlargement(self.path, chosen, mpp, f"level {level}")
                    self._setup_resampled(level, downsamples[level], mpp, base_mpp, roi)
                    return
        level = 0 if level is None else int(level)
        if not 0 <= level < slide.level_count:
            raise NucleiDataError(
                f"{self.path}: pyramid level {level} does not exist (levels 0..{slide.level_count - 1}: "
                f"{list(slide.level_dimensions)})"
            )
        self.level = level
        self.downsample = downsamples[level]
        self.mpp = base_mpp * self.downsample if base_mpp is not None else None
        full_w, full_h = slide.dimensions
        x0, y0, x1, y1 = _clip_roi(roi, full_w, full_h, self.path, "slide")
        # The region starts on this level's pixel grid; its origin is the level-0 pixel that
        # the backends map back to that level pixel (a shift of less than one level pixel).
        self._level_origin = (int(x0 / self.downsample), int(y0 / self.downsample))
        self.origin = tuple(level0_position(v, self.downsample) for v in self._level_origin)
        level_w, level_h = slide.level_dimensions[level]
        # The region at this level: every level pixel the ROI touches up to its far edge (a width
        # of round((x1 - x0) / d) from the rounded-down start would stop short of it), never past
        # the level's own edge (downsamples are rounded).
        self.width = max(1, min(level_w, math.ceil(x1 / self.downsample)) - self._level_origin[0])
        self.height = max(1, min(level_h, math.ceil(y1 / self.downsample)) - self._level_origin[1])

    def _setup_resampled(self, level: int, level_downsample: float, mpp: float, base_mpp: float, roi):
        """The region on a grid of exactly ``mpp`` µm/px, starting at the ROI's own level-0 x, y,
        resampled from ``level`` as it is read (:func:`resampled_block`)."""
        self.resampled = True
        self.level, self._level_downsample = level, level_downsample
        self.mpp = float(mpp)
        self.downsample = self.mpp / base_mpp  # level-0 px per analysed px; below 1 when enlarging
        full_w, full_h = self._slide.dimensions
        x0, y0, x1, y1 = _clip_roi(roi, full_w, full_h, self.path, "slide")
        self.origin = (x0, y0)
        self.width, self.height = _resampled_size(x0, y0, x1, y1, full_w, full_h, self.downsample)

    def _read_level(self, level: int, x0_level0: int, y0_level0: int, width: int, height: int):
        return self._composite(self._read_stored(level, x0_level0, y0_level0, width, height))

    def _composite(self, pixels: np.ndarray) -> np.ndarray:
        # openslide-python un-premultiplies OpenSlide's ARGB; tiffslide returns a TIFF's alpha as
        # stored, associated (premultiplied) or not.
        return composite_on_white(pixels, premultiplied=self._premultiplied)

    def _read_stored(self, level: int, x0_level0: int, y0_level0: int, width: int, height: int):
        """(height, width, C) uint8 samples as stored, C = 1 to 4, before compositing."""
        if self.backend == "tiffslide":
            pixels = self._slide.read_region((x0_level0, y0_level0), level, (width, height), as_array=True)
        else:
            pixels = np.asarray(self._slide.read_region((x0_level0, y0_level0), level, (width, height)))
        if pixels.dtype != np.uint8:
            raise NucleiDataError(f"{self.path}: unsupported slide pixel type {pixels.dtype}")
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
            raise NucleiDataError(f"{self.path}: unsupported slide pixels of shape {pixels.shape} "
                                  "(expected grey, grey + alpha, RGB or RGBA)")
        return pixels

    def read(self, y0, y1, x0, x1):
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"block [{y0}:{y1}, {x0}:{x1}] outside the {self.height}x{self.width} region")
        if self.resampled:
            return self._read_resampled(y0, y1, x0, x1)
        location = (level0_position(self._level_origin[0] + x0, self.downsample),
                    level0_position(self._level_origin[1] + y0, self.downsample))
        return self._read_block(self.level, location, x1 - x0, y1 - y0)

    def _read_block(self, level: int, location: Tuple[int, int], width: int, height: int) -> np.ndarray:
        if self._stripped and level == 0:
            return self._read_through_band(location, width, height)
        return self._read_checked(self._read_level, level, location, width, height)

    def _read_through_band(self, location: Tuple[int, int], width: int, height: int) -> np.ndarray:
        """A block of a single-level TIFF stored in strips, cut from a cached band of whole rows.

        Strips span the image's width, and tiffslide keeps no decoded strip: each tile read on its
        own would decode its rows across the whole width again (21x the decoding of one read for
        a 16,384 px wide image in 512 px tiles). Tiles are read row by row, so one band of at
        least :data:`_BAND_ROWS` rows serves a whole row of tiles.
        """
        x, y = location
        full_w, full_h = self._slide.dimensions
        if x < 0 or y < 0 or x + width > full_w or y + height > full_h:
            return self._read_checked(self._read_level, 0, location, width, height)  # the backend pads past the edge
        band = self._band  # one snapshot: SlideSource is public, and may be read from two threads
        if band is None or not (band[0] <= y and y + height <= band[1]):
            y1 = min(full_h, y + max(height, _BAND_ROWS))
            self._band = band = None  # the old band's memory goes before the new one is decoded
            # The samples as stored: compositing a whole band would take ~40 bytes per pixel.
            stored = self._read_checked(self._read_stored, 0, (0, y), full_w, y1 - y)
            self._band = band = (y, y1, stored)
        band_y0, _, stored = band
        return self._composite(stored[y - band_y0 : y - band_y0 + height, x : x + width].copy())

    def _read_checked(self, read: Callable[..., np.ndarray], level: int, location: Tuple[int, int],
                      width: int, height: int) -> np.ndarray:
        """``read(level, x, y, width, height)`` (composited or stored samples), its errors named."""
        try:
            return read(level, *location, width, height)
        except NucleiDataError:
            raise
        except Exception as err:  # a truncated or corrupt tile surfaces only when it is read
            raise NucleiDataError(
                f"{self.path}: cannot read level {level} block at level-0 {location} "
                f"({type(err).__name__}: {err})"
            ) from err

    def _read_resampled(self, y0, y1, x0, x1) -> np.ndarray:
        def read_level(bx0, by0, width, height):
            location = (level0_position(bx0, self._level_downsample), level0_position(by0, self._level_downsample))
            return self._read_block(self.level, location, width, height)

        level_w, level_h = self._slide.level_dimensions[self.level]
        start = (self.origin[0] / self._level_downsample, self.origin[1] / self._level_downsample)
        return resampled_block(read_level, level_w, level_h, start, self.downsample / self._level_downsample,
                               y0, y1, x0, x1)

    def thumbnail(self, max_side: int = 2048):
        scale = min(1.0, max_side / max(self.height, self.width))  # thumbnail px per analysed px
        out_h, out_w = max(1, round(self.height * scale)), max(1, round(self.width * scale))
        # Read from the coarsest level that is still at least as fine as the thumbnail.
        wanted = self.downsample / scale
        level = max((i for i, d in enumerate(self._slide.level_downsamples) if d <= wanted * 1.01),
                    key=lambda i: self._slide.level_downsamples[i], default=self.level)
        level_ds = float(self._slide.level_downsamples[level])
        level_w, level_h = self._slide.level_dimensions[level]
        src_x0, src_y0 = int(self.origin[0] / level_ds), int(self.origin[1] / level_ds)
        src_w = min(level_w - src_x0, max(1, round(self.width * self.downsample / level_ds)))
        src_h = min(level_h - src_y0, max(1, round(self.height * self.downsample / level_ds)))
        thumb = np.zeros((out_h, out_w, 3), np.uint8)
        fy, fx = out_h / src_h, out_w / src_w
        for by in range(0, src_h, _THUMBNAIL_BLOCK):
            for bx in range(0, src_w, _THUMBNAIL_BLOCK):
                bh, bw = min(_THUMBNAIL_BLOCK, src_h - by), min(_THUMBNAIL_BLOCK, src_w - bx)
                ty0, ty1 = round(by * fy), round((by + bh) * fy)
                tx0, tx1 = round(bx * fx), round((bx + bw) * fx)
                if ty1 <= ty0 or tx1 <= tx0:
                    continue
                block = self._read_block(level, (level0_position(src_x0 + bx, level_ds),
                                                 level0_position(src_y0 + by, level_ds)), bw, bh)
                thumb[ty0:ty1, tx0:tx1] = cv2.resize(block, (tx1 - tx0, ty1 - ty0),
                                                     interpolation=cv2.INTER_AREA)
        return thumb

    def close(self):
        self._band = None
        self._slide.close()


# ------------------------------------------------------------------------ tissue detection
# Otsu's threshold on saturation is clipped to this range: on a slide that is all tissue Otsu
# would split pale from dark tissue, and on one that is all glass it would split noise.
_SATURATION_RANGE = (0.05, 0.15)


class TissueMask:
    """A low-resolution tissue mask of an analysed region; ``scale`` = region px per mask px."""

    def __init__(self, mask: np.ndarray, region_height: int, region_width: int):
        self.mask = mask
        self.scale_y = region_height / mask.shape[0]
        self.scale_x = region_width / mask.shape[1]

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def has_tissue(self, tile: Tile) -> bool:
        y0, y1 = int(tile.y0 / self.scale_y), int(math.ceil(tile.y1 / self.scale_y))
        x0, x1 = int(tile.x0 / self.scale_x), int(math.ceil(tile.x1 / self.scale_x))
        return bool(self.mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].any())


def tissue_mask_from_thumbnail(thumbnail: np.ndarray, region_height: int, region_width: int,
                               margin: int = 0) -> TissueMask:
    """Tissue = saturation above Otsu's threshold (clipped to [0.05, 0.15]) on the thumbnail.

    Small specks (dust) are removed, and the mask is dilated by ``margin`` region pixels so
    nuclei at the tissue edge still get a tile.
    """
    import skimage.color
    import skimage.filters
    import skimage.morphology

    saturation = skimage.color.rgb2hsv(thumbnail)[..., 1]
    if np.ptp(saturation) > 0:
        threshold = skimage.filters.threshold_otsu(saturation)
    else:
        threshold = _SATURATION_RANGE[0]
    threshold = float(np.clip(threshold, *_SATURATION_RANGE))
    mask = saturation > threshold
    mask = skimage.morphology.remove_small_objects(mask, max_size=4)
    scale = max(region_height / thumbnail.shape[0], region_width / thumbnail.shape[1])
    radius = int(math.ceil(margin / scale)) if margin > 0 else 0
    if radius > 0 and mask.any():
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
    return TissueMask(mask, region_height, region_width)


# ------------------------------------------------------------------------ opening inputs
# A single-level 8-bit TIFF larger than this is read region by region like a slide (decoded
# whole, a 100,000 x 80,000 px export would take 24 GB); smaller ones are decoded whole, which
# also applies read_rgb_image's conversions.
_LARGE_TIFF_PIXELS = 8192 * 8192
# ... when stored in tiles or in strips of at most this many bytes: each block read decodes the
# strips it crosses, and a file of one huge strip would be decoded again for every tile.
_MAX_STRIP_BYTES = 64 * 2**20
# Rows decoded at once from such strips (a band of the full width: 300 MB at 100,000 px wide).
_BAND_ROWS = 1024


def _slide_reader_reads_as_stored(page) -> bool:
    """Whether the slide reader gets a single-level TIFF page's colours right: interleaved grey
    or RGB (JPEG-compressed YCbCr, which is decoded to RGB), alone or with alpha, straight or
    premultiplied. Planar-separate samples (tiffslide cannot read them), palettes, other YCbCr
    (returned as stored) and untagged extra channels (taken as alpha: an untagged zero channel
    reads as a white image) are left to read_rgb_image."""
    ycbcr_decoded = page.photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression in (
        tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG)
    photometric_ok = ycbcr_decoded or page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)
    alpha = (tifffile.EXTRASAMPLE.UNASSALPHA, tifffile.EXTRASAMPLE.ASSOCALPHA)
    samples_ok = page.samplesperpixel in (1, 3) or (
        page.samplesperpixel in (2, 4) and len(page.extrasamples) == 1 and page.extrasamples[0] in alpha)
    return photometric_ok and samples_ok and (page.samplesperpixel == 1
                                              or page.planarconfig == tifffile.PLANARCONFIG.CONTIG)


def is_slide_file(path: str) -> bool:
    """Whole-slide formats, pyramidal TIFFs, and large 8-bit TIFFs in tiles or small strips whose
    colours the slide reader reads as stored (:func:`_slide_reader_reads_as_stored`): read
    region by region."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if len(tif.series[0].levels) > 1:
                return True
            if page.dtype != np.uint8 or page.imagewidth * page.imagelength <= _LARGE_TIFF_PIXELS:
                return False
            if not _slide_reader_reads_as_stored(page):
                return False  # read_rgb_image's conversions (planes, palette, extra channels) apply
            strip_bytes = page.rowsperstrip * page.imagewidth * page.samplesperpixel
            return bool(page.is_tiled or strip_bytes <= _MAX_STRIP_BYTES)
    except Exception:
        return False  # let read_rgb_image report what is wrong with it


def open_image(path, level: Optional[int] = None, mpp: Optional[float] = None,
               roi: Optional[Sequence[int]] = None, backend: str = "auto") -> ImageSource:
    """Open one input for prediction: a SlideSource for slides, else an ArraySource (or a
    ResampledImageSource).

    ``level``/``mpp``/``roi`` as :class:`SlideSource`. Plain images have one level: a level
    above 0 is an error, and ``roi`` crops the decoded image. With ``mpp``, an image whose
    resolution tags (:func:`tiff_resolution_mpp`) lie more than 10 % from it is resampled to it
    as slides are (:func:`resampled_block`; enlarging warns); one without them is analysed as it
    is, with a warning.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NucleiDataError(f"{path}: file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES + SLIDE_SUFFIXES:
        raise NucleiDataError(
            f"{path}: unsupported format {suffix or '(no suffix)'} (images: "
            f"{' '.join(IMAGE_SUFFIXES)}; slides: {' '.join(SLIDE_SUFFIXES)})"
        )
    if is_slide_file(path):
        return SlideSource(path, level=level, mpp=mpp, roi=roi, backend=backend)
    if level not in (None, 0):
        raise NucleiDataError(f"{path}: a plain image has only pyramid level 0 (asked for {level})")
    check_target_mpp(mpp)
    image = read_rgb_image(path)
    x0, y0, x1, y1 = _clip_roi(roi, image.shape[1], image.shape[0], path, "image")
    image_mpp = tiff_resolution_mpp(path)
    if mpp is not None and image_mpp is None:
        warnings.warn(f"{path}: the image records no µm/px; analysed at its own resolution, not {mpp} µm/px")
    elif mpp is not None and abs(image_mpp - mpp) > mpp * MPP_TOLERANCE:
        check_enlargement(path, image_mpp, mpp, "the image")
        return ResampledImageSource(image, (x0, y0, x1, y1), mpp / image_mpp, mpp, path=path)
    return ArraySource(image[y0:y1, x0:x1], path=path, origin=(x0, y0), mpp=image_mpp)


# Resolution tags outside this range are an image editor's 72 / 300 dpi, not a microscope's.
_CREDIBLE_MPP = (0.01, 20.0)


def tiff_resolution_mpp(path) -> Optional[float]:
    """µm per pixel from a TIFF's resolution tags (XResolution in pixels per cm or inch), as a slide
    reader takes a plain TIFF's; None for other files, no or unitless tags, or a resolution no
    microscope gives (outside 0.01-20 µm/px: 72 dpi is 353 µm/px)."""
    if os.path.splitext(os.fspath(path))[1].lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            resolution, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if resolution is None or unit is None:
                return None
            numerator, denominator = resolution.value
            microns_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
    except (tifffile.TiffFileError, OSError, ValueError, TypeError):
        return None  # read_rgb_image has read the pixels; the tags are only an extra
    if microns_per_unit is None or not numerator or not denominator:
        return None
    mpp = microns_per_unit * denominator / numerator
    return mpp if _CREDIBLE_MPP[0] <= mpp <= _CREDIBLE_MPP[1] else None


def write_pyramidal_tiff(path, read_level0: Callable[[int, int, int, int], np.ndarray],
                         height: int, width: int, num_levels: int = 3, tile: int = 256,
                         mpp: float = 0.25, subifds: bool = False, compression="zlib"):
    """Write a tiled pyramidal BigTIFF, tile by tile (constant memory), for tests and benchmarks.

    ``read_level0(y0, y1, x0, x1)`` gives RGB uint8 of the full-resolution image; level k is
    it shrunk 2^k times (area averaging). Levels are successive reduced-resolution pages, which
    both tiffslide and OpenSlide's generic-TIFF reader read, or SubIFDs (tiffslide only) with
    ``subifds=True``. The resolution tags record ``mpp``.
    """

    def tiles(level):
        factor = 2 ** level
        level_h, level_w = -(-height // factor), -(-width // factor)
        for ty in range(0, level_h, tile):
            for tx in range(0, level_w, tile):
                y0, x0 = ty * factor, tx * factor
                y1, x1 = min(height, (ty + tile) * factor), min(width, (tx + tile) * factor)
                block = read_level0(y0, y1, x0, x1)
                if factor > 1:
                    size = (-(-(x1 - x0) // factor), -(-(y1 - y0) // factor))
                    block = cv2.resize(block, size, interpolation=cv2.INTER_AREA)
                padded = np.zeros((tile, tile, 3), np.uint8)
                padded[: block.shape[0], : block.shape[1]] = block
                yield padded

    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for level in range(num_levels):
            factor = 2 ** level
            shape = (-(-height // factor), -(-width // factor), 3)
            pixels_per_cm = 1e4 / (mpp * factor)
            options = dict(shape=shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                           compression=compression, resolution=(pixels_per_cm, pixels_per_cm),
                           resolutionunit="CENTIMETER")
            if level == 0:
                options["subifds"] = num_levels - 1 if subifds else 0
            else:
                options["subfiletype"] = 1
            writer.write(tiles(level), **options)

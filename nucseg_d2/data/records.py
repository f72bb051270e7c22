"""Detectron2 dataset dicts ("records") from nuclei label maps, cached on disk."""
import hashlib
import importlib.metadata
import logging
import os
import pickle
import re
import sys
import warnings

import numpy as np
import pycocotools.mask as mask_util
import scipy.ndimage
from detectron2.structures import BoxMode

from ..utils import atomic_path
from . import mapper, readers
from .mapper import compact_label_ids
from .readers import NucleiDataError, load_label_map, read_rgb_image

__all__ = ["label_map_to_annotations", "rle_from_crop", "build_records", "get_nuclei_cache_dir"]

logger = logging.getLogger(__name__)

# Bump when the record layout or the annotation encoding changes, to invalidate old caches.
_RECORDS_CACHE_VERSION = 1
# The records are made by these modules' code, so a fix to a reader (say, where a polygon's pixels
# lie) must not be hidden by annotations cached before it: their source is part of the cache key.
_RECORD_CODE_MODULES = (readers, mapper, sys.modules[__name__])


def get_nuclei_cache_dir():
    """``$NUCSEG_CACHE``, default ``~/.cache/nucseg_d2`` (not created here)."""
    cache_dir = os.environ.get("NUCSEG_CACHE") or os.path.join("~", ".cache", "nucseg_d2")
    return os.path.expanduser(cache_dir)


def rle_from_crop(crop_mask: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
    """COCO compressed RLE of a full (height, width) mask that is ``crop_mask`` at (top, left).

    Byte-identical to ``pycocotools.mask.encode`` on the full image, at the cost of the crop:
    runs go down columns, so the foreground pixels' column-major flat indices give the runs.
    """
    crop_cols, crop_rows = np.nonzero(np.asarray(crop_mask).T)  # column-major order
    flat = (crop_cols.astype(np.int64) + left) * height + (crop_rows + top)
    if flat.size == 0:
        counts = [height * width]
    else:
        breaks = np.flatnonzero(np.diff(flat) != 1)
        starts = np.concatenate(([flat[0]], flat[breaks + 1]))
        ends = np.concatenate((flat[breaks] + 1, [flat[-1] + 1]))
        boundaries = np.column_stack([starts, ends]).ravel()
        counts = np.diff(np.concatenate(([0], boundaries, [height * width])))
        if counts[-1] == 0:  # pycocotools writes no empty trailing background run
            counts = counts[:-1]
        counts = counts.tolist()
    rle = mask_util.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def label_map_to_annotations(label_map):
    """One Detectron2 annotation dict per nucleus (positive id) of ``label_map``, in id order."""
    label_map = np.asarray(label_map)
    height, width = label_map.shape
    # find_objects allocates one entry per id up to the maximum; compact sparse ids first.
    label_map = compact_label_ids(label_map)
    ids = np.unique(label_map)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return []
    boxes = scipy.ndimage.find_objects(label_map)
    annotations = []
    for nucleus_id in ids:
        rows, cols = boxes[nucleus_id - 1]
        nucleus_crop = label_map[rows, cols] == nucleus_id
        rle = rle_from_crop(nucleus_crop, rows.start, cols.start, height, width)
        annotations.append(
            {
                "bbox": [
                    float(cols.start),
                    float(rows.start),
                    float(cols.stop - cols.start),
                    float(rows.stop - rows.start),
                ],
                "bbox_mode": BoxMode.XYWH_ABS,
                "segmentation": rle,
                "area": int(np.count_nonzero(nucleus_crop)),
                "category_id": 0,
                "iscrowd": 0,
            }
        )
    return annotations


def _build_record(spec):
    image = read_rgb_image(spec["file_name"])
    record = dict(spec)
    record["height"], record["width"] = int(image.shape[0]), int(image.shape[1])
    record.setdefault("label_format", "label_map")
    record["annotations"] = label_map_to_annotations(load_label_map(record))
    return record


def _file_fingerprint(path):
    try:
        stat = os.stat(path)
    except OSError as err:
        raise NucleiDataError(f"{path}: file not found") from err
    return f"{os.path.abspath(path)}|{stat.st_mtime_ns}|{stat.st_size}"


def _record_code_fingerprint(modules=_RECORD_CODE_MODULES):
    """A hash of the source of ``modules``, read through their loaders (zip imports too); where a
    loader cannot give it (a frozen application), the installed package version stands in."""
    digest = hashlib.sha256()
    for module in modules:
        try:
            source = module.__spec__.loader.get_data(module.__file__)
        except (AttributeError, OSError, TypeError):
            try:
                source = f"{module.__name__} {importlib.metadata.version('nucseg-d2')}".encode()
            except importlib.metadata.PackageNotFoundError:
                source = module.__name__.encode()
        digest.update(source)
    return digest.hexdigest()


# Taken once, at import: a process keeps the code it imported, so a long training whose reader
# files are edited under it must go on storing records under its own code's key, not the new one.
_RECORD_CODE_FINGERPRINT = _record_code_fingerprint()


def _cache_path(specs, cache_key):
    digest = hashlib.sha256(f"v{_RECORDS_CACHE_VERSION}|{_RECORD_CODE_FINGERPRINT}|{cache_key}".encode())
    for spec in specs:
        digest.update(repr(sorted(spec.items())).encode())
        digest.update(_file_fingerprint(spec["file_name"]).encode())
        digest.update(_file_fingerprint(spec["label_file"]).encode())
    safe_key = re.sub(r"[^A-Za-z0-9_.-]", "_", cache_key)
    file_name = f"{safe_key}-{digest.hexdigest()[:20]}.pkl"
    return os.path.join(get_nuclei_cache_dir(), "records", file_name)


def build_records(specs, cache_key):
    """Records for ``specs``, read from / written to the on-disk cache.

    Each spec is a dict with ``file_name``, ``label_file``, ``image_id``, optional ``label_format``
    (default "label_map") and any extra keys (``organ``, ``patient``), which are copied into the
    record. The cache entry is keyed by ``cache_key`` plus the specs and the paths, mtimes and
    sizes of their files, so editing a file invalidates it, and by the source of the code that
    makes records (as this process imported it), so a reader fix does too.
    """
    specs = [dict(spec) for spec in specs]
    cache_path = _cache_path(specs, cache_key)
    if os.path.isfile(cache_path):
        try:
            with open(cache_path, "rb") as cache_file:
                return pickle.load(cache_file)
        except Exception as err:  # a corrupt or foreign cache entry is rebuilt, never trusted
            logger.warning("Ignoring unreadable records cache %s (%s)", cache_path, err)
    records = [_build_record(spec) for spec in specs]
    try:
        # Atomic write: readers (other processes) see either no entry or a complete one.
        with atomic_path(cache_path) as temp_path, open(temp_path, "wb") as temp_file:
            pickle.dump(records, temp_file, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError as err:
        warnings.warn(f"Could not write records cache {cache_path}: {err}")
    return records

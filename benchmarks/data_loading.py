#!/usr/bin/env python
"""Data-loading throughput: images/s through the nuclei mapper + augmentations on Kumar 1000x1000.

Baseline, run in the same process: Detectron2's stock ``DatasetMapper`` on the same records
(masks decoded from the cached COCO RLE annotations) with the same crop and flips.
Uses ``$NUCSEG_DATASETS/kumar`` when present, else synthetic 1000x1000 tiles.

    python benchmarks/data_loading.py [--images 16] [--crop 256]
"""
import argparse
import os
import platform
import tempfile
import time

import numpy as np
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T

import nucseg_d2  # noqa: F401  (registers data sets)
from nucseg_d2 import add_nucseg_config
from nucseg_d2.data import NucleiDatasetMapper, register_nuclei_folder
from nucseg_d2.data.synthetic import ensure_synthetic_split


def load_records(num_images):
    try:
        records = DatasetCatalog.get("kumar_train")
        source = "Kumar (real)"
    except Exception as e:  # no real data here: fall back to synthetic 1000x1000 tiles
        print(f"[kumar unavailable: {e}] using synthetic 1000x1000 tiles")
        folder = os.path.join(tempfile.gettempdir(), "nucseg_bench_synthetic")
        pairs = ensure_synthetic_split(folder, "bench", num_images, size=(1000, 1000), seed=5)
        register_nuclei_folder("bench_synthetic_1000", os.path.dirname(pairs[0][0]),
                               os.path.dirname(pairs[0][1]))
        records = DatasetCatalog.get("bench_synthetic_1000")
        source = "synthetic 1000x1000"
    return records[:num_images], source


def throughputs(mappers, records, repeats):
    """Images/s of each mapper: the best of ``repeats`` passes over ``records``, the mappers taking
    turns pass by pass (so a slower spell of the machine does not fall on one of them), each pass
    from the same numpy seed (the crops and flips draw from it)."""
    for mapper in mappers:
        mapper(records[0])  # warm-up (imports, caches)
    best = [0.0] * len(mappers)
    for _ in range(repeats):
        for index, mapper in enumerate(mappers):
            np.random.seed(0)
            start = time.perf_counter()
            for record in records:
                mapper(record)
            best[index] = max(best[index], len(records) / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    records, source = load_records(args.images)
    cfg = get_cfg()
    add_nucseg_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [args.crop, args.crop]
    cfg.INPUT.MASK_FORMAT = "bitmask"
    ours_geometric = NucleiDatasetMapper(cfg, is_train=True)
    cfg_all = cfg.clone()
    for key in ("GAUSSIAN_BLUR_PROB", "GAUSSIAN_NOISE_PROB", "EMBOSS_PROB", "SHARPEN_PROB",
                "CHANNEL_SHUFFLE_PROB", "STAIN_JITTER_PROB"):
        cfg_all.INPUT.AUG[key] = 0.5
    ours_all = NucleiDatasetMapper(cfg_all, is_train=True)
    cfg_rescale = cfg.clone()
    cfg_rescale.INPUT.AUG.SCALE_PROB = 1.0  # the whole image resized before every crop
    ours_rescale = NucleiDatasetMapper(cfg_rescale, is_train=True)
    stock = DatasetMapper(
        is_train=True,
        augmentations=[
            T.RandomCrop("absolute", (args.crop, args.crop)),
            T.RandomFlip(horizontal=True, vertical=False),
            T.RandomFlip(horizontal=False, vertical=True),
        ],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        recompute_boxes=True,
    )
    names = ["detectron2 DatasetMapper (RLE annotations), crop+flips", "NucleiDatasetMapper, crop+flips+rot90",
             "NucleiDatasetMapper, + all photometric (p=0.5 each)",
             f"NucleiDatasetMapper, + rescale (p=1, {tuple(cfg_rescale.INPUT.AUG.SCALE_RANGE)})"]
    mappers = [stock, ours_geometric, ours_all, ours_rescale]
    rows = list(zip(names, throughputs(mappers, records, args.repeats)))
    baseline = rows[0][1]
    print(f"\nData loading on {source}, {len(records)} images, crop {args.crop}, 1 process, "
          f"best of {args.repeats} passes each")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'mapper':60s} {'images/s':>9s} {'vs stock':>9s}")
    for name, rate in rows:
        print(f"{name:60s} {rate:9.2f} {rate / baseline:8.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Score the predictor (tiling, TTA, thresholds: what users run) on a registered data set.

Predicts every image of DATASET with NucleiPredictor, writes the label maps as uint16 PNGs named
after the image id (TIFF past 65,535 nuclei, as the evaluator) under RUN_DIR/DATASET/label_maps/,
scores them with nucseg-eval's dataset mode (metrics.json, per_image.csv beside them) and logs
the seconds per image, so that a variant of
inference (e.g. --tta) becomes a results folder the tables of docs/RESULTS.md can compare.

    python scripts/predict_eval.py --config-file results/tnbc_proposed_cpu1100/config.yaml \
        --weights output/tnbc_proposed_cpu1100/model_final.pth --dataset tnbc_val \
        --run-dir results/tnbc_proposed_cpu1100_predictor_tta --tta
"""
import argparse
import os
import platform
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nucseg_d2.data.datasets import register_config_datasets  # noqa: E402
from nucseg_d2.data.readers import read_rgb_image  # noqa: E402
from nucseg_d2.evaluation import folder_eval  # noqa: E402
from nucseg_d2.predict import NucleiPredictor  # noqa: E402
from nucseg_d2.predict.writers import write_label_map_image  # noqa: E402
from nucseg_d2.utils import atomic_path  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", required=True, help="a registered data set, e.g. tnbc_val")
    parser.add_argument("--run-dir", required=True, help="results folder; DATASET/ is written inside")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (flips, rot90)")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    out_dir = os.path.join(args.run_dir, args.dataset)
    maps_dir = os.path.join(out_dir, "label_maps")
    os.makedirs(maps_dir, exist_ok=True)
    predictor = NucleiPredictor(args.config_file, weights=args.weights, tta=args.tta,
                                tile_size=args.tile_size, opts=args.opts)
    register_config_datasets(predictor.cfg)  # the run's own folders (DATASETS.NUCLEI_FOLDERS)
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"device {predictor.device}; tta {args.tta}; config {args.config_file}; weights {args.weights}"]
    seconds = []
    for record in DatasetCatalog.get(args.dataset):
        image = read_rgb_image(record["file_name"])
        start = time.perf_counter()
        result = predictor.predict(image)
        seconds.append(time.perf_counter() - start)
        write_label_map_image(os.path.join(maps_dir, str(record["image_id"])), result.label_map)
        lines.append(f"{record['image_id']}: {int(result.label_map.max())} nuclei, {seconds[-1]:.2f} s")
    # The first image pays for lazy initialisation; as Detectron2's evaluator, leave it out.
    timed = seconds[1:] or seconds
    lines.append(f"seconds per image: {np.mean(timed):.2f} (mean of {len(timed)}, first image excluded)")
    with atomic_path(os.path.join(out_dir, "predict_log.txt")) as temp:
        with open(temp, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return folder_eval.main(["--dataset", args.dataset, "--pred", maps_dir, "-o", out_dir])


if __name__ == "__main__":
    sys.exit(main())

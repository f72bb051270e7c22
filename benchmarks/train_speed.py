#!/usr/bin/env python
"""Training s/iteration, inference s/image (1000x1000) and peak memory per config, as ratios to a baseline.

Each config trains on the same synthetic batches (mapper output of the built-in synthetic data
set) in this process; the first config is the baseline. Default: the paper's ablation (Table 3).

    python benchmarks/train_speed.py [--configs A.yaml B.yaml ...] [--iters 4] [KEY VALUE ...]
"""
import argparse
import os
import platform
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nucseg_d2.config import build_nuclei_cfg
from nucseg_d2.data import NucleiDatasetMapper
from nucseg_d2.data.synthetic import generate_tile
from rss import peak_rss_mib, reset_peak_rss  # benchmarks/rss.py, beside this script


def load_cfg(path, opts):
    cfg = build_nuclei_cfg(path, opts)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def time_config(cfg, records, iters, infer_image, warmup=2):
    torch.manual_seed(0)
    np.random.seed(0)  # the crops, flips and rotations draw from it: the same batches for every config
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    rng = np.random.default_rng(0)
    batches = [[mapper(records[i]) for i in rng.integers(0, len(records), batch_size)]
               for _ in range(iters + warmup)]
    model.train()
    times = []
    with EventStorage(0):
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # kernels run asynchronously; time them, not their launch
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.eval()
    height, width = infer_image.shape[:2]
    test_input = {"image": torch.from_numpy(infer_image.transpose(2, 0, 1).copy()),
                  "height": height, "width": width}
    with torch.no_grad():
        model([test_input])
        start = time.perf_counter()
        detections = len(model([test_input])[0]["instances"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        infer = time.perf_counter() - start
    if torch.cuda.is_available():
        return float(np.median(times)), infer, detections, torch.cuda.max_memory_allocated() / 2**20
    return float(np.median(times)), infer, detections, peak_rss_mib()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=[
        "configs/tnbc_maskrcnn.yaml", "configs/tnbc_ab1.yaml", "configs/tnbc_ab3.yaml",
        "configs/tnbc_ab2.yaml", "configs/tnbc.yaml", "configs/tnbc_light_head.yaml"])
    parser.add_argument("--infer-size", type=int, default=1000, help="side of the inference image")
    parser.add_argument("--detections", type=int, default=1000,
                        help="untrained models detect arbitrarily many nuclei: force this many "
                             "detections per image (score threshold 0) so every config does the "
                             "same work, as on a crowded Kumar tile; 0 keeps the config's rule")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    records = DatasetCatalog.get("nuclei_synthetic_train")
    infer_image, _ = generate_tile(np.random.default_rng(0), size=(args.infer_size, args.infer_size))
    rows = []
    for path in args.configs:
        cfg = load_cfg(path, args.opts)
        if args.detections:
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
            cfg.TEST.DETECTIONS_PER_IMAGE = args.detections
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        s_iter, s_infer, detections, peak = time_config(cfg, records, args.iters, infer_image)
        rows.append((path, cfg.SOLVER.IMS_PER_BATCH, list(cfg.INPUT.CROP.SIZE), s_iter, s_infer,
                     detections, peak))
    print(f"\nTraining speed, {args.iters} timed iterations each, device {rows and load_cfg(args.configs[0], args.opts).MODEL.DEVICE}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    # Peak memory: CUDA max allocated, or on the CPU the peak RSS while this config ran (reset
    # before each; memory an earlier config left with the allocator can still count in it).
    infer_col = f"infer s/{args.infer_size}²"
    print(f"{'config':30s} {'batch':>5s} {'crop':>10s} {'s/iter':>7s} {'ratio':>6s} {infer_col:>14s} "
          f"{'ratio':>6s} {'dets':>5s} {'peak MiB':>9s}")
    base_iter, base_infer = rows[0][3], rows[0][4]
    for path, batch, crop, s_iter, s_infer, detections, peak in rows:
        print(f"{path:30s} {batch:5d} {str(crop):>10s} {s_iter:7.2f} {s_iter / base_iter:6.2f} "
              f"{s_infer:14.2f} {s_infer / base_infer:6.2f} {detections:5d} {peak:9.0f}")


if __name__ == "__main__":
    main()

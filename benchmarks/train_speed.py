#!/usr/bin/env python
"""CPU training seconds/iteration (and inference seconds/image) per config, as a ratio to a baseline.

Each config trains on the same synthetic batches (mapper output of the built-in synthetic data
set) in this process; the first config is the baseline.

    python benchmarks/train_speed.py [--configs configs/tnbc.yaml configs/demo.yaml] [--iters 4]
"""
import argparse
import os
import platform
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nucseg_d2 import add_nucseg_config
from nucseg_d2.config import merge_config_file
from nucseg_d2.data import NucleiDatasetMapper


def load_cfg(path, opts):
    cfg = get_cfg()
    add_nucseg_config(cfg)
    merge_config_file(cfg, path)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def time_config(cfg, records, iters, warmup=2):
    torch.manual_seed(0)
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
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.eval()
    test_input = NucleiDatasetMapper(cfg, is_train=False)(records[0])
    with torch.no_grad():
        model([test_input])
        start = time.perf_counter()
        model([test_input])
        infer = time.perf_counter() - start
    return float(np.median(times)), infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tnbc.yaml", "configs/demo.yaml"])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    records = DatasetCatalog.get("nuclei_synthetic_train")
    rows = []
    for path in args.configs:
        cfg = load_cfg(path, args.opts)
        s_iter, s_infer = time_config(cfg, records, args.iters)
        rows.append((path, cfg.SOLVER.IMS_PER_BATCH, list(cfg.INPUT.CROP.SIZE), s_iter, s_infer))
    print(f"\nTraining speed, {args.iters} timed iterations each, device {rows and load_cfg(args.configs[0], args.opts).MODEL.DEVICE}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'config':32s} {'batch':>5s} {'crop':>10s} {'s/iter':>8s} {'ratio':>6s} {'infer s/256²':>12s} {'ratio':>6s}")
    base_iter, base_infer = rows[0][3], rows[0][4]
    for path, batch, crop, s_iter, s_infer in rows:
        print(f"{path:32s} {batch:5d} {str(crop):>10s} {s_iter:8.2f} {s_iter / base_iter:6.2f} "
              f"{s_infer:12.2f} {s_infer / base_infer:6.2f}")


if __name__ == "__main__":
    main()

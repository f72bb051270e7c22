#!/usr/bin/env python
"""Training s/iteration, inference s/image (1000x1000) and peak memory per config, as ratios to a baseline.

Each config trains on the same synthetic batches (mapper output of the built-in synthetic data
set) in this process; the first config is the baseline. Default: the paper's ablation (Table 3).

    python benchmarks/train_speed.py [--configs A.yaml B.yaml ...] [--iters 4] [--skip-memory] [KEY VALUE ...]

The configs take turns step by step (training) and pass by pass (inference), so that load changes
fall on all of them; peak memory is measured for each config in a fresh process.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
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
from timing import run_stamp  # benchmarks/timing.py


def load_cfg(path, opts):
    cfg = build_nuclei_cfg(path, opts)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


class ConfigRun:
    """One config's model, optimiser and training batches (the same crops for every config)."""

    def __init__(self, path, opts, records, iters, infer_image, detections, warmup=2):
        self.path = path
        self.cfg = cfg = load_cfg(path, opts)
        if detections:
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
            cfg.TEST.DETECTIONS_PER_IMAGE = detections
        torch.manual_seed(0)
        np.random.seed(0)  # the crops, flips and rotations draw from it: the same batches for every config
        mapper = NucleiDatasetMapper(cfg, is_train=True)
        self.model = build_model(cfg)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        rng = np.random.default_rng(0)
        self.batches = [[mapper(records[i]) for i in rng.integers(0, len(records), cfg.SOLVER.IMS_PER_BATCH)]
                        for _ in range(iters + warmup)]
        height, width = infer_image.shape[:2]
        self.test_input = {"image": torch.from_numpy(infer_image.transpose(2, 0, 1).copy()),
                           "height": height, "width": width}
        self.warmup = warmup

    def train_step(self, index):
        """Seconds of training step ``index`` (warm-up steps first)."""
        self.model.train()
        start = time.perf_counter()
        with EventStorage(index):
            losses = self.model(self.batches[index])
            self.optimizer.zero_grad()
            sum(losses.values()).backward()
            self.optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels run asynchronously; time them, not their launch
        return time.perf_counter() - start

    def inference(self):
        """(seconds, detections) of one forward pass on the inference image."""
        self.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            detections = len(self.model([self.test_input])[0]["instances"])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return time.perf_counter() - start, detections


def peak_memory_mib(path, opts, iters, infer_size, detections):
    """This config's training steps and one inference in this (fresh) process: peak RSS, or CUDA's
    peak allocation, from the model's construction on."""
    records = DatasetCatalog.get("nuclei_synthetic_train")
    infer_image, _ = generate_tile(np.random.default_rng(0), size=(infer_size, infer_size))
    reset_peak_rss()
    run = ConfigRun(path, opts, records, iters, infer_image, detections)
    for index in range(len(run.batches)):
        run.train_step(index)
    run.inference()
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()


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
    parser.add_argument("--infer-repeats", type=int, default=3, help="inference passes per config (fastest kept)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_of:
        print(json.dumps({"peak_mib": peak_memory_mib(args.memory_of, args.opts, args.iters, args.infer_size,
                                                       args.detections)}))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(run_stamp())
    records = DatasetCatalog.get("nuclei_synthetic_train")
    infer_image, _ = generate_tile(np.random.default_rng(0), size=(args.infer_size, args.infer_size))
    runs = [ConfigRun(path, args.opts, records, args.iters, infer_image, args.detections) for path in args.configs]
    # The configs take turns, step by step and pass by pass, so that a change in the machine's load
    # falls on all of them; warm-up steps and one warm-up pass are not timed.
    for index in range(runs[0].warmup):
        for run in runs:
            run.train_step(index)
    step_times = {run.path: [] for run in runs}
    for index in range(runs[0].warmup, runs[0].warmup + args.iters):
        for run in runs:
            step_times[run.path].append(run.train_step(index))
    for run in runs:
        run.inference()
    infer = {run.path: (float("inf"), 0) for run in runs}
    for _ in range(args.infer_repeats):
        for run in runs:
            infer[run.path] = min(infer[run.path], run.inference())
    peaks = {}
    if not args.skip_memory:
        for run in runs:  # each in a fresh process: memory an earlier config left would count otherwise
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-of", run.path,
                                   "--iters", str(args.iters), "--infer-size", str(args.infer_size),
                                   "--detections", str(args.detections), *args.opts],
                                  capture_output=True, text=True, check=True)
            peaks[run.path] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
    device = runs[0].cfg.MODEL.DEVICE
    print(f"\nTraining speed, median of {args.iters} steps each after {runs[0].warmup} warm-up steps, "
          f"inference fastest of {args.infer_repeats}, configs in turn, device {device}")
    detection_counts = {count for _, count in infer.values()}
    if len(detection_counts) > 1:
        print(f"note: the configs detected different numbers of nuclei ({sorted(detection_counts)}): "
              "the inference ratios compare unequal work")
    memory = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS, fresh process"
    print(f"peak MiB: {memory}" if peaks else "peak MiB: not measured (--skip-memory)")
    infer_col = f"infer s/{args.infer_size}²"
    print(f"{'config':30s} {'batch':>5s} {'crop':>10s} {'s/iter':>7s} {'ratio':>6s} {infer_col:>14s} "
          f"{'ratio':>6s} {'dets':>5s} {'peak MiB':>9s}")
    base_iter = float(np.median(step_times[runs[0].path]))
    base_infer = infer[runs[0].path][0]
    for run in runs:
        s_iter = float(np.median(step_times[run.path]))
        s_infer, detections = infer[run.path]
        peak = f"{peaks[run.path]:9.0f}" if run.path in peaks else f"{'-':>9s}"
        print(f"{run.path:30s} {run.cfg.SOLVER.IMS_PER_BATCH:5d} {str(list(run.cfg.INPUT.CROP.SIZE)):>10s} "
              f"{s_iter:7.2f} {s_iter / base_iter:6.2f} {s_infer:14.2f} {s_infer / base_infer:6.2f} "
              f"{detections:5d} {peak}")


if __name__ == "__main__":
    main()

"""Cost of the dual-modal mask head (paper Table 1) against Detectron2's stock mask head.

Heads, all with GN on 256 x 14 x 14 RoI features and one (class-agnostic) mask channel:
  * stock:  MaskRCNNConvUpsampleHead, 4 convs + deconv + 1x1 predictor (our baseline configs);
  * dual:   DualModalMaskHead with Table 1's widths (Conv4 = 1024), the default;
  * dual-N: DualModalMaskHead with DUAL_MODAL.SHUFFLE_CONV_DIM = N, a cheaper non-paper option.

For each number of RoIs (crowded tiles send ~1,000 through the mask head) it times, with the
heads measured round-robin in the same run so that load on a shared machine hits all alike:
  * forward only (eval mode, no_grad), as at inference;
  * forward + backward of a BCE loss on the logits, as in training.
Medians of --repeats runs, after a warm-up pass on 32 RoIs. Also prints parameters and FLOPs
per RoI (fvcore's FlopCountAnalysis, which counts one multiply-add as one flop).

Usage: .venv/bin/python benchmarks/mask_head_speed.py [--rois 256 1000] [--repeats 3]
       [--shuffle-dims 256] [--threads N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation, on import

import torch  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head

from nucseg_d2.config import add_nucseg_config
from nucseg_d2.modeling import DualModalMaskHead  # noqa: F401  (registers the head)
from timing import run_stamp  # benchmarks/timing.py

ROI_FEATURES = ShapeSpec(channels=256, height=14, width=14)


def build_heads(shuffle_dims):
    """name -> mask head, built from configs as a user would."""
    cfg = get_cfg()
    add_nucseg_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    heads = {}
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    heads["stock (4conv GN)"] = build_mask_head(cfg, ROI_FEATURES)
    cfg.MODEL.ROI_MASK_HEAD.NAME = "DualModalMaskHead"
    heads["dual (Table 1)"] = build_mask_head(cfg, ROI_FEATURES)
    for dim in shuffle_dims:
        cfg.MODEL.ROI_MASK_HEAD.DUAL_MODAL.SHUFFLE_CONV_DIM = dim
        heads[f"dual, SHUFFLE_CONV_DIM={dim}"] = build_mask_head(cfg, ROI_FEATURES)
    return heads


def flops_per_roi(head):
    head.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(_LayersOnly(head), torch.zeros(1, 256, 14, 14))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total()


class _LayersOnly(torch.nn.Module):
    """The head's ``layers`` as a module, so fvcore traces logits only (no loss/inference)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(head, x, device):
    head.eval()
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        head.layers(x)
        _sync(device)
    return time.perf_counter() - start


def time_forward_backward(head, x, targets, device):
    head.train()
    head.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    loss = F.binary_cross_entropy_with_logits(head.layers(x)[:, 0], targets)
    loss.backward()
    _sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rois", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shuffle-dims", type=int, nargs="*", default=[256],
                        help="cheaper DUAL_MODAL.SHUFFLE_CONV_DIM values to measure too")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    heads = build_heads(args.shuffle_dims)
    baseline_name = next(iter(heads))

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"device: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} runs, heads run round-robin")
    print(run_stamp() + "\n")

    print("| head | params | GFLOPs/RoI (fvcore, 1 MAC = 1 flop) | FLOPs vs stock |")
    print("|---|---:|---:|---:|")
    flops = {name: flops_per_roi(head) for name, head in heads.items()}
    for name, head in heads.items():
        params = sum(p.numel() for p in head.parameters())
        print(f"| {name} | {params / 1e6:.2f} M | {flops[name] / 1e9:.3f} | "
              f"{flops[name] / flops[baseline_name]:.2f}x |")
    print()

    for head in heads.values():
        head.to(device)
    print("| RoIs | head | forward (s) | vs stock | forward+backward (s) | vs stock |")
    print("|---:|---|---:|---:|---:|---:|")
    for num_rois in args.rois:
        x = torch.randn(num_rois, 256, 14, 14, device=device)
        targets = (torch.rand(num_rois, 28, 28, device=device) > 0.5).float()
        forward_times = {name: [] for name in heads}
        train_times = {name: [] for name in heads}
        for head in heads.values():  # warm-up at this size: allocator growth, kernel selection
            time_forward(head, x, device)
            time_forward_backward(head, x, targets, device)
        for _ in range(args.repeats):
            for name, head in heads.items():
                forward_times[name].append(time_forward(head, x, device))
                train_times[name].append(time_forward_backward(head, x, targets, device))
        forward = {name: statistics.median(times) for name, times in forward_times.items()}
        train = {name: statistics.median(times) for name, times in train_times.items()}
        for name in heads:
            print(f"| {num_rois} | {name} | {forward[name]:.3f} | "
                  f"{forward[name] / forward[baseline_name]:.2f}x | {train[name]:.3f} | "
                  f"{train[name] / train[baseline_name]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

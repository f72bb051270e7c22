#!/usr/bin/env python
"""Prediction speed and memory: megapixels/s per tile size, stitching overhead, peak memory.

    python benchmarks/predict_speed.py [--device cpu|cuda] [--tile-sizes 256 512 1024]
        [--image-size 1024 | --image PATH] [--config C] [--weights W] [--tta]
        [--slide-sizes 2048 8192] [KEY VALUE ...]

1. Speed: the --config model (default the demo model; untrained unless --weights; the
   detection count is printed, since post-processing cost grows with it) over a synthetic
   --image-size square image or a real --image, for each
   tile size (overlap = tile/8, at least 32), best of --repeats runs. Reported: megapixels/s
   end to end, seconds per tile, the share of
   time in the model's forward pass ("inference"), in stitching (binarising masks, core
   filtering, bit packing) and in the final painting; "whole" is the model run once on the
   whole image without the predictor, the inference-alone reference. With --tta, each setting
   is also run with test-time augmentation and its time is printed as a ratio to the plain run.
2. Memory (each in a fresh subprocess): peak RSS added by ``predict`` over a model already
   built, and the tracemalloc peak of Python/numpy allocations, for a 1000x1000 image with the
   --config model, and for synthetic pyramidal TIFF slides (--slide-sizes, written tile by tile)
   read and predicted tile by tile, with that model or (--slide-model stand-in, seconds
   instead of minutes on a CPU) a stand-in returning a realistic nucleus density (one per
   40x40 px). The only part that should grow with the slide is the output label map
   (2 bytes/px) and the bit-packed masks of kept nuclei.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.structures import Boxes, Instances  # noqa: E402

from nucseg_d2.data.readers import read_rgb_image  # noqa: E402
from nucseg_d2.data.synthetic import generate_tile  # noqa: E402
from nucseg_d2.predict import NucleiPredictor, open_image  # noqa: E402
from nucseg_d2.predict.predictor import TTA_TRANSFORMS  # noqa: E402
from nucseg_d2.predict.slides import write_pyramidal_tiff  # noqa: E402
from rss import current_rss_mib, peak_rss_mib, reset_peak_rss  # noqa: E402  (benchmarks/rss.py)
from timing import best_times_interleaved, run_stamp  # noqa: E402  (benchmarks/timing.py)

DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")


def synthetic_reader(num_distinct=8, tile=256, seed=0):
    """read(y0, y1, x0, x1) of an endless mosaic of synthetic H&E tiles (no full image held)."""
    tiles = [generate_tile(np.random.default_rng(seed + i), tile)[0] for i in range(num_distinct)]

    def read(y0, y1, x0, x1):
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(y0 // tile, (y1 - 1) // tile + 1):
            for tx in range(x0 // tile, (x1 - 1) // tile + 1):
                source = tiles[(ty * 5 + tx * 3) % num_distinct]
                ys = slice(max(y0, ty * tile), min(y1, (ty + 1) * tile))
                xs = slice(max(x0, tx * tile), min(x1, (tx + 1) * tile))
                out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = \
                    source[ys.start - ty * tile : ys.stop - ty * tile, xs.start - tx * tile : xs.stop - tx * tile]
        return out

    return read


class DenseStandIn(torch.nn.Module):
    """Returns one 12-20 px round detection per 40x40 px of tile (Kumar: one per 500-2000 px²)."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            height, width = inputs["image"].shape[1:]
            rng = np.random.default_rng(height * 7 + width)
            count = max(1, height * width // (40 * 40))
            centres = rng.uniform([0, 0], [width, height], size=(count, 2))
            sizes = rng.uniform(12, 20, size=(count, 1))
            boxes = np.clip(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1), 0, [width, height] * 2)
            yy, xx = np.mgrid[0:28, 0:28] - 13.5
            disk = torch.from_numpy(((yy**2 + xx**2) <= 13**2).astype(np.float32))
            instances = Instances((height, width))
            instances.pred_boxes = Boxes(torch.from_numpy(boxes).float())
            instances.scores = torch.from_numpy(rng.uniform(0.5, 1.0, count)).float()
            instances.pred_mask_probs = disk.expand(count, 1, 28, 28)
            outputs.append({"instances": instances})
        return outputs


# ------------------------------------------------------------------------ speed
def speed(args):
    if args.image:
        image = read_rgb_image(args.image)
        source = os.path.basename(args.image)
    else:
        image = synthetic_reader()(0, args.image_size, 0, args.image_size)
        source = "synthetic"
    megapixels = image.shape[0] * image.shape[1] / 1e6
    torch.manual_seed(0)
    predictor = NucleiPredictor(args.config, weights=args.weights or "", device=args.device, opts=args.opts)
    with torch.inference_mode():  # warm-up at the full size (allocator growth, first-call costs)
        predictor.run_model([image])

    def whole():
        predictor.run_model([image])
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously; time them, not their launch

    settings = [(tile_size, max(32, tile_size // 8), batch_size, transforms)
                for tile_size in args.tile_sizes for batch_size in args.batch_sizes
                for transforms in ([("identity",), TTA_TRANSFORMS] if args.tta else [("identity",)])]

    def tiled(setting):
        def run():
            predictor.tile_size, predictor.overlap, predictor.batch_size, predictor.transforms = setting
            return predictor.predict(image), dict(predictor.last_timing)
        return run

    # Every setting once per repeat, in turn, the whole-image pass among them: a change in load
    # falls on all of them, and each keeps its fastest run.
    timed = best_times_interleaved([whole] + [tiled(setting) for setting in settings], args.repeats)
    whole_s = timed[0][0]
    rows = [dict(tiles="whole", tile_size=max(image.shape[:2]), seconds=whole_s, mp_per_s=megapixels / whole_s,
                 inference=1.0, stitch=float("nan"), paint=float("nan"), nuclei=float("nan"))]
    for (tile_size, overlap, batch_size, transforms), (seconds, (result, timing)) in zip(settings, timed[1:]):
        tta = " tta" if len(transforms) > 1 else ""
        rows.append(dict(tiles=f"{timing['tiles']} x {tile_size}/{overlap} b{batch_size}{tta}",
                         tile_size=tile_size, seconds=seconds, mp_per_s=megapixels / seconds,
                         inference=timing["inference"] / seconds,
                         stitch=timing["stitch"] / seconds, paint=timing["paint"] / seconds,
                         nuclei=result.num_nuclei))
        if tta:
            print(f"TTA ({len(transforms)} passes) / plain, tile {tile_size} batch {batch_size}: "
                  f"{seconds / rows[-2]['seconds']:.2f}x the time, {result.num_nuclei} vs "
                  f"{rows[-2]['nuclei']} nuclei")
    predictor.transforms = ("identity",)
    print(f"\nSpeed, {image.shape[1]}x{image.shape[0]} {source} image, "
          f"{os.path.relpath(args.config, REPO)} ({'trained' if args.weights else 'untrained'}), "
          f"device {predictor.device}:")
    # "x whole": each tiling's time over the model's single pass on the whole image, in this process.
    print(f"{'tiling':>22} {'s':>8} {'x whole':>8} {'s/tile':>7} {'MP/s':>8} {'infer%':>7} {'stitch%':>8} "
          f"{'paint%':>7} {'nuclei':>7}")
    for row in rows:
        per_tile = row["seconds"] / (int(row["tiles"].split()[0]) if row["tiles"] != "whole" else 1)
        print(f"{row['tiles']:>22} {row['seconds']:8.2f} {row['seconds'] / whole_s:8.2f} {per_tile:7.2f} "
              f"{row['mp_per_s']:8.3f} {100 * row['inference']:7.1f} {100 * row['stitch']:8.1f} "
              f"{100 * row['paint']:7.1f} {row['nuclei']:>7}")
    return rows


# ------------------------------------------------------------------------ memory (subprocesses)
def measure_memory(kind, size, config, device, tile_size, weights, opts, slide_path=None, slide_model="config"):
    """Runs in a fresh process: prints one JSON line with the memory figures."""
    torch.manual_seed(0)
    use_stand_in = kind == "slide" and slide_model == "stand-in"
    if use_stand_in:
        predictor = NucleiPredictor(model=DenseStandIn(), tile_size=tile_size, overlap=tile_size // 8)
    else:
        predictor = NucleiPredictor(config, weights=weights or "", device=device, opts=opts,
                                    tile_size=tile_size, overlap=tile_size // 8)
    if kind == "image":
        source_image = synthetic_reader()(0, size, 0, size)
    base_rss = current_rss_mib()
    reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    if kind == "image":
        result = predictor.predict(source_image)
    else:
        with open_image(slide_path) as slide:
            result = predictor.predict_source(slide, tissue_mask=False)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps(dict(
        kind=kind, size=size, seconds=seconds,
        model="stand-in" if use_stand_in else os.path.splitext(os.path.basename(config))[0],
        tiles=predictor.last_timing["tiles"], nuclei=result.num_nuclei,
        label_map_mib=result.label_map.nbytes / 2**20, base_rss_mib=base_rss,
        added_peak_rss_mib=peak_rss_mib() - base_rss, traced_peak_mib=traced_peak / 2**20,
    )))


def memory(args):
    rows = []
    common = ["--config", args.config, "--device", str(args.device), "--weights", args.weights or "",
              "--slide-model", args.slide_model]
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [("image", 1000, None)]
        for size in args.slide_sizes:
            path = os.path.join(scratch, f"slide_{size}.tif")
            start = time.perf_counter()
            write_pyramidal_tiff(path, synthetic_reader(), size, size, num_levels=4, compression="jpeg")
            print(f"wrote {size}x{size} pyramidal TIFF ({os.path.getsize(path) / 2**20:.0f} MiB) in "
                  f"{time.perf_counter() - start:.1f} s")
            jobs.append(("slide", size, path))
        for kind, size, path in jobs:
            command = [sys.executable, os.path.abspath(__file__), "--measure", kind, str(size),
                       "--memory-tile-size", str(args.memory_tile_size), *common]
            if path:
                command += ["--slide", path]
            command += list(args.opts)
            run = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode != 0 or not lines:
                print(run.stderr[-2000:])
                raise SystemExit(f"memory run {kind} {size} failed")
            rows.append(json.loads(lines[-1]))
    print(f"\nPeak memory of predict (tile {args.memory_tile_size}, fresh process each):")
    print(f"{'input':>18} {'model':>9} {'tiles':>6} {'nuclei':>7} {'s':>8} {'labels MiB':>11} "
          f"{'+RSS MiB':>9} {'traced MiB':>11}")
    for row in rows:
        name = f"{row['kind']} {row['size']}x{row['size']}"
        print(f"{name:>18} {row['model']:>9} {row['tiles']:>6} {row['nuclei']:>7} {row['seconds']:8.1f} "
              f"{row['label_map_mib']:11.1f} {row['added_peak_rss_mib']:9.1f} {row['traced_peak_mib']:11.1f}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=DEMO_CONFIG, help="the model's config (default: the demo model)")
    parser.add_argument("--weights", default="")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--image", help="time this RGB image instead of a synthetic one")
    parser.add_argument("--tta", action="store_true", help="also time each setting with test-time augmentation")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--slide-sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--memory-tile-size", type=int, default=1024)
    parser.add_argument("--slide-model", choices=("config", "stand-in"), default="config",
                        help="what predicts the slides: the --config model, or a fast stand-in")
    parser.add_argument("--repeats", type=int, default=2, help="speed runs per setting (best is kept)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    if args.measure:
        measure_memory(args.measure[0], int(args.measure[1]), args.config, args.device, args.memory_tile_size,
                       args.weights, args.opts, args.slide, args.slide_model)
        return
    if args.batch_sizes is None:
        args.batch_sizes = [1, 4] if str(args.device).startswith("cuda") else [1]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, GPU {gpu}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(run_stamp())
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()

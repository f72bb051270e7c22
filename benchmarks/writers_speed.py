#!/usr/bin/env python
"""Cost of nucseg-predict's output writers beside the label-map TIFF, in one process.

    python benchmarks/writers_speed.py [--size 2048] [--repeats 3] [--formats labels geojson ...]
                                       [--memory-mapped]

A --size square mosaic of synthetic H&E tiles and their label maps stands in for a prediction
(the writers see only the label map, the scores and the image). Each format is written through
``nucseg_d2.predict.cli.write_outputs``, the code path of ``nucseg-predict``, best of --repeats.
Printed per format: seconds, milliseconds per nucleus, and the ratio to writing the label-map
TIFF (the one output every run writes), measured in the same process. With --memory-mapped,
each format is also written from a copy of the label map memory-mapped from a file (as
``nucseg-predict`` holds maps over --label-map-ram-gib), and the ratio to the in-memory map is
printed; the copy's pages are in the page cache, as right after painting. A map over 2048 px a
side is written as a tiled TIFF with a pyramid of reduced levels; then the label TIFF without
the pyramid is timed too, and the pyramid's cost printed as a ratio.
"""
import argparse
import os
import platform
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nucseg_d2.data.synthetic import generate_tile  # noqa: E402
from nucseg_d2.predict.cli import FORMATS, write_outputs  # noqa: E402
from nucseg_d2.predict.result import PredictionResult  # noqa: E402
from nucseg_d2.predict.slides import ArraySource  # noqa: E402
from nucseg_d2.predict.tiling import open_label_map_file  # noqa: E402
from nucseg_d2.predict.writers import label_tiff_pyramid_factors, write_label_tiff  # noqa: E402
from timing import best_times_interleaved, run_stamp  # noqa: E402  (benchmarks/timing.py)

TILE = 256


def synthetic_prediction(size: int, seed: int = 0):
    """(RGB image, PredictionResult) of a size x size mosaic, nuclei numbered 1..N over it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    label_map = np.zeros((size, size), np.int64)
    next_id = 0
    for y in range(0, size, TILE):
        for x in range(0, size, TILE):
            tile_image, tile_labels = generate_tile(rng, TILE)
            h, w = min(TILE, size - y), min(TILE, size - x)
            image[y:y + h, x:x + w] = tile_image[:h, :w]
            crop = tile_labels[:h, :w]  # each tile numbers its nuclei 1..N
            label_map[y:y + h, x:x + w] = np.where(crop > 0, crop + next_id, 0)
            next_id += int(tile_labels.max())
    # Edge tiles cut by --size may lose ids: renumber 1..N (background 0 is the smallest id).
    _, compact = np.unique(label_map, return_inverse=True)
    label_map = compact.reshape(size, size)
    num_nuclei = int(label_map.max())
    scores = rng.uniform(0.5, 1.0, num_nuclei).astype(np.float32)
    dtype = np.uint16 if num_nuclei <= np.iinfo(np.uint16).max else np.uint32  # as the predictor
    return image, PredictionResult(label_map=label_map.astype(dtype), scores=scores)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--memory-mapped", action="store_true",
                        help="also write from a memory-mapped copy of the label map")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(run_stamp())
    image, result = synthetic_prediction(args.size)
    source = ArraySource(image, path="synthetic.png")
    formats = ["labels"] + [name for name in args.formats if name != "labels"]
    with tempfile.TemporaryDirectory() as scratch:
        results = {"memory": result}
        if args.memory_mapped:
            mapped = open_label_map_file(os.path.join(scratch, "labels.npy"), *result.label_map.shape,
                                         result.label_map.dtype)
            mapped[:] = result.label_map
            results["mapped"] = PredictionResult(label_map=mapped, scores=result.scores)

        def writer(name, kind):
            paths = {name: os.path.join(scratch, f"synthetic_{kind}" + FORMATS[name])}
            return lambda: write_outputs(results[kind], source, paths, image_id=1)

        runs = [(name, kind) for name in formats for kind in results]
        writers = [writer(name, kind) for name, kind in runs]
        with_pyramid = bool(label_tiff_pyramid_factors(result.label_map.shape))
        if with_pyramid:
            runs.append(("labels without pyramid", "memory"))
            flat_path = os.path.join(scratch, "synthetic_flat.tif")
            writers.append(lambda: write_label_tiff(flat_path, result.label_map, pyramid=False))
        for write in writers:  # warm-up: imports, first-call caches
            write()
        # The formats take turns within each repeat; each keeps its fastest run.
        timed = best_times_interleaved(writers, args.repeats)
        if args.memory_mapped:
            for name in formats:  # the same bytes either way
                with open(os.path.join(scratch, "synthetic_memory" + FORMATS[name]), "rb") as a, \
                        open(os.path.join(scratch, "synthetic_mapped" + FORMATS[name]), "rb") as b:
                    assert a.read() == b.read(), f"{name}: the memory-mapped map wrote other bytes"
    seconds = {run: best for run, (best, _) in zip(runs, timed)}
    print(f"\n{args.size}x{args.size} synthetic image, {result.num_nuclei} nuclei, best of {args.repeats}:")
    mapped_header = f" {'mapped s':>9} {'x in memory':>12}" if args.memory_mapped else ""
    print(f"{'format':>9} {'s':>8} {'ms/nucleus':>11} {'x labels TIFF':>14}{mapped_header}")
    for name in formats:
        in_memory = seconds[name, "memory"]
        mapped_cells = (f" {seconds[name, 'mapped']:9.3f} {seconds[name, 'mapped'] / in_memory:12.2f}"
                        if args.memory_mapped else "")
        print(f"{name:>9} {in_memory:8.3f} {1000 * in_memory / result.num_nuclei:11.3f} "
              f"{in_memory / seconds['labels', 'memory']:14.1f}{mapped_cells}")
    if with_pyramid:
        flat = seconds["labels without pyramid", "memory"]
        print(f"label TIFF: {seconds['labels', 'memory']:.3f} s with its pyramid, {flat:.3f} s without "
              f"({seconds['labels', 'memory'] / flat:.2f}x)")


if __name__ == "__main__":
    main()

"""How much the overlap rule's float comparison changed a run's label maps (fixed at 3903cf1).

Until 3903cf1, ``paint_masks`` dropped a mask when ``1 - free/area > max_overlap`` in floats, which
is true for a mask covered by exactly 30 % at ``max_overlap`` 0.3 (1 - 0.7 = 0.30000000000000004).
Post-processing sweeps chose 0.3 for six committed runs. This paints one run's detections on the
given data sets with both comparisons, at each score / mask setting chosen with 0.3, and reports
how many nuclei and how much AJI differ. The weights of the six runs are gone; another run's
detections stand in for them.

    python scripts/overlap_rule_check.py RUN WEIGHTS DATASET... [--max-overlap 0.3]
    e.g. python scripts/overlap_rule_check.py kumar_ab3_cpu1100 output/kumar_ab3_cpu1100/model_final.pth \
        kumar_val kumar_test

RUN names ``results/RUN/config.yaml`` (the run's thresholds and proposal budget).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402

import nucseg_d2  # noqa: E402,F401  (registers the data sets)
from nucseg_d2.data.datasets import register_config_datasets  # noqa: E402
from nucseg_d2.data.readers import load_label_map, read_rgb_image  # noqa: E402
from nucseg_d2.evaluation.metrics import aji  # noqa: E402
from nucseg_d2.modeling.postprocess import box_local_masks, paint_masks  # noqa: E402
from nucseg_d2.predict import NucleiPredictor  # noqa: E402

# (score, mask) thresholds that six post-processing sweeps chose together with a maximum overlap of
# 0.3: Kumar baseline seed 1 and proposed seed 2; TNBC Ab1, Ab2, Ab3 and proposed seed 1.
SETTINGS = ((0.4, 0.4), (0.3, 0.5), (0.8, 0.5), (0.5, 0.4), (0.6, 0.5), (0.5, 0.5))


def paint_masks_float_rule(label_map, masks, max_overlap):
    """``paint_masks`` as it was before 3903cf1."""
    for mask, ys, xs in masks:
        area = int(mask.sum())
        if area == 0:
            continue
        region = label_map[ys, xs]
        free = mask & (region == 0)
        free_area = int(free.sum())
        if free_area == 0 or 1.0 - free_area / area > max_overlap:
            continue
        region[free] = label_map.max() + 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("weights")
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--max-overlap", type=float, default=0.3)
    args = parser.parse_args()
    predictor = NucleiPredictor(os.path.join("results", args.run, "config.yaml"), weights=args.weights)
    register_config_datasets(predictor.cfg)  # a run on the user's own folders (DATASETS.NUCLEI_FOLDERS)
    detections = []
    for dataset in args.datasets:
        for record in DatasetCatalog.get(dataset):
            instances = predictor.run_model([read_rgb_image(record["file_name"])])[0].to("cpu")
            detections.append((load_label_map(record), instances))
    for score_thresh, mask_thresh in SETTINGS:
        differing_images, nuclei_difference, nuclei, aji_change = 0, 0, 0, []
        for gt, instances in detections:
            kept = instances[instances.scores > score_thresh]
            kept = kept[np.argsort(-kept.scores.numpy(), kind="stable")]
            height, width = kept.image_size
            old, new = np.zeros((height, width), np.int32), np.zeros((height, width), np.int32)
            paint_masks_float_rule(old, box_local_masks(kept, height, width, mask_thresh), args.max_overlap)
            paint_masks(new, box_local_masks(kept, height, width, mask_thresh), args.max_overlap)
            differing_images += int(not np.array_equal(old, new))
            nuclei_difference += int(new.max()) - int(old.max())
            nuclei += int(new.max())
            aji_change.append(aji(gt, new) - aji(gt, old))
        aji_change = np.asarray(aji_change)
        print(f"score {score_thresh} mask {mask_thresh} overlap {args.max_overlap}: {len(detections)} images, "
              f"{differing_images} differ; nuclei {nuclei} (exact rule) - {nuclei - nuclei_difference} (float rule); "
              f"AJI change mean {aji_change.mean():+.6f}, largest {np.abs(aji_change).max():.6f}")


if __name__ == "__main__":
    main()

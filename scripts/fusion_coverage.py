#!/usr/bin/env python
"""How much of each training crop's nuclei does feature fusion paste a mask over?

Fusion pastes the mask logits of the positive ROIs the ROI heads sampled; the rest of F_N is F_0.
With MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE R and POSITIVE_FRACTION 0.25 at most R/4 positive ROIs
per image are sampled, and a nucleus matched by several proposals may take several of them. For
each R given, this runs the training forward pass of a trained fusion model on the same fixed
training batches (the same proposals, sampled with the same seed) and prints per crop: ground-truth
nuclei, positive ROIs, nuclei with at least one pasted mask, and the share of nucleus pixels under
a pasted box (the box MODEL.NUCSEG.FUSION_BOXES names, by the paste's pixel-centre rule).

    python scripts/fusion_coverage.py --config-file output/kumar_ab2_cpu1100_s2/config.yaml \
        --weights output/kumar_ab2_cpu1100_s2/model_final.pth --rois-per-image 128 512
"""
import argparse
import os
import platform
import sys

import numpy as np
import torch
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from fusion_box_offsets import (  # noqa: E402
    build_trained_model,
    check_checkpoint_files,
    fixed_batches,
    fusion_config,
    print_markdown_table,
    run_reporting_errors,
)
from nucseg_d2.modeling.fusion import paste_mask_logits  # noqa: E402


def pasted_pixels(boxes, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels FeatureFusion pastes a mask over for these XYXY boxes."""
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    _, covered = paste_mask_logits(torch.zeros(len(boxes), 1, 1), boxes, height, width)
    return covered.numpy()


def crop_coverage(gt_masks: np.ndarray, positive_gt_boxes: np.ndarray, pasted_boxes: np.ndarray) -> dict:
    """One crop: ``gt_masks`` (N, H, W) bool, the matched ground-truth box of each positive ROI
    (P, 4) and the box its mask is pasted at (P, 4)."""
    num_nuclei, height, width = gt_masks.shape
    matched = len(np.unique(positive_gt_boxes.reshape(-1, 4), axis=0)) if len(positive_gt_boxes) else 0
    nucleus_pixels = gt_masks.any(axis=0)
    covered = pasted_pixels(pasted_boxes, height, width) & nucleus_pixels
    return {
        "nuclei": num_nuclei,
        "positive_rois": len(pasted_boxes),
        "nuclei_pasted": matched,
        "nucleus_pixels_pasted": covered.sum() / max(1, nucleus_pixels.sum()),
    }


def measure(model, batches, rois_per_image: int, seed: int) -> dict:
    """Means over the crops of ``batches`` with ``rois_per_image`` ROIs sampled per image."""
    model.roi_heads.batch_size_per_image = rois_per_image
    positive_rois = []
    hook = model.roi_heads.register_forward_hook(lambda m, inputs, output: positive_rois.extend(output[0]))
    model.train()
    try:
        with torch.no_grad(), EventStorage(0):
            for batch in batches:
                torch.manual_seed(seed)  # the same proposals and sampling draws for every setting
                model(batch)
    finally:
        hook.remove()
    crops = [x for batch in batches for x in batch]
    rows = []
    for crop, rois in zip(crops, positive_rois):
        gt_masks = crop["instances"].gt_masks.tensor.numpy()
        if len(rois) == 0:
            rows.append(crop_coverage(gt_masks, np.zeros((0, 4)), np.zeros((0, 4))))
            continue
        # The boxes the model pastes at (MODEL.NUCSEG.FUSION_BOXES: regressed or proposal).
        pasted = rois.get(model.fusion_box_field).tensor.numpy()
        rows.append(crop_coverage(gt_masks, rois.gt_boxes.tensor.numpy(), pasted))
    means = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    means["nuclei_pasted_share"] = float(np.mean([row["nuclei_pasted"] / max(1, row["nuclei"]) for row in rows]))
    return {"crops": len(rows), **means}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="a fusion model's config.yaml (FUSION_ON)")
    parser.add_argument("--weights", required=True, help="its trained weights")
    parser.add_argument("--rois-per-image", type=int, nargs="+", default=[128, 512],
                        help="MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE values to compare (default 128 512)")
    parser.add_argument("--batches", type=int, default=8, help="training batches (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    return run_reporting_errors(_run, parser, parser.parse_args(argv))


def _run(parser, args) -> int:
    cfg = fusion_config(parser, args.config_file)
    if any(value < 1 for value in args.rois_per_image):
        parser.error(f"--rois-per-image must be >= 1, got {args.rois_per_image}")
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    check_checkpoint_files([args.weights])
    # Loaded before the batches are built (minutes on Kumar): a checkpoint of another architecture
    # is refused at once.
    model = build_trained_model(cfg, args.weights, args.config_file)
    batches = fixed_batches(cfg, args.batches, args.seed)
    print(f"# {platform.node()} {platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{args.batches} batches of {cfg.SOLVER.IMS_PER_BATCH} from {cfg.DATASETS.TRAIN[0]}, "
          f"{args.weights}, positive fraction {cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION}")
    print_markdown_table("ROIs per image", ((rois_per_image, measure(model, batches, rois_per_image, args.seed))
                                            for rois_per_image in args.rois_per_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())

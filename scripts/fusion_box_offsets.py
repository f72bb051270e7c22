#!/usr/bin/env python
"""How far apart are the two boxes feature fusion could paste a mask at, in training?

In training each positive ROI's mask logits are pooled from, and scored by loss_mask in, its
proposal box; the paper's Eq. 1 pastes them at the box the box head regressed from that proposal
(MODEL.NUCSEG.FUSION_BOXES "predicted"), the alternative is the proposal itself ("proposal").
For each checkpoint this runs the training forward pass on the same fixed training batches and
prints, over the positive ROIs: the IoU between the two boxes, the distance between their
centres, each box's IoU with its matched ground-truth nucleus, and loss_fusion with either box.

    python scripts/fusion_box_offsets.py --config-file results/tnbc_proposed_cpu1100/config.yaml \
        --weights output/tnbc_proposed_cpu1100/model_0000274.pth output/tnbc_proposed_cpu1100/model_final.pth
"""
import argparse
import os
import platform
import sys

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nucseg_d2.config import NucleiConfigError, build_nuclei_cfg  # noqa: E402
from nucseg_d2.data import NucleiDatasetMapper, register_config_datasets  # noqa: E402
from nucseg_d2.data.readers import NucleiDataError  # noqa: E402
from nucseg_d2.modeling.meta_arch import FUSION_BOX_FIELDS  # noqa: E402
from nucseg_d2.predict import CheckpointError, load_checkpoint, require_checkpoint_path  # noqa: E402

# What the diagnostic scripts report as one `error:` line (exit status 2) instead of a traceback.
PROJECT_ERRORS = (NucleiConfigError, NucleiDataError, CheckpointError)


def run_reporting_errors(run, parser, args) -> int:
    """``run(parser, args)``'s exit status, or 2 after one ``error:`` line for a bad config, data
    or checkpoint (this script's and fusion_coverage.py's command lines)."""
    try:
        return run(parser, args)
    except PROJECT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def fusion_config(parser, config_file):
    """The run's config on the CPU, without weights of its own; a usage error unless it fuses."""
    cfg = build_nuclei_cfg(config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    if not cfg.MODEL.NUCSEG.FUSION_ON:
        parser.error(f"{config_file}: MODEL.NUCSEG.FUSION_ON is off; nothing is pasted")
    return cfg


def check_checkpoint_files(paths) -> None:
    """Refuse an empty or missing checkpoint path before the slow batch building."""
    for path in paths:
        require_checkpoint_path(path, "--weights")


def build_trained_model(cfg, weights: str, config_file: str):
    """``build_model(cfg)`` with ``weights`` loaded strictly: any missing, unexpected or wrongly
    shaped key raises CheckpointError naming the file."""
    model = build_model(cfg)
    # load_checkpoint forgives a checkpoint without the semantic head and feature fusion, which
    # never run at inference unless the semantic map is asked for; the training pass measured here
    # runs them (loss_fusion), so ask for it while loading and demand their weights too.
    return_semantic = getattr(model, "return_semantic", False)
    model.return_semantic = True
    try:
        load_checkpoint(model, weights, what=f"{cfg.MODEL.META_ARCHITECTURE} ({config_file})")
    finally:
        model.return_semantic = return_semantic
    return model


def fixed_batches(cfg, num_batches: int, seed: int):
    """``num_batches`` training batches (random crops and augmentation), the same on every call."""
    seed_all_rng(seed)
    register_config_datasets(cfg)  # a run on the user's own folders (DATASETS.NUCLEI_FOLDERS)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    rng = np.random.default_rng(seed)
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    return [[mapper(records[i]) for i in rng.integers(len(records), size=batch_size)] for _ in range(num_batches)]


def measure(model, batches, seed: int) -> dict:
    """Box statistics over the positive ROIs, and the mean loss_fusion for each choice of box."""
    positive_rois = []
    hook = model.roi_heads.register_forward_hook(lambda m, inputs, output: positive_rois.extend(output[0]))
    fusion_losses = {}
    model.train()
    with torch.no_grad(), EventStorage(0):
        for choice, field in FUSION_BOX_FIELDS.items():
            model.fusion_box_field = field
            losses = []
            for batch in batches:
                torch.manual_seed(seed)  # the same ROI sampling for both boxes
                losses.append(float(model(batch)["loss_fusion"]))
            fusion_losses[choice] = float(np.mean(losses))
            hook.remove()  # the ROIs of the first pass are the ROIs of every pass
    iou, centre_offset, proposal_gt, predicted_gt = [], [], [], []
    for rois in positive_rois:
        if len(rois) == 0:  # a crop without nuclei has no positive ROIs (and no gt_boxes field)
            continue
        proposal, predicted, gt = rois.proposal_boxes, rois.pred_boxes, rois.gt_boxes
        iou.append(torch.diag(pairwise_iou(proposal, predicted)))
        centre_offset.append((proposal.get_centers() - predicted.get_centers()).norm(dim=1))
        proposal_gt.append(torch.diag(pairwise_iou(proposal, gt)))
        predicted_gt.append(torch.diag(pairwise_iou(predicted, gt)))
    iou, centre_offset, proposal_gt, predicted_gt = (torch.cat(v).numpy() for v in
                                                     (iou, centre_offset, proposal_gt, predicted_gt))
    return {
        "rois": len(iou),
        "iou_median": float(np.median(iou)), "iou_below_0.7": float(np.mean(iou < 0.7)),
        "centre_offset_px_mean": float(centre_offset.mean()),
        "proposal_gt_iou": float(proposal_gt.mean()), "predicted_gt_iou": float(predicted_gt.mean()),
        **{f"loss_fusion_{choice}": loss for choice, loss in fusion_losses.items()},
    }


def print_markdown_table(first_column: str, labelled_rows) -> None:
    """Print (label, {column: value}) pairs as a Markdown table, each row as soon as it comes (the
    rows are slow to measure); floats to 3 decimals, the columns those of the first row."""
    columns = None
    for label, row in labelled_rows:
        if columns is None:
            columns = list(row)
            print(f"| {first_column} | " + " | ".join(columns) + " |")
            print("|" + "---|" * (len(columns) + 1))
        print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                                          for c in columns) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="a proposed-model run's config.yaml")
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoints to measure")
    parser.add_argument("--batches", type=int, default=8, help="training batches (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    return run_reporting_errors(_run, parser, parser.parse_args(argv))


def _run(parser, args) -> int:
    cfg = fusion_config(parser, args.config_file)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    check_checkpoint_files(args.weights)
    # Every checkpoint is loaded once before the batches are built and the first row measured
    # (minutes each): one of another architecture further down the list is refused at once.
    for weights in args.weights:
        build_trained_model(cfg, weights, args.config_file)
    batches = fixed_batches(cfg, args.batches, args.seed)
    print(f"# {platform.node()} {platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{args.batches} batches of {cfg.SOLVER.IMS_PER_BATCH} from {cfg.DATASETS.TRAIN[0]}")

    def measured_rows():
        for weights in args.weights:
            yield weights, measure(build_trained_model(cfg, weights, args.config_file), batches, args.seed)

    print_markdown_table("checkpoint", measured_rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())

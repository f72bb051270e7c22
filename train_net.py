#!/usr/bin/env python
"""Train and evaluate nucseg-d2 models: ``python train_net.py --config-file configs/tnbc.yaml``.

Thin, in the manner of Detectron2's ``projects/*/train_net.py``: every option is a config key.
"""
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results
from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from nucseg_d2.config import NucleiConfigError, build_nuclei_cfg, check_run_inputs
from nucseg_d2.data import (
    NucleiDataError, NucleiDatasetMapper, absolute_nuclei_folders, register_config_datasets,
)
from nucseg_d2.engine import TrainingTimeLimit, TrainingTimeLimitReached, reseed_resumed_training_data
from nucseg_d2.evaluation import NucleiEvaluator
from nucseg_d2.predict import CheckpointError, load_checkpoint
from nucseg_d2.utils import leave_distributed_worker


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # The evaluation sets are first read at the first evaluation, maybe hours in: a missing
        # or unpaired label file there is named before anything is built or written instead.
        for dataset_name in cfg.DATASETS.TEST:
            DatasetCatalog.get(dataset_name)
        super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=NucleiDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=NucleiDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [NucleiEvaluator.from_cfg(cfg, dataset_name, output_folder, save_label_maps=True)]
        if cfg.TEST.NUCLEI.COCO_AP:
            # COCOeval keeps 100 detections per image by default; a Kumar tile holds ~1,900 nuclei.
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder,
                                            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE))
        return DatasetEvaluators(evaluators)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        reseed_resumed_training_data(self, lambda: self.build_train_loader(self.cfg))

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.SOLVER.NUCLEI.TIME_LIMIT_S > 0:
            # Last, so that the other hooks (lr schedule, writers) have finished the iteration it ends.
            hooks.append(TrainingTimeLimit(self.cfg.SOLVER.NUCLEI.TIME_LIMIT_S, self.cfg.TEST.EVAL_PERIOD,
                                           self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hooks

    def train(self):
        try:
            return super().train()
        except TrainingTimeLimitReached:
            return self._last_eval_results


def setup(args):
    cfg = build_nuclei_cfg(args.config_file, args.opts)
    fallback_note = None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # The same command (a GPU run's, AMP included) can be tried on the CPU first.
        fallback_note = f"no CUDA device: MODEL.DEVICE {cfg.MODEL.DEVICE} -> cpu"
        cfg.MODEL.DEVICE = "cpu"
        if cfg.SOLVER.AMP.ENABLED:
            cfg.SOLVER.AMP.ENABLED = False
            fallback_note += ", SOLVER.AMP.ENABLED True -> False"
    # The run's saved config.yaml must find the user's folders from any directory (a resume, an
    # --eval-only, the post-processing sweep).
    cfg.DATASETS.NUCLEI_FOLDERS = absolute_nuclei_folders(cfg.DATASETS.NUCLEI_FOLDERS)
    # tnbc_cv5_* are registered on import; other fold counts, and the user's folders, when a
    # config asks for them.
    register_config_datasets(cfg)
    check_run_inputs(cfg, eval_only=args.eval_only, resume=args.resume)
    processes = comm.get_world_size()
    if processes > 1 and not args.eval_only and not cfg.MODEL.DEVICE.startswith("cuda"):
        # check_training_processes sees no config: here MODEL.DEVICE cpu on a CUDA machine.
        raise NucleiConfigError(
            f"{processes} training processes need MODEL.DEVICE cuda (one GPU each), got MODEL.DEVICE "
            f"{cfg.MODEL.DEVICE}; train on the CPU with --num-gpus 1")
    cfg.freeze()
    default_setup(cfg, args)
    # This package's warnings (e.g. a training time limit reached) go to the run's log.txt too.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nucseg_d2")
    if fallback_note:
        logging.getLogger("nucseg_d2").warning(fallback_note)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        resuming = args.resume and checkpointer.has_checkpoint()
        weights = checkpointer.get_checkpoint_file() if resuming else cfg.MODEL.WEIGHTS
        # Strict, unlike a start of training: a checkpoint of another architecture would
        # otherwise be scored with the layers it lacks left random.
        load_checkpoint(model, weights, what=f"{cfg.MODEL.META_ARCHITECTURE} ({args.config_file})")
        res = Trainer.test(cfg, model)
        if comm.is_main_process():  # the other processes' evaluators return {}
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_training_processes(args):
    """Several training processes need CUDA: Detectron2's trainer wraps the model in
    DistributedDataParallel with one GPU per process, which PyTorch refuses for a CPU model, so
    every process would fail with a stack trace. Evaluation builds no such wrapper."""
    processes = args.num_gpus * args.num_machines
    if processes > 1 and not args.eval_only and not torch.cuda.is_available():
        raise NucleiConfigError(
            f"--num-gpus {args.num_gpus} --num-machines {args.num_machines} starts {processes} training processes, "
            "which need a CUDA device each; without CUDA train with --num-gpus 1 (one process uses every core; "
            "--eval-only may use several)")


def run(args):
    try:
        result = main(args)
    except (NucleiDataError, NucleiConfigError, CheckpointError) as e:
        # One clear line instead of a stack trace (the message names the file and the problem).
        # Errors raised in a DataLoader worker arrive with the worker's traceback folded into
        # the message; its last line is the original message.
        message = str(e).strip().splitlines()[-1]
        logging.getLogger("nucseg_d2").error(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if comm.get_world_size() > 1:
        # Left to interpreter teardown, gloo objects now and then abort a finished rank, and
        # launch() then fails the whole run (nucseg_d2.utils.leave_distributed_worker).
        leave_distributed_worker()
    return result


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        check_training_processes(args)
    except NucleiConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )

"""End to end through train_net.py on the synthetic data: loss falls, eval is repeatable, resume works."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_net  # noqa: E402

from detectron2.engine import default_argument_parser  # noqa: E402

# A tiny version of the demo: few iterations, few images, small crops.
TINY = [
    "MODEL.DEVICE", "cpu",
    "SOLVER.MAX_ITER", "24",
    "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.STEPS", "(100,)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.CHECKPOINT_PERIOD", "12",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.DETECTIONS_PER_IMAGE", "100",
    "INPUT.CROP.SIZE", "[128, 128]",
    "SEED", "7",
]


def _run(*argv):
    args = default_argument_parser().parse_args(list(argv))
    return train_net.main(args)


def _read_metrics_json(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory):
    """A run through train_net.main, keeping the trainer's loss at every iteration (metrics.json
    holds only 20-iteration medians every 20 iterations) in total_loss.json beside its files."""
    output_dir = tmp_path_factory.mktemp("demo_run")
    trained = []
    train = train_net.Trainer.train

    def train_and_keep(self):
        trained.append(self)
        return train(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_net.Trainer, "train", train_and_keep)
        _run("--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "OUTPUT_DIR", str(output_dir))
    (trainer,) = trained
    losses = [value for value, _ in sorted(trainer.storage.history("total_loss").values(), key=lambda v: v[1])]
    (output_dir / "total_loss.json").write_text(json.dumps(losses))
    return output_dir


@pytest.mark.slow
def test_training_loss_falls_and_checkpoints_are_written(trained_demo):
    losses = json.loads((trained_demo / "total_loss.json").read_text())
    assert len(losses) == 24
    # Windows that share no iteration (the first includes warm-up), a fall of at least 10 %.
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.9 * first, f"total loss did not fall: {first} -> {last} ({losses})"
    records = [r for r in _read_metrics_json(trained_demo) if "total_loss" in r]
    assert len(records) >= 2
    # The demo trains the proposed model: all seven terms of the paper's Eq. 4, each finite.
    seven = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask",
             "loss_sem_seg", "loss_fusion"]
    for record in records:
        assert all(math.isfinite(record[name]) for name in seven), record
    assert (trained_demo / "model_final.pth").is_file()
    assert (trained_demo / "model_0000011.pth").is_file()
    assert (trained_demo / "inference" / "nuclei_synthetic_val" / "per_image.csv").is_file()


@pytest.mark.slow
def test_eval_only_is_repeatable(trained_demo):
    weights = str(trained_demo / "model_final.pth")
    common = ["--config-file", str(ROOT / "configs/demo.yaml"), "--eval-only", *TINY,
              "MODEL.WEIGHTS", weights, "TEST.NUCLEI.SCORE_THRESH", "0.05"]
    first = _run(*common, "OUTPUT_DIR", str(trained_demo / "eval1"))
    second = _run(*common, "OUTPUT_DIR", str(trained_demo / "eval2"))
    assert first == second
    assert set(first["nuclei"]) >= {"aji", "dice1"}


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(trained_demo):
    argv = ["--config-file", str(ROOT / "configs/demo.yaml"), "--resume", *TINY,
            "SOLVER.MAX_ITER", "26", "OUTPUT_DIR", str(trained_demo)]
    before = len(_read_metrics_json(trained_demo))
    _run(*argv)
    resumed = [r["iteration"] for r in _read_metrics_json(trained_demo)[before:] if "total_loss" in r]
    # The resumed run starts after iteration 23 (the first run's last), not at 0.
    assert resumed and min(resumed) >= 24 and resumed[-1] == 25


def test_unknown_config_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nINPUT:\n  NOT_A_KEY: 1\n' % (ROOT / "configs/demo.yaml"))
    with pytest.raises(train_net.NucleiConfigError, match="bad.yaml.*NOT_A_KEY"):
        _run("--config-file", str(bad))


def test_bad_config_value_is_rejected():
    with pytest.raises(train_net.NucleiConfigError, match="GAUSSIAN_BLUR_PROB"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), "INPUT.AUG.GAUSSIAN_BLUR_PROB", "1.5")


def test_eval_only_without_weights_is_refused_before_anything_is_written(tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(train_net.NucleiConfigError, match="--eval-only needs trained weights"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), "--eval-only", *TINY, "OUTPUT_DIR", str(output_dir))
    assert not output_dir.exists()  # earlier results in OUTPUT_DIR would be left as they were


def test_amp_needs_a_cuda_device(tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    # Asked for on the CPU: refused before a model is built (Detectron2 would assert at the first step).
    with pytest.raises(train_net.NucleiConfigError,
                       match="SOLVER.AMP.ENABLED needs a CUDA device; MODEL.DEVICE is cpu"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "MODEL.DEVICE", "cpu",
             "SOLVER.AMP.ENABLED", "True", "OUTPUT_DIR", str(output_dir))
    assert not output_dir.exists()
    # A GPU command tried where CUDA is absent: the device falls back to the CPU, and AMP with it.
    monkeypatch.setattr(train_net.torch.cuda, "is_available", lambda: False)
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/demo.yaml"), "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True",
         "OUTPUT_DIR", str(output_dir)])
    cfg = train_net.setup(args)
    assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED
    assert "MODEL.DEVICE cuda -> cpu, SOLVER.AMP.ENABLED True -> False" in (output_dir / "log.txt").read_text()


def test_eval_only_refuses_a_checkpoint_of_another_architecture(tmp_path):
    # Detectron2 loads checkpoints leniently (a warning); scored that way, the proposed model's
    # Table 1 head and fusion would stay random in a baseline checkpoint's evaluation.
    import torch
    from detectron2.modeling import build_model

    from nucseg_d2.predict.predictor import build_predict_cfg

    baseline = build_model(build_predict_cfg(str(ROOT / "configs/demo_maskrcnn.yaml"), ["MODEL.DEVICE", "cpu"]))
    weights = tmp_path / "maskrcnn.pth"
    torch.save({"model": baseline.state_dict()}, weights)
    with pytest.raises(train_net.CheckpointError, match=r"maskrcnn.pth: .*missing keys.*roi_heads.mask_head"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), "--eval-only", *TINY,
             "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "inference").exists()


def test_fold_count_beyond_the_tnbc_patients_names_the_key(tmp_path):
    with pytest.raises(train_net.NucleiConfigError, match=r"DATASETS.TNBC_NUM_FOLDS: .*2\.\.\d+, got 20"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "DATASETS.TNBC_NUM_FOLDS", "20",
             "OUTPUT_DIR", str(tmp_path))
    assert not any(tmp_path.iterdir())


def _write_folder_dataset(folder, corrupt_first=False, empty_labels=False):
    import numpy as np
    from PIL import Image

    from nucseg_d2.data.synthetic import generate_tile

    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(2):
        image, labels = generate_tile(np.random.default_rng(i), size=(96, 96))
        if empty_labels:
            labels[:] = 0
        Image.fromarray(image).save(folder / "images" / f"tile{i}.png")
        Image.fromarray(labels.astype(np.uint16)).save(folder / "labels" / f"tile{i}.png")
    if corrupt_first:
        data = (folder / "images" / "tile0.png").read_bytes()
        (folder / "images" / "tile0.png").write_bytes(data[: len(data) // 3])


def test_a_bad_evaluation_set_is_named_before_training(tmp_path, capsys):
    _write_folder_dataset(tmp_path / "val")
    (tmp_path / "val" / "images" / "tile1.png").unlink()  # its label map is left without an image
    folder = f"[['test_unpaired_val', '{tmp_path}/val/images', '{tmp_path}/val/labels']]"
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "DATASETS.NUCLEI_FOLDERS", folder,
         "DATASETS.TEST", "('test_unpaired_val',)", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        train_net.run(args)
    assert exit_info.value.code == 2
    assert "1 label(s) without an image" in capsys.readouterr().err
    # Refused before the trainer was made: no checkpoint, and no metrics.json opened.
    assert not list((tmp_path / "out").glob("model_*.pth"))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_corrupt_image_is_reported_once_by_name(tmp_path, capsys):
    _write_folder_dataset(tmp_path / "corrupt", corrupt_first=True)
    # The folder is registered from the config alone (DATASETS.NUCLEI_FOLDERS), as a user would.
    folder = f"[['test_corrupt_folder', '{tmp_path}/corrupt/images', '{tmp_path}/corrupt/labels']]"
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "DATALOADER.NUM_WORKERS", "1",
         "DATASETS.NUCLEI_FOLDERS", folder,
         "DATASETS.TRAIN", "('test_corrupt_folder',)", "DATASETS.TEST", "()",
         "OUTPUT_DIR", str(tmp_path / "out")]
    )
    with pytest.raises(SystemExit) as exit_info:
        train_net.run(args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tile0.png" in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in errors[0]


@pytest.mark.slow
def test_images_without_nuclei_train_and_evaluate(tmp_path, monkeypatch):
    _write_folder_dataset(tmp_path / "empty", empty_labels=True)
    config = tmp_path / "empty.yaml"
    config.write_text(
        f"_BASE_: {ROOT / 'configs/demo.yaml'}\n"
        "DATASETS:\n"
        "  NUCLEI_FOLDERS: [['test_empty_folder', 'empty/images', 'empty/labels', 'label_map']]\n"
        "  TRAIN: ('test_empty_folder',)\n"
        "  TEST: ('test_empty_folder',)\n")
    monkeypatch.chdir(tmp_path)  # the folders are given relative to it
    _run("--config-file", str(config), *TINY, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path / "out"))
    # The run's saved config holds them absolute, so a resume or an --eval-only from any
    # directory finds them again.
    from nucseg_d2.config import build_nuclei_cfg

    saved = build_nuclei_cfg(str(tmp_path / "out/config.yaml"))
    assert saved.DATASETS.NUCLEI_FOLDERS == [
        ["test_empty_folder", str(tmp_path / "empty/images"), str(tmp_path / "empty/labels"), "label_map"]]
    summary = json.loads((tmp_path / "out/inference/test_empty_folder/metrics.json").read_text())
    assert summary["num_images"] == 2
    # Nothing to find: an image scores 1.0 where nothing was predicted, else 0.0 (metrics.py's
    # convention), whatever the untrained model predicts.
    with open(tmp_path / "out/inference/test_empty_folder/per_image.csv") as rows:
        for row in csv.DictReader(rows):
            assert int(row["num_gt"]) == 0
            expected = 1.0 if int(row["num_pred"]) == 0 else 0.0
            assert [float(row[k]) for k in ("aji", "dice1", "pq")] == [expected] * 3, row


def test_a_resumed_run_does_not_see_its_first_batches_again(tmp_path):
    from detectron2.utils.env import seed_all_rng

    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "OUTPUT_DIR", str(tmp_path / "out")])
    cfg = train_net.setup(args)

    def first_batch(resume):
        seed_all_rng(cfg.SEED)  # what every start of train_net.py does (default_setup)
        trainer = train_net.Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        batch = next(iter(trainer._trainer.data_loader))
        return trainer, torch.stack([record["image"].float().mean() for record in batch])

    trainer, batch = first_batch(resume=False)
    assert torch.equal(first_batch(resume=False)[1], batch)  # a start from scratch is reproducible
    trainer.iter = 9  # as after iteration 9: the trainer's state in the checkpoint says where to resume
    trainer.checkpointer.save("model_0000009")
    resumed, resumed_batch = first_batch(resume=True)
    assert resumed.start_iter == 10
    # Detectron2 alone would start the sampler and crops from SEED again: the very same batch.
    assert not torch.equal(resumed_batch, batch)
    assert torch.equal(first_batch(resume=True)[1], resumed_batch)  # and a resume is reproducible


def test_time_limit_stops_training_saves_and_evaluates_the_weights_it_reached(tmp_path, monkeypatch):
    import itertools
    import nucseg_d2.engine

    # A clock that advances 10 s at each reading: the 1 s limit is past when the first
    # iteration ends, so exactly one iteration is trained.
    ticks = itertools.count(0.0, 10.0)
    monkeypatch.setattr(nucseg_d2.engine, "perf_counter", lambda: next(ticks))
    output_dir = tmp_path / "out"
    results = _run("--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "SOLVER.MAX_ITER", "5",
                   "SOLVER.NUCLEI.TIME_LIMIT_S", "1", "OUTPUT_DIR", str(output_dir))
    trained = [row["iteration"] for row in _read_metrics_json(output_dir) if "total_loss" in row]
    assert trained == [0]
    assert any(row.get("time_limit_stop_iter") == 1 for row in _read_metrics_json(output_dir))
    # Saved under the iteration's name: a model_final would pass for a finished schedule.
    assert (output_dir / "model_0000000.pth").is_file() and not (output_dir / "model_final.pth").exists()
    assert (output_dir / "last_checkpoint").read_text() == "model_0000000.pth"
    assert (output_dir / "inference/nuclei_synthetic_val/metrics.json").is_file()
    assert set(results) == {"nuclei"}  # the evaluation results, returned as train() returns them
    assert "Training time limit of 1 s reached after 1 of 5 iterations" in (output_dir / "log.txt").read_text()

    # --resume, without the limit, continues at the next iteration towards the configured schedule.
    monkeypatch.undo()
    _run("--config-file", str(ROOT / "configs/demo.yaml"), "--resume", *TINY, "SOLVER.MAX_ITER", "5",
         "OUTPUT_DIR", str(output_dir))
    trained = [row["iteration"] for row in _read_metrics_json(output_dir) if "total_loss" in row]
    assert trained[0] == 0 and trained[-1] == 4
    assert "Starting training from iteration 1" in (output_dir / "log.txt").read_text()
    assert (output_dir / "model_final.pth").is_file()  # the schedule is finished now


@pytest.mark.parametrize("eval_period", [1, 2])
def test_time_limit_right_after_a_periodic_evaluation_does_not_evaluate_again(tmp_path, monkeypatch, eval_period):
    import itertools
    import nucseg_d2.engine

    # The same 10-s clock: the limit stops after iteration 0, where EVAL_PERIOD 1 has just
    # evaluated (EvalHook's final evaluation must not repeat it) and EVAL_PERIOD 2 has not.
    ticks = itertools.count(0.0, 10.0)
    monkeypatch.setattr(nucseg_d2.engine, "perf_counter", lambda: next(ticks))
    output_dir = tmp_path / "out"
    results = _run("--config-file", str(ROOT / "configs/demo.yaml"), *TINY, "SOLVER.MAX_ITER", "5",
                   "TEST.EVAL_PERIOD", str(eval_period), "SOLVER.NUCLEI.TIME_LIMIT_S", "1",
                   "OUTPUT_DIR", str(output_dir))
    log = (output_dir / "log.txt").read_text()
    assert log.count("Start inference on") == 1
    assert set(results) == {"nuclei"} and (output_dir / "model_0000000.pth").is_file()


def test_several_training_processes_without_cuda_are_refused_before_launch(monkeypatch):
    monkeypatch.setattr(train_net.torch.cuda, "is_available", lambda: False)

    def check(*argv):
        train_net.check_training_processes(default_argument_parser().parse_args(["--config-file", "c.yaml", *argv]))

    with pytest.raises(train_net.NucleiConfigError, match="--num-gpus 2 --num-machines 1 starts 2 training "
                                                           "processes, which need a CUDA device each"):
        check("--num-gpus", "2")
    with pytest.raises(train_net.NucleiConfigError, match="starts 2 training processes"):
        check("--num-machines", "2", "--dist-url", "tcp://127.0.0.1:1")
    check()  # one process
    check("--num-gpus", "2", "--eval-only")  # evaluation wraps no model in DistributedDataParallel


def test_several_training_processes_on_a_cpu_device_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    # A CUDA machine told MODEL.DEVICE cpu: what check_training_processes cannot see before launch.
    monkeypatch.setattr(train_net.comm, "get_world_size", lambda: 2)
    output_dir = tmp_path / "out"

    def setup(*opts):
        return train_net.setup(default_argument_parser().parse_args(
            ["--config-file", str(ROOT / "configs/demo.yaml"), *opts, "OUTPUT_DIR", str(output_dir)]))

    with pytest.raises(train_net.NucleiConfigError,
                       match="2 training processes need MODEL.DEVICE cuda .*got MODEL.DEVICE cpu"):
        setup("MODEL.DEVICE", "cpu")
    assert not output_dir.exists()
    # Evaluation wraps no model in DistributedDataParallel: several CPU processes may share it.
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/demo.yaml"), "--eval-only", "MODEL.DEVICE", "cpu",
         "MODEL.WEIGHTS", str(tmp_path / "weights.pth"), "OUTPUT_DIR", str(output_dir)])
    (tmp_path / "weights.pth").write_bytes(b"")
    assert train_net.setup(args).MODEL.DEVICE == "cpu"


def test_negative_time_limit_is_refused():
    with pytest.raises(train_net.NucleiConfigError, match="SOLVER.NUCLEI.TIME_LIMIT_S must be >= 0"):
        _run("--config-file", str(ROOT / "configs/demo.yaml"), "SOLVER.NUCLEI.TIME_LIMIT_S", "-1")

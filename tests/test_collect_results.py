"""scripts/collect_results.sh: what a GPU run returned, or a train_net OUTPUT_DIR, becomes a
results folder the tables can read (per-image CSV, training metrics, config, the run's log)."""
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from nucseg_d2.evaluation.results_table import cost_table, results_table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collect_results.sh"
LOG = (
    "[11/26 10:00:00 d2.engine.hooks]: Overall training speed: 98 iterations in 0:01:40 (1.0204 s / it)\n"
    "[11/26 10:00:05 d2.evaluation.evaluator]: Total inference time: 0:00:03 (0.250000 s / iter per device, on 1 devices)\n"
    "[11/26 10:00:06 d2.evaluation.testing]: Evaluation results for tnbc_test in csv format:\n"
)


def _inference_tree(root: Path):
    folder = root / "inference" / "tnbc_test"
    (folder / "label_maps").mkdir(parents=True)
    (folder / "per_image.csv").write_text("image_id,aji\na,0.5\nb,0.7\n")
    (folder / "label_maps" / "a.png").write_bytes(b"png")
    (folder / "label_maps.json").write_text('{"label_maps": {"tnbc_test": ["a.png"]}}')  # the evaluator's own note


def _collect(src: Path, results: Path):
    env = dict(os.environ, RESULTS_DIR=str(results))
    subprocess.run(["bash", str(SCRIPT), str(src), "run1"], check=True, env=env, capture_output=True)
    return results / "run1"


def _gpu_returned(tmp_path, config_text):
    """The folder gpu_train_eval.sh returns: inference.tar, training metrics, config and log."""
    work, returned = tmp_path / "work", tmp_path / "out"
    _inference_tree(work)
    returned.mkdir()
    with tarfile.open(returned / "inference.tar", "w") as tar:
        tar.add(work / "inference", arcname="inference")
    (returned / "training_metrics.json").write_text('{"iteration": 99}\n')
    (returned / "config.yaml").write_text(config_text)
    (returned / "train_eval.log").write_text(LOG)
    return returned


def test_gpu_return_folder(tmp_path):
    returned = _gpu_returned(tmp_path, "DATASETS:\n  TEST: [tnbc_test]\n")
    run = _collect(returned, tmp_path / "results")
    assert (run / "tnbc_test" / "label_maps" / "a.png").read_bytes() == b"png"
    assert (run / "training_metrics.json").read_text() == '{"iteration": 99}\n'
    assert not (run / "inference").exists()
    assert "| 0.6000 ± 0.1414 |" in results_table([("run1", str(run))], "tnbc_test", ["aji"])
    # The log travels as log.txt.gz (compressed: the tree a GPU command carries is capped), and the
    # cost table reads the GPU run's timings from it.
    assert gzip.decompress((run / "log.txt.gz").read_bytes()).decode() == LOG
    assert "| run1 | 98 | 0:01:40 | 1.02 | 0.25 |" in cost_table([("run1", str(run))], "tnbc_test")


def test_kumar_validation_label_maps_stay_behind(tmp_path):
    output = tmp_path / "output"
    for dataset in ("kumar_val", "kumar_test"):
        (output / "inference" / dataset / "label_maps").mkdir(parents=True)
        (output / "inference" / dataset / "per_image.csv").write_text("image_id,aji\na,0.5\n")
        (output / "inference" / dataset / "label_maps" / "a.png").write_bytes(b"png")
    (output / "metrics.json").write_text('{"iteration": 9}\n')
    (output / "config.yaml").write_text("DATASETS:\n  TEST: [kumar_val, kumar_test]\n")
    (output / "log.txt").write_text(LOG)
    run = _collect(output, tmp_path / "results")
    assert (run / "kumar_val" / "per_image.csv").is_file() and not (run / "kumar_val" / "label_maps").exists()
    assert (run / "kumar_test" / "label_maps" / "a.png").read_bytes() == b"png"


def test_train_net_output_dir_without_checkpoints(tmp_path):
    output = tmp_path / "output"
    _inference_tree(output)
    (output / "inference" / "tnbc_test" / "stray.pth").write_bytes(b"weights")
    (output / "model_final.pth").write_bytes(b"weights")
    (output / "metrics.json").write_text('{"iteration": 9}\n')
    (output / "config.yaml").write_text("SEED: 1\n")
    (output / "log.txt").write_text(LOG)
    stale = tmp_path / "results" / "run1" / "log.txt"  # an uncompressed log of an earlier collection
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    (stale.parent / "config.yaml").write_text("SEED: 1\n")  # of this same run: collecting it again is allowed
    run = _collect(output, tmp_path / "results")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.txt.gz", "tnbc_test", "training_metrics.json"]
    assert gzip.decompress((run / "log.txt.gz").read_bytes()).decode() == LOG
    assert not list(run.rglob("*.pth"))
    assert sorted(p.name for p in (run / "tnbc_test").iterdir()) == ["label_maps", "per_image.csv"]
    assert (run / "training_metrics.json").read_text() == '{"iteration": 9}\n'


def _train_net_output(root: Path, config: str = "SEED: 1\n") -> Path:
    _inference_tree(root)
    (root / "metrics.json").write_text('{"iteration": 9}\n')
    (root / "config.yaml").write_text(config)
    (root / "log.txt").write_text(LOG)
    return root


def test_collecting_the_same_run_again_leaves_no_stale_data_set_folder(tmp_path):
    output = _train_net_output(tmp_path / "output")
    run = _collect(output, tmp_path / "results")
    # A data set evaluated by an earlier evaluation of the run, and a file put beside the collection
    # (the device's console output, cpu_train_eval.sh's test log): only the latter is kept.
    (run / "old_set" / "label_maps").mkdir(parents=True)
    (run / "old_set" / "per_image.csv").write_text("image_id,aji\nz,0.1\n")
    (run / "device_output.txt").write_text("console")
    (output / "inference" / "tnbc_test" / "per_image.csv").write_text("image_id,aji\na,0.9\n")
    assert _collect(output, tmp_path / "results") == run
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "device_output.txt", "log.txt.gz", "tnbc_test",
                                                     "training_metrics.json"]
    assert (run / "tnbc_test" / "per_image.csv").read_text() == "image_id,aji\na,0.9\n"
    assert (run / "device_output.txt").read_text() == "console"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run1"]  # no .partial left behind


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_run_is_refused_and_left_as_it_was_unless_force(tmp_path):
    run = _collect(_train_net_output(tmp_path / "first"), tmp_path / "results")
    (run / "device_output.txt").write_text("console of the first run")
    before = _tree(run)
    second = _train_net_output(tmp_path / "second", config="SEED: 2\n")
    (second / "inference" / "tnbc_val").mkdir()
    (second / "inference" / "tnbc_val" / "per_image.csv").write_text("image_id,aji\nv,0.3\n")
    env = dict(os.environ, RESULTS_DIR=str(tmp_path / "results"))
    done = subprocess.run(["bash", str(SCRIPT), str(second), "run1"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == (f"error: {tmp_path / 'results' / 'run1'} holds another run (its config.yaml differs "
                           f"from {second}'s); nothing collected (FORCE=1 replaces it)\n")
    assert _tree(run) == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run1"]

    # FORCE=1 replaces it whole: nothing of the first run stays (its console output is not the second's).
    subprocess.run(["bash", str(SCRIPT), str(second), "run1"], env=dict(env, FORCE="1"), check=True,
                   capture_output=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.txt.gz", "tnbc_test", "tnbc_val",
                                                     "training_metrics.json"]
    assert (run / "config.yaml").read_text() == "SEED: 2\n"


def test_a_folder_that_is_not_a_collected_run_is_refused(tmp_path):
    notes = tmp_path / "results" / "run1"
    notes.mkdir(parents=True)
    (notes / "sweep.csv").write_text("kept")
    env = dict(os.environ, RESULTS_DIR=str(tmp_path / "results"))
    done = subprocess.run(["bash", str(SCRIPT), str(_train_net_output(tmp_path / "output")), "run1"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "holds another run (it has no config.yaml)" in done.stderr
    assert _tree(notes) == {"sweep.csv": b"kept"}


def test_a_failed_collection_leaves_the_earlier_one(tmp_path):
    returned = _gpu_returned(tmp_path, "SEED: 1\n")
    run = _collect(returned, tmp_path / "results")
    before = _tree(run)
    # The same run returned again, its evaluation damaged on the way.
    (returned / "inference.tar").write_bytes(b"not a tar archive")
    (returned / "training_metrics.json").write_text('{"iteration": 100}\n')
    env = dict(os.environ, RESULTS_DIR=str(tmp_path / "results"))
    done = subprocess.run(["bash", str(SCRIPT), str(returned), "run1"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert _tree(run) == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run1"]


def test_missing_source_fails(tmp_path):
    env = dict(os.environ, RESULTS_DIR=str(tmp_path / "results"))
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nothing"), "run1"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert f"error: {tmp_path / 'nothing'} lacks inference/ (the evaluation)" in done.stderr
    assert not (tmp_path / "results").exists()


def test_a_run_interrupted_before_its_evaluation_is_refused_by_name(tmp_path):
    # What gpu_timed_runs.sh packs for a run it had to interrupt: the log and metrics, no inference/.
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "train_eval.log").write_text(LOG)
    (pack / "training_metrics.json").write_text('{"iteration": 9}\n')
    (pack / "config.yaml").write_text("SEED: 1\n")
    with tarfile.open(tmp_path / "proposed.tar", "w") as tar:
        tar.add(pack, arcname=".")
    env = dict(os.environ, RESULTS_DIR=str(tmp_path / "results"))
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "proposed.tar"), "run1"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "proposed.tar lacks inference/ (the evaluation); nothing collected" in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_the_cpu_and_its_return_is_collected(tmp_path):
    """scripts/gpu_train_eval.sh on the CPU (detectron2 importable, so no kit), as the GPU route
    is to be checked before device minutes are spent: its $OUT must hold what comes back (at most 8
    files) and collect_results.sh must turn that into a results folder the tables read."""
    root = SCRIPT.parents[1]
    out = tmp_path / "out"  # the script creates it
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, NUCSEG_CACHE=str(tmp_path / "cache"),
               DEADLINE_S="1000", EVAL_S="100")
    tiny = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "5", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(100,)",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.CROP.SIZE", "[128, 128]",
            "TEST.DETECTIONS_PER_IMAGE", "50", "SEED", "7"]
    started = time.monotonic()
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_train_eval.sh"), "configs/demo.yaml", "cpu-check",
                           *tiny], env=env, capture_output=True, text=True, cwd=tmp_path)
    whole_command_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[phase] train_and_eval" in done.stdout and "[phase] collect" in done.stdout
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["config.yaml", "inference.tar", "train_eval.log", "training_metrics.json"]
    run = _collect(out, tmp_path / "results")
    # The deadline less the evaluation's share and the seconds already spent bounds the training.
    limit = int(re.search(r"TIME_LIMIT_S: (\d+)\n", (run / "config.yaml").read_text()).group(1))
    printed = int(re.search(r"SOLVER.NUCLEI.TIME_LIMIT_S (\d+) \(unless", done.stdout).group(1))
    # DEADLINE_S - EVAL_S less the install phase's seconds, which the whole command's bound.
    assert limit == printed and 900 - math.ceil(whole_command_s) <= limit <= 900
    table = results_table([("cpu-check", str(run))], "nuclei_synthetic_val", ["aji"])
    assert table.splitlines()[2].startswith("| cpu-check | ")
    assert list((run / "nuclei_synthetic_val" / "label_maps").glob("*.png"))
    # Detectron2 times the iterations after its first few; the timings come from the returned log.
    cost_row = cost_table([("cpu-check", str(run))], "nuclei_synthetic_val").splitlines()[2]
    assert re.match(r"\| cpu-check \| \d+ \| [\d:.]+ \| [\d.]+ \| [\d.]+ \|$", cost_row), cost_row


def test_the_gpu_script_refuses_a_deadline_that_leaves_no_time_to_train(tmp_path):
    root = SCRIPT.parents[1]
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, DEADLINE_S="30", EVAL_S="60")
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_train_eval.sh"), "configs/demo.yaml", "cpu-check"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "no time left to train (DEADLINE_S=30, EVAL_S=60)" in done.stderr
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_the_timed_gpu_script_sizes_one_schedule_for_both_runs_and_their_tars_are_collected(tmp_path):
    """scripts/gpu_timed_runs.sh on the CPU with two small configs side by side: calibration, one
    schedule sized to the deadline for both, evaluation, and one NAME.tar per run in $OUT that
    collect_results.sh turns into a results folder."""
    root = SCRIPT.parents[1]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, NUCSEG_CACHE=str(tmp_path / "cache"),
               WORK=str(tmp_path / "work"), DEADLINE_S="900", CAL_ITERS="3", EVAL_S="20",
               MAX_ITERS="12")  # a generous deadline and a cap: the test does not hang on the machine's load
    tiny = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.CROP.SIZE", "[128, 128]",
            "TEST.DETECTIONS_PER_IMAGE", "50", "SEED", "7"]
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_timed_runs.sh"), "proposed=configs/demo.yaml",
                           "baseline=configs/demo_maskrcnn.yaml", "--", *tiny],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    schedule = re.search(r"schedule: (\d+) iterations, warm-up (\d+), lr steps \((\d+), (\d+)\), time limit (\d+) s",
                         done.stdout)
    assert schedule, done.stdout[-3000:]
    iters, warmup, step1, step2, limit = map(int, schedule.groups())
    assert iters == 12 and (warmup, step1, step2) == (1, 9, 10)
    assert 0 < limit < 900
    assert sorted(p.name for p in out.iterdir()) == ["baseline.tar", "gpu_timed_runs.log", "proposed.tar"]
    assert "[phase] collect" in (out / "gpu_timed_runs.log").read_text()
    for name in ("proposed", "baseline"):
        run = _collect(out / f"{name}.tar", tmp_path / "results" / name)
        config = (run / "config.yaml").read_text()
        assert f"MAX_ITER: {iters}\n" in config and f"TIME_LIMIT_S: {limit}\n" in config
        trained = [json.loads(line) for line in (run / "training_metrics.json").read_text().splitlines()]
        assert any("total_loss" in row for row in trained)
        assert list((run / "nuclei_synthetic_val" / "label_maps").glob("*.png"))
        assert "Overall training speed" in gzip.decompress((run / "log.txt.gz").read_bytes()).decode()

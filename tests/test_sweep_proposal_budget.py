"""scripts/sweep_proposal_budget.sh: its refusals, and on an untrained demo run, that each budget is
the one the evaluation used and caps the nuclei found."""
import csv
import gzip
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from nucseg_d2.predict.predictor import build_predict_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "sweep_proposal_budget.sh")


def _sweep(tmp_path, *args):
    env = dict(os.environ, RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path / "results"),
               PYTHON=sys.executable, NUCSEG_CACHE=str(tmp_path / "cache"))
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("args, problem", [
    (["demo_run", "kumar_test", "2000"], "'kumar_test' looks like a test split"),
    (["demo_run", "kumar_val", "2000", "4k"], "a budget is a positive whole number, got '4k'"),
    (["demo_run", "kumar_val", "0"], "a budget is a positive whole number, got '0'"),
    (["demo_run", "kumar_val", "2000"], "runs/demo_run/config.yaml not found"),
    (["demo_run", "kumar_val"], "usage: "),
    (["demo_run", "kumar val", "2000"], "run and split names are letters, digits, '_', '.' and '-', got 'kumar val'"),
    (["../demo_run", "kumar_val", "2000"], "got '../demo_run'"),
])
def test_refusals_name_the_problem_and_write_nothing(tmp_path, args, problem):
    done = _sweep(tmp_path, *args)
    assert done.returncode == 2
    assert problem in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_each_budget_is_used_and_caps_the_nuclei_found(tmp_path, untrained_demo_weights):
    run = tmp_path / "runs" / "demo_run"
    run.mkdir(parents=True)
    # Every detection painted whole (an untrained head's mask probabilities sit near 0.5), so the
    # number of nuclei found follows the number of proposals.
    cfg = build_predict_cfg(os.path.join(REPO, "configs", "demo.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0",
        "TEST.NUCLEI.SCORE_THRESH", "0.0", "TEST.NUCLEI.MASK_THRESH", "1e-6", "TEST.NUCLEI.MAX_OVERLAP", "1.0"])
    (run / "config.yaml").write_text(cfg.dump())
    shutil.copyfile(untrained_demo_weights, run / "model_final.pth")  # thresholds change no weights

    # Another data set's sweep first: its results must survive the validation sweep.
    other = _sweep(tmp_path, "demo_run", "nuclei_synthetic_train", "5")
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-2000:]
    done = _sweep(tmp_path, "demo_run", "nuclei_synthetic_val", "5", "60")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sweeps = tmp_path / "results" / "proposal_budget"
    kept = sweeps / "demo_run_nuclei_synthetic_train" / "budget_5" / "nuclei_synthetic_train" / "per_image.csv"
    assert kept.is_file()
    found = {}
    for budget in (5, 60):
        folder = sweeps / "demo_run_nuclei_synthetic_val" / f"budget_{budget}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "eval_log.txt.gz", "nuclei_synthetic_val"]
        rpn = yaml.safe_load((folder / "config.yaml").read_text())["MODEL"]["RPN"]
        assert rpn["PRE_NMS_TOPK_TEST"] == rpn["POST_NMS_TOPK_TEST"] == budget
        with open(folder / "nuclei_synthetic_val" / "per_image.csv", newline="") as f:
            found[budget] = [int(row["num_pred"]) for row in csv.DictReader(f)]
        assert "Total inference time" in gzip.decompress((folder / "eval_log.txt.gz").read_bytes()).decode()
        assert f"budget {budget}: " in done.stdout
    assert max(found[5]) <= 5
    assert sum(found[60]) > sum(found[5])
    assert "| budget 60 | " in done.stdout  # the table of budgets against the first

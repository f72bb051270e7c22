"""scripts/collect_results.sh: what a GPU run returned, or a train_net OUTPUT_DIR, becomes a
results folder the tables can read (per-image CSV, training metrics, config, the run's log)."""
import os
import subprocess
import tarfile
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


def _collect(src: Path, results: Path):
    env = dict(os.environ, RESULTS_DIR=str(results))
    subprocess.run(["bash", str(SCRIPT), str(src), "run1"], check=True, env=env, capture_output=True)
    return results / "run1"


def test_gpu_return_folder(tmp_path):
    work, returned = tmp_path / "work", tmp_path / "out"
    _inference_tree(work)
    returned.mkdir()
    with tarfile.open(returned / "inference.tar", "w") as tar:
        tar.add(work / "inference", arcname="inference")
    (returned / "training_metrics.json").write_text('{"iteration": 99}\n')
    (returned / "config.yaml").write_text("DATASETS:\n  TEST: [tnbc_test]\n")
    (returned / "train_eval.log").write_text(LOG)
    run = _collect(returned, tmp_path / "results")
    assert (run / "tnbc_test" / "label_maps" / "a.png").read_bytes() == b"png"
    assert (run / "training_metrics.json").read_text() == '{"iteration": 99}\n'
    assert not (run / "inference").exists()
    assert "| 0.6000 ± 0.1414 |" in results_table([("run1", str(run))], "tnbc_test", ["aji"])
    # The log travels as log.txt, so the cost table reads the GPU run's timings.
    assert "| run1 | 98 | 0:01:40 | 1.02 | 0.25 |" in cost_table([("run1", str(run))], "tnbc_test")


def test_train_net_output_dir_without_checkpoints(tmp_path):
    output = tmp_path / "output"
    _inference_tree(output)
    (output / "inference" / "tnbc_test" / "stray.pth").write_bytes(b"weights")
    (output / "model_final.pth").write_bytes(b"weights")
    (output / "metrics.json").write_text('{"iteration": 9}\n')
    (output / "config.yaml").write_text("SEED: 1\n")
    (output / "log.txt").write_text(LOG)
    run = _collect(output, tmp_path / "results")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.txt", "tnbc_test", "training_metrics.json"]
    assert not list(run.rglob("*.pth"))
    assert (run / "training_metrics.json").read_text() == '{"iteration": 9}\n'


def test_missing_source_fails(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        _collect(tmp_path / "nothing", tmp_path / "results")

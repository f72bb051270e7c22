"""scripts/predict_eval.py: the predictor's label maps for every image of a data set, scored by the
folder evaluator against that data set's own labels."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from model_inputs import write_synthetic_folder

from nucseg_d2.data.readers import read_label_map
from nucseg_d2.evaluation.metrics import aji

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("predict_eval", ROOT / "scripts" / "predict_eval.py")
predict_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_eval)


def test_every_image_is_predicted_written_and_scored(tmp_path, untrained_demo_weights, capsys):
    images, labels = write_synthetic_folder(tmp_path, 2, 96)
    truths = {f"t{i}": read_label_map(labels / f"t{i}.png") for i in range(2)}
    folders = repr([["predict_eval_folder", str(images), str(labels)]])
    run_dir = tmp_path / "run"
    status = predict_eval.main([
        "--config-file", str(ROOT / "configs" / "demo.yaml"), "--weights", untrained_demo_weights,
        "--dataset", "predict_eval_folder", "--run-dir", str(run_dir), "--tile-size", "256",
        "DATASETS.NUCLEI_FOLDERS", folders, "TEST.NUCLEI.SCORE_THRESH", "0.0",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "16"])
    assert status == 0
    out = run_dir / "predict_eval_folder"
    with open(out / "per_image.csv") as stream:
        rows = {row["image_id"]: row for row in csv.DictReader(stream)}
    assert set(rows) == set(truths)
    assert all(int(row["num_pred"]) > 0 for row in rows.values())  # something to score (score threshold 0)
    for image_id, truth in truths.items():
        predicted = read_label_map(out / "label_maps" / f"{image_id}.png")
        assert predicted.shape == truth.shape
        # The scores are those of the written maps against the data set's labels.
        assert int(rows[image_id]["num_pred"]) == len(np.unique(predicted)) - 1
        assert float(rows[image_id]["aji"]) == aji(truth, predicted)
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 2
    log = (out / "predict_log.txt").read_text()
    assert "t0: " in log and "t1: " in log and "seconds per image:" in log
    assert "seconds per image" in capsys.readouterr().out


def _synthetic_folder(tmp_path, name):
    """A registered-by-config data set of two synthetic tiles: the config overrides naming it."""
    images, labels = write_synthetic_folder(tmp_path, 2, 96)
    return ["DATASETS.NUCLEI_FOLDERS", repr([[name, str(images), str(labels)]])]


def _arguments(weights, dataset, run_dir, *extra):
    return ["--config-file", str(ROOT / "configs" / "demo.yaml"), "--weights", str(weights), "--dataset", dataset,
            "--run-dir", str(run_dir), "--tile-size", "256", *extra]


def test_existing_results_are_refused_unless_overwrite(tmp_path, untrained_demo_weights, capsys):
    folders = _synthetic_folder(tmp_path, "predict_eval_existing")
    old = tmp_path / "run" / "predict_eval_existing"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text("old")
    (old / "old_only.txt").write_text("old")
    opts = [*folders, "TEST.NUCLEI.SCORE_THRESH", "0.0", "TEST.DETECTIONS_PER_IMAGE", "16"]
    assert predict_eval.main(_arguments(untrained_demo_weights, "predict_eval_existing", tmp_path / "run",
                                        *opts)) == 2
    err = capsys.readouterr().err
    assert f"{old}: already exists" in err and "--overwrite" in err
    assert (old / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["predict_eval_existing"]

    assert predict_eval.main(_arguments(untrained_demo_weights, "predict_eval_existing", tmp_path / "run",
                                        "--overwrite", *opts)) == 0
    # The new folder whole, nothing of the old one, no build folder beside it.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["predict_eval_existing"]
    assert sorted(p.name for p in old.iterdir()) == ["label_maps", "metrics.json", "per_image.csv",
                                                     "predict_log.txt"]
    metrics = json.loads((old / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["predictions"] == str(old / "label_maps")


def test_a_failed_overwrite_leaves_the_old_results(tmp_path, untrained_demo_weights, capsys, monkeypatch):
    folders = _synthetic_folder(tmp_path, "predict_eval_failing")
    old = tmp_path / "run" / "predict_eval_failing"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text("old")
    written = []
    write = predict_eval.write_label_map_image

    def disk_full_at_the_second_map(path, label_map):
        if written:
            raise OSError(f"cannot write {path}: No space left on device")
        written.append(path)
        write(path, label_map)

    monkeypatch.setattr(predict_eval, "write_label_map_image", disk_full_at_the_second_map)
    assert predict_eval.main(_arguments(untrained_demo_weights, "predict_eval_failing", tmp_path / "run",
                                        "--overwrite", *folders)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert len(written) == 1  # one new label map was written before the failure, and went with it
    assert sorted(p.name for p in old.iterdir()) == ["metrics.json"] and (old / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["predict_eval_failing"]
    # A first run that fails leaves no run folder either.
    written.clear()
    assert predict_eval.main(_arguments(untrained_demo_weights, "predict_eval_failing", tmp_path / "new_run",
                                        *folders)) == 2
    assert len(written) == 1 and not (tmp_path / "new_run").exists()


def test_a_missing_checkpoint_is_one_error_line_and_no_run_folder(tmp_path, capsys):
    folders = _synthetic_folder(tmp_path, "predict_eval_no_weights")
    missing = tmp_path / "nowhere" / "model_final.pth"
    assert predict_eval.main(_arguments(missing, "predict_eval_no_weights", tmp_path / "run", *folders)) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {missing}: checkpoint file not found"]
    assert not (tmp_path / "run").exists()
    # An empty --weights would predict with a randomly initialised model.
    assert predict_eval.main(_arguments("", "predict_eval_no_weights", tmp_path / "run", *folders)) == 2
    assert "no checkpoint given (--weights)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unregistered_data_set_is_refused_before_the_model_is_built(tmp_path, untrained_demo_weights, capsys,
                                                                       monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data set name was checked")

    monkeypatch.setattr(predict_eval, "NucleiPredictor", no_model)
    assert predict_eval.main(_arguments(untrained_demo_weights, "tnbc_vall", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dataset 'tnbc_vall': not a registered data set") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()

"""scripts/predict_eval.py: the predictor's label maps for every image of a data set, scored by the
folder evaluator against that data set's own labels."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from nucseg_d2.data.readers import read_label_map
from nucseg_d2.data.synthetic import generate_tile
from nucseg_d2.evaluation.metrics import aji

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("predict_eval", ROOT / "scripts" / "predict_eval.py")
predict_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict_eval)


def test_every_image_is_predicted_written_and_scored(tmp_path, untrained_demo_weights, capsys):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    truths = {}
    for i in range(2):
        image, label_map = generate_tile(np.random.default_rng(i), size=(96, 96))
        Image.fromarray(image).save(tmp_path / "images" / f"t{i}.png")
        Image.fromarray(label_map.astype(np.uint16)).save(tmp_path / "labels" / f"t{i}.png")
        truths[f"t{i}"] = label_map
    folders = repr([["predict_eval_folder", str(tmp_path / "images"), str(tmp_path / "labels")]])
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

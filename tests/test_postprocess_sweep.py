"""postprocess_sweep: every threshold setting scored on the same detections, by hand; the CLI on
the synthetic data and its refusals."""
import csv
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from detectron2.modeling import build_model
from detectron2.structures import Instances

from nucseg_d2.evaluation.postprocess_sweep import SweepError, best_setting, main, sweep_postprocess
from nucseg_d2.predict.predictor import build_predict_cfg

from real_data import REAL_DATA_ROOT  # noqa: E402  (tests/ helper)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.yaml")
SIZE = (20, 20)


def _image_with_a_haloed_nucleus_and_a_false_positive():
    """Nuclei A (16 px) and B (16 px). Detections: A exact (score 0.9, prob 0.9); B exact (prob 0.7)
    with a 20-px ring of prob 0.45 around it (score 0.55); a 9-px false positive (score 0.45)."""
    gt = np.zeros(SIZE, np.int32)
    gt[2:6, 2:6] = 1
    gt[10:14, 10:14] = 2
    a, b, fp = (np.zeros(SIZE, np.float32) for _ in range(3))
    a[2:6, 2:6] = 0.9
    b[9:15, 9:15] = 0.45
    b[10:14, 10:14] = 0.7
    fp[16:19, 1:4] = 0.8
    instances = Instances(SIZE)
    instances.pred_masks = torch.tensor(np.stack([a, b, fp]))
    instances.scores = torch.tensor([0.9, 0.55, 0.45])
    instances.pred_classes = torch.zeros(3, dtype=torch.int64)
    return "img", gt, instances


def _second_image_with_two_overlapping_detections():
    """A 10x10 image, one 20-px nucleus (rows 2-5, cols 2-6). Detections: the nucleus exactly
    (score 0.9) and a 12-px mask (rows 2-5, cols 5-7) 8/12 covered by it (score 0.8)."""
    gt = np.zeros((10, 10), np.int32)
    gt[2:6, 2:7] = 1
    first, second = np.zeros((2, 10, 10), np.float32)
    first[2:6, 2:7] = 0.9
    second[2:6, 5:8] = 0.9
    instances = Instances((10, 10))
    instances.pred_masks = torch.tensor(np.stack([first, second]))
    instances.scores = torch.tensor([0.9, 0.8])
    instances.pred_classes = torch.zeros(2, dtype=torch.int64)
    return "small", gt, instances


def test_each_setting_is_scored_on_the_same_detections_and_the_best_is_picked():
    grid = {"score_thresh": (0.4, 0.5), "mask_thresh": (0.4, 0.5), "max_overlap": (0.3, 0.7)}
    images = [_image_with_a_haloed_nucleus_and_a_false_positive(), _second_image_with_two_overlapping_detections()]
    rows = sweep_postprocess(images, grid, metrics=("aji", "dice1"))
    settings = [(row["score_thresh"], row["mask_thresh"], row["max_overlap"]) for row in rows]
    assert settings == [(s, m, o) for s in (0.4, 0.5) for m in (0.4, 0.5) for o in (0.3, 0.7)]
    # First image: AJI = 32 matched pixels over 32 + the extra pixels of the setting (halo 20,
    # false positive 9); the overlap rule never applies. Second image: the second mask's free 4 px
    # are kept at overlap 0.7 (8/12 covered) and dropped at 0.3: AJI 20/24 or 1.
    first = {(0.4, 0.4): (32, 61), (0.4, 0.5): (32, 41), (0.5, 0.4): (32, 52), (0.5, 0.5): (32, 32)}
    second = {0.3: (20, 20), 0.7: (20, 24)}
    for row, (score, mask, overlap) in zip(rows, settings):
        (i1, u1), (i2, u2) = first[(score, mask)], second[overlap]
        assert row["aji"] == pytest.approx((i1 / u1 + i2 / u2) / 2)
        assert row["pooled_aji"] == pytest.approx((i1 + i2) / (u1 + u2))
        assert row["mean_num_pred"] == ((3 if score == 0.4 else 2) + (1 if overlap == 0.3 else 2)) / 2
    best = best_setting(rows)
    assert (best["score_thresh"], best["mask_thresh"], best["max_overlap"], best["aji"]) == (0.5, 0.5, 0.3, 1.0)
    one_image = sweep_postprocess(images[:1], {"score_thresh": (0.4,), "mask_thresh": (0.5,), "max_overlap": (0.7,)},
                                  metrics=("dice1",))
    assert one_image[0]["dice1"] == pytest.approx(2 * 32 / (32 + 41))


def test_ties_go_to_the_first_setting_and_bad_selections_are_errors():
    rows = [{"score_thresh": 0.3, "aji": 0.5}, {"score_thresh": 0.4, "aji": 0.5}, {"score_thresh": 0.5, "aji": 0.4}]
    assert best_setting(rows)["score_thresh"] == 0.3
    with pytest.raises(SweepError, match="'hausdorff' is not among"):
        best_setting(rows, "hausdorff")
    with pytest.raises(SweepError, match="no images"):
        sweep_postprocess([])


def test_cli_writes_every_setting_with_the_configs_own_and_the_overrides(tmp_path, untrained_demo_weights, capsys):
    out = tmp_path / "sweep"
    # The config's own setting (0.5, 0.5, 0.7) is added to a grid that lacks it.
    assert main(["--config-file", CONFIG, "--weights", untrained_demo_weights, "--dataset", "nuclei_synthetic_val",
                 "--output-dir", str(out), "--score-thresh", "0.3,0.6", "--mask-thresh", "0.5",
                 "--max-overlap", "0.7", "MODEL.RPN.POST_NMS_TOPK_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "32"]) == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["score_thresh"]) for row in rows] == [0.3, 0.5, 0.6]
    assert {"aji", "aji_plus", "paper_aji", "dice1", "pq", "pooled_aji", "mean_num_pred"} <= set(rows[0])
    best = json.loads((out / "best.json").read_text())
    assert best["dataset"] == "nuclei_synthetic_val" and best["images"] > 0
    assert best["config_setting"]["score_thresh"] == 0.5
    highest = max(float(row["aji"]) for row in rows)
    first_highest = next(row for row in rows if float(row["aji"]) == highest)
    assert best["best"]["aji"] == pytest.approx(highest)
    assert best["overrides"] == (f"TEST.NUCLEI.SCORE_THRESH {float(first_highest['score_thresh'])} "
                                 f"TEST.NUCLEI.MASK_THRESH 0.5 TEST.NUCLEI.MAX_OVERLAP 0.7")
    assert "TEST.NUCLEI.MAX_OVERLAP 0.7" in capsys.readouterr().out


def test_cli_reads_a_folder_data_set_named_in_the_config(tmp_path, untrained_demo_weights):
    from PIL import Image

    from nucseg_d2.data.synthetic import generate_tile

    for folder in ("images", "labels"):
        (tmp_path / "mine" / folder).mkdir(parents=True)
    for i in range(2):
        image, label_map = generate_tile(np.random.default_rng(i), size=(48, 48))
        Image.fromarray(image).save(tmp_path / "mine" / "images" / f"t{i}.png")
        Image.fromarray(label_map.astype(np.uint16)).save(tmp_path / "mine" / "labels" / f"t{i}.png")
    folders = repr([["sweep_folder_val", str(tmp_path / "mine/images"), str(tmp_path / "mine/labels")]])
    out = tmp_path / "sweep"
    assert main(["--config-file", CONFIG, "--weights", untrained_demo_weights, "--dataset", "sweep_folder_val",
                 "--output-dir", str(out), "--score-thresh", "0.5", "--mask-thresh", "0.5", "--max-overlap", "0.7",
                 "DATASETS.NUCLEI_FOLDERS", folders,
                 "MODEL.RPN.POST_NMS_TOPK_TEST", "16", "TEST.DETECTIONS_PER_IMAGE", "16"]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["dataset"] == "sweep_folder_val" and best["images"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "tnbc_test"], "tnbc_test is a test split"),
    (["--dataset", "kumar_test_same_organ"], "kumar_test_same_organ is a test split"),
    (["--dataset", "nuclei_synthetic_val", "--select", "score_thresh"], "--select 'score_thresh': choose one of"),
    (["--dataset", "nuclei_synthetic_val", "MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
    (["--dataset", "nuclei_synthetic_val", "--score-thresh", "0.5,1.5"], "--score-thresh: expected values in"),
    (["--dataset", "nuclei_synthetic_val", "--mask-thresh", "half"], "--mask-thresh: expected comma-separated"),
    (["--dataset", "nuclei_synthetic_val", "--mask-thresh", "0.5,0"], "--mask-thresh: expected values in (0, 1)"),
    (["--dataset", "nuclei_synthetic_val", "--score-thresh", "0.01"], "below the model's"),
    (["--dataset", "no_such_set"], "no_such_set"),
    # Thresholds chosen on images the model trained on would flatter it.
    (["--dataset", "nuclei_synthetic_val", "DATASETS.TRAIN", "('nuclei_synthetic_train', 'nuclei_synthetic_val')"],
     "nuclei_synthetic_val shares 8 image(s) with nuclei_synthetic_val (DATASETS.TRAIN of the run)"),
])
def test_cli_refusals_name_the_problem_and_write_nothing(tmp_path, untrained_demo_weights, capsys, extra, message):
    out = tmp_path / "sweep"
    args = ["--config-file", CONFIG, "--weights", untrained_demo_weights, "--output-dir", str(out), *extra,
            "MODEL.RPN.POST_NMS_TOPK_TEST", "8", "TEST.DETECTIONS_PER_IMAGE", "8"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("error: ")
    assert not out.exists()


@pytest.mark.skipif(not (REAL_DATA_ROOT / "tnbc").is_dir(), reason="real TNBC data absent")
def test_a_validation_set_holding_a_cross_validation_folds_test_patients_is_refused(monkeypatch):
    from detectron2.data import DatasetCatalog

    from nucseg_d2.evaluation.postprocess_sweep import _refuse_images_the_run_trained_or_is_tested_on

    monkeypatch.setenv("NUCSEG_DATASETS", str(REAL_DATA_ROOT))
    tnbc = os.path.join(REPO, "configs", "tnbc.yaml")
    val = DatasetCatalog.get("tnbc_val")  # patients 02 and 05
    _refuse_images_the_run_trained_or_is_tested_on(build_predict_cfg(tnbc), "tnbc_val", val)  # the usual run
    fold2 = build_predict_cfg(tnbc, ["DATASETS.TRAIN", "('tnbc_cv5_fold2_train',)",
                                     "DATASETS.TEST", "('tnbc_cv5_fold2_test',)"])
    with pytest.raises(SweepError, match=r"tnbc_val shares \d+ image\(s\) with tnbc_cv5_fold2_train"):
        _refuse_images_the_run_trained_or_is_tested_on(fold2, "tnbc_val", val)  # patient 05
    fold2_test_only = build_predict_cfg(fold2, ["DATASETS.TRAIN", "('tnbc_train',)"])
    with pytest.raises(SweepError, match=r"with tnbc_cv5_fold2_test \(DATASETS.TEST of the run\): 02_"):
        _refuse_images_the_run_trained_or_is_tested_on(fold2_test_only, "tnbc_val", val)  # patient 02


def test_an_option_after_the_overrides_is_named(tmp_path, untrained_demo_weights, capsys):
    assert main(["--config-file", CONFIG, "--weights", untrained_demo_weights, "--dataset", "nuclei_synthetic_val",
                 "--output-dir", str(tmp_path / "sweep"), "TEST.DETECTIONS_PER_IMAGE", "8", "--select", "pq"]) == 2
    assert "--select comes after the config overrides" in capsys.readouterr().err


def test_cli_names_missing_weights(tmp_path, capsys):
    assert main(["--config-file", CONFIG, "--weights", str(tmp_path / "none.pth"), "--dataset", "nuclei_synthetic_val",
                 "--output-dir", str(tmp_path / "sweep")]) == 2
    assert "none.pth: weights not found" in capsys.readouterr().err


def test_the_tuning_script_names_a_run_that_was_not_trained(tmp_path):
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "tune_postprocess.sh"), "never_trained"],
                          env=dict(os.environ, RUNS_DIR=str(tmp_path), RESULTS_DIR=str(tmp_path / "results")),
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{tmp_path}/never_trained/config.yaml not found" in done.stderr
    assert not (tmp_path / "results").exists()


def _untrained_run(tmp_path, name, proposals, detections, **env):
    """An untrained demo run where tune_postprocess.sh reads trained ones (RUNS_DIR/NAME/{config.yaml,
    model_final.pth}); returns the script's environment (results under tmp_path/results)."""
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    cfg = build_predict_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TEST", str(proposals),
                                     "TEST.DETECTIONS_PER_IMAGE", str(detections),
                                     "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.01"])
    (run / "config.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, run / "model_final.pth")
    return dict(os.environ, RUNS_DIR=str(tmp_path / "runs"), RESULTS_DIR=str(tmp_path / "results"),
                PYTHON=sys.executable, NUCSEG_CACHE=str(tmp_path / "cache"), **env)


@pytest.mark.slow
def test_the_tuning_script_scores_val_and_test_with_the_thresholds_it_chose(tmp_path):
    """scripts/tune_postprocess.sh on an (untrained) demo run: the chosen thresholds are those the
    evaluation used, and the validation figures it reports equal the sweep's best."""
    env = _untrained_run(tmp_path, "demo_run", proposals=64, detections=32)
    results = tmp_path / "results"
    command = ["bash", os.path.join(REPO, "scripts", "tune_postprocess.sh"), "demo_run", "nuclei_synthetic_val",
               "nuclei_synthetic_train"]
    for _ in range(2):  # a second run replaces the first's results
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tuned = results / "demo_run_pp"
    assert sorted(p.name for p in tuned.iterdir()) == ["config.yaml", "eval_log.txt.gz", "nuclei_synthetic_train",
                                                       "nuclei_synthetic_val", "postprocess_sweep.json"]
    best = json.loads((tuned / "postprocess_sweep.json").read_text())
    sweep = results / "postprocess_sweeps" / "demo_run_nuclei_synthetic_val"
    assert best == json.loads((sweep / "best.json").read_text())
    used = yaml.safe_load((tuned / "config.yaml").read_text())["TEST"]["NUCLEI"]
    assert [used["SCORE_THRESH"], used["MASK_THRESH"], used["MAX_OVERLAP"]] == [
        best["best"]["score_thresh"], best["best"]["mask_thresh"], best["best"]["max_overlap"]]
    val = json.loads((tuned / "nuclei_synthetic_val" / "metrics.json").read_text())
    assert val["mean"]["aji"] == pytest.approx(best["best"]["aji"])
    assert (tuned / "nuclei_synthetic_train" / "per_image.csv").is_file()
    assert sorted(p.name for p in (tuned / "nuclei_synthetic_train").iterdir()) == [  # no evaluator listing
        "label_maps", "metrics.json", "per_image.csv"]
    assert gzip.decompress((tuned / "eval_log.txt.gz").read_bytes()).decode().count("Rank of current process") == 1


@pytest.mark.slow
def test_the_tuning_script_leaves_kumars_validation_label_maps_out(tmp_path):
    """As collect_results.sh: kumar_val's metrics and per-image CSV are kept, its label maps are not
    (room in a Kumar device carry); kumar_test's are. Kumar's layout with 64x64 images."""
    import tifffile
    from PIL import Image

    from nucseg_d2.data.synthetic import generate_tile

    data = tmp_path / "data" / "kumar"
    for folder in ("images", "labels"):
        (data / folder).mkdir(parents=True)
    with open(os.path.join(REPO, "nucseg_d2", "data", "splits", "kumar2017_split.csv")) as stream:
        image_ids = [row["image_id"] for row in csv.DictReader(stream)]
    for index, image_id in enumerate(image_ids):
        image, label_map = generate_tile(np.random.default_rng(index), size=(64, 64))
        tifffile.imwrite(data / "images" / f"{image_id}.tif", image)
        Image.fromarray(label_map.astype(np.uint16)).save(data / "labels" / f"{image_id}.png")
    env = _untrained_run(tmp_path, "kumar_run", proposals=32, detections=8, NUCSEG_DATASETS=str(tmp_path / "data"))
    results = tmp_path / "results"
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "tune_postprocess.sh"), "kumar_run", "kumar_val"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tuned = results / "kumar_run_pp"
    assert (tuned / "kumar_val" / "per_image.csv").is_file() and not (tuned / "kumar_val" / "label_maps").exists()
    assert len(list((tuned / "kumar_test" / "label_maps").glob("*.png"))) == 14

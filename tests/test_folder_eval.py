"""The folder CLI (nucseg-eval): pairing, formats, groups, data sets, and every error case."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from scipy import ndimage

from nucseg_d2.data import register_nuclei_folder
from nucseg_d2.data.readers import read_label_map
from nucseg_d2.data.synthetic import generate_tile
from nucseg_d2.evaluation.folder_eval import DEFAULT_METRICS, FolderEvalError, main, read_groups_csv
from nucseg_d2.evaluation.metrics import compute_metrics

ROOT = Path(__file__).resolve().parents[1]


def _rectangles(shape, *nuclei):
    """Label map with each (id, rows, cols) nucleus painted."""
    label_map = np.zeros(shape, np.int32)
    for nucleus_id, rows, cols in nuclei:
        label_map[rows, cols] = nucleus_id
    return label_map


# Ground truth a: nucleus 1 (16 px) and nucleus 2 (24 px). Its prediction finds nucleus 1 exactly,
# two thirds of nucleus 2 (16 px, IoU 2/3) and a 4-px false positive, with other ids:
# AJI = (16 + 16) / (16 + 24 + 4) = 8/11, Dice1 = 2*32 / (40 + 36) = 16/19, DQ = 2 / 2.5 = 4/5,
# SQ = (1 + 2/3) / 2 = 5/6, PQ = 2/3.
GT_A = _rectangles((16, 16), (1, slice(2, 6), slice(2, 6)), (2, slice(8, 12), slice(8, 14)))
PRED_A = _rectangles((16, 16), (40, slice(2, 6), slice(2, 6)), (70000, slice(8, 12), slice(8, 12)),
                     (3, slice(13, 15), slice(0, 2)))
# Ground truth b: one nucleus of 36 px with an id above 255; its prediction is the same nucleus
# with a different id (perfect: every metric 1).
GT_B = _rectangles((16, 16), (300, slice(4, 10), slice(4, 10)))
PRED_B = _rectangles((16, 16), (5, slice(4, 10), slice(4, 10)))
# Ground truth c: nucleus 7 (rows 0:4, cols 0:6 = 24 px); the prediction misses it entirely.
GT_C = _rectangles((16, 12), (7, slice(0, 4), slice(0, 6)))
PRED_C = np.zeros((16, 12), np.int32)


def _save(path, label_map):
    """Write a label map in the format its suffix names."""
    path = str(path)
    if path.endswith(".npy"):
        np.save(path, label_map)
    elif path.endswith(".mat"):
        scipy.io.savemat(path, {"inst_map": label_map})
    elif path.endswith((".tif", ".tiff")):
        tifffile.imwrite(path, label_map.astype(np.uint32))
    else:
        Image.fromarray(label_map.astype(np.uint16)).save(path)


@pytest.fixture
def folders(tmp_path):
    """gt/{a.png, b.mat, c.tif}, pred/{a_pred.npy, b_pred.tif, c_pred.png} plus ignored files."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    _save(gt_dir / "a.png", GT_A)
    _save(gt_dir / "b.mat", GT_B)
    _save(gt_dir / "c.tif", GT_C)
    _save(pred_dir / "a_pred.npy", PRED_A)
    _save(pred_dir / "b_pred.tif", PRED_B)
    _save(pred_dir / "c_pred.png", PRED_C)
    (pred_dir / "a_overlay.jpg").write_bytes(b"not a label map")  # wrong suffix: ignored
    (pred_dir / "notes.txt").write_text("ignored")
    return gt_dir, pred_dir


def _run(*argv):
    return main([str(arg) for arg in argv])


def _rows(output_dir):
    with open(output_dir / "per_image.csv", newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def _metrics_json(output_dir):
    with open(output_dir / "metrics.json") as f:
        return json.load(f, parse_constant=lambda constant: pytest.fail(f"non-strict JSON {constant}"))


def test_scores_pairs_by_stem_across_formats(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "out"
    assert _run("--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", out) == 0
    rows = _rows(out)
    assert sorted(rows) == ["a", "b", "c"]
    a = rows["a"]
    assert (int(a["num_gt"]), int(a["num_pred"])) == (2, 3)
    assert float(a["aji"]) == pytest.approx(8 / 11, abs=1e-12)
    assert float(a["dice1"]) == pytest.approx(16 / 19, abs=1e-12)
    assert (float(a["dq"]), float(a["sq"]), float(a["pq"])) == pytest.approx((4 / 5, 5 / 6, 2 / 3), abs=1e-12)
    assert all(float(rows["b"][key]) == 1.0 for key in ("aji", "aji_plus", "paper_aji", "dice1", "pq"))
    assert all(float(rows["c"][key]) == 0.0 for key in ("aji", "dice1", "pq"))
    for image_id, gt, pred in (("a", GT_A, PRED_A), ("b", GT_B, PRED_B), ("c", GT_C, PRED_C)):
        direct = compute_metrics(gt, pred, DEFAULT_METRICS)
        assert {key: float(rows[image_id][key]) for key in direct} == pytest.approx(direct, abs=1e-12)

    summary = _metrics_json(out)
    assert summary["mean"]["aji"] == pytest.approx((8 / 11 + 1 + 0) / 3, abs=1e-12)
    # Pooled: (32 + 36 + 0) / (44 + 36 + 24).
    assert summary["pooled_aji"] == pytest.approx(68 / 104, abs=1e-12)
    assert summary["num_images"] == 3 and summary["dataset"] is None
    assert summary["predictions"] == str(pred_dir) and summary["ground_truth"] == str(gt_dir)
    printed = capsys.readouterr().out
    assert "3 image(s)" in printed
    assert re.search(rf"^aji\s+{summary['mean']['aji']:.4f}\s", printed, re.MULTILINE)
    assert f"{68 / 104:.4f}" in printed


def test_suffixes_on_both_sides_and_all_metrics(folders, tmp_path):
    gt_dir, pred_dir = folders
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for name in os.listdir(gt_dir):
        stem, suffix = os.path.splitext(name)
        (gt_dir / name).rename(labelled / f"{stem}_label{suffix}")
    out = tmp_path / "out"
    argv = ["--pred", pred_dir, "--gt", labelled, "--gt-suffix", "_label", "--pred-suffix", "_pred",
            "-o", out, "--metrics", "all"]
    assert _run(*argv) == 0
    rows = _rows(out)
    assert float(rows["b"]["object_hausdorff"]) == 0.0
    assert rows["c"]["object_hausdorff"] == "inf"  # nothing predicted
    assert _metrics_json(out)["mean"]["object_hausdorff"] is None  # inf in strict JSON


def test_groups_csv_gives_means_per_group(folders, tmp_path):
    gt_dir, pred_dir = folders
    groups = tmp_path / "groups.csv"
    groups.write_text("image_id,organ\na,Breast\nb,Breast\nc,Liver\nunused,Kidney\n")
    out = tmp_path / "out"
    assert _run("--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", out, "--groups", groups) == 0
    summary = _metrics_json(out)
    assert summary["groups"]["Breast"]["mean"]["aji"] == pytest.approx((8 / 11 + 1) / 2, abs=1e-12)
    assert summary["groups"]["Liver"] == {
        "mean": {key: 0.0 for key in ("aji", "aji_plus", "paper_aji", "dice1", "dq", "sq", "pq")},
        "std": {key: None for key in ("aji", "aji_plus", "paper_aji", "dice1", "dq", "sq", "pq")},
        "count": 1,
        "pooled_aji": 0.0,
    }
    # Pooled per organ: Breast sums image a's intersections and unions (32 / 44 px) with those of
    # the perfect image b (36 / 36 px): 68 / 80.
    assert summary["groups"]["Breast"]["pooled_aji"] == pytest.approx(68 / 80, abs=1e-12)
    assert _rows(out)["a"]["organ"] == "Breast"
    # A file of several group columns: --group-column picks one.
    both = tmp_path / "both.csv"
    both.write_text("image_id,organ,site\na,Breast,Centre1\nb,Breast,Centre2\nc,Liver,Centre2\n")
    out_site = tmp_path / "out_site"
    assert _run("--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", out_site, "--groups", both,
                "--group-column", "site") == 0
    by_site = _metrics_json(out_site)["groups"]
    assert set(by_site) == {"Centre1", "Centre2"} and by_site["Centre2"]["count"] == 2
    assert by_site["Centre2"]["mean"]["aji"] == pytest.approx((1 + 0) / 2, abs=1e-12)  # images b and c
    assert _rows(out_site)["c"]["site"] == "Centre2" and "organ" not in _rows(out_site)["c"]


def test_groups_csv_as_spreadsheets_save_it(tmp_path):
    # "CSV UTF-8" from a spreadsheet starts with a byte-order mark; cells may carry spaces.
    groups = tmp_path / "groups.csv"
    groups.write_bytes("image_id,organ\r\na , Estómago\r\n,\r\nb,Liver\r\n".encode("utf-8-sig"))
    assert read_groups_csv(str(groups)) == ("organ", {"a": "Estómago", "b": "Liver"})


@pytest.mark.parametrize("content, problem", [
    ("image_id,organ\na,Est\u00f3mago\n".encode("cp1252"), "groups file is not UTF-8 text .*save it as CSV UTF-8"),
    (b"image_id,organ\na,Breast\nb,\n", "line 3: empty image_id or organ \\('b', ''\\)"),
    (b"image_id,organ\na,Breast\nc\n", "line 3: empty image_id or organ \\('c', ''\\)"),
])
def test_bad_groups_csv_is_named(tmp_path, content, problem):
    groups = tmp_path / "groups.csv"
    groups.write_bytes(content)
    with pytest.raises(FolderEvalError, match="groups.csv: " + problem):
        read_groups_csv(str(groups))


def _error_case(case, gt_dir, pred_dir, tmp_path):
    """(argv, the text the error message must contain) for each way the input can be wrong."""
    common = ["--gt", gt_dir, "-o", tmp_path / "out"]
    if case == "missing_pairs":
        (pred_dir / "b_pred.tif").unlink()
        _save(pred_dir / "z_pred.png", PRED_B)
        return ["--pred", pred_dir, "--pred-suffix", "_pred", *common], [
            "missing pairs", "1 ground-truth image(s)", "b.mat", "1 prediction file(s)", "z_pred.png"]
    if case == "nothing_pairs":  # forgot --pred-suffix
        return ["--pred", pred_dir, *common], ["3 ground-truth image(s)", "a.png, b.mat, c.tif", "--pred-suffix"]
    if case == "size_mismatch":
        _save(pred_dir / "c_pred.png", np.zeros((16, 16), np.int32))
        return ["--pred", pred_dir, "--pred-suffix", "_pred", *common], [
            "c_pred.png: prediction is 16x16", "c.tif is 16x12"]
    if case == "non_integer_map":
        np.save(pred_dir / "a_pred.npy", PRED_A + 0.5)
        return ["--pred", pred_dir, "--pred-suffix", "_pred", *common], ["a_pred.npy", "non-integral"]
    if case == "colour_map":
        Image.fromarray(np.dstack([PRED_C.astype(np.uint8), PRED_C.astype(np.uint8) + 1, PRED_C.astype(np.uint8)])).save(
            pred_dir / "c_pred.png")
        return ["--pred", pred_dir, "--pred-suffix", "_pred", *common], ["c_pred.png", "channels"]
    if case == "empty_prediction_folder":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "readme.txt").write_text("no label maps here")
        return ["--pred", empty, *common], [str(empty), "no prediction label maps"]
    if case == "suffix_matches_nothing":
        return ["--pred", pred_dir, "--pred-suffix", "_inst", *common], [
            "no prediction label maps", "'_inst'"]
    if case == "missing_folder":
        return ["--pred", tmp_path / "absent", *common], ["absent: prediction folder not found"]
    if case == "duplicate_stem":
        _save(pred_dir / "a_pred.png", PRED_A)
        return ["--pred", pred_dir, "--pred-suffix", "_pred", *common], ["a_pred.npy and a_pred.png"]
    if case == "ungrouped_image":
        groups = tmp_path / "groups.csv"
        groups.write_text("image_id,organ\na,Breast\n")
        return ["--pred", pred_dir, "--pred-suffix", "_pred", "--groups", groups, *common], [
            "no organ for 2 image(s): b, c"]
    if case == "ambiguous_group_column":
        groups = tmp_path / "groups.csv"
        groups.write_text("image_id,organ,split\na,Breast,test\n")
        return ["--pred", pred_dir, "--pred-suffix", "_pred", "--groups", groups, *common], [
            "--group-column", "['organ', 'split']"]
    if case == "unknown_metric":
        return ["--pred", pred_dir, "--pred-suffix", "_pred", "--metrics", "aji,f2", *common], ["['f2']"]
    if case == "unknown_dataset":
        return ["--pred", pred_dir, "--dataset", "no_such_set", "-o", tmp_path / "out"], [
            "unknown data set 'no_such_set'", "kumar_test"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing_pairs", "nothing_pairs", "size_mismatch", "non_integer_map", "colour_map",
    "empty_prediction_folder", "suffix_matches_nothing", "missing_folder", "duplicate_stem",
    "ungrouped_image", "ambiguous_group_column", "unknown_metric", "unknown_dataset",
])
def test_errors_exit_2_naming_the_files(case, folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    argv, expected_fragments = _error_case(case, gt_dir, pred_dir, tmp_path)
    assert _run(*argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    for fragment in expected_fragments:
        assert fragment in captured.err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_every_bad_file_is_reported_in_one_run(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    np.save(pred_dir / "a_pred.npy", PRED_A + 0.5)
    _save(pred_dir / "c_pred.png", np.zeros((16, 16), np.int32))
    assert _run("--pred", pred_dir, "--pred-suffix", "_pred", "--gt", gt_dir, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "2 of 3 image(s) cannot be scored" in err and "a_pred.npy" in err and "c_pred.png" in err


def test_usage_errors_exit_2(folders, tmp_path):
    gt_dir, pred_dir = folders
    with pytest.raises(SystemExit) as both:
        _run("--pred", pred_dir, "--gt", gt_dir, "--dataset", "kumar_test", "-o", tmp_path)
    with pytest.raises(SystemExit) as neither:
        _run("--pred", pred_dir, "-o", tmp_path)
    assert both.value.code == 2 and neither.value.code == 2


def test_extra_predictions_can_be_allowed(folders, tmp_path):
    gt_dir, pred_dir = folders
    _save(pred_dir / "z_pred.png", PRED_B)
    argv = ["--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", tmp_path / "out"]
    assert _run(*argv) == 2
    assert _run(*argv, "--allow-extra-predictions") == 0
    assert sorted(_rows(tmp_path / "out")) == ["a", "b", "c"]


def test_a_detectron2_training_log_is_never_replaced(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "metrics.json"
    log.write_text('{"iteration": 19, "total_loss": 2.5, "lr": 0.001}\n{"iteration": 39, "total_loss": 1.9}\n')
    before = log.read_bytes()
    argv = ["--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", run_dir]
    for extra in ([], ["--overwrite"]):
        assert _run(*argv, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {log}: not a nucseg-eval summary (Detectron2's training log")
        assert "even with --overwrite" in err and len(err.splitlines()) == 1
        assert log.read_bytes() == before
        assert sorted(os.listdir(run_dir)) == ["metrics.json"]


def test_an_earlier_evaluation_is_replaced_only_with_overwrite(folders, tmp_path, capsys, monkeypatch):
    gt_dir, pred_dir = folders
    out = tmp_path / "out"
    argv = ["--pred", pred_dir, "--gt", gt_dir, "--pred-suffix", "_pred", "-o", out]
    assert _run(*argv, "--metrics", "aji") == 0
    capsys.readouterr()
    earlier = {name: (out / name).read_bytes() for name in ("metrics.json", "per_image.csv")}

    import nucseg_d2.evaluation.folder_eval as folder_eval

    # Refused before any map is scored: a large folder is not scored only to be refused at the end.
    monkeypatch.setattr(folder_eval, "score_image", lambda *args, **kwargs: pytest.fail("scored"))
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'metrics.json'}: already exists (an earlier evaluation's); pass --overwrite " \
                  "to replace it, or give another -o folder\n"
    assert {name: (out / name).read_bytes() for name in earlier} == earlier
    monkeypatch.undo()
    assert _run(*argv, "--overwrite") == 0
    assert "dice1" in _rows(out)["a"] and "dice1" in _metrics_json(out)["mean"]
    # The per-image table alone, or one that is not a nucseg-eval table, counts too.
    (out / "metrics.json").unlink()
    assert _run(*argv) == 2
    assert f"{out / 'per_image.csv'}: already exists" in capsys.readouterr().err
    (out / "per_image.csv").write_text("name,score\nx,1\n")
    assert _run(*argv, "--overwrite") == 2
    assert "not a nucseg-eval per-image table (its header lacks image_id, num_gt, num_pred)" in capsys.readouterr().err
    assert (out / "per_image.csv").read_text() == "name,score\nx,1\n"
    # A table of ours saved again by a spreadsheet (a byte-order mark before the header) is still ours.
    assert _run(*argv, "--metrics", "aji", "-o", tmp_path / "again") == 0
    table = tmp_path / "again" / "per_image.csv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    assert _run(*argv, "-o", tmp_path / "again", "--overwrite") == 0
    assert not table.read_bytes().startswith(b"\xef\xbb\xbf")


def test_runs_as_a_module_with_exit_status_2(folders, tmp_path):
    gt_dir, pred_dir = folders
    completed = subprocess.run(
        [sys.executable, "-m", "nucseg_d2.evaluation.folder_eval", "--pred", str(pred_dir), "--gt", str(gt_dir),
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert completed.returncode == 2
    assert "a_pred.npy" in completed.stderr and "a.png" in completed.stderr


# ---------------------------------------------------------------------- --dataset (registered)


def _erode_each_nucleus(label_map):
    """Keep a pixel only where its whole 3x3 neighbourhood has its id (erodes every nucleus by
    one pixel, separating touching ones)."""
    same_around = (ndimage.minimum_filter(label_map, size=3) == label_map) & (
        ndimage.maximum_filter(label_map, size=3) == label_map)
    return np.where(same_around, label_map, 0).astype(np.int32)


def _score_eroded_dataset(dataset, gt_by_id, tmp_path, capsys, group_key):
    """Write eroded ground truth as predictions, score them with --dataset, compare each row with
    the metrics computed directly."""
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    eroded = {image_id: _erode_each_nucleus(gt) for image_id, gt in gt_by_id.items()}
    for image_id, label_map in eroded.items():
        _save(pred_dir / f"{image_id}.png", label_map)
    out = tmp_path / "out"
    assert _run("--pred", pred_dir, "--dataset", dataset, "-o", out) == 0
    rows = _rows(out)
    assert sorted(rows) == sorted(gt_by_id)
    for image_id, gt in gt_by_id.items():
        direct = compute_metrics(gt, eroded[image_id], DEFAULT_METRICS)
        assert {key: float(rows[image_id][key]) for key in direct} == pytest.approx(direct, abs=1e-12)
        assert 0.0 < direct["aji"] < 1.0 and 0.0 < direct["dice1"] < 1.0
    summary = _metrics_json(out)
    assert summary["dataset"] == dataset
    assert summary["mean"]["aji"] == pytest.approx(np.mean([float(r["aji"]) for r in rows.values()]), abs=1e-12)
    assert f"mean per {group_key}:" in capsys.readouterr().out
    return rows, summary


def test_dataset_mode_on_real_kumar_test(real_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUCSEG_DATASETS", str(real_data_root))
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "cache"))
    kumar_labels = real_data_root / "kumar" / "labels"
    records = DatasetCatalog.get("kumar_test")
    gt_by_id = {r["image_id"]: read_label_map(kumar_labels / f"{r['image_id']}.png") for r in records}
    assert len(gt_by_id) == 14
    rows, summary = _score_eroded_dataset("kumar_test", gt_by_id, tmp_path, capsys, "organ")
    organs = {r["organ"] for r in records}
    assert set(summary["groups"]) == organs and len(organs) == 7
    # Eroding by one pixel keeps most nuclei above IoU 0.5 (DQ 0.975) but loses their rims (SQ 0.751).
    assert summary["mean"]["dq"] > 0.9 and summary["mean"]["sq"] < 0.8


def test_dataset_mode_on_a_synthetic_twin(tmp_path, monkeypatch, capsys):
    """The real-data test on synthetic tiles registered as a folder data set with organs."""
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "cache"))
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    gt_by_id, organ_of = {}, {}
    for seed, organ in enumerate(["Breast", "Breast", "Liver"]):
        image, label_map = generate_tile(np.random.default_rng(seed), size=(96, 96))
        image_id = f"tile{seed}"
        Image.fromarray(image).save(images / f"{image_id}.png")
        _save(labels / f"{image_id}.png", label_map)
        gt_by_id[image_id], organ_of[image_id] = label_map, organ
    folder_name, name = "nucseg_test_folder_eval_twin_folder", "nucseg_test_folder_eval_twin"
    register_nuclei_folder(folder_name, images, labels)
    DatasetCatalog.register(name, lambda: [dict(r, organ=organ_of[r["image_id"]]) for r in DatasetCatalog.get(folder_name)])
    try:
        rows, summary = _score_eroded_dataset(name, gt_by_id, tmp_path, capsys, "organ")
        assert set(summary["groups"]) == {"Breast", "Liver"}
        assert summary["groups"]["Breast"]["count"] == 2
        assert rows["tile2"]["organ"] == "Liver"
    finally:
        for registered in (name, folder_name):
            DatasetCatalog.remove(registered)
            if registered in MetadataCatalog:
                MetadataCatalog.remove(registered)

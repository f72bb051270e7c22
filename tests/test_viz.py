"""Tests of nucseg_d2.viz: match categories on hand-made maps, the pictures' sizes and colours,
metrics.json parsing, and the command line."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucseg_d2 import viz
from nucseg_d2.evaluation.reporting import read_training_metrics
from nucseg_d2.predict.writers import write_label_tiff
from nucseg_d2.viz import (
    CATEGORY_COLORS,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    MERGED,
    SPLIT,
    TRUE_POSITIVE,
    match_categories,
    match_overlay,
    plot_per_image_metrics,
    plot_training_curves,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hand_made_maps():
    """One nucleus of each category, with non-contiguous ids on both sides."""
    gt = np.zeros((40, 60), np.int32)
    pred = np.zeros((40, 60), np.int32)
    gt[2:10, 2:10] = 10  # true positive: pred 7 lacks one column, IoU 56/64
    pred[2:10, 2:9] = 7
    gt[2:8, 20:26] = 20  # false negative: nothing predicted there
    pred[30:36, 2:8] = 8  # false positive: no nucleus there
    gt[15:23, 2:9] = 30  # merged: pred 9 covers both 30 and 40 completely
    gt[15:23, 10:17] = 40
    pred[15:23, 2:17] = 9
    gt[15:25, 30:46] = 50  # split: preds 100 and 101 are both inside gt 50
    pred[15:25, 30:38] = 100
    pred[15:25, 38:46] = 101
    return gt, pred


def test_categories_of_hand_made_maps():
    gt, pred = _hand_made_maps()
    categories = match_categories(gt, pred)
    assert categories.gt == {10: TRUE_POSITIVE, 20: FALSE_NEGATIVE, 30: MERGED, 40: MERGED, 50: SPLIT}
    assert categories.pred == {7: TRUE_POSITIVE, 8: FALSE_POSITIVE, 9: MERGED, 100: SPLIT, 101: SPLIT}
    assert categories.counts() == {TRUE_POSITIVE: 1, FALSE_POSITIVE: 1, FALSE_NEGATIVE: 1,
                                   MERGED: 1, SPLIT: 1}


def test_weak_overlaps_are_errors_not_matches():
    gt = np.zeros((20, 20), np.int32)
    pred = np.zeros((20, 20), np.int32)
    gt[0:10, 0:10] = 1
    pred[0:10, 6:16] = 1  # IoU 40/160: neither found nor a merge or split
    gt[12:20, 0:8] = 2
    pred[12:20, 0:9] = 2  # covers gt 2 and 1/3 of gt 3's pixels: one merge needs > 1/2 of each
    gt[12:20, 8:11] = 3
    categories = match_categories(gt, pred)
    assert categories.gt == {1: FALSE_NEGATIVE, 2: TRUE_POSITIVE, 3: FALSE_NEGATIVE}
    assert categories.pred == {1: FALSE_POSITIVE, 2: TRUE_POSITIVE}


def test_empty_maps():
    empty = np.zeros((5, 5), np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 4
    assert match_categories(empty, empty).counts() == dict.fromkeys(CATEGORY_COLORS, 0)
    assert match_categories(one, empty).gt == {4: FALSE_NEGATIVE}
    assert match_categories(empty, one).pred == {4: FALSE_POSITIVE}


def test_match_overlay_colours_and_size():
    gt, pred = _hand_made_maps()
    image = np.full(gt.shape + (3,), 128, np.uint8)
    picture = match_overlay(image, gt, pred, legend=False)
    scale = 9  # ceil(512 / 60): enlarged until at least 512 pixels wide
    assert picture.shape == (40 * scale, 60 * scale, 3)
    # Outlines in the category colour, fills translucent, untouched background.
    assert tuple(picture[2 * scale, 3 * scale]) == CATEGORY_COLORS[TRUE_POSITIVE]  # top edge of 7
    assert tuple(picture[2 * scale, 22 * scale]) == CATEGORY_COLORS[FALSE_NEGATIVE]  # top of gt 20
    assert tuple(picture[30 * scale, 4 * scale]) == CATEGORY_COLORS[FALSE_POSITIVE]
    assert tuple(picture[15 * scale, 5 * scale]) == CATEGORY_COLORS[MERGED]
    assert tuple(picture[15 * scale, 33 * scale]) == CATEGORY_COLORS[SPLIT]
    fill = picture[5 * scale, 22 * scale].astype(int)  # inside the false negative
    expected = np.round(0.7 * 128 + 0.3 * np.array(CATEGORY_COLORS[FALSE_NEGATIVE]))
    np.testing.assert_array_equal(fill, expected)
    assert tuple(picture[38 * scale, 58 * scale]) == (128, 128, 128)
    # The two merged nuclei keep a white ground-truth outline inside the merged prediction.
    assert np.all(picture[18 * scale, 9 * scale - 1] > 200)
    assert tuple(picture[18 * scale, 5 * scale]) != tuple(picture[18 * scale, 9 * scale - 1])

    with_legend = match_overlay(image, gt, pred)
    assert with_legend.shape[1] == 60 * scale and 40 * scale + 20 <= with_legend.shape[0] <= 40 * scale + 120
    np.testing.assert_array_equal(with_legend[: 40 * scale], picture)
    legend = with_legend[40 * scale:]
    for colour in CATEGORY_COLORS.values():  # every category's swatch is drawn
        assert np.any(np.all(np.abs(legend.astype(int) - colour) <= 2, axis=-1))


def test_match_overlay_of_ids_past_two_to_the_31():
    # read_label_map keeps such ids as int64; a lookup table up to them would need a TiB.
    gt, pred = _hand_made_maps()
    huge_gt, huge_pred = gt.astype(np.int64), pred.astype(np.int64)
    huge_gt[gt > 0] += 2**40
    huge_pred[pred > 0] += 2**40
    image = np.full(gt.shape + (3,), 128, np.uint8)
    np.testing.assert_array_equal(match_overlay(image, huge_gt, huge_pred, legend=False),
                                  match_overlay(image, gt, pred, legend=False))


def test_match_overlay_keeps_wide_images_at_their_size(tmp_path):
    gt, pred = _hand_made_maps()
    wide = [np.tile(a, (1, 10)) for a in (gt, pred)]  # 600 pixels wide: no enlargement
    image = np.full(wide[0].shape + (3,), 200, np.uint8)
    out = tmp_path / "overlay.png"
    picture = viz.save_match_overlay(out, image, *wide)
    assert picture.shape[:2][1] == 600 and picture.shape[0] > 40
    assert np.asarray(Image.open(out).convert("RGB")).shape == picture.shape


def test_match_overlay_rejects_mismatched_shapes():
    gt, pred = _hand_made_maps()
    with pytest.raises(ValueError, match="share H, W"):
        match_overlay(np.zeros((40, 61, 3), np.uint8), gt, pred)


def _write_per_image_csv(path, organs=True):
    columns = ["image_id", "organ", "num_gt", "num_pred", "aji", "pq", "dice1", "object_hausdorff"]
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns if organs else [c for c in columns if c != "organ"])
        for index, organ in enumerate(["Liver", "Breast", "Liver", "Kidney", "Breast"]):
            row = [f"TCGA-{index:02d}", organ, 300, 280, *rng.uniform(0.5, 0.8, 3), 9.5]
            writer.writerow(row if organs else row[:1] + row[2:])


def test_per_image_metric_bars(tmp_path):
    _write_per_image_csv(tmp_path / "per_image.csv")
    out = tmp_path / "bars.png"
    assert plot_per_image_metrics(tmp_path / "per_image.csv", out) == ["aji", "pq", "dice1"]
    width, height = Image.open(out).size
    assert width >= 600 and height > 3 * 150
    assert plot_per_image_metrics(tmp_path / "per_image.csv", out, metrics=["object_hausdorff"]) == [
        "object_hausdorff"]
    with pytest.raises(ValueError, match="missing_metric"):
        plot_per_image_metrics(tmp_path / "per_image.csv", out, metrics=["missing_metric"])
    _write_per_image_csv(tmp_path / "plain.csv", organs=False)
    assert plot_per_image_metrics(tmp_path / "plain.csv", tmp_path / "plain.png") == ["aji", "pq", "dice1"]


def _write_metrics_json(path):
    """A run to iteration 99 with evaluations at 49 and 99, resumed from iteration 60 (so 79 and
    99 are logged again), plus a half-written last line (the run was killed)."""
    def train(iteration, loss_cls, total_loss, lr):
        return {"iteration": iteration, "loss_cls": loss_cls, "loss_box_reg": 0.5,
                "total_loss": total_loss, "lr": lr, "data_time": 0.1}

    lines = [train(19, 0.9, 2.0, 0.01), train(39, 0.8, 2.0, 0.01), {"iteration": 49, "nuclei/aji": 0.5},
             train(59, 0.7, 2.0, 0.01), train(79, 0.6, 2.0, 0.01), train(99, 0.5, 2.0, 0.01),
             {"iteration": 99, "nuclei/aji": 0.5},
             # resumed from the checkpoint at iteration 60
             train(79, 0.25, 1.5, 0.001), train(99, 0.2, 1.4, 0.001),
             {"iteration": 99, "nuclei/aji": 0.6, "nuclei/pq": 0.55}]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"iteration": 119, "loss_cl'
    path.write_text(text)


def test_per_image_bars_show_infinite_values(tmp_path, monkeypatch):
    # An object Hausdorff with nothing found is inf: matplotlib draws no bar, which reads as 0.
    path = tmp_path / "per_image.csv"
    path.write_text("image_id,object_hausdorff\na,4.0\nb,inf\nc,6.0\n")
    figures = []
    monkeypatch.setattr(viz, "_save_figure", lambda figure, out: figures.append(figure))
    plot_per_image_metrics(path, tmp_path / "bars.png", metrics=["object_hausdorff"])
    axis = figures[0].axes[0]
    assert axis.get_title(loc="left") == "object_hausdorff: mean 5.000 over 2 images; 1 more infinite (red ^)"
    (markers,) = axis.get_lines()
    assert markers.get_xdata().tolist() == [1] and markers.get_ydata().tolist() == [6.0]


def test_metrics_json_resumed_run_replaces_the_old_tail(tmp_path):
    path = tmp_path / "metrics.json"
    _write_metrics_json(path)
    series = read_training_metrics(path)
    assert series["total_loss"] == {19: 2.0, 39: 2.0, 59: 2.0, 79: 1.5, 99: 1.4}
    assert series["nuclei/aji"] == {49: 0.5, 99: 0.6}
    assert series["lr"][99] == 0.001


def test_metrics_json_evaluation_written_after_a_later_training_line_is_no_restart(tmp_path):
    # As Detectron2 writes an evaluation at 274 (EVAL_PERIOD 275) whose iteration logged no losses:
    # its values come after those of 279, keys in first-stored order (results/*_cpu1100 hold this).
    lines = [{"iteration": 259, "total_loss": 2.0, "lr": 0.01}, {"iteration": 279, "total_loss": 1.9, "lr": 0.01},
             {"iteration": 274, "nuclei/aji": 0.5}, {"iteration": 299, "total_loss": 1.8, "lr": 0.01}]
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    series = read_training_metrics(path)
    assert series["total_loss"] == {259: 2.0, 279: 1.9, 299: 1.8}
    assert series["nuclei/aji"] == {274: 0.5}


def test_metrics_json_of_a_published_run_keeps_every_logged_loss():
    path = REPO_ROOT / "results" / "tnbc_proposed_cpu1100" / "training_metrics.json"
    logged = {json.loads(line)["iteration"] for line in open(path) if '"total_loss"' in line}
    assert {279, 559, 839} <= logged  # each followed in the file by an earlier evaluation
    assert set(read_training_metrics(path)["total_loss"]) == logged


def test_training_curves(tmp_path):
    path = tmp_path / "metrics.json"
    _write_metrics_json(path)
    out = tmp_path / "curves.png"
    drawn = plot_training_curves(path, out)
    assert drawn == {"losses": ["loss_box_reg", "loss_cls", "total_loss"], "lr": ["lr"],
                     "aji": ["nuclei/aji"]}
    assert Image.open(out).size == (1100, 360)


def test_training_curves_without_evaluation_and_bad_files(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"iteration": 0, "total_loss": 3.0, "lr": 0.0}) + "\n")
    assert plot_training_curves(path, tmp_path / "curves.png")["aji"] == []
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="no metrics entries"):
        plot_training_curves(path, tmp_path / "curves.png")


def test_command_line(tmp_path, capsys):
    gt, pred = _hand_made_maps()
    Image.fromarray(np.full(gt.shape + (3,), 128, np.uint8)).save(tmp_path / "image.png")
    write_label_tiff(tmp_path / "gt.tif", gt)
    np.save(tmp_path / "pred.npy", pred)
    out = tmp_path / "overlay.png"
    assert viz.main(["overlay", str(tmp_path / "image.png"), str(tmp_path / "gt.tif"),
                     str(tmp_path / "pred.npy"), str(out)]) == 0
    assert Image.open(out).size[0] == 540
    assert "merged 1, split 1" in capsys.readouterr().out
    assert viz.main(["curves", str(tmp_path / "missing.json"), str(tmp_path / "c.png")]) == 1
    assert "missing.json" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    _write_per_image_csv(tmp_path / "per_image.csv")
    out = tmp_path / "bars.png"
    completed = subprocess.run(
        [sys.executable, "-m", "nucseg_d2.viz", "metrics", str(tmp_path / "per_image.csv"), str(out),
         "--metrics", "aji", "pq"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert out.is_file() and "aji, pq" in completed.stdout

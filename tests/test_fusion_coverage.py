"""scripts/fusion_coverage.py: per-crop coverage of the nuclei by pasted masks, by hand; its
training batches from a folder named in the config."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from model_inputs import write_synthetic_folder

from nucseg_d2.predict.predictor import build_predict_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fusion_coverage.py"
spec = importlib.util.spec_from_file_location("fusion_coverage", SCRIPT)
fusion_coverage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusion_coverage)


def test_pasted_pixels_follow_the_paste_rule():
    # Pixel centres x + 0.5 in [1.4, 3.6) are columns 1, 2, 3 (centres 1.5, 2.5, 3.5); rows 0, 1.
    covered = fusion_coverage.pasted_pixels([[1.4, 0.0, 3.6, 2.0]], 4, 5)
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:4] = True
    assert (covered == expected).all()
    assert not fusion_coverage.pasted_pixels(np.zeros((0, 4)), 4, 5).any()


def test_crop_coverage_counts_distinct_nuclei_and_nucleus_pixels_under_a_pasted_box():
    gt_masks = np.zeros((3, 6, 6), bool)
    gt_masks[0, 0:2, 0:2] = True  # 4 px, two positive ROIs
    gt_masks[1, 4:6, 4:6] = True  # 4 px, one ROI whose box covers 2 of them
    gt_masks[2, 0:2, 4:6] = True  # 4 px, no ROI
    gt_boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [4, 4, 6, 6]], np.float32)
    pasted = np.array([[0, 0, 2, 2], [0.2, 0, 2, 2], [4, 4, 6, 5]], np.float32)
    row = fusion_coverage.crop_coverage(gt_masks, gt_boxes, pasted)
    assert row == {"nuclei": 3, "positive_rois": 3, "nuclei_pasted": 2, "nucleus_pixels_pasted": 6 / 12}
    empty = fusion_coverage.crop_coverage(gt_masks[:0], np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty == {"nuclei": 0, "positive_rois": 0, "nuclei_pasted": 0, "nucleus_pixels_pasted": 0.0}


def test_training_batches_come_from_a_folder_named_in_the_config(tmp_path):
    """The diagnostic scripts read DATASETS.TRAIN through the config's own folders."""
    from nucseg_d2.config import build_nuclei_cfg

    images, labels = write_synthetic_folder(tmp_path, 2, 64)
    folders = repr([["coverage_folder_train", str(images), str(labels)]])
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = build_nuclei_cfg(config, ["DATASETS.NUCLEI_FOLDERS", folders,
                                    "DATASETS.TRAIN", "('coverage_folder_train',)", "SOLVER.IMS_PER_BATCH", "3",
                                    "INPUT.CROP.SIZE", "[32, 32]"])
    (batch,) = fusion_coverage.fixed_batches(cfg, 1, seed=0)
    assert len(batch) == 3 and all(tuple(x["image"].shape) == (3, 32, 32) for x in batch)


def test_markdown_table_prints_the_committed_layout(capsys):
    rows = [(128, {"crops": 32, "nuclei": 39.53125, "positive_rois": 32.0}),
            (512, {"crops": 32, "nuclei": 39.53125, "positive_rois": 126.53125})]
    fusion_coverage.print_markdown_table("ROIs per image", iter(rows))
    assert capsys.readouterr().out.splitlines() == [
        "| ROIs per image | crops | nuclei | positive_rois |",
        "|---|---|---|---|",
        "| 128 | 32 | 39.531 | 32.000 |",
        "| 512 | 32 | 39.531 | 126.531 |",
    ]


@pytest.fixture(scope="module")
def maskrcnn_weights(tmp_path_factory):
    """A checkpoint of the demo's plain Mask R-CNN: no semantic head, no fusion, the stock mask head."""
    model = build_model(build_predict_cfg(str(CONFIGS / "demo_maskrcnn.yaml"), ["MODEL.DEVICE", "cpu"]))
    path = tmp_path_factory.mktemp("maskrcnn") / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _no_batches(*args, **kwargs):
    raise AssertionError("training batches were built before the checkpoint was checked")


def test_a_checkpoint_of_another_architecture_is_refused_naming_its_missing_keys(maskrcnn_weights, capsys,
                                                                                  monkeypatch):
    monkeypatch.setattr(fusion_coverage, "fixed_batches", _no_batches)
    status = fusion_coverage.main(["--config-file", str(CONFIGS / "demo.yaml"), "--weights", maskrcnn_weights])
    assert status == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {maskrcnn_weights}: checkpoint does not match the architecture of")
    # The semantic head and the fusion run in the training pass measured: their weights are demanded
    # too (the predictor's loader forgives their absence), so every key the file lacks is counted.
    fusion_keys = build_model(build_predict_cfg(str(CONFIGS / "demo.yaml"), ["MODEL.DEVICE", "cpu"])).state_dict()
    missing = set(fusion_keys) - set(torch.load(maskrcnn_weights)["model"])
    assert any(key.startswith("sem_seg_head.") for key in missing)
    assert f"missing keys ({len(missing)}): feature_fusion.predictor.bias, " in err


@pytest.mark.parametrize("weights, message", [
    ("nowhere/model_final.pth", "nowhere/model_final.pth: checkpoint file not found"),
    ("", "no checkpoint given (--weights)"),  # fvcore's loader would go on with the untrained model
])
def test_a_missing_or_empty_checkpoint_is_refused_before_any_batch(weights, message, capsys, monkeypatch):
    monkeypatch.setattr(fusion_coverage, "fixed_batches", _no_batches)
    status = fusion_coverage.main(["--config-file", str(CONFIGS / "demo.yaml"), "--weights", weights])
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_the_trained_model_s_own_checkpoint_is_measured(tmp_path, untrained_demo_weights, capsys):
    write_synthetic_folder(tmp_path, 1, 64)
    config = tmp_path / "config.yaml"
    config.write_text(f'_BASE_: "{CONFIGS / "demo.yaml"}"\n'
                      f"DATASETS:\n  NUCLEI_FOLDERS: [[coverage_main_train, {tmp_path / 'images'}, "
                      f"{tmp_path / 'labels'}]]\n  TRAIN: [coverage_main_train]\n"
                      "SOLVER:\n  IMS_PER_BATCH: 1\nINPUT:\n  CROP:\n    SIZE: [64, 64]\n")
    status = fusion_coverage.main(["--config-file", str(config), "--weights", untrained_demo_weights,
                                   "--rois-per-image", "16", "--batches", "1"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| ROIs per image | crops | nuclei | positive_rois |")
    assert lines[3].startswith("| 16 | 1 |")

"""scripts/fusion_coverage.py: per-crop coverage of the nuclei by pasted masks, by hand; its
training batches from a folder named in the config."""
import importlib.util
from pathlib import Path

import numpy as np

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
    from PIL import Image

    from nucseg_d2.config import build_nuclei_cfg
    from nucseg_d2.data.synthetic import generate_tile

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for i in range(2):
        image, label_map = generate_tile(np.random.default_rng(i), size=(64, 64))
        Image.fromarray(image).save(tmp_path / "images" / f"t{i}.png")
        Image.fromarray(label_map.astype(np.uint16)).save(tmp_path / "labels" / f"t{i}.png")
    folders = repr([["coverage_folder_train", str(tmp_path / "images"), str(tmp_path / "labels")]])
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

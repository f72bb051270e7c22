"""NucleiEvaluator on a tiny registered data set fed hand-made predictions.

The data set has four 16x16 images whose nuclei are rectangles, so every painted prediction and
every metric value can be worked out on paper:

    a: nucleus 1 = rows 2:6, cols 2:6 (16 px); nucleus 2 = rows 8:12, cols 8:14 (24 px)
    b: nucleus 300 = rows 4:10, cols 4:10 (36 px)   (an id above 255)
    c: nucleus 7 = rows 0:3, cols 0:16 (48 px); nucleus 9 = rows 10:16, cols 3:7 (24 px)
    d: no nucleus

The "hand-worked" predictions are perfect on b, c and d. On a they are: S1 = nucleus 1 exactly
(score 0.9); S2 = rows 8:12, cols 8:12 (16 px, score 0.8), two thirds of nucleus 2; a false
positive rows 13:15, cols 0:2 (4 px, score 0.7); and a whole-image mask of score 0.3, which the
0.5 score threshold drops. For a:

    AJI = (16 + 16) / (16 + 24 + 4) = 32/44 = 8/11 (AJI+ and paper AJI pick the same pairs)
    Dice1 = 2 * 32 / (40 + 36) = 16/19
    PQ: matches S1 (IoU 1) and S2 (IoU 16/24 = 2/3 > 0.5), one FP: DQ = 2 / (2 + 1/2) = 4/5,
        SQ = (1 + 2/3) / 2 = 5/6, PQ = 2/3
    pooled AJI over a, b, c, d = (32 + 36 + 72 + 0) / (44 + 36 + 72 + 0) = 140/152 = 35/38
"""
import csv
import json
import logging
import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, print_csv_format, verify_results
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from PIL import Image

from nucseg_d2 import add_nucseg_config
from nucseg_d2.config import NucleiConfigError, validate_nucseg_config
from nucseg_d2.data import register_nuclei_folder
from nucseg_d2.evaluation import NucleiEvaluator
from nucseg_d2.evaluation.folder_eval import main as folder_eval_main
from nucseg_d2.evaluation.metrics import ALL_METRICS, compute_metrics, metric_keys
from nucseg_d2.evaluation.reporting import json_safe
from nucseg_d2.utils import leave_distributed_worker

SIZE = 16
IMAGE_IDS = ("a", "b", "c", "d")
# (id, rows, cols) of each ground-truth nucleus.
GT_NUCLEI = {
    "a": [(1, slice(2, 6), slice(2, 6)), (2, slice(8, 12), slice(8, 14))],
    "b": [(300, slice(4, 10), slice(4, 10))],
    "c": [(7, slice(0, 3), slice(0, 16)), (9, slice(10, 16), slice(3, 7))],
    "d": [],
}
# (rows, cols, score) of each hand-worked prediction on image a; the others are perfect.
PREDICTED_ON_A = [
    (slice(2, 6), slice(2, 6), 0.9),
    (slice(8, 12), slice(8, 12), 0.8),
    (slice(13, 15), slice(0, 2), 0.7),
    (slice(0, 16), slice(0, 16), 0.3),  # below the score threshold: ignored
]


def gt_label_map(image_id):
    label_map = np.zeros((SIZE, SIZE), np.int32)
    for nucleus_id, rows, cols in GT_NUCLEI[image_id]:
        label_map[rows, cols] = nucleus_id
    return label_map


def predicted_rectangles(image_id, hand_worked=True):
    """[(rows, cols, score)] predicted for an image: perfect, or the hand-worked case on a."""
    if hand_worked and image_id == "a":
        return PREDICTED_ON_A
    return [(rows, cols, 0.9) for _, rows, cols in GT_NUCLEI[image_id]]


def expected_pred_label_map(image_id, hand_worked=True):
    """The label map the evaluator should paint (ids 1..N in descending score, threshold 0.5)."""
    label_map = np.zeros((SIZE, SIZE), np.int32)
    kept = [r for r in predicted_rectangles(image_id, hand_worked) if r[2] > 0.5]
    for new_id, (rows, cols, _) in enumerate(sorted(kept, key=lambda r: -r[2]), start=1):
        label_map[rows, cols] = new_id
    return label_map


def make_instances(image_id, mask_form="full", hand_worked=True):
    """Instances as a model returns them: full-image ``pred_masks`` (Detectron2's default and
    what COCOEvaluator reads) or compact ``pred_mask_probs`` + ``pred_boxes`` (NucleiRCNN)."""
    rectangles = predicted_rectangles(image_id, hand_worked)
    instances = Instances((SIZE, SIZE))
    boxes = [[c.start, r.start, c.stop, r.stop] for r, c, _ in rectangles]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([s for _, _, s in rectangles], dtype=torch.float32)
    instances.pred_classes = torch.zeros(len(rectangles), dtype=torch.int64)
    if mask_form == "full":
        masks = torch.zeros((len(rectangles), SIZE, SIZE), dtype=torch.bool)
        for i, (rows, cols, _) in enumerate(rectangles):
            masks[i, rows, cols] = True
        instances.pred_masks = masks
    else:
        # Probability 1 over the whole box pastes back exactly onto the box's pixels.
        instances.pred_mask_probs = torch.ones((len(rectangles), 1, 28, 28))
    return instances


def run_evaluator(evaluator, image_ids=IMAGE_IDS, mask_form="full", hand_worked=True):
    evaluator.reset()
    for image_id in image_ids:
        outputs = [{"instances": make_instances(image_id, mask_form, hand_worked)}]
        evaluator.process([{"image_id": image_id, "height": SIZE, "width": SIZE}], outputs)
    return evaluator.evaluate()


def write_tiny_dataset(folder):
    """images/<id>.png (blank RGB) and labels/<id>.png (uint16 label maps) under ``folder``."""
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    for image_id in IMAGE_IDS:
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(os.path.join(images, f"{image_id}.png"))
        Image.fromarray(gt_label_map(image_id).astype(np.uint16)).save(os.path.join(labels, f"{image_id}.png"))
    return images, labels


def read_per_image_csv(output_dir):
    with open(os.path.join(output_dir, "per_image.csv"), newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def read_strict_json(path):
    def reject(constant):
        raise AssertionError(f"{path} is not strict JSON: contains {constant}")

    with open(path) as f:
        return json.load(f, parse_constant=reject)


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch, request):
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "cache"))
    images, labels = write_tiny_dataset(str(tmp_path / "data"))
    name = f"nucseg_test_evaluator_{request.node.name}".replace("[", "_").replace("]", "")
    register_nuclei_folder(name, images, labels)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_perfect_prediction_scores_one_on_every_metric(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "out")
    evaluator = NucleiEvaluator(tiny_dataset, output_dir=output_dir, metrics=list(ALL_METRICS))
    results = run_evaluator(evaluator, hand_worked=False)
    expected = {key: (0.0 if key == "object_hausdorff" else 1.0) for key in metric_keys(ALL_METRICS)}
    assert results == {"nuclei": expected}
    summary = read_strict_json(os.path.join(output_dir, "metrics.json"))
    assert summary["mean"] == expected
    assert summary["pooled_aji"] == 1.0
    assert summary["num_images"] == 4
    rows = read_per_image_csv(output_dir)
    assert sorted(rows) == list(IMAGE_IDS)
    assert [int(rows[i]["num_gt"]) for i in IMAGE_IDS] == [2, 1, 2, 0]
    assert [int(rows[i]["num_pred"]) for i in IMAGE_IDS] == [2, 1, 2, 0]
    assert all(float(rows[i]["aji"]) == 1.0 for i in IMAGE_IDS)


@pytest.mark.parametrize("mask_form", ["full", "compact"])
def test_hand_worked_case(tiny_dataset, tmp_path, mask_form):
    output_dir = str(tmp_path / mask_form)
    evaluator = NucleiEvaluator(tiny_dataset, output_dir=output_dir)
    results = run_evaluator(evaluator, mask_form=mask_form)

    rows = read_per_image_csv(output_dir)
    a = rows["a"]
    assert int(a["num_gt"]) == 2 and int(a["num_pred"]) == 3
    assert float(a["aji"]) == pytest.approx(8 / 11, abs=1e-12)
    assert float(a["aji_plus"]) == pytest.approx(8 / 11, abs=1e-12)
    assert float(a["paper_aji"]) == pytest.approx(8 / 11, abs=1e-12)
    assert float(a["dice1"]) == pytest.approx(16 / 19, abs=1e-12)
    assert float(a["dq"]) == pytest.approx(4 / 5, abs=1e-12)
    assert float(a["sq"]) == pytest.approx(5 / 6, abs=1e-12)
    assert float(a["pq"]) == pytest.approx(2 / 3, abs=1e-12)
    # Every row equals the metrics computed directly on the known label maps.
    for image_id in IMAGE_IDS:
        direct = compute_metrics(gt_label_map(image_id), expected_pred_label_map(image_id), evaluator.metrics)
        assert {key: float(rows[image_id][key]) for key in direct} == pytest.approx(direct, abs=1e-12)

    mean_aji = (8 / 11 + 3) / 4
    assert results["nuclei"]["aji"] == pytest.approx(mean_aji, abs=1e-12)
    assert list(results["nuclei"]) == ["aji", "aji_plus", "paper_aji", "dice1", "dq", "sq", "pq"]
    summary = read_strict_json(os.path.join(output_dir, "metrics.json"))
    assert summary["mean"]["aji"] == pytest.approx(mean_aji, abs=1e-12)
    # Sample std (ddof=1) of [8/11, 1, 1, 1]: the deviations are -9/44 and 3/44 (x3).
    assert summary["std"]["aji"] == pytest.approx(math.sqrt((81 + 3 * 9) / 44**2 / 3), abs=1e-12)
    assert summary["pooled_aji"] == pytest.approx(35 / 38, abs=1e-12)
    assert summary["dataset"] == tiny_dataset
    assert summary["postprocess"] == {"score_thresh": 0.5, "mask_thresh": 0.5, "max_overlap": 0.7}


def test_results_work_with_print_csv_format_and_verify_results(tiny_dataset):
    results = run_evaluator(NucleiEvaluator(tiny_dataset))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    testing_logger = logging.getLogger("detectron2.evaluation.testing")
    testing_logger.addHandler(handler)
    previous_level = testing_logger.level
    testing_logger.setLevel(logging.INFO)
    try:
        print_csv_format(results)
    finally:
        testing_logger.removeHandler(handler)
        testing_logger.setLevel(previous_level)
    assert messages == [
        "copypaste: Task: nuclei",
        "copypaste: aji,aji_plus,paper_aji,dice1,dq,sq,pq",
        "copypaste: " + ",".join(f"{results['nuclei'][k]:.4f}" for k in results["nuclei"]),
    ]

    cfg = get_cfg()
    cfg.TEST.EXPECTED_RESULTS = [["nuclei", "aji", (8 / 11 + 3) / 4, 1e-9], ["nuclei", "pq", (2 / 3 + 3) / 4, 1e-9]]
    assert verify_results(cfg, results) is True
    cfg.TEST.EXPECTED_RESULTS = [["nuclei", "aji", 1.0, 1e-9]]
    with pytest.raises(SystemExit):  # Detectron2 exits when the expected results are not met
        verify_results(cfg, results)


def test_nan_and_inf_are_written_as_null(tiny_dataset, tmp_path):
    """One image: std is NaN; an empty prediction: object Hausdorff is inf. Strict JSON has
    neither, so metrics.json holds null; the returned results keep the floats."""
    output_dir = str(tmp_path / "out")
    evaluator = NucleiEvaluator(tiny_dataset, output_dir=output_dir, metrics=["aji", "object_hausdorff"])
    evaluator.reset()
    empty = make_instances("d")  # no detections
    evaluator.process([{"image_id": "a"}], [{"instances": empty}])
    results = evaluator.evaluate()
    assert results["nuclei"]["aji"] == 0.0
    assert math.isinf(results["nuclei"]["object_hausdorff"])
    summary = read_strict_json(os.path.join(output_dir, "metrics.json"))
    assert summary["mean"] == {"aji": 0.0, "object_hausdorff": None}
    assert summary["std"] == {"aji": None, "object_hausdorff": None}
    assert read_per_image_csv(output_dir)["a"]["object_hausdorff"] == "inf"
    assert json_safe({"x": [math.nan, -math.inf, 1.5], 2: (math.inf,)}) == {"x": [None, None, 1.5], "2": [None]}


def test_groups_from_record_fields(tiny_dataset, tmp_path):
    """Records with an ``organ`` field (as Kumar's) give per-organ means in metrics.json."""
    organ_of = {"a": "Breast", "b": "Breast", "c": "Liver", "d": "Liver"}
    name = tiny_dataset + "_organs"
    DatasetCatalog.register(name, lambda: [dict(r, organ=organ_of[r["image_id"]]) for r in DatasetCatalog.get(tiny_dataset)])
    try:
        output_dir = str(tmp_path / "out")
        run_evaluator(NucleiEvaluator(name, output_dir=output_dir))
        summary = read_strict_json(os.path.join(output_dir, "metrics.json"))
        assert summary["groups"]["Breast"]["mean"]["aji"] == pytest.approx((8 / 11 + 1) / 2, abs=1e-12)
        assert summary["groups"]["Breast"]["count"] == 2
        assert summary["groups"]["Liver"]["mean"]["aji"] == 1.0
        assert read_per_image_csv(output_dir)["c"]["organ"] == "Liver"
    finally:
        DatasetCatalog.remove(name)


def test_folder_tool_reproduces_the_evaluator_from_its_saved_label_maps(tiny_dataset, tmp_path, capsys):
    """The evaluator's label_maps/*.png scored by the folder CLI give identical report files."""
    evaluator_dir = str(tmp_path / "evaluator")
    run_evaluator(NucleiEvaluator(tiny_dataset, output_dir=evaluator_dir, save_label_maps=True))
    folder_dir = str(tmp_path / "folder")
    argv = ["--pred", os.path.join(evaluator_dir, "label_maps"), "--dataset", tiny_dataset, "-o", folder_dir]
    assert folder_eval_main(argv) == 0
    with open(os.path.join(evaluator_dir, "per_image.csv")) as a, open(os.path.join(folder_dir, "per_image.csv")) as b:
        assert a.read() == b.read()
    from_evaluator = read_strict_json(os.path.join(evaluator_dir, "metrics.json"))
    from_folder = read_strict_json(os.path.join(folder_dir, "metrics.json"))
    for key in ("mean", "std", "count", "num_images", "pooled_aji"):
        assert from_folder[key] == from_evaluator[key]
    assert "pooled AJI" in capsys.readouterr().out


# ------------------------------------------------------------------------------ distributed


def _distributed_evaluation(dataset_dir, dataset_name, output_dir, results_path):
    """Runs in each of the 2 spawned processes: rank r scores images r, r + 2, ..."""
    register_nuclei_folder(dataset_name, os.path.join(dataset_dir, "images"), os.path.join(dataset_dir, "labels"))
    rank, world_size = comm.get_rank(), comm.get_world_size()
    image_ids = IMAGE_IDS[rank::world_size]
    results = run_evaluator(NucleiEvaluator(dataset_name, output_dir=output_dir, save_label_maps=True),
                            image_ids=image_ids)
    with open(f"{results_path}.rank{rank}", "w") as f:
        json.dump({"world_size": world_size, "image_ids": image_ids, "results": results}, f)
    leave_distributed_worker()


def test_distributed_evaluation_gathers_to_the_main_process(tiny_dataset, tmp_path):
    single_dir = str(tmp_path / "single")
    single_results = run_evaluator(NucleiEvaluator(tiny_dataset, output_dir=single_dir))

    dataset_dir = str(tmp_path / "data")
    distributed_dir = str(tmp_path / "distributed")
    results_path = str(tmp_path / "results")
    # Without a GPU, launch() starts the processes with the gloo backend.
    # The last evaluation listed every image: the main process must know the other rank's maps as
    # this evaluation's, or it would remove them as left over.
    os.makedirs(distributed_dir)
    with open(os.path.join(distributed_dir, "label_maps.json"), "w") as f:
        json.dump({"label_maps": {tiny_dataset + "_distributed": [f"{i}.png" for i in IMAGE_IDS]}}, f)
    launch(_distributed_evaluation, 2, dist_url="auto", timeout=timedelta(seconds=120),
           args=(dataset_dir, tiny_dataset + "_distributed", distributed_dir, results_path))

    with open(results_path + ".rank0") as f:
        rank0 = json.load(f)
    with open(results_path + ".rank1") as f:
        rank1 = json.load(f)
    assert rank0["world_size"] == 2
    assert rank0["image_ids"] == ["a", "c"] and rank1["image_ids"] == ["b", "d"]
    assert rank1["results"] == {}  # only the main process reports
    assert rank0["results"] == json.loads(json.dumps(single_results))
    with open(os.path.join(single_dir, "per_image.csv")) as a, open(os.path.join(distributed_dir, "per_image.csv")) as b:
        assert a.read() == b.read()
    single_summary = read_strict_json(os.path.join(single_dir, "metrics.json"))
    distributed_summary = read_strict_json(os.path.join(distributed_dir, "metrics.json"))
    single_summary.pop("dataset"), distributed_summary.pop("dataset")
    assert distributed_summary == single_summary
    assert sorted(os.listdir(os.path.join(distributed_dir, "label_maps"))) == [f"{i}.png" for i in IMAGE_IDS]


# ---------------------------------------------------------------------------------- COCO AP


def test_coco_ap_needs_full_masks_in_the_config():
    cfg = get_cfg()
    add_nucseg_config(cfg)
    cfg.TEST.NUCLEI.COCO_AP = True
    with pytest.raises(NucleiConfigError, match="TEST.NUCLEI.COCO_AP.*MODEL.NUCSEG.PASTE_FULL_MASKS"):
        validate_nucseg_config(cfg)
    cfg.MODEL.NUCSEG.PASTE_FULL_MASKS = True
    validate_nucseg_config(cfg)


def test_coco_evaluator_runs_beside_the_nuclei_evaluator(tiny_dataset, tmp_path):
    """train_net's pair of evaluators on the COCO-style records: perfect full masks give mask AP
    100; compact masks alone give COCOEvaluator nothing to score masks with (hence the check)."""
    output_dir = str(tmp_path / "out")
    evaluators = DatasetEvaluators([
        NucleiEvaluator(tiny_dataset, output_dir=output_dir),
        COCOEvaluator(tiny_dataset, output_dir=output_dir),
    ])
    results = run_evaluator(evaluators, hand_worked=False)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["nuclei"]["aji"] == 1.0

    compact = run_evaluator(COCOEvaluator(tiny_dataset, output_dir=str(tmp_path / "compact")),
                            mask_form="compact", hand_worked=False)
    assert "segm" not in compact and "bbox" in compact


def test_label_maps_an_earlier_evaluation_left_are_removed(tiny_dataset, tmp_path):
    """A re-evaluation into the same folder removes the maps the last evaluation of the data set
    listed and this one did not write (an image since dropped, a map now in the other format);
    files nobody listed, another data set's maps and a listed name that is not a file stay; an
    evaluation that scored nothing changes nothing."""
    output_dir = tmp_path / "out"
    maps = output_dir / "label_maps"
    maps.mkdir(parents=True)
    for name in ("dropped_image.png", IMAGE_IDS[0] + ".tif", "placed_by_hand.png", "other_set.png"):
        (maps / name).write_bytes(b"earlier")
    (maps / "a_folder.png").mkdir()
    listing = {tiny_dataset: ["dropped_image.png", IMAGE_IDS[0] + ".tif", "a_folder.png"],
               "other_set": ["other_set.png"]}
    (output_dir / "label_maps.json").write_text(json.dumps({"label_maps": listing}))
    empty = NucleiEvaluator(tiny_dataset, output_dir=str(output_dir), save_label_maps=True)
    empty.reset()
    assert empty.evaluate() == {}
    assert len(os.listdir(maps)) == 5
    run_evaluator(NucleiEvaluator(tiny_dataset, output_dir=str(output_dir), save_label_maps=True))
    ours = [f"{image_id}.png" for image_id in IMAGE_IDS]
    assert sorted(os.listdir(maps)) == sorted(ours + ["placed_by_hand.png", "other_set.png", "a_folder.png"])
    listed = read_strict_json(str(output_dir / "label_maps.json"))["label_maps"]
    assert listed == {tiny_dataset: ours, "other_set": ["other_set.png"]}
    assert os.path.isfile(output_dir / "per_image.csv")


def test_an_unreadable_label_map_listing_keeps_the_maps(tiny_dataset, tmp_path, caplog):
    output_dir = tmp_path / "out"
    (output_dir / "label_maps").mkdir(parents=True)
    (output_dir / "label_maps" / "dropped_image.png").write_bytes(b"earlier")
    (output_dir / "label_maps.json").write_text('{"label_maps": ["dropped_image.png"]}')
    run_evaluator(NucleiEvaluator(tiny_dataset, output_dir=str(output_dir), save_label_maps=True))
    assert (output_dir / "label_maps" / "dropped_image.png").exists()
    assert "label_maps.json: unreadable" in caplog.text


def test_an_unreadable_entry_of_the_listing_costs_only_that_entry(tiny_dataset, tmp_path, caplog):
    output_dir = tmp_path / "out"
    (output_dir / "label_maps").mkdir(parents=True)
    for name in ("dropped_image.png", "other_set.png"):
        (output_dir / "label_maps" / name).write_bytes(b"earlier")
    listing = {tiny_dataset: ["dropped_image.png"], "other_set": "other_set.png", "third_set": ["x.png"]}
    (output_dir / "label_maps.json").write_text(json.dumps({"label_maps": listing}))
    run_evaluator(NucleiEvaluator(tiny_dataset, output_dir=str(output_dir), save_label_maps=True))
    assert not (output_dir / "label_maps" / "dropped_image.png").exists()
    assert (output_dir / "label_maps" / "other_set.png").exists()
    assert "entries of ['other_set'] unreadable" in caplog.text
    assert set(read_strict_json(str(output_dir / "label_maps.json"))["label_maps"]) == {tiny_dataset, "third_set"}


def test_label_maps_past_uint16_are_written_as_tiff(tmp_path):
    """PNG holds no 32-bit ids: a map with ids past 65,535 goes to TIFF, not a crash."""
    import tifffile

    evaluator = NucleiEvaluator.__new__(NucleiEvaluator)  # only the writer is under test
    evaluator.output_dir = str(tmp_path)
    evaluator._written_label_maps = []
    small = np.array([[0, 1], [2, 65535]], dtype=np.int32)
    large = np.array([[0, 1], [2, 70000]], dtype=np.int32)
    evaluator._write_label_map("small", small)
    evaluator._write_label_map("large", large)
    png = np.asarray(Image.open(tmp_path / "label_maps" / "small.png"))
    assert png.dtype == np.uint16 and (png == small).all()
    tif = tifffile.imread(tmp_path / "label_maps" / "large.tif")
    assert tif.dtype == np.uint32 and (tif == large).all()
    assert sorted(os.listdir(tmp_path / "label_maps")) == ["large.tif", "small.png"]

"""Records (annotations, cache) and data-set registration, on hand-made folders and real data."""
import csv
import importlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import scipy.io
import tifffile
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.structures import BoxMode
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import nucseg_d2  # noqa: F401  (registers the data sets)
from nucseg_d2.data import datasets, records
from nucseg_d2.data.readers import NucleiDataError, load_label_map
from nucseg_d2.data.records import build_records, label_map_to_annotations

from real_data import REAL_DATA_ROOT  # noqa: E402  (tests/ helper)

REAL_ROOT = REAL_DATA_ROOT
SPLITS_DIR = Path(datasets.__file__).parent / "splits"
TNBC_SIZES = {"tnbc_train": 30, "tnbc_val": 7, "tnbc_test": 13}
KUMAR_SIZES = {
    "kumar_train": 16,
    "kumar_test_same_organ": 8,
    "kumar_test_different_organ": 6,
    "kumar_test": 14,
    "kumar_train_minus_val": 12,
    "kumar_val": 4,
}
# First training image of each organ in kumar2017_split.csv.
KUMAR_VAL_IDS = {
    "TCGA-A7-A13E-01Z-00-DX1": "Breast",
    "TCGA-B0-5711-01Z-00-DX1": "Kidney",
    "TCGA-18-5592-01Z-00-DX1": "Liver",
    "TCGA-G9-6336-01Z-00-DX1": "Prostate",
}
# Hand-worked from the patient image counts 01:7 02:3 03:5 04:8 05:4 06:3 07:3 08:4 09:6 10:4 11:3.
TNBC_FOLDS_5 = [["04", "07"], ["01", "06"], ["02", "09"], ["03", "10"], ["05", "08", "11"]]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "cache"))


def _split_rows(file_name):
    with open(SPLITS_DIR / file_name, newline="") as split_file:
        return list(csv.DictReader(split_file))


def _write_label_png(path, label_map):
    Image.fromarray(label_map.astype(np.uint16)).save(path)


def _tiny_label_map(seed, size=8):
    """A label map with a couple of rectangular nuclei, id gaps included."""
    rng = np.random.default_rng(seed)
    label_map = np.zeros((size, size), np.uint16)
    for nucleus_id in (3, 10 + seed % 5):
        top, left = rng.integers(0, size - 2, 2)
        label_map[top : top + 2, left : left + 3] = nucleus_id
    return label_map


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A data root with the TNBC and Kumar layouts (8x8 images), and a small CPM-17 folder."""
    root = tmp_path_factory.mktemp("datasets")
    for row in _split_rows("tnbc_split.csv"):
        patient, image_id = row["patient"], row["image"]
        for folder in (f"Slide_{patient}", f"GT_{patient}"):
            (root / "tnbc" / folder).mkdir(parents=True, exist_ok=True)
        slide = Image.fromarray(np.full((8, 8, 4), 255, np.uint8), "RGBA")
        slide.save(root / "tnbc" / f"Slide_{patient}" / f"{image_id}.png")
        gt = np.zeros((8, 8), np.uint8)
        gt[1:3, 1:3] = gt[5:7, 4:8] = 255  # two nuclei
        Image.fromarray(gt, "L").save(root / "tnbc" / f"GT_{patient}" / f"{image_id}.png")
    for folder in ("images", "labels", "xml"):
        (root / "kumar" / folder).mkdir(parents=True)
    for index, row in enumerate(_split_rows("kumar2017_split.csv")):
        image_id = row["image_id"]
        image_path = root / "kumar" / "images" / f"{image_id}.tif"
        tifffile.imwrite(image_path, np.zeros((8, 8, 3), np.uint8), compression="lzw")
        if image_id == "TCGA-CH-5767-01Z-00-DX1":  # XML only: exercises the fallback
            (root / "kumar" / "xml" / f"{image_id}.xml").write_text(
                "<Annotations><Annotation><Regions><Region><Vertices>"
                '<Vertex X="1.5" Y="1.5"/><Vertex X="4.5" Y="1.5"/>'
                '<Vertex X="4.5" Y="3.5"/><Vertex X="1.5" Y="3.5"/>'
                "</Vertices></Region></Regions></Annotation></Annotations>"
            )
        else:
            _write_label_png(root / "kumar" / "labels" / f"{image_id}.png", _tiny_label_map(index))
    for split, count in (("train", 3), ("test", 2)):
        for folder in ("Images", "Labels"):
            (root / "cpm17" / split / folder).mkdir(parents=True)
        for i in range(count):
            split_dir = root / "cpm17" / split
            image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
            image.save(split_dir / "Images" / f"image_{i:02d}.png")
            inst_map = {"inst_map": _tiny_label_map(i).astype(np.float64)}  # as HoVer-Net's release
            scipy.io.savemat(split_dir / "Labels" / f"image_{i:02d}.mat", inst_map)
    return root


# --------------------------------------------------------------------------- annotations
def test_annotations_hand_worked():
    label_map = np.zeros((4, 5), np.int32)
    label_map[0:2, 1] = 3  # column 1, rows 0-1
    label_map[2:4, 3:5] = 7  # bottom-right 2x2 block; ids 1, 2, 4-6 unused
    first, second = label_map_to_annotations(label_map)
    assert first["bbox"] == [1.0, 0.0, 1.0, 2.0] and first["area"] == 2
    assert second["bbox"] == [3.0, 2.0, 2.0, 2.0] and second["area"] == 4
    assert first["bbox_mode"] == BoxMode.XYWH_ABS
    assert first["category_id"] == 0 and first["iscrowd"] == 0
    # Column-major runs for id 3: 4 background, 2 nucleus, then 14 background.
    expected_rle = mask_util.frPyObjects({"size": [4, 5], "counts": [4, 2, 14]}, 4, 5)
    assert first["segmentation"] == {"size": [4, 5], "counts": expected_rle["counts"].decode()}
    assert isinstance(second["segmentation"]["counts"], str)
    assert (mask_util.decode(second["segmentation"]) == (label_map == 7)).all()
    json.dumps([first, second])


def test_empty_label_map_has_no_annotations():
    assert label_map_to_annotations(np.zeros((5, 6), np.int32)) == []


def test_sparse_huge_ids_are_handled_in_id_order():
    label_map = np.zeros((3, 3), np.int64)
    label_map[0, 0] = 2**40
    label_map[2, 2] = 5
    annotations = label_map_to_annotations(label_map)
    assert [a["bbox"] for a in annotations] == [[2.0, 2.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.int32, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 4))
)
def test_rle_equals_pycocotools_encode_of_full_mask(label_map):
    annotations = label_map_to_annotations(label_map)
    ids = [i for i in np.unique(label_map) if i > 0]
    assert len(annotations) == len(ids)
    for nucleus_id, annotation in zip(ids, annotations):
        mask = label_map == nucleus_id
        expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert annotation["segmentation"]["counts"] == expected["counts"].decode()
        rows, cols = np.nonzero(mask)
        x, y, w, h = annotation["bbox"]
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert annotation["area"] == mask.sum()


@pytest.mark.skipif(not (REAL_ROOT / "kumar").is_dir(), reason="real Kumar data absent")
def test_real_kumar_annotations_reconstruct_the_label_map():
    from nucseg_d2.data.readers import read_label_map

    label_map = read_label_map(REAL_ROOT / "kumar" / "labels" / "TCGA-A7-A13E-01Z-00-DX1.png")
    annotations = label_map_to_annotations(label_map)
    rebuilt = np.zeros_like(label_map)
    for nucleus_id, annotation in zip(np.unique(label_map)[1:], annotations):
        rebuilt[mask_util.decode(annotation["segmentation"]).astype(bool)] = nucleus_id
    assert len(annotations) == 314
    assert (rebuilt == label_map).all()


# --------------------------------------------------------------------------- build_records
def _folder_specs(tmp_path, count=2):
    specs = []
    for i in range(count):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"img{i}.png")
        _write_label_png(tmp_path / f"img{i}_labels.png", _tiny_label_map(i))
        specs.append(
            {
                "file_name": str(tmp_path / f"img{i}.png"),
                "label_file": str(tmp_path / f"img{i}_labels.png"),
                "image_id": f"img{i}",
                "organ": "Breast",
            }
        )
    return specs


def test_build_records_fields(tmp_path):
    specs = _folder_specs(tmp_path, count=1)
    (record,) = build_records(specs, "fields")
    assert record["height"] == 8 and record["width"] == 8
    assert record["label_format"] == "label_map" and record["image_id"] == "img0"
    assert record["organ"] == "Breast"
    assert len(record["annotations"]) == 2


def test_cache_hit_returns_identical_records_without_recomputing(tmp_path, monkeypatch):
    specs = _folder_specs(tmp_path)
    first = build_records(specs, "hit")
    cache_files = list((tmp_path / "cache" / "records").iterdir())
    assert len(cache_files) == 1 and cache_files[0].suffix == ".pkl"  # no temp files left behind

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(records, "label_map_to_annotations", must_not_run)
    monkeypatch.setattr(records, "read_rgb_image", must_not_run)
    assert build_records(specs, "hit") == first


def test_cache_is_invalidated_when_a_label_file_changes(tmp_path):
    specs = _folder_specs(tmp_path)
    before = build_records(specs, "changed")
    label_map = np.zeros((8, 8), np.uint16)
    label_map[0, 0] = 1
    _write_label_png(specs[1]["label_file"], label_map)
    os.utime(specs[1]["label_file"], ns=(1, 1))  # a different mtime even on coarse file systems
    after = build_records(specs, "changed")
    assert before[0] == after[0]
    assert len(before[1]["annotations"]) == 2 and len(after[1]["annotations"]) == 1


def test_cache_is_invalidated_when_the_reader_code_changes(tmp_path, monkeypatch):
    specs = _folder_specs(tmp_path)
    build_records(specs, "code")

    def fixed_reader(label_map):
        return label_map_to_annotations(label_map)[:1]

    monkeypatch.setattr(records, "label_map_to_annotations", fixed_reader)
    assert len(build_records(specs, "code")[1]["annotations"]) == 2  # same code: the cached entry
    # A process that imported other code (a reader fix) has another fingerprint: rebuilt.
    monkeypatch.setattr(records, "_RECORD_CODE_FINGERPRINT", "f" * 64)
    assert len(build_records(specs, "code")[1]["annotations"]) == 1
    assert len(list((tmp_path / "cache" / "records").iterdir())) == 2


def test_code_fingerprint_is_the_source_of_the_record_modules(tmp_path):
    copies = []
    for module in records._RECORD_CODE_MODULES:
        copy = tmp_path / os.path.basename(module.__file__)
        copy.write_bytes(Path(module.__file__).read_bytes())
        spec = importlib.util.spec_from_file_location(f"copy_of_{module.__name__}", copy)
        copies.append(type("Module", (), {"__file__": str(copy), "__spec__": spec, "__name__": spec.name}))
    assert records._record_code_fingerprint(copies) == records._RECORD_CODE_FINGERPRINT
    with open(copies[0].__file__, "a") as edited:
        edited.write("\n# a reader fix\n")
    changed = records._record_code_fingerprint(copies)
    assert changed != records._RECORD_CODE_FINGERPRINT
    # A module whose loader cannot give its source (a frozen application) hashes its name and
    # the package version instead of failing.
    frozen = type("Module", (), {"__file__": None, "__spec__": None, "__name__": "frozen_readers"})
    assert len(records._record_code_fingerprint([frozen])) == 64


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    specs = _folder_specs(tmp_path)
    expected = build_records(specs, "corrupt")
    (cache_file,) = (tmp_path / "cache" / "records").iterdir()
    cache_file.write_bytes(b"\x80\x04 truncated pickle")
    assert build_records(specs, "corrupt") == expected
    with open(cache_file, "rb") as repaired:
        assert pickle.load(repaired) == expected


def test_build_records_errors_name_the_file(tmp_path):
    specs = _folder_specs(tmp_path)
    data = Path(specs[1]["file_name"]).read_bytes()
    Path(specs[1]["file_name"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(NucleiDataError) as error:
        build_records(specs, "truncated")
    # The reader's error, naming the file once, not re-wrapped per record.
    assert str(error.value).startswith(specs[1]["file_name"] + ": ")
    specs = _folder_specs(tmp_path)
    _write_label_png(specs[0]["label_file"], np.zeros((8, 9), np.uint16))
    with pytest.raises(NucleiDataError, match=r"img0_labels\.png.*img0\.png"):
        build_records(specs, "mismatch")
    with pytest.raises(NucleiDataError, match="nowhere.png"):
        build_records([dict(specs[0], label_file=str(tmp_path / "nowhere.png"))], "missing")


def test_records_work_with_detectron2_mapper_and_coco_export(tmp_path):
    specs = _folder_specs(tmp_path)
    name = "nucseg_test_detectron2_compat"
    DatasetCatalog.register(name, lambda: build_records(specs, name))
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    try:
        coco = convert_to_coco_dict(name)
        json.dumps(coco)
        assert [a["area"] for a in coco["annotations"]] == [6.0, 6.0, 6.0, 6.0]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    record = build_records(specs, "mapper")[0]
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    instances = mapper(record)["instances"]
    label_map = _tiny_label_map(0)
    expected = torch.from_numpy(np.stack([label_map == 3, label_map == 10]))
    assert torch.equal(instances.gt_masks.tensor, expected)


# --------------------------------------------------------------------------- registration
def test_registered_names_and_metadata():
    other_names = ["cpm17_train", "cpm17_test", "nuclei_synthetic_train", "nuclei_synthetic_val"]
    for name in list(TNBC_SIZES) + list(KUMAR_SIZES) + other_names:
        assert name in DatasetCatalog, name
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == ["nucleus"]
        assert metadata.stuff_classes == ["background", "nucleus"]
        assert metadata.evaluator_type == "nuclei"
        assert metadata.dataset_root
    for fold in range(5):
        assert f"tnbc_cv5_fold{fold}_train" in DatasetCatalog
        assert f"tnbc_cv5_fold{fold}_test" in DatasetCatalog
    assert "coco_2017_val" in DatasetCatalog  # Detectron2's own registrations are kept


def test_reimport_does_not_register_twice():
    before = {name: DatasetCatalog[name] for name in datasets.NUCLEI_DATASET_NAMES}
    importlib.reload(datasets)
    assert {name: DatasetCatalog[name] for name in datasets.NUCLEI_DATASET_NAMES} == before


def test_tnbc_patient_folds_are_balanced_and_deterministic():
    assert datasets.tnbc_patient_folds(5) == TNBC_FOLDS_5
    with pytest.raises(ValueError):
        datasets.tnbc_patient_folds(12)


def test_three_tnbc_folds_by_hand_and_their_registration(fake_root, monkeypatch):
    # Images per patient (tnbc_split.csv): 04:8 01:7 09:6 03:5 05:4 08:4 10:4 02:3 06:3 07:3 11:3.
    # Largest first, each to the fold with the fewest images (ties: lower fold): 04->0 01->1 09->2
    # 03->2 (6) 05->1 (7) 08->0 (8) 10->1 (11, tie with 2) 02->2 (11) 06->0 (12) 07->2 (14)
    # 11->0 (15, tie with 1): 18, 15 and 17 images.
    assert datasets.tnbc_patient_folds(3) == [["04", "06", "08", "11"], ["01", "05", "10"], ["02", "03", "07", "09"]]
    by_size = ["04", "01", "09", "03", "05", "08", "10", "02", "06", "07", "11"]
    assert datasets.tnbc_patient_folds(11) == [[patient] for patient in by_size]  # one patient a fold
    with pytest.raises(ValueError, match=r"num_folds must be in 2\.\.11, got 1"):
        datasets.tnbc_patient_folds(1)
    monkeypatch.setenv("NUCSEG_DATASETS", str(fake_root))
    names = datasets.register_tnbc_cross_validation(3)
    assert names == [f"tnbc_cv3_fold{i}_{split}" for i in range(3) for split in ("train", "test")]
    for fold, patients in enumerate(datasets.tnbc_patient_folds(3)):
        test = DatasetCatalog.get(f"tnbc_cv3_fold{fold}_test")
        train = DatasetCatalog.get(f"tnbc_cv3_fold{fold}_train")
        assert {r["patient"] for r in test} == set(patients)
        assert {r["patient"] for r in train} == set(by_size) - set(patients)
        assert len(test) == (18, 15, 17)[fold] and len(train) + len(test) == 50


def test_missing_data_root_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(tmp_path / "absent"))
    with pytest.raises(NucleiDataError, match=r"absent.*NUCSEG_DATASETS"):
        DatasetCatalog.get("tnbc_train")
    monkeypatch.setenv("NUCSEG_DATASETS", str(tmp_path))
    with pytest.raises(NucleiDataError, match=r"kumar.*NUCSEG_DATASETS"):
        DatasetCatalog.get("kumar_train")


def test_tnbc_splits_on_fake_layout(fake_root, monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(fake_root))
    patients_of = {
        "tnbc_train": {"01", "04", "06", "07", "09", "11"},
        "tnbc_val": {"02", "05"},
        "tnbc_test": {"03", "08", "10"},
    }
    for name, size in TNBC_SIZES.items():
        dataset = DatasetCatalog.get(name)
        assert len(dataset) == size
        assert {r["patient"] for r in dataset} == patients_of[name]
        assert all(r["label_format"] == "tnbc_binary" for r in dataset)
        assert all(len(r["annotations"]) == 2 for r in dataset)
        assert MetadataCatalog.get(name).dataset_root == str(fake_root / "tnbc")
    for fold, test_patients in enumerate(TNBC_FOLDS_5):
        test = DatasetCatalog.get(f"tnbc_cv5_fold{fold}_test")
        train = DatasetCatalog.get(f"tnbc_cv5_fold{fold}_train")
        assert {r["patient"] for r in test} == set(test_patients)
        assert len(train) + len(test) == 50
        assert not {r["image_id"] for r in train} & {r["image_id"] for r in test}


def test_kumar_splits_on_fake_layout(fake_root, monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(fake_root))
    for name, size in KUMAR_SIZES.items():
        assert len(DatasetCatalog.get(name)) == size, name
    val = DatasetCatalog.get("kumar_val")
    assert {r["image_id"]: r["organ"] for r in val} == KUMAR_VAL_IDS
    train_minus_val = {r["image_id"] for r in DatasetCatalog.get("kumar_train_minus_val")}
    train = {r["image_id"] for r in DatasetCatalog.get("kumar_train")}
    assert train_minus_val == train - set(KUMAR_VAL_IDS)
    test = DatasetCatalog.get("kumar_test")
    (xml_record,) = [r for r in test if r["image_id"] == "TCGA-CH-5767-01Z-00-DX1"]
    assert xml_record["label_format"] == "monuseg_xml" and xml_record["label_file"].endswith(".xml")
    # Rectangle X 1..4, Y 1..3: the pixels with centres inside are rows 1-2, columns 1-3.
    assert xml_record["annotations"][0]["bbox"] == [1.0, 1.0, 3.0, 2.0]
    organs = {r["organ"] for r in DatasetCatalog.get("kumar_test_different_organ")}
    assert organs == {"Bladder", "Colon", "Stomach"}


def test_kumar_missing_image_is_reported(fake_root, tmp_path, monkeypatch):
    broken_root = tmp_path / "broken"
    (broken_root / "kumar" / "images").mkdir(parents=True)
    monkeypatch.setenv("NUCSEG_DATASETS", str(broken_root))
    missing = r"kumar_val: 8 file\(s\) not found.*TCGA-A7-A13E-01Z-00-DX1\.tif"
    with pytest.raises(NucleiDataError, match=missing):
        DatasetCatalog.get("kumar_val")


def test_cpm17_on_fake_layout(fake_root, monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(fake_root))
    train = DatasetCatalog.get("cpm17_train")
    assert [r["image_id"] for r in train] == ["image_00", "image_01", "image_02"]
    assert all(r["label_format"] == "cpm17_mat" and r["label_file"].endswith(".mat") for r in train)
    for index, record in enumerate(train):
        np.testing.assert_array_equal(load_label_map(record), _tiny_label_map(index))
    assert len(DatasetCatalog.get("cpm17_test")) == 2


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.parametrize("folders, problem", [
    ([["only_two", "images"]], r"NUCLEI_FOLDERS\[0\]: expected \[name, image_dir, label_dir\]"),
    ([["a", "i", "l", "png"]], r"NUCLEI_FOLDERS\[0\]: label_format must be one of"),
    ([["tnbc_train", "i", "l"]], r"'tnbc_train' is a built-in data set"),
    ([["a", "i", "l"], ["a", "j", "m"]], r"NUCLEI_FOLDERS\[1\]: data set 'a' is given twice"),
    ([["a", "", "l"]], r"non-empty strings"),
])
def test_config_folders_are_checked_before_anything_is_read(folders, problem):
    from nucseg_d2.config import NucleiConfigError, build_nuclei_cfg

    with pytest.raises(NucleiConfigError, match=problem):
        build_nuclei_cfg(DEMO_CONFIG, ["DATASETS.NUCLEI_FOLDERS", repr(folders)])


def test_config_folders_are_registered_relative_to_the_working_directory(tmp_path, monkeypatch):
    from nucseg_d2.config import build_nuclei_cfg

    images, labels = tmp_path / "data" / "images", tmp_path / "data" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"t{i}.png")
        label_map = np.zeros((8, 8), np.uint16)
        label_map[1:4, 1:4] = 1
        _write_label_png(labels / f"t{i}.png", label_map)
    monkeypatch.chdir(tmp_path)
    name = "test_config_folder_relative"
    cfg = build_nuclei_cfg(DEMO_CONFIG, ["DATASETS.NUCLEI_FOLDERS", repr([[name, "data/images", "data/labels"]])])
    assert datasets.register_config_datasets(cfg) == [name]
    assert datasets.register_config_datasets(cfg) == [name]  # again: a no-op
    monkeypatch.chdir("/")  # the folders were resolved when registered, not when read
    records = DatasetCatalog.get(name)
    assert [r["image_id"] for r in records] == ["t0", "t1"] and len(records[0]["annotations"]) == 1
    monkeypatch.chdir(tmp_path)
    cfg = build_nuclei_cfg(DEMO_CONFIG, ["DATASETS.NUCLEI_FOLDERS", repr([[name, "data/labels", "data/images"]])])
    with pytest.raises(NucleiDataError, match=rf"NUCLEI_FOLDERS\[0\] '{name}': .*already registered"):
        datasets.register_config_datasets(cfg)
    # A missing folder is named at registration, before any training, not when first read.
    cfg = build_nuclei_cfg(DEMO_CONFIG, ["DATASETS.NUCLEI_FOLDERS", repr([["other", "data/images", "data/lables"]])])
    with pytest.raises(NucleiDataError, match=r"NUCLEI_FOLDERS\[0\] 'other': .*data/lables: folder not found"):
        datasets.register_config_datasets(cfg)
    assert "other" not in DatasetCatalog


def test_absolute_nuclei_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/pathologist")
    folders = [["a", "images", "~/labels"], ["b", "/data/i", "/data/l", "tnbc_binary"]]
    assert datasets.absolute_nuclei_folders(folders) == [
        ["a", str(tmp_path / "images"), "/home/pathologist/labels"], ["b", "/data/i", "/data/l", "tnbc_binary"]]


def test_register_nuclei_folder(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    label_maps = {stem: _tiny_label_map(i) for i, stem in enumerate(["a", "b", "c", "d"])}
    for stem in label_maps:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"{stem}.png")
    _write_label_png(labels / "a.png", label_maps["a"])
    np.save(labels / "b.npy", label_maps["b"].astype(np.int32))
    scipy.io.savemat(labels / "c.mat", {"inst_map": label_maps["c"]})
    tifffile.imwrite(labels / "d.tif", label_maps["d"], compression="lzw")
    (labels / "notes.txt").write_text("ignored")
    name = "nucseg_test_user_folder"
    datasets.register_nuclei_folder(name, images, labels)
    datasets.register_nuclei_folder(name, images, labels)  # same arguments: no-op
    try:
        with pytest.raises(ValueError, match="already registered"):
            datasets.register_nuclei_folder(name, labels, images)
        dataset = DatasetCatalog.get(name)
        assert [r["image_id"] for r in dataset] == ["a", "b", "c", "d"]
        for record in dataset:
            expected = label_maps[record["image_id"]]
            decoded = [mask_util.decode(a["segmentation"]) for a in record["annotations"]]
            expected_masks = [expected == i for i in np.unique(expected)[1:]]
            assert len(decoded) == len(expected_masks)
            assert all((d == m).all() for d, m in zip(decoded, expected_masks))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "e.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "f.png")
        with pytest.raises(NucleiDataError, match=r"2 image\(s\) without a label.*e\.png, f\.png"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_nuclei_folder_refuses_labels_without_images_and_labels_of_another_format(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"{stem}.png")
        _write_label_png(labels / f"{stem}.png", _tiny_label_map(0))
    _write_label_png(labels / "c.png", _tiny_label_map(1))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "d.gif")  # not an image suffix read
    _write_label_png(labels / "d.png", _tiny_label_map(2))
    binary_labels = tmp_path / "binary"
    binary_labels.mkdir()
    np.save(binary_labels / "a.npy", np.zeros((8, 8), np.uint8))
    _write_label_png(binary_labels / "b.png", _tiny_label_map(0) > 0)
    names = {"nucseg_test_orphan_labels": (labels, "label_map"),
             "nucseg_test_binary_npy": (binary_labels, "tnbc_binary")}
    for name, (label_dir, label_format) in names.items():
        datasets.register_nuclei_folder(name, images, label_dir, label_format)
    try:
        # The set would otherwise shrink to a and b without a word.
        orphans = r"labels: 2 label\(s\) without an image .* in .*images: c\.png, d\.png"
        with pytest.raises(NucleiDataError, match=orphans):
            DatasetCatalog.get("nucseg_test_orphan_labels")
        # tnbc_binary reads image masks: a.npy is not its label (it was decoded as a corrupt image).
        with pytest.raises(NucleiDataError, match=r"1 image\(s\) without a label \(\.png, \.tif, \.tiff\) .*: a\.png"):
            DatasetCatalog.get("nucseg_test_binary_npy")
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_register_nuclei_folder_is_lazy(tmp_path):
    name = "nucseg_test_lazy_folder"
    datasets.register_nuclei_folder(name, tmp_path / "no_images", tmp_path / "no_labels")
    try:
        with pytest.raises(NucleiDataError, match="no_images"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_synthetic_loader_arguments(tmp_path, monkeypatch):
    from nucseg_d2.data import synthetic
    calls = []

    def fake_split(cache_dir, split, num_images, size, seed):
        calls.append((cache_dir, split, num_images, tuple(size), seed))
        image = tmp_path / f"{split}.png"
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
        _write_label_png(tmp_path / f"{split}_labels.png", np.eye(4))
        return [(str(image), str(tmp_path / f"{split}_labels.png"))]

    monkeypatch.setattr(synthetic, "ensure_synthetic_split", fake_split)
    (record,) = DatasetCatalog.get("nuclei_synthetic_train")
    DatasetCatalog.get("nuclei_synthetic_val")
    cache_dir = str(tmp_path / "cache" / "synthetic")
    assert calls == [(cache_dir, "train", 48, (256, 256), 0), (cache_dir, "val", 8, (256, 256), 1)]
    assert record["label_format"] == "label_map" and len(record["annotations"]) == 1


def test_synthetic_val_end_to_end():
    dataset = DatasetCatalog.get("nuclei_synthetic_val")
    assert len(dataset) == 8
    assert all((r["height"], r["width"]) == (256, 256) and r["annotations"] for r in dataset)


# --------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (REAL_ROOT / "tnbc").is_dir(), reason="real TNBC data absent")
def test_real_tnbc_split_sizes(monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(REAL_ROOT))
    nuclei = 0
    for name, size in TNBC_SIZES.items():
        dataset = DatasetCatalog.get(name)
        assert len(dataset) == size
        assert all((r["height"], r["width"]) == (512, 512) for r in dataset)
        nuclei += sum(len(r["annotations"]) for r in dataset)
    assert nuclei == 4056


@pytest.mark.skipif(not (REAL_ROOT / "kumar").is_dir(), reason="real Kumar data absent")
def test_real_kumar_split_sizes(monkeypatch):
    monkeypatch.setenv("NUCSEG_DATASETS", str(REAL_ROOT))
    for name, size in KUMAR_SIZES.items():
        assert len(DatasetCatalog.get(name)) == size, name
    all_records = DatasetCatalog.get("kumar_train") + DatasetCatalog.get("kumar_test")
    nuclei = sum(len(r["annotations"]) for r in all_records)
    assert nuclei == 16958  # ../shared/data/SOURCES.md, counted by the data's providers
    assert {r["image_id"] for r in DatasetCatalog.get("kumar_val")} == set(KUMAR_VAL_IDS)

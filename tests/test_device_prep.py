"""scripts/prepare_device_data.py: the GPU carry folder holds pixel-identical data that fits."""
import csv
import importlib.util
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from detectron2.data import DatasetCatalog
from PIL import Image

from nucseg_d2.data.readers import NucleiDataError, read_rgb_image

REPO = Path(__file__).resolve().parents[1]
SPLIT_CSV = REPO / "nucseg_d2" / "data" / "splits" / "kumar2017_split.csv"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_device_data", REPO / "scripts" / "prepare_device_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _load_script()
REAL_WORKING_TREE_BYTES = prep.working_tree_bytes
RECTANGLE_XML = (
    "<Annotations><Annotation><Regions><Region><Vertices>"
    '<Vertex X="1" Y="1"/><Vertex X="4" Y="1"/><Vertex X="4" Y="3"/><Vertex X="1" Y="3"/>'
    "</Vertices></Region></Regions></Annotation></Annotations>"
)


@pytest.fixture(autouse=True)
def empty_working_tree(monkeypatch):
    """The checkout these tests run in would count towards the limit; its size is not under test
    (but in test_the_working_tree_that_travels_counts_against_the_limit, which restores it)."""
    monkeypatch.setattr(prep, "working_tree_bytes", lambda repo: 0)


@pytest.fixture()
def kumar_root(tmp_path):
    """Kumar layout with noisy 16x16 TIFFs (noise defeats any lossy codec that sneaks in)."""
    root = tmp_path / "data"
    for folder in ("images", "labels", "xml"):
        (root / "kumar" / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(SPLIT_CSV, newline="") as f:
        for index, row in enumerate(csv.DictReader(f)):
            image_id = row["image_id"]
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            tifffile.imwrite(root / "kumar" / "images" / f"{image_id}.tif", pixels, compression="lzw")
            if index < 2:  # image 0 has polygons only; image 1 has both (its label map wins)
                (root / "kumar" / "xml" / f"{image_id}.xml").write_text(RECTANGLE_XML)
            if index != 0:
                labels = np.zeros((16, 16), np.uint16)
                labels[2:6, 3:9] = 1
                Image.fromarray(labels).save(root / "kumar" / "labels" / f"{image_id}.png")
    return root


@pytest.fixture()
def kit(tmp_path):
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "install.sh").write_text("#!/bin/sh\n")
    return kit


def test_kumar_copy_is_webp_with_identical_pixels_and_loads(kumar_root, kit, tmp_path, monkeypatch):
    dest = tmp_path / "device"
    assert prep.main(["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest)]) == 0
    copies = sorted((dest / "data" / "kumar" / "images").iterdir())
    assert len(copies) == 30 and all(p.suffix == ".webp" for p in copies)
    assert (dest / "kit" / "install.sh").is_file()
    assert len(list((dest / "data" / "kumar" / "labels").iterdir())) == 29
    with open(SPLIT_CSV, newline="") as f:
        polygons_only = next(csv.DictReader(f))["image_id"]
    assert [p.name for p in (dest / "data" / "kumar" / "xml").iterdir()] == [f"{polygons_only}.xml"]
    assert not list((dest / "data").glob("*.partial"))

    monkeypatch.setenv("NUCSEG_DATASETS", str(dest / "data"))
    records = DatasetCatalog.get("kumar_val")
    assert len(records) == 4 and all(r["file_name"].endswith(".webp") for r in records)
    for record in records:
        original = kumar_root / "kumar" / "images" / f"{record['image_id']}.tif"
        assert np.array_equal(read_rgb_image(record["file_name"]), read_rgb_image(str(original)))


def test_original_tiff_is_preferred_and_a_lossy_copy_is_never_used(kumar_root, monkeypatch):
    images = kumar_root / "kumar" / "images"
    monkeypatch.setenv("NUCSEG_DATASETS", str(kumar_root))
    first_test_id = DatasetCatalog.get("kumar_test")[0]["image_id"]
    prep.reencode_lossless_webp(images / f"{first_test_id}.tif", images / f"{first_test_id}.webp")
    assert DatasetCatalog.get("kumar_test")[0]["file_name"].endswith(f"{first_test_id}.tif")
    (images / f"{first_test_id}.tif").rename(images / f"{first_test_id}.jpg")
    (images / f"{first_test_id}.webp").unlink()
    with pytest.raises(NucleiDataError, match=rf"{first_test_id}\.tif"):
        DatasetCatalog.get("kumar_test")


def test_a_corrupt_image_leaves_the_previous_carry_folder_intact(kumar_root, kit, tmp_path):
    dest = tmp_path / "device"
    args = ["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest)]
    assert prep.main(args) == 0
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    victim = sorted((kumar_root / "kumar" / "images").iterdir())[5]
    victim.write_bytes(b"not a tiff")
    assert prep.main(args) == 2
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_refuses_a_lossy_target_and_unknown_sets(tmp_path, kumar_root, kit):
    sixteen_bit = tmp_path / "deep.tif"
    tifffile.imwrite(sixteen_bit, np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(prep.DevicePrepError, match=r"deep\.tif.*8-bit RGB"):
        prep.reencode_lossless_webp(sixteen_bit, tmp_path / "deep.webp")
    assert prep.main(["cpm17", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(tmp_path / "d")]) == 2
    assert prep.main(["tnbc", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(tmp_path / "d")]) == 2


def test_over_the_carry_limit_is_an_error(kumar_root, kit, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CARRY_LIMIT_BYTES", 1000)
    dest = tmp_path / "device"
    assert prep.main(["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest)]) == 3
    assert not (dest / "data").exists() and not (dest / "kit").exists() and not (dest / ".partial").exists()


def _write_wheel(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, payload in entries.items():
            wheel.writestr(name, payload)


def test_detectron2_wheel_travels_without_its_compiled_extension_and_copies_are_writable(kumar_root, kit, tmp_path):
    detectron2_entries = {
        "detectron2/__init__.py": b"__version__ = '0.7.2'\n",
        "detectron2/_C.cpython-310-x86_64-linux-gnu.so": bytes(range(256)) * 64,
        "detectron2/layers/nms.py": b"def nms(): pass\n",
        "sal_detectron2-0.7.2.dist-info/RECORD": b"detectron2/__init__.py,,\n",
    }
    _write_wheel(kit / "wheels" / "sal_detectron2-0.7.2-cp310-none-any.whl", detectron2_entries)
    _write_wheel(kit / "wheels" / "pycocotools-2.0-cp312-abi3-linux.whl", {"pycocotools/_mask.so": b"\x7fELF"})
    for path in [kit, *kit.rglob("*")]:  # the shared kit is read-only
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    dest = tmp_path / "device"
    args = ["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest)]
    assert prep.main(args) == 0

    with zipfile.ZipFile(dest / "kit" / "wheels" / "sal_detectron2-0.7.2-cp310-none-any.whl") as slim:
        kept = {name: slim.read(name) for name in slim.namelist()}
    assert kept == {name: data for name, data in detectron2_entries.items() if not name.endswith(".so")}
    other = "pycocotools-2.0-cp312-abi3-linux.whl"
    assert (dest / "kit" / "wheels" / other).read_bytes() == (kit / "wheels" / other).read_bytes()
    assert all(p.stat().st_mode & stat.S_IWUSR for p in [dest, *dest.rglob("*")])
    assert prep.main(args) == 0  # the writable copies can be replaced by the next run


def test_a_corrupt_detectron2_wheel_is_named(kumar_root, kit, tmp_path, capsys):
    (kit / "wheels" / "sal_detectron2-0.7.2-cp310-none-any.whl").write_bytes(b"not a zip")
    dest = tmp_path / "device"
    assert prep.main(["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest)]) == 2
    assert "sal_detectron2-0.7.2-cp310-none-any.whl: not a readable wheel" in capsys.readouterr().err
    assert not dest.exists() or not list(dest.iterdir())


def test_the_working_tree_that_travels_counts_against_the_limit(kumar_root, kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prep, "working_tree_bytes", REAL_WORKING_TREE_BYTES)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("output/\n")
    (repo / "tracked.txt").write_bytes(b"t" * 100)
    (repo / "untracked.txt").write_bytes(b"u" * 50)
    (repo / "output").mkdir()
    (repo / "output" / "ignored.bin").write_bytes(b"i" * 10_000)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.txt"], check=True)
    assert prep.working_tree_bytes(str(repo)) == 100 + 50 + len("output/\n")
    assert prep.working_tree_bytes(str(tmp_path / "not_a_checkout")) is None

    dest = tmp_path / "device"
    args = ["kumar", "--data-root", str(kumar_root), "--kit", str(kit), "--dest", str(dest), "--repo", str(repo)]
    assert prep.main(args) == 0
    carry = prep.folder_bytes(dest)
    before = {p.relative_to(dest): p.stat().st_mtime_ns for p in dest.rglob("*")}
    monkeypatch.setattr(prep, "CARRY_LIMIT_BYTES", carry + 100)  # the carry fits alone, not with the tree
    capsys.readouterr()
    assert prep.main(args) == 3
    assert "MiB of working tree" in capsys.readouterr().err
    assert {p.relative_to(dest): p.stat().st_mtime_ns for p in dest.rglob("*")} == before  # the old carry stays

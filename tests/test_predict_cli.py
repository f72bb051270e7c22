"""nucseg-predict end to end: a folder with a corrupt file, resuming, bad setups, slides, and
sharding over 2 CPU processes (gloo) through Detectron2's launch."""
import csv
import errno
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import weakref

import numpy as np
import pytest
import tifffile
import torch
from detectron2.modeling import build_model
from PIL import Image

from nucseg_d2.data.synthetic import generate_tile
from nucseg_d2.predict.cli import (DEFAULT_FORMATS, FORMATS, _encodable_file_name, build_parser, expand_inputs, main,
                                   write_outputs)
from nucseg_d2.predict.predictor import build_predict_cfg
from nucseg_d2.predict.result import PredictionResult
from nucseg_d2.predict.slides import ArraySource, write_pyramidal_tiff

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.yaml")
# Few proposals keep the untrained demo model fast on the CPU.
FAST = ["--opts", "MODEL.RPN.POST_NMS_TOPK_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "32"]


def _images(folder, count, size=(96, 128)):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        image, _ = generate_tile(np.random.default_rng(i), size)
        paths.append(os.path.join(folder, f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def _run(inputs, output, weights, *extra, opts=()):
    return main([*inputs, "--config-file", CONFIG, "--weights", weights, "--output", str(output),
                 "--quiet", *extra, *FAST, *opts])


def test_folder_with_a_corrupt_file_reports_it_and_finishes_the_rest(tmp_path, untrained_demo_weights, capsys):
    folder = tmp_path / "in"
    good = _images(folder, 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "empty.tif").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")  # ignored in a folder
    output = tmp_path / "out"
    assert _run([str(folder)], output, untrained_demo_weights) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "broken.png" in errors[0] and "empty.tif" in errors[1]
    assert "4 inputs: 2 done, 0 skipped (outputs exist), 2 failed" in captured.out
    for path in good:
        stem = os.path.splitext(os.path.basename(path))[0]
        for name in DEFAULT_FORMATS:
            assert (output / (stem + FORMATS[name])).is_file(), name
    labels = tifffile.imread(output / "img0_labels.tif")
    assert labels.shape == (96, 128) and labels.dtype in (np.uint16, np.uint32)
    assert json.loads((output / "img0.geojson").read_text())["type"] == "FeatureCollection"
    assert not list(output.glob("broken*")) and not list(output.glob(".*.tmp"))

    # Re-run: finished inputs are skipped, the broken one is tried (and reported) again; what a
    # killed writer left of an output is removed.
    stamp = os.path.getmtime(output / "img0_labels.tif")
    (output / ".img0_labels.tif.0123456789ab.tmp").write_bytes(b"half a label map")
    assert _run([str(folder)], output, untrained_demo_weights) == 1
    out = capsys.readouterr().out
    assert "0 done, 2 skipped (outputs exist), 2 failed" in out
    assert "img0.png: removed 1 temp file(s) left by an interrupted run" in out
    assert not list(output.glob(".*.tmp"))
    assert os.path.getmtime(output / "img0_labels.tif") == stamp
    # A missing output makes its input run again, writing only what is missing: a GeoJSON
    # edited (in QuPath, say) since is kept; --overwrite redoes everything.
    os.remove(output / "img1_overlay.png")
    (output / "img1.geojson").write_text('{"edited": true}')
    assert _run(good, output, untrained_demo_weights) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 skipped" in out and "img1.png: keeping its existing coco, csv, geojson, labels" in out
    assert (output / "img1_overlay.png").is_file()
    assert (output / "img1.geojson").read_text() == '{"edited": true}'
    assert _run(good, output, untrained_demo_weights, "--overwrite", "--formats", "labels") == 0
    assert "2 done, 0 skipped" in capsys.readouterr().out
    # The same file and settings: the outputs not asked for are kept.
    assert (output / "img1.geojson").read_text() == '{"edited": true}'
    # Other settings into the same folder: skipping its outputs would mix two runs' predictions.
    stamp = os.path.getmtime(output / "img0_labels.tif")
    assert _run(good, output, untrained_demo_weights, "--roi", "0", "0", "64", "64") == 2
    assert re.search(r"error: .*out holds predictions made with other settings \(roi: see .*"
                     r"nucseg_predict_settings.json\)", capsys.readouterr().err)
    assert os.path.getmtime(output / "img0_labels.tif") == stamp
    assert _run(good, output, untrained_demo_weights, "--roi", "0", "0", "64", "64", "--overwrite",
                "--formats", "labels") == 0
    assert tifffile.imread(output / "img0_labels.tif").shape == (64, 64)
    assert json.loads((output / "nucseg_predict_settings.json").read_text())["roi"] == [0, 0, 64, 64]
    # The same weights copied elsewhere are the same settings (other machines, a moved checkout).
    copied = tmp_path / "copied.pth"
    copied.write_bytes(open(untrained_demo_weights, "rb").read())
    assert _run(good, output, str(copied), "--roi", "0", "0", "64", "64", "--formats", "labels") == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_glob_list_file_and_all_background_image(tmp_path, untrained_demo_weights, capsys):
    paths = _images(tmp_path / "in", 2, size=(64, 64))
    blank = str(tmp_path / "in" / "blank.jpg")
    Image.fromarray(np.full((80, 80, 3), 240, np.uint8)).save(blank)
    listing = tmp_path / "list.txt"
    listing.write_text("# inputs\nin/img1.png\n\nin/blank.jpg\n")
    assert expand_inputs([str(listing)]) == [str(tmp_path / "in" / "img1.png"), blank]
    assert expand_inputs([str(tmp_path / "in" / "*.png"), paths[0]]) == paths
    output = tmp_path / "out"
    assert _run([str(listing)], output, untrained_demo_weights, "--formats", "labels", "csv",
                opts=["TEST.NUCLEI.SCORE_THRESH", "1.0"]) == 0
    assert "2 inputs: 2 done" in capsys.readouterr().out
    assert tifffile.imread(output / "blank_labels.tif").max() == 0
    assert (output / "blank_nuclei.csv").read_text().splitlines() == [  # no nuclei: the header alone
        "image,id,centroid_x,centroid_y,area_px,perimeter_px,eccentricity,solidity,major_axis_px,minor_axis_px,"
        "score,mean_r,mean_g,mean_b,mean_haematoxylin,mean_eosin"]
    document = tmp_path / "report.docx"
    document.write_bytes(b"PK\x03\x04")
    assert _run([str(document)], tmp_path / "out_document", untrained_demo_weights) == 1
    assert re.search(r"error: .*report.docx: unsupported format .docx", capsys.readouterr().err)


def test_list_files_with_a_byte_order_mark_or_not_utf8(tmp_path, untrained_demo_weights, capsys):
    # Notepad's "UTF-8" starts with a byte-order mark; it must not become part of the first path.
    listing = tmp_path / "list.txt"
    listing.write_bytes("in/img0.png\r\nin/Estómago 1.png\r\n".encode("utf-8-sig"))
    assert expand_inputs([str(listing)]) == [str(tmp_path / "in" / name) for name in ("img0.png", "Estómago 1.png")]
    # Windows PowerShell's `>` writes UTF-16: one line naming the list, not a traceback.
    listing.write_bytes("in/img0.png\n".encode("utf-16"))
    assert _run([str(listing)], tmp_path / "out", untrained_demo_weights) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {listing}: input list is not UTF-8 text") and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path / "out")


def test_weights_from_the_config_are_recorded_by_content(tmp_path, untrained_demo_weights, capsys):
    images = _images(tmp_path / "in", 2, size=(64, 64))
    weights = tmp_path / "w.pth"
    weights.write_bytes(open(untrained_demo_weights, "rb").read())
    output = tmp_path / "out"

    def run(inputs, checkpoint=weights):  # no --weights: MODEL.WEIGHTS through --opts
        return main([*inputs, "--config-file", CONFIG, "--output", str(output), "--quiet", "--formats", "labels",
                     *FAST, "MODEL.WEIGHTS", str(checkpoint)])

    assert run(images[:1]) == 0
    settings = json.loads((output / "nucseg_predict_settings.json").read_text())
    assert settings["weights"] == {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    capsys.readouterr()
    # Retrained weights saved under the same name: skipping img0 and predicting img1 would give a
    # folder of two models' predictions.
    state = torch.load(untrained_demo_weights, map_location="cpu")
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key] + 1
    torch.save(state, weights)
    stamp = os.path.getmtime(output / "img0_labels.tif")
    assert run(images) == 2
    err = capsys.readouterr().err
    assert f"holds predictions made with other settings (weights {weights}: see" in err
    assert sorted(os.listdir(output)) == [".img0.nucseg_input.json", "img0_labels.tif", "nucseg_predict_settings.json"]
    assert os.path.getmtime(output / "img0_labels.tif") == stamp
    assert run(images, tmp_path / "missing.pth") == 2
    assert f"{tmp_path / 'missing.pth'}: checkpoint file not found (MODEL.WEIGHTS of the config)" in \
        capsys.readouterr().err


def test_setup_errors_are_one_clear_line(tmp_path, untrained_demo_weights, capsys):
    image = _images(tmp_path / "in", 1)[0]
    occupied = tmp_path / "file"
    occupied.write_text("")
    assert _run([image], occupied, untrained_demo_weights) == 2
    assert re.search(r"error: output folder .*file cannot be written", capsys.readouterr().err)
    assert _run([image], tmp_path / "out", str(tmp_path / "missing.pth")) == 2
    assert "missing.pth: checkpoint file not found" in capsys.readouterr().err
    # An address (detectron2://, https://) is no file to look for: Detectron2's PathManager fetches it
    # (here a test-only prefix in front of a local path, since nothing can be downloaded).
    from detectron2.utils.file_io import PathManager
    from iopath.common.file_io import PathHandler

    class LocalPathHandler(PathHandler):
        def _get_supported_prefixes(self):
            return ["nucseg-cli-test://"]

        def _get_local_path(self, path, **kwargs):
            return path[len("nucseg-cli-test://"):]

    if "nucseg-cli-test://" not in PathManager._path_handlers:
        PathManager.register_handler(LocalPathHandler())
    assert _run([image], tmp_path / "by_address", f"nucseg-cli-test://{untrained_demo_weights}") == 0
    assert os.path.isfile(tmp_path / "by_address" / "img0_labels.tif")
    other = build_model(build_predict_cfg(os.path.join(REPO, "configs", "demo_maskrcnn.yaml"),
                                          ["MODEL.DEVICE", "cpu"]))
    wrong = str(tmp_path / "maskrcnn.pth")
    torch.save({"model": other.state_dict()}, wrong)
    assert _run([image], tmp_path / "out", wrong) == 2
    err = capsys.readouterr().err
    assert "maskrcnn.pth: checkpoint does not match" in err and "roi_heads.mask_head." in err
    assert not os.listdir(tmp_path / "out")  # nothing written
    twin = tmp_path / "other" / "img0.jpg"
    twin.parent.mkdir()
    Image.open(image).convert("RGB").save(twin)
    assert _run([image, str(twin)], tmp_path / "out", untrained_demo_weights) == 2
    assert "share a name" in capsys.readouterr().err
    twin.rename(twin.with_name("IMG0.jpg"))  # one file on a case-insensitive file system
    assert _run([image, str(twin.with_name("IMG0.jpg"))], tmp_path / "out", untrained_demo_weights) == 2
    assert "share a name" in capsys.readouterr().err
    assert _run([image], tmp_path / "out", untrained_demo_weights, "--batch-size", "-1") == 2
    assert "error: --batch-size must be >= 1 (got -1)" in capsys.readouterr().err
    assert _run([image], tmp_path / "out", untrained_demo_weights, "--mpp", "0") == 2
    assert "error: --mpp must be > 0 micrometres per pixel (got 0.0)" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "out")


def test_output_folder_may_be_the_input_folder(tmp_path, untrained_demo_weights, capsys):
    folder = tmp_path / "in"
    _images(folder, 2, size=(64, 64))
    assert _run([str(folder)], folder, untrained_demo_weights) == 0
    captured = capsys.readouterr()
    assert "2 inputs: 2 done" in captured.out and "note:" not in captured.err
    assert (folder / "img0_labels.tif").is_file() and (folder / "img1_overlay.png").is_file()
    # On the re-run the outputs lying beside the images are not taken for new inputs.
    assert _run([str(folder)], folder, untrained_demo_weights) == 0
    captured = capsys.readouterr()
    assert "2 inputs: 0 done, 2 skipped" in captured.out
    assert "note: 4 file(s) in the output folder named as nucseg-predict outputs" in captured.err


def test_slide_with_level_and_roi(tmp_path, untrained_demo_weights):
    image, _ = generate_tile(np.random.default_rng(0), (512, 512))
    slide = str(tmp_path / "slide.tif")
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 512, 512, num_levels=2)
    output = tmp_path / "out"
    assert _run([slide], output, untrained_demo_weights, "--level", "1", "--roi", "64", "32", "256", "300",
                "--tile-size", "96", "--overlap", "32", opts=["TEST.NUCLEI.SCORE_THRESH", "0.0"]) == 0
    with tifffile.TiffFile(output / "slide_labels.tif") as labels:
        assert labels.pages[0].shape == (150, 128)
        placement = json.loads(labels.pages[0].description)["nucseg_d2"]
    assert placement == {"origin_level0": [64, 32], "downsample": 2.0, "mpp": 0.5}  # 0.25 µm at level 0
    features = json.loads((output / "slide.geojson").read_text())["features"]
    assert features
    # Outlines are in level-0 coordinates, inside the ROI.
    exteriors = [polygon[0] for f in features for polygon in (
        [f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon" else f["geometry"]["coordinates"])]
    xs = [x for ring in exteriors for x, _ in ring]
    ys = [y for ring in exteriors for _, y in ring]
    assert 64 <= min(xs) and max(xs) <= 64 + 256 and 32 <= min(ys) and max(ys) <= 32 + 300


def test_options_reach_the_predictor_and_parquet_matches_csv(tmp_path, untrained_demo_weights, monkeypatch):
    import pyarrow.parquet

    import nucseg_d2.predict.predictor as predictor_module

    calls = []

    class RecordingPredictor(predictor_module.NucleiPredictor):
        def __init__(self, *args, **kwargs):
            calls.append(("init", kwargs))
            super().__init__(*args, **kwargs)

        def predict_source(self, source, **kwargs):
            calls.append(("predict", dict(kwargs, level=getattr(source, "level", 0))))
            return super().predict_source(source, **kwargs)

    monkeypatch.setattr(predictor_module, "NucleiPredictor", RecordingPredictor)
    image, _ = generate_tile(np.random.default_rng(0), (256, 256))
    slide = str(tmp_path / "slide.tif")
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 256, 256, num_levels=2)  # 0.25, 0.5 µm
    for mode, tissue in (("on", True), ("off", False), ("auto", "auto")):
        output = tmp_path / f"out_{mode}"
        calls.clear()
        assert _run([slide], output, untrained_demo_weights, "--tta", "--tissue-mask", mode, "--mpp", "0.5",
                    "--tile-size", "128", "--overlap", "32", "--formats", "labels", "csv", "parquet",
                    opts=["TEST.NUCLEI.SCORE_THRESH", "0.0"]) == 0
        (_, init), (_, predict) = calls
        assert init["tta"] is True and (init["tile_size"], init["overlap"]) == (128, 32)
        # --mpp 0.5 picks level 1; a 128² map is far below --label-map-ram-gib's default.
        assert predict == {"tissue_mask": tissue, "level": 1, "label_map_file": None}
        assert tifffile.imread(output / "slide_labels.tif").shape == (128, 128)
    with open(output / "slide_nuclei.csv") as stream:
        rows = list(csv.DictReader(stream))
    table = pyarrow.parquet.read_table(output / "slide_nuclei.parquet").to_pylist()
    assert rows and len(table) == len(rows) and list(table[0]) == list(rows[0])
    for row, record in zip(rows, table):
        assert row.pop("image") == record.pop("image") == "slide.tif"
        assert all(float(row[key]) == pytest.approx(float(record[key])) for key in row), (row, record)


def test_two_cpu_processes_shard_the_inputs(tmp_path, untrained_demo_weights):
    _images(tmp_path / "in", 5, size=(64, 64))
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    paths = expand_inputs([str(tmp_path / "in")])  # broken.png, img0.png, ..., img4.png
    output = tmp_path / "out"
    command = [sys.executable, "-m", "nucseg_d2.predict", str(tmp_path / "in"), "--config-file", CONFIG,
               "--weights", untrained_demo_weights, "--output", str(output), "--formats", "labels", "--quiet",
               "--num-gpus", "2", "--dist-url", "auto", *FAST]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr[-3000:]  # one input failed
    done = {}
    for rank, path in re.findall(r"\[rank (\d)\] (\S+): \d+ nuclei", run.stdout):
        done.setdefault(int(rank), []).append(path)
    assert done == {0: paths[2::2], 1: paths[1::2]}  # rank r takes inputs[r::2]
    assert re.search(r"\[rank 0\] error: .*broken.png", run.stderr)
    assert "6 inputs: 5 done, 0 skipped (outputs exist), 1 failed" in run.stdout
    expected = [f".img{i}.nucseg_input.json" for i in range(5)] + [f"img{i}_labels.tif" for i in range(5)]
    assert sorted(os.listdir(output)) == sorted(expected + ["nucseg_predict_settings.json"])


def test_an_input_too_large_for_coco_gets_its_other_outputs(tmp_path, untrained_demo_weights, capsys,
                                                             monkeypatch):
    # A whole slide at full resolution has more pixels than COCO RLE's 32-bit run lengths hold;
    # the limit is lowered so that a 96x128 image stands for one (a 64x64 image stays under it).
    from nucseg_d2.predict import writers

    monkeypatch.setattr(writers, "COCO_MAX_PIXELS", 100 * 100)
    small, large = str(tmp_path / "small.png"), str(tmp_path / "large.png")
    Image.fromarray(generate_tile(np.random.default_rng(0), (64, 64))[0]).save(small)
    Image.fromarray(generate_tile(np.random.default_rng(1), (96, 128))[0]).save(large)
    output = tmp_path / "out"
    assert _run([small, large], output, untrained_demo_weights) == 0
    captured = capsys.readouterr()
    assert "2 done, 0 skipped" in captured.out
    assert re.search(r"large.png: no coco output: 128x96 px is too large for COCO RLE", captured.err)
    assert sorted(p.name for p in output.glob("large*")) == [
        "large.geojson", "large_labels.tif", "large_nuclei.csv", "large_overlay.png"]
    assert (output / "small_coco.json").is_file()
    # Re-run: the large input is not predicted again for an output it can never have.
    assert _run([large], output, untrained_demo_weights) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    # Asked for COCO alone, it fails with the reason.
    assert _run([large], tmp_path / "coco_only", untrained_demo_weights, "--formats", "coco") == 1
    assert re.search(r"large.png: 128x96 px is too large for COCO RLE", capsys.readouterr().err)


def test_a_failing_output_does_not_keep_the_others_from_being_written(tmp_path, untrained_demo_weights,
                                                                    capsys, monkeypatch):
    from nucseg_d2.predict import writers

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(writers, "write_geojson", full_disk)
    image = _images(tmp_path / "in", 1)[0]
    output = tmp_path / "out"
    assert _run([image], output, untrained_demo_weights) == 1
    error = capsys.readouterr().err
    assert re.search(r"img0.png: geojson output not written \(OSError: .*No space left on device.*\); "
                     r"written: labels, coco, csv, overlay", error)
    assert sorted(p.name for p in output.iterdir()) == [
        ".img0.nucseg_input.json", "img0_coco.json", "img0_labels.tif", "img0_nuclei.csv", "img0_overlay.png",
        "nucseg_predict_settings.json"]


def test_a_label_map_over_the_ram_limit_lives_in_a_scratch_file_until_written(tmp_path, untrained_demo_weights,
                                                                            capsys, monkeypatch):
    from nucseg_d2.predict import cli, writers

    slide = str(tmp_path / "slide.tif")
    image, _ = generate_tile(np.random.default_rng(0), (128, 160))
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 128, 160, num_levels=1)
    options = ["--tile-size", "256", "--overlap", "32"]
    opts = ["TEST.NUCLEI.SCORE_THRESH", "0.0"]
    assert _run([slide], tmp_path / "in_ram", untrained_demo_weights, *options, opts=opts) == 0
    assert tifffile.imread(tmp_path / "in_ram" / "slide_labels.tif").max() > 0
    # 160 x 128 px x 4 bytes = 0.078 MiB: over a limit of 0.07 MiB. While the outputs are written,
    # the map is a memory-mapped .npy file in the output folder, named as a temp file.
    maps_seen = []
    write_geojson = writers.write_geojson

    def recording_write_geojson(path, result):
        maps_seen.append((type(result.label_map), sorted(os.listdir(os.path.dirname(path)))))
        return write_geojson(path, result)

    monkeypatch.setattr(writers, "write_geojson", recording_write_geojson)
    output = tmp_path / "on_disk"
    assert _run([slide], output, untrained_demo_weights, *options, "--label-map-ram-gib", str(0.07 / 1024),
                opts=opts) == 0
    ((map_type, listing),) = maps_seen
    assert map_type is np.memmap
    assert [name for name in listing if re.fullmatch(r"\.slide_labels\.npy\.[0-9a-f]{12}\.tmp", name)]
    for suffix in (FORMATS[name] for name in DEFAULT_FORMATS):  # the same outputs as from memory
        assert (output / f"slide{suffix}").read_bytes() == (tmp_path / "in_ram" / f"slide{suffix}").read_bytes()
    assert not list(output.glob(".*.tmp"))  # the scratch file is gone
    # One map under the limit stays in memory.
    maps_seen.clear()
    assert _run([slide], tmp_path / "small", untrained_demo_weights, *options, "--label-map-ram-gib", str(0.08 / 1024),
                opts=opts) == 0
    assert maps_seen[0][0] is np.ndarray
    # What a killed run left is removed when the input is run again.
    capsys.readouterr()
    (output / ".slide_labels.npy.0123456789ab.tmp").write_bytes(b"half a label map")
    os.remove(output / "slide_overlay.png")
    assert _run([slide], output, untrained_demo_weights, *options, opts=opts) == 0
    assert "slide.tif: removed 1 temp file(s) left by an interrupted run" in capsys.readouterr().out
    assert not list(output.glob(".*.tmp"))
    # A limit that is no size is refused before anything runs.
    for bad in ("-1", "nan", "inf"):
        assert _run([slide], tmp_path / "bad", untrained_demo_weights, "--label-map-ram-gib", bad) == 2
        assert f"--label-map-ram-gib must be a number >= 0 (got {float(bad)})" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli.label_map_scratch_target(slide, str(output)) == str(output / "slide_labels.npy")


def test_a_folder_filled_before_mpp_resampled_is_not_mixed_with_resampled_outputs(tmp_path, untrained_demo_weights,
                                                                                capsys):
    image, _ = generate_tile(np.random.default_rng(0), (128, 128))
    slide = str(tmp_path / "slide.tif")
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 128, 128, num_levels=1)
    output = tmp_path / "out"
    assert _run([slide], output, untrained_demo_weights, "--mpp", "0.25", "--formats", "labels") == 0
    settings_file = output / "nucseg_predict_settings.json"
    settings = json.loads(settings_file.read_text())
    assert settings["mpp_rule"] == "the level within 10 %, else resampled" and settings["mpp"] == 0.25
    del settings["mpp_rule"]  # as --mpp recorded its settings before it resampled
    settings_file.write_text(json.dumps(settings))
    (output / ".slide.nucseg_input.json").unlink()  # nor were records of inputs kept then
    capsys.readouterr()
    assert _run([slide], output, untrained_demo_weights, "--mpp", "0.25", "--formats", "labels", "geojson") == 2
    assert "holds predictions made with other settings (mpp_rule: see" in capsys.readouterr().err
    assert not (output / "slide.geojson").exists()
    # Without --mpp nothing changed: such folders still take the run.
    settings_file.write_text(json.dumps(dict(settings, mpp=None)))
    assert _run([slide], output, untrained_demo_weights, "--formats", "labels") == 0


def test_a_failed_input_releases_its_scratch_label_map_and_a_full_disk_is_found_first(
        tmp_path, untrained_demo_weights, capsys, monkeypatch):
    from nucseg_d2.predict import cli, writers

    slide = str(tmp_path / "slide.tif")
    image, _ = generate_tile(np.random.default_rng(0), (128, 160))
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 128, 160, num_levels=1)
    maps = []

    def full_disk(path, result):
        maps.append(weakref.ref(result.label_map))
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(writers, "write_geojson", full_disk)
    output = tmp_path / "out"
    # With automatic collection off, only the explicit collection after a failed input frees the
    # map that the writer's exception chain holds in a reference cycle (its file's disk space).
    gc.disable()
    try:
        assert _run([slide], output, untrained_demo_weights, "--tile-size", "256", "--label-map-ram-gib", "0",
                    opts=["TEST.NUCLEI.SCORE_THRESH", "0.0"]) == 1
        assert len(maps) == 1 and maps[0]() is None
    finally:
        gc.enable()
    assert "geojson output not written" in capsys.readouterr().err
    assert not list(output.glob(".*.tmp")) and (output / "slide_labels.tif").is_file()
    # A folder without room for the scratch file is named before the slide is predicted.
    import nucseg_d2.predict.predictor as predictor_module

    def never_predicted(*args, **kwargs):
        raise AssertionError("predicted although the scratch file cannot be written")

    monkeypatch.setattr(cli.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10_000, 9_000, 1_000))
    monkeypatch.setattr(predictor_module.NucleiPredictor, "predict_source", never_predicted)
    assert _run([slide], output, untrained_demo_weights, "--tile-size", "256", "--label-map-ram-gib", "0",
                "--overwrite") == 1
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(output))}: no room for the 160x128 label map's scratch file \(0.00 GiB "
                     r"needed, 0.00 GiB free\); free some, or raise --label-map-ram-gib", err)
    assert "OSError" not in err  # one line of ours, not an exception's repr


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, untrained_demo_weights, capsys):
    import fcntl

    image = _images(tmp_path / "in", 1, size=(64, 64))[0]
    output = tmp_path / "out"
    output.mkdir()
    held = os.open(output, os.O_RDONLY)  # as a running nucseg-predict holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _run([image], output, untrained_demo_weights, "--formats", "labels") == 2
        assert f"error: {output}: another nucseg-predict run is writing there" in capsys.readouterr().err
        assert os.listdir(output) == []
    finally:
        os.close(held)
    assert _run([image], output, untrained_demo_weights, "--formats", "labels") == 0
    assert _run([image], output, untrained_demo_weights, "--formats", "labels", "--overwrite") == 0  # released


def test_an_input_at_another_scale_than_the_training_data_is_warned_of(tmp_path, untrained_demo_weights, capsys):
    slide = str(tmp_path / "scan20x.tif")
    image, _ = generate_tile(np.random.default_rng(0), (128, 128))
    write_pyramidal_tiff(slide, lambda y0, y1, x0, x1: image[y0:y1, x0:x1], 128, 128, num_levels=2, mpp=0.5)
    assert _run([slide], tmp_path / "as_is", untrained_demo_weights, "--formats", "labels") == 0
    captured = capsys.readouterr()
    assert (f"{slide}: warning: analysed at 0.500 µm/px, but the model was trained at 0.25 "
            "(TEST.NUCLEI.TRAINING_MPP): nuclei at another scale are found worse; --mpp 0.25 resamples to it"
            in captured.err)
    assert re.search(r"scan20x.tif: \d+ nuclei, 128x128 px at 0.500 µm/px \(level 0\), ", captured.out)
    assert f"{slide}: predicted; writing labels\n" in captured.out  # before the minutes a slide's outputs take
    assert _run([slide], tmp_path / "resampled", untrained_demo_weights, "--formats", "labels", "--mpp", "0.25") == 0
    captured = capsys.readouterr()
    assert "warning: analysed at" not in captured.err
    assert re.search(r"scan20x.tif: \d+ nuclei, 256x256 px at 0.250 µm/px \(resampled from level 0\), ", captured.out)
    # A config that does not know its training scale does not warn.
    assert _run([slide], tmp_path / "unknown", untrained_demo_weights, "--formats", "labels",
                opts=["TEST.NUCLEI.TRAINING_MPP", "0.0"]) == 0
    assert "warning: analysed at" not in capsys.readouterr().err


def test_outputs_of_another_file_or_other_settings_are_not_taken_as_done(tmp_path, untrained_demo_weights, capsys):
    first, second = tmp_path / "batch1", tmp_path / "batch2"
    image = _images(first, 1, size=(64, 64))[0]
    other = _images(second, 2, size=(64, 80))[1]  # batch2/img1.png
    os.replace(other, second / "img0.png")  # another slide with the same file name
    output = tmp_path / "out"
    assert _run([image], output, untrained_demo_weights, "--formats", "labels") == 0
    record = json.loads((output / ".img0.nucseg_input.json").read_text())
    assert record["file"] == "img0.png" and record["size"] == os.path.getsize(image)
    capsys.readouterr()
    assert _run([image], output, untrained_demo_weights, "--formats", "labels") == 0  # its own: skipped
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert _run([str(second / "img0.png")], output, untrained_demo_weights, "--formats", "labels") == 1
    assert re.search(r"error: .*batch2/img0.png: the outputs named img0\* in .*out were made from another file "
                     r"\(img0.png, \d+ bytes; this one has \d+\); give another --output, or --overwrite",
                     capsys.readouterr().err)
    # An --overwrite run over other inputs that changes the folder's settings leaves this input's
    # outputs made with the old ones: they are not skipped under the new settings.
    two = _images(tmp_path / "more", 2, size=(64, 64))
    assert _run(two, tmp_path / "mixed", untrained_demo_weights, "--formats", "labels") == 0
    assert _run(two[1:], tmp_path / "mixed", untrained_demo_weights, "--formats", "labels", "--overwrite",
                "--overlap", "16") == 0
    capsys.readouterr()
    assert _run(two, tmp_path / "mixed", untrained_demo_weights, "--formats", "labels", "--overlap", "16") == 1
    captured = capsys.readouterr()
    assert re.search(r"more/img0.png: its outputs in .*mixed were made with other settings than the folder's "
                     r"nucseg_predict_settings.json", captured.err)
    assert "0 done, 1 skipped (outputs exist), 1 failed" in captured.out
    # Outputs of any format count: asking the other file for a format not written yet fails too.
    assert _run([str(second / "img0.png")], output, untrained_demo_weights, "--formats", "geojson") == 1
    assert "were made from another file" in capsys.readouterr().err and not (output / "img0.geojson").exists()
    # --overwrite takes the input over: the outputs the other file made are removed in every
    # format, not only those asked for, so none is later taken as the new file's.
    (output / "img0.geojson").write_text("{}")  # as if written by the first file
    assert _run([str(second / "img0.png")], output, untrained_demo_weights, "--formats", "csv", "--overwrite") == 0
    assert sorted(p.name for p in output.glob("img0*")) == ["img0_nuclei.csv"]
    assert json.loads((output / ".img0.nucseg_input.json").read_text())["size"] == os.path.getsize(second / "img0.png")
    # A record that is no JSON object is one line, not a traceback.
    (output / ".img0.nucseg_input.json").write_text("[]")
    assert _run([str(second / "img0.png")], output, untrained_demo_weights, "--formats", "csv") == 1
    assert re.search(r"error: .*\.img0\.nucseg_input\.json: cannot read which input made the outputs there "
                     r"\(not a JSON object\); --overwrite to redo", capsys.readouterr().err)


def test_no_label_pyramid_leaves_the_levels_out(tmp_path):
    parser = build_parser()
    required = ["in.png", "--config-file", "c.yaml", "--output", str(tmp_path)]
    assert parser.parse_args(required).label_pyramid is True
    assert parser.parse_args(required + ["--no-label-pyramid"]).label_pyramid is False
    result = PredictionResult(np.ones((2100, 2100), np.uint16), np.ones(1, np.float32))
    source = ArraySource(np.zeros((2100, 2100, 3), np.uint8), path="in.png")
    for label_pyramid, num_pages in ((True, 3), (False, 1)):
        path = tmp_path / f"pyramid_{label_pyramid}_labels.tif"
        write_outputs(result, source, {"labels": str(path)}, 1, label_pyramid=label_pyramid)
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == num_pages


def test_a_file_name_that_is_not_utf8_still_names_the_table_rows():
    name = os.fsdecode(b"/slides/biopsy_\xff.svs")  # bytes Linux allows in a name, surrogates in Python
    assert _encodable_file_name(name) == "biopsy_\ufffd.svs"
    assert _encodable_file_name("/slides/biopsy ö.svs") == "biopsy ö.svs"

"""Shared helpers: atomic writes, name listings, pairing files by stem, leaving a worker process."""
import logging
import logging.handlers
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import DatasetCatalog
from process_group import free_port, join_gloo_group

from nucseg_d2.data.datasets import register_nuclei_folder
from nucseg_d2.data.readers import NucleiDataError
from nucseg_d2.evaluation.folder_eval import FolderEvalError, label_maps_by_stem
from nucseg_d2.utils import (
    atomic_path, files_by_stem, first_few, leave_distributed_worker, remove_stale_temp_files, scratch_path)


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out" / "result.txt"
    with atomic_path(target) as temp:
        with open(temp, "w") as f:
            f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            with open(temp, "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["result.txt"]  # no temp file left behind


def test_stale_temp_files_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "slide_labels.tif"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from nucseg_d2.utils import atomic_path\n"
        "with atomic_path(sys.argv[1]) as temp:\n"
        "    open(temp, 'w').write('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    assert killed.returncode == -9
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".slide_labels.tif.")
    keep = [".slide_labels.tif.notours.tmp", ".other.tif.0123456789ab.tmp", "slide_labels.tif.tmp"]
    for name in keep:
        (tmp_path / name).write_text("")
    assert remove_stale_temp_files(target) == {str(target): 1}
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_scratch_files_are_removed_on_exit_and_after_a_kill(tmp_path):
    target = tmp_path / "slide_labels.npy"
    with scratch_path(target) as scratch:
        open(scratch, "w").write("map")
        assert os.path.dirname(scratch) == str(tmp_path) and not target.exists()
    with pytest.raises(RuntimeError):
        with scratch_path(target) as scratch:
            open(scratch, "w").write("map")
            raise RuntimeError("crash")
    with scratch_path(target):
        pass  # never written: nothing to remove, no error
    assert os.listdir(tmp_path) == []
    # What a killed process left is found by remove_stale_temp_files, as atomic_path's.
    with scratch_path(target) as scratch:
        open(scratch, "w").write("map")
        assert remove_stale_temp_files(target) == {str(target): 1} and os.listdir(tmp_path) == []


def test_atomic_path_writes_names_up_to_the_file_name_limit(tmp_path):
    # ".<name>.<12 hex>.tmp" adds 18 bytes: the temp file of a 250-byte name needs a shorter one.
    long_name = "n" * 246 + ".png"
    with atomic_path(tmp_path / long_name) as temp:
        open(temp, "w").write("done")
    assert (tmp_path / long_name).read_text() == "done"
    # What a killed writer of that name leaves is found again; another long name's is left alone.
    (tmp_path / os.path.basename(temp)).write_text("half")
    another = f".~{'0' * 32}.0123456789ab.tmp"
    (tmp_path / another).write_text("")
    assert remove_stale_temp_files(tmp_path / long_name) == {str(tmp_path / long_name): 1}
    assert sorted(os.listdir(tmp_path)) == sorted([long_name, another])


@pytest.mark.parametrize("path", ["result.txt", "out/result.txt"])
def test_atomic_path_errors_name_a_relative_path_not_the_temp_file(tmp_path, monkeypatch, path):
    # The temp name (".result.txt.<hex>.tmp") holds the bare name: the message must name the path.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=rf"^cannot write {path}: .*No space left on device"):
        with atomic_path(path) as temp:
            raise OSError(28, "No space left on device", temp)  # as a full disk while writing
    assert not os.path.exists(path)


def test_first_few():
    assert first_few(["a", "b"], 3) == "a, b"
    assert first_few(["a", "b", "c", "d", "e"], 2) == "a, b and 3 more"


def test_files_by_stem_filters_strips_and_rejects_ambiguous_names(tmp_path):
    for name in ("img1_pred.png", "img2_pred.TIF", "img3.png", "_pred.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "img4_pred.png").mkdir()  # a folder is not a file
    found = files_by_stem(str(tmp_path), (".png", ".tif"), strip_suffix="_pred")
    assert found == {"img1": str(tmp_path / "img1_pred.png"), "img2": str(tmp_path / "img2_pred.TIF")}
    assert set(files_by_stem(str(tmp_path), (".png",))) == {"img1_pred", "img3", "_pred"}
    (tmp_path / "img1_pred.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"two files for image 'img1' \(img1_pred.png and img1_pred.tif\)"):
        files_by_stem(str(tmp_path), (".png", ".tif"), strip_suffix="_pred")


def test_callers_turn_ambiguous_names_into_their_own_errors(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("a.png", "a.jpg"):
        (images / name).write_bytes(b"")
    (labels / "a.png").write_bytes(b"")
    register_nuclei_folder("ambiguous_folder_for_test", str(images), str(labels))
    with pytest.raises(NucleiDataError, match=r"two files for image 'a' \(a.jpg and a.png\)"):
        DatasetCatalog.get("ambiguous_folder_for_test")
    (labels / "a.npy").write_bytes(b"")
    with pytest.raises(FolderEvalError, match=r"two prediction files for image 'a'"):
        label_maps_by_stem(str(labels), role="prediction")


def _worker_that_leaves(rank, port, out_dir):
    join_gloo_group(rank, 2, port)
    # Held in memory until the handler is closed, as logging.shutdown() does at a normal exit.
    held = logging.handlers.MemoryHandler(capacity=100, flushLevel=logging.CRITICAL,
                                          target=logging.FileHandler(out_dir / f"rank{rank}.log"))
    logger = logging.getLogger("nucseg_d2.test_leave")
    logger.setLevel(logging.INFO)
    logger.addHandler(held)
    logger.info("logged before leaving")
    sys.stdout = open(out_dir / f"rank{rank}.stdout", "w")  # buffered: written only when flushed
    print("printed before leaving", end="")
    leave_distributed_worker()
    (out_dir / f"rank{rank}.after").write_text("the process went on")


def test_leave_distributed_worker_exits_cleanly_after_flushing(tmp_path):
    mp.spawn(_worker_that_leaves, args=(free_port(), tmp_path), nprocs=2)  # raises unless both exit with 0
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.log").read_text() == "logged before leaving\n"
        assert (tmp_path / f"rank{rank}.stdout").read_text() == "printed before leaving"
        assert not (tmp_path / f"rank{rank}.after").exists()


def test_leave_distributed_worker_refuses_a_single_process():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="world_size > 1"):
        leave_distributed_worker()
    # A group of one: launch() never spawns for it, so leaving would end the calling program.
    join_gloo_group(0, 1, free_port())
    try:
        with pytest.raises(RuntimeError, match="world_size > 1"):
            leave_distributed_worker()
    finally:
        dist.destroy_process_group()

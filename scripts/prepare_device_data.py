#!/usr/bin/env python
"""Fill the ignored ``.device/`` folder that a GPU device command carries: the detectron2 kit and
the data sets a run needs, in a form that fits the device's 64 MiB limit on what travels.

    .venv/bin/python scripts/prepare_device_data.py tnbc   # kit + TNBC   (~27 MiB)
    .venv/bin/python scripts/prepare_device_data.py kumar  # kit + Kumar  (~45 MiB)

The limit counts the whole working tree that travels (tracked and untracked-not-ignored files) plus
the carry folder, so the script adds the two and fails when they exceed it. The kit's detectron2
wheel is carried without its compiled extension (6 MB), which the kit's install.sh never unpacks.
TNBC is copied as is. Kumar's LZW TIFFs (67 MB) are re-encoded as lossless WebP (about 41 MB),
and every re-encoded image is decoded again and compared with the original pixel by pixel, so a
run on the copy sees exactly the pixels of the original. Both data sets together do not fit one
command: train and evaluate them in separate device commands.
Then: ``run`` with ``carry: [".device"]`` and ``bash scripts/gpu_train_eval.sh ...``.
"""
import argparse
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import numpy as np
import tifffile
from PIL import Image

CARRY_LIMIT_BYTES = 64 * 2**20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_ROOT = os.environ.get("NUCSEG_DATASETS") or os.path.join(REPO_ROOT, "..", "shared", "data")
DEFAULT_KIT = os.path.join(REPO_ROOT, "..", "shared", "device-kit")


class DevicePrepError(RuntimeError):
    pass


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _read_tiff_pixels(path):
    try:
        return tifffile.imread(path)
    except Exception as e:  # tifffile raises many types for a corrupt file
        raise DevicePrepError(f"{path}: cannot read the TIFF ({e})") from e


def reencode_lossless_webp(tiff_path, webp_path):
    """Write ``tiff_path`` as lossless WebP and prove, by decoding it again, that no pixel changed."""
    pixels = _read_tiff_pixels(tiff_path)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise DevicePrepError(f"{tiff_path}: expected 8-bit RGB(A), got {pixels.dtype} {pixels.shape}; "
                              "WebP cannot hold it losslessly")
    mode = "RGB" if pixels.shape[2] == 3 else "RGBA"
    # exact=True keeps the colour of fully transparent pixels, which WebP may otherwise drop.
    Image.fromarray(pixels, mode).save(webp_path, format="WEBP", lossless=True, exact=True, quality=100, method=4)
    with Image.open(webp_path) as decoded:
        if not np.array_equal(np.asarray(decoded.convert(mode)), pixels):
            raise DevicePrepError(f"{webp_path}: the re-encoded pixels differ from {tiff_path}")


def working_tree_bytes(repo):
    """Bytes of the files a device command sends besides the carry: git's tracked files and the
    untracked files it does not ignore. None when ``repo`` is not a git checkout."""
    try:
        listing = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in filter(None, listing.decode("utf-8", "surrogateescape").split("\0")):
        path = os.path.join(repo, name)
        if os.path.lexists(path):  # a tracked file deleted from the work tree does not travel
            total += os.lstat(path).st_size
    return total


def _make_writable(path):
    """Copies of the read-only shared kit and data stay read-only; the next run must replace them."""
    for folder, _, files in os.walk(path):
        for entry in [folder] + [os.path.join(folder, name) for name in files]:
            os.chmod(entry, os.stat(entry).st_mode | stat.S_IWUSR)


def _strip_compiled_extension(wheel):
    """Rewrite a detectron2 wheel without its ``.so`` files, every other entry byte for byte."""
    slim = wheel + ".slim"
    try:
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w") as target:
            for info in source.infolist():
                if not info.filename.endswith(".so"):
                    target.writestr(info, source.read(info))
    except zipfile.BadZipFile as e:
        raise DevicePrepError(f"{wheel}: not a readable wheel ({e})") from e
    os.replace(slim, wheel)


def _copy_kit(source, dest):
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("site"))
    _make_writable(dest)
    wheels = os.path.join(dest, "wheels")
    for name in sorted(os.listdir(wheels)) if os.path.isdir(wheels) else ():
        # install.sh unpacks only detectron2's Python code (its _C is a CUDA 12 build the device cannot use).
        if name.startswith("sal_detectron2-") and name.endswith(".whl"):
            _strip_compiled_extension(os.path.join(wheels, name))


def _copy_tnbc(source, dest):
    shutil.copytree(source, dest)


def _copy_kumar(source, dest):
    os.makedirs(os.path.join(dest, "images"))
    images = sorted(f for f in os.listdir(os.path.join(source, "images")) if f.lower().endswith((".tif", ".tiff")))
    if not images:
        raise DevicePrepError(f"{os.path.join(source, 'images')}: no .tif images to re-encode")
    for name in images:
        stem = os.path.splitext(name)[0]
        reencode_lossless_webp(os.path.join(source, "images", name), os.path.join(dest, "images", stem + ".webp"))
    shutil.copytree(os.path.join(source, "labels"), os.path.join(dest, "labels"))
    # The XML polygons are only the fallback for images without a label map: carry just those.
    for name in images:
        stem = os.path.splitext(name)[0]
        xml = os.path.join(source, "xml", stem + ".xml")
        if not os.path.isfile(os.path.join(source, "labels", stem + ".png")) and os.path.isfile(xml):
            os.makedirs(os.path.join(dest, "xml"), exist_ok=True)
            shutil.copy2(xml, os.path.join(dest, "xml", stem + ".xml"))
    return len(images)


COPIERS = {"tnbc": _copy_tnbc, "kumar": _copy_kumar}


def _exclude_from_git(dest):
    """Keep ``dest`` out of git (the data may not be redistributed) without touching .gitignore."""
    exclude = os.path.join(REPO_ROOT, ".git", "info", "exclude")
    if not os.path.isdir(os.path.dirname(exclude)):
        return
    rel = os.path.relpath(os.path.abspath(dest), REPO_ROOT)
    if rel.startswith(".."):
        return
    entry = f"/{rel}/"
    existing = open(exclude).read().splitlines() if os.path.isfile(exclude) else []
    if entry not in existing:
        with open(exclude, "a") as f:
            f.write(("\n" if existing and existing[-1] else "") + entry + "\n")


class CarryTooLargeError(DevicePrepError):
    pass


def prepare(datasets, data_root, kit, dest, tree_bytes=0):
    """Build ``dest/kit`` and ``dest/data/<set>`` (replacing earlier sets); returns the carry's bytes.

    The new carry replaces the old one only when it and ``tree_bytes`` (the working tree that travels
    beside it) fit the device's limit; otherwise the old carry stays and CarryTooLargeError is raised.
    """
    unknown = [name for name in datasets if name not in COPIERS]
    if unknown:
        raise DevicePrepError(f"unknown data set(s) {unknown}; choose from {sorted(COPIERS)}")
    for name in datasets:
        if not os.path.isdir(os.path.join(data_root, name)):
            raise DevicePrepError(f"{os.path.join(data_root, name)}: data set folder not found "
                                  "(set NUCSEG_DATASETS or --data-root)")
    if not os.path.isfile(os.path.join(kit, "install.sh")):
        raise DevicePrepError(f"{kit}: no install.sh; not a device kit (see ../shared/device-kit)")
    os.makedirs(dest, exist_ok=True)
    _exclude_from_git(dest)
    # Build the new kit and data beside the old ones and swap them in only when all succeeded,
    # so a corrupt image leaves the previous, working carry folder as it was.
    staging = os.path.join(dest, ".partial")
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    os.makedirs(os.path.join(staging, "data"))
    try:
        _copy_kit(kit, os.path.join(staging, "kit"))
        for name in datasets:
            COPIERS[name](os.path.join(data_root, name), os.path.join(staging, "data", name))
            _make_writable(os.path.join(staging, "data", name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    carry = folder_bytes(staging)
    if carry + tree_bytes > CARRY_LIMIT_BYTES:
        shutil.rmtree(staging)
        mib = 2**20
        raise CarryTooLargeError(
            f"{carry / mib:.1f} MiB to carry + {tree_bytes / mib:.1f} MiB of working tree = "
            f"{(carry + tree_bytes) / mib:.1f} MiB, over the device's limit of {CARRY_LIMIT_BYTES / mib:.0f} MiB; "
            f"prepare fewer data sets per run or commit less ({dest} left as it was)")
    # A carry holds what the next command needs and nothing more: sets from earlier runs go.
    for part in ("kit", "data"):
        if os.path.isdir(os.path.join(dest, part)):
            shutil.rmtree(os.path.join(dest, part))
        os.replace(os.path.join(staging, part), os.path.join(dest, part))
    os.rmdir(staging)
    return folder_bytes(dest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", metavar="SET", help="tnbc and/or kumar")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--kit", default=DEFAULT_KIT)
    parser.add_argument("--dest", default=os.path.join(REPO_ROOT, ".device"))
    parser.add_argument("--repo", default=REPO_ROOT, help="the checkout whose working tree travels with the carry")
    args = parser.parse_args(argv)
    tree = working_tree_bytes(args.repo)
    if tree is None:
        print(f"warning: {args.repo} is not a git checkout; its working tree, which travels too, is not counted",
              file=sys.stderr)
        tree = 0
    try:
        carry = prepare(args.datasets, args.data_root, args.kit, args.dest, tree_bytes=tree)
    except CarryTooLargeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (DevicePrepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mib = 2**20
    print(f"{args.dest}: {carry / mib:.1f} MiB to carry + {tree / mib:.1f} MiB of working tree = "
          f"{(carry + tree) / mib:.1f} MiB (limit {CARRY_LIMIT_BYTES / mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

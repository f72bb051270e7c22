"""``nucseg-predict`` / ``python -m nucseg_d2.predict``: a trained model over many images or slides.

    nucseg-predict slides/ --config-file configs/kumar.yaml --weights model_final.pth --output out/

Inputs are images, folders, globs or text files listing paths (one a line, relative to the
list's folder). Per input ``<stem>`` the outputs are ``<stem>_labels.tif``, ``<stem>.geojson``,
``<stem>_coco.json``, ``<stem>_nuclei.csv`` (or ``.parquet``) and ``<stem>_overlay.png`` (see
``--formats``). Inputs whose outputs all exist are skipped unless ``--overwrite``, so an
interrupted batch resumes where it stopped; of an input whose outputs partly exist, only the
missing ones are written (a GeoJSON edited in QuPath is never replaced unasked). A failing input
is reported on one line and the batch goes on; the exit status is 1 when any input failed, 2 when
nothing could start (bad checkpoint, config or output folder).

Many inputs: ``--num-gpus N`` (processes per machine; on a machine without GPU they run on the
CPU with the gloo backend), ``--num-machines``, ``--machine-rank``, ``--dist-url``, through
Detectron2's ``launch``. Rank r of W takes ``inputs[r::W]``.

Memory: a label map larger than ``--label-map-ram-gib`` (at its largest, 4 bytes per pixel of
the analysed region) is painted into a memory-mapped scratch file in the output folder, removed
once the input's outputs are written, so a whole slide's map at level 0 needs disk, not RAM (per
process: with ``--num-gpus N``, N maps at once).
"""
import argparse
import contextlib
import gc
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import NucleiConfigError
from ..data.readers import NucleiDataError
from ..utils import atomic_path, leave_distributed_worker, remove_stale_temp_files, scratch_path
from .predictor import CheckpointError, build_predict_cfg
from .slides import IMAGE_SUFFIXES, MPP_TOLERANCE, SLIDE_SUFFIXES

__all__ = ["main", "build_parser", "expand_inputs", "output_paths", "FORMATS", "DEFAULT_FORMATS"]

logger = logging.getLogger("nucseg_d2.predict")

# Output format name -> file name suffix after the input's stem.
FORMATS: Dict[str, str] = {
    "labels": "_labels.tif",
    "geojson": ".geojson",
    "coco": "_coco.json",
    "csv": "_nuclei.csv",
    "parquet": "_nuclei.parquet",
    "overlay": "_overlay.png",
}
DEFAULT_FORMATS = ("labels", "geojson", "coco", "csv", "overlay")
LIST_SUFFIXES = (".txt", ".lst")
INPUT_SUFFIXES = IMAGE_SUFFIXES + SLIDE_SUFFIXES
OVERLAY_MAX_SIDE = 2048  # overlays of slides are downsampled to this long side

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_SETUP_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucseg-predict",
        description="Segment nuclei in H&E images and whole slides with a trained nucseg-d2 model.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or slide file, folder, glob pattern, or .txt list of paths")
    parser.add_argument("--config-file", required=True, help="model config YAML")
    parser.add_argument("--weights", help="checkpoint (default: MODEL.WEIGHTS of the config)")
    parser.add_argument("--output", required=True, help="output folder (created if missing)")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels (default 1024)")
    parser.add_argument("--overlap", type=int, default=128,
                        help="tile overlap in pixels; at least the largest nucleus diameter (default 128)")
    parser.add_argument("--batch-size", type=int, help="tiles per forward pass (default 4 on GPU, 1 on CPU)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="slide pyramid level to analyse (default 0)")
    level.add_argument("--mpp", type=float,
                       help="target µm/px (training data: 0.25): the coarsest level at or finer than it, "
                            "resampled to it unless within 10%%")
    parser.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                        help="region of interest in level-0 pixels")
    parser.add_argument("--tissue-mask", choices=("auto", "on", "off"), default="auto",
                        help="skip tiles without tissue (Otsu on a thumbnail); auto = slides only")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (flips, rot90)")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(DEFAULT_FORMATS),
                        help=f"outputs to write (default: {' '.join(DEFAULT_FORMATS)})")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs exist")
    parser.add_argument("--no-label-pyramid", dest="label_pyramid", action="store_false",
                        help="write label TIFFs over 2048 px a side without their reduced-resolution levels")
    parser.add_argument("--label-map-ram-gib", type=float, default=4.0, metavar="GIB",
                        help="largest label map kept in memory (4 bytes per pixel of the analysed region); "
                             "larger ones are memory-mapped from a scratch file in the output folder, removed "
                             "when the input is done (default 4; 0: always)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the config's MODEL.DEVICE, CPU without GPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto",
                        help="rendezvous URL, e.g. tcp://host:port (auto: a free local port, one machine)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (last option)")
    return parser


# ------------------------------------------------------------------------ inputs and outputs
def _is_within(path: str, folder: str) -> bool:
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(folder)


def is_output_file(path: str) -> bool:
    """Whether the file name is one this tool writes (``<stem>_labels.tif``, ``<stem>_overlay.png``, ...)."""
    return os.path.basename(path).lower().endswith(tuple(FORMATS.values()))


def expand_inputs(specs: Sequence[str], output_dir: Optional[str] = None) -> List[str]:
    """Files to process, in order, without duplicates.

    A folder gives its image/slide files (not recursive; hidden files, and files in the output
    folder named as this tool's outputs, excluded); a glob its matches with an image/slide
    suffix; a ``.txt``/``.lst`` file the paths it lists (UTF-8, a byte-order mark dropped);
    anything else is taken as a file, so a missing one fails by name later. Raises NucleiDataError
    naming the folder or list that cannot be read.
    """
    paths: List[str] = []
    earlier_outputs: List[str] = []

    def supported(path):
        if not (os.path.isfile(path) and path.lower().endswith(INPUT_SUFFIXES)
                and not os.path.basename(path).startswith(".")):
            return False
        # Outputs written into the input folder (--output = the input folder) are not inputs.
        if output_dir and _is_within(path, output_dir) and is_output_file(path):
            earlier_outputs.append(path)
            return False
        return True

    for spec in specs:
        if os.path.isdir(spec) or (any(ch in spec for ch in "*?[") and not os.path.exists(spec)):
            if os.path.isdir(spec):
                try:
                    names = os.listdir(spec)
                except OSError as err:
                    raise NucleiDataError(f"{spec}: cannot list the input folder ({err.strerror or err})") from err
                found = sorted(p for p in (os.path.join(spec, n) for n in names) if supported(p))
            else:
                found = sorted(p for p in glob.glob(spec, recursive=True) if supported(p))
            if not found:
                print(f"warning: {spec}: no image or slide files ({' '.join(INPUT_SUFFIXES)})",
                      file=sys.stderr)
            paths += found
        elif spec.lower().endswith(LIST_SUFFIXES) and os.path.isfile(spec):
            base = os.path.dirname(os.path.abspath(spec))
            try:
                # utf-8-sig: Notepad and spreadsheets start UTF-8 text with a byte-order mark, which
                # would otherwise become part of the first path.
                with open(spec, encoding="utf-8-sig") as stream:
                    lines = stream.read().splitlines()
            except UnicodeDecodeError as err:
                raise NucleiDataError(f"{spec}: input list is not UTF-8 text ({err.reason} at byte {err.start}); "
                                      "save it as UTF-8") from err
            except OSError as err:
                raise NucleiDataError(f"{spec}: cannot read the input list ({err.strerror or err})") from err
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    paths.append(line if os.path.isabs(line) else os.path.join(base, line))
        else:
            paths.append(spec)
    if earlier_outputs:
        print(f"note: {len(earlier_outputs)} file(s) in the output folder named as nucseg-predict outputs "
              f"(e.g. {os.path.basename(earlier_outputs[0])}) are not taken as inputs", file=sys.stderr)
    unique, seen = [], set()
    for path in paths:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def input_stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def output_paths(path: str, output_dir: str, formats: Sequence[str]) -> Dict[str, str]:
    stem = input_stem(path)
    return {name: os.path.join(output_dir, stem + FORMATS[name]) for name in formats}


def label_map_scratch_target(path: str, output_dir: str) -> str:
    """The path whose temp files (:func:`~nucseg_d2.utils.scratch_path`) hold an input's
    memory-mapped label map while its outputs are written; the path itself is never created."""
    return os.path.join(output_dir, input_stem(path) + "_labels.npy")


def _stem_collisions(paths: Sequence[str]) -> Dict[str, List[str]]:
    by_stem: Dict[str, List[str]] = {}
    for path in paths:  # case-insensitive file systems give Slide1 and slide1 the same outputs
        by_stem.setdefault(input_stem(path).lower(), []).append(path)
    return {stem: group for stem, group in by_stem.items() if len(group) > 1}


def _check_output_dir(output_dir: str) -> Optional[str]:
    """None when ``output_dir`` can be created and written, else why not."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".nucseg-write-test-"):
            pass
    except OSError as err:
        return f"output folder {output_dir} cannot be written ({type(err).__name__}: {err.strerror or err})"
    return None


def write_outputs(result, source, paths: Dict[str, str], image_id: int, label_pyramid: bool = True) -> None:
    """Write each requested output (every writer is atomic); one that fails does not keep the
    others from being written: the failures are raised together afterwards. ``label_pyramid``:
    whether a large label TIFF gets its reduced-resolution levels."""
    failures = {}
    for name, path in paths.items():
        try:
            _write_output(name, path, result, source, image_id, label_pyramid)
        except Exception as err:  # the predictions behind the other outputs are not lost
            failures[name] = err
    if failures:
        written = [name for name in paths if name not in failures]
        raise NucleiDataError(
            f"{source.path}: "
            + "; ".join(f"{name} output not written ({_error_line(err)})" for name, err in failures.items())
            + (f"; written: {', '.join(written)}" if written else "")
        ) from next(iter(failures.values()))


def _encodable_file_name(path: str) -> str:
    """The file name of ``path`` as UTF-8 can hold it: a name of bytes that are not UTF-8 (Linux)
    reaches Python with surrogates, which no writer can encode; they become U+FFFD."""
    return os.path.basename(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _outputs_possible(paths: Dict[str, str], source, formats: Sequence[str], tag: str) -> Dict[str, str]:
    """``paths`` without a COCO output the analysed region is too large for (with a note), so that a
    whole slide still gets its other outputs, and a re-run does not predict it again for nothing."""
    from .writers import COCO_MAX_PIXELS

    if "coco" not in paths or source.height * source.width < COCO_MAX_PIXELS:
        return paths
    reason = (f"{source.width}x{source.height} px is too large for COCO RLE (32-bit run lengths)")
    if set(formats) == {"coco"}:
        raise NucleiDataError(f"{source.path}: {reason}; ask for the GeoJSON or label TIFF instead")
    print(f"{tag}{source.path}: no coco output: {reason}; the GeoJSON and label TIFF hold the same nuclei",
          file=sys.stderr, flush=True)
    return {name: p for name, p in paths.items() if name != "coco"}


def _write_output(name: str, path: str, result, source, image_id: int, label_pyramid: bool) -> None:
    from . import writers

    if name == "labels":
        writers.write_label_tiff(path, result.label_map, mpp=result.mpp, origin=result.origin,
                                 downsample=result.downsample, pyramid=label_pyramid)
    elif name == "geojson":
        writers.write_geojson(path, result)
    elif name == "coco":
        writers.write_coco_json(path, result, image_id=image_id, file_name=source.path)
    elif name in ("csv", "parquet"):
        writers.write_nucleus_table(path, result, source.read, image=_encodable_file_name(source.path))
    elif name == "overlay":
        writers.write_overlay_png(path, result, source.thumbnail(OVERLAY_MAX_SIDE))


# ------------------------------------------------------------------------ the work of one rank
def _error_line(err: BaseException) -> str:
    # Our errors name the file already; others get their type so the cause is recognisable.
    message = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    if isinstance(err, (NucleiDataError, CheckpointError, NucleiConfigError)):
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _setup_error_line(err: BaseException) -> str:
    # A KeyError's message is the bare key: an unknown config key or override.
    return _error_line(err) if not isinstance(err, KeyError) else f"config: {err}"


NO_WEIGHTS = "no weights: give --weights or set MODEL.WEIGHTS in the config"


def _run_weights(args, cfg) -> str:
    """The checkpoint the run loads: --weights, else MODEL.WEIGHTS of the built config (YAML and --opts)."""
    return args.weights or cfg.MODEL.WEIGHTS


def _process_inputs(args, inputs: List[Tuple[int, str]], rank: int, world_size: int) -> Dict:
    """Predict and write this rank's inputs; returns its summary (done / skipped / failed)."""
    from .predictor import NucleiPredictor
    from .slides import open_image

    tag = f"[rank {rank}] " if world_size > 1 else ""
    summary = {"done": [], "skipped": [], "failed": [], "setup_error": None}
    todo = []
    outputs = [(image_id, path, output_paths(path, args.output, args.formats)) for image_id, path in inputs]
    # Each input's outputs are written by this rank alone: what a killed run left is no one's.
    scratch_targets = {path: label_map_scratch_target(path, args.output) for _, path, _ in outputs}
    records = {path: input_record_path(path, args.output) for _, path, _ in outputs}
    removed = remove_stale_temp_files([p for _, _, paths in outputs for p in paths.values()]
                                      + list(scratch_targets.values()) + list(records.values()))
    for image_id, path, paths in outputs:
        stale = sum(removed.get(p, 0) for p in [*paths.values(), scratch_targets[path], records[path]])
        if stale:
            print(f"{tag}{path}: removed {stale} temp file(s) left by an interrupted run", flush=True)
        if not args.overwrite:
            existing = sorted(name for name, p in paths.items() if os.path.isfile(p))
            # Outputs of any format count, not only those asked for now: --formats may change.
            any_output = any(os.path.isfile(p) for p in output_paths(path, args.output, FORMATS).values())
            problem = _outputs_of_another_input(path, args.output, args.folder_settings) if any_output else None
            if problem:
                summary["failed"].append((path, problem))
                print(f"{tag}error: {problem}", file=sys.stderr, flush=True)
                continue
            if len(existing) == len(paths):
                summary["skipped"].append(path)
                print(f"{tag}{path}: skipped (outputs exist; --overwrite to redo)", flush=True)
                continue
            if existing:
                print(f"{tag}{path}: keeping its existing {', '.join(existing)} output(s), writing the "
                      f"others (--overwrite to redo all)", flush=True)
                paths = {name: p for name, p in paths.items() if name not in existing}
        todo.append((image_id, path, paths))
    if not todo:
        return summary

    device = args.device
    if device is None and torch.cuda.is_available():
        from detectron2.utils import comm

        device = f"cuda:{comm.get_local_rank()}"
    try:
        cfg = build_predict_cfg(args.config_file, args.opts)
        weights = _run_weights(args, cfg)
        if not weights:
            raise CheckpointError(NO_WEIGHTS)
        predictor = NucleiPredictor(  # the built cfg: the YAML and overrides are not read again
            cfg, weights=weights, device=device, tile_size=args.tile_size, overlap=args.overlap,
            batch_size=args.batch_size, tta=args.tta, progress=not args.quiet and rank == 0,
        )
    except KeyboardInterrupt:
        raise
    except Exception as err:  # any failure here is one line and exit 2, never a traceback that
        # would end this rank before its all_gather and so take its sibling ranks down with it
        summary["setup_error"] = _setup_error_line(err)
        logger.debug("%s", traceback.format_exc())
        return summary
    if args.settings_to_record is not None:  # after the model loaded: a failed start writes nothing
        _record_settings(args.output, args.settings_to_record)

    tissue = {"auto": "auto", "on": True, "off": False}[args.tissue_mask]
    for image_id, path, paths in todo:
        start = time.perf_counter()
        try:
            with open_image(path, level=args.level, mpp=args.mpp, roi=args.roi) as source:
                paths = _outputs_possible(paths, source, args.formats, tag)
                if not paths:  # only the impossible COCO output was missing
                    summary["skipped"].append(path)
                    print(f"{tag}{path}: skipped (its other outputs exist; no coco output possible)", flush=True)
                    continue
                if args.mpp is None:
                    _warn_of_another_scale(source, cfg.TEST.NUCLEI.TRAINING_MPP, tag)

                def before_writing(path=path, paths=paths, source=source):
                    _take_over_outputs(path, args.output, args.folder_settings, args.overwrite)
                    if source.is_slide:  # writing the outputs of a slide's million nuclei takes minutes
                        print(f"{tag}{path}: predicted; writing {', '.join(paths)}", flush=True)

                num_nuclei = _predict_and_write(predictor, source, paths, image_id, tissue, args.label_map_ram_gib,
                                                scratch_targets[path], before_writing, args.label_pyramid)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one bad input must not stop the batch
            line = _error_line(err)
            if path not in line:
                line = f"{path}: {line}"
            summary["failed"].append((path, line))
            print(f"{tag}error: {line}", file=sys.stderr, flush=True)
            logger.debug("%s", traceback.format_exc())
        else:
            summary["done"].append(path)
            timing = predictor.last_timing
            print(f"{tag}{path}: {num_nuclei} nuclei, {source.width}x{source.height} px{_scale_note(source)}, "
                  f"{timing.get('tiles_run', 0)}/{timing.get('tiles', 0)} "
                  f"tiles, {time.perf_counter() - start:.1f} s", flush=True)
            continue
        # A failed writer's exception and traceback form reference cycles that can hold the
        # result, and with it a memory-mapped label map whose removed file keeps its disk space
        # (the next slide's map may need it): collect them now, outside the handler.
        gc.collect()
    return summary


def _scale_note(source) -> str:
    """The analysed scale for the per-input line: " at 0.500 µm/px (level 1)", "... (resampled
    from level 0)", or nothing when the input records none."""
    if source.mpp is None:
        return ""
    if not source.is_slide:
        return f" at {source.mpp:.3f} µm/px" + (" (resampled)" if source.resampled else "")
    how = "resampled from level" if source.resampled else "level"
    return f" at {source.mpp:.3f} µm/px ({how} {source.level})"


def _warn_of_another_scale(source, training_mpp: float, tag: str) -> None:
    if training_mpp and source.mpp is not None and abs(source.mpp - training_mpp) > MPP_TOLERANCE * training_mpp:
        print(f"{tag}{source.path}: warning: analysed at {source.mpp:.3f} µm/px, but the model was trained at "
              f"{training_mpp:g} (TEST.NUCLEI.TRAINING_MPP): nuclei at another scale are found worse; "
              f"--mpp {training_mpp:g} resamples to it", file=sys.stderr, flush=True)


def _largest_label_map_bytes(width: int, height: int) -> int:
    """A label map's size at its largest: a slide's map is uint32 past 65,535 detections."""
    return width * height * np.dtype(np.uint32).itemsize


def _require_scratch_room(scratch_target: str, width: int, height: int) -> None:
    """NucleiDataError naming the folder before predicting, when it cannot take the label map's scratch file
    at its largest: the space is reserved only once the slide is predicted, hours later."""
    folder = os.path.dirname(os.path.abspath(scratch_target))
    need, free = _largest_label_map_bytes(width, height), shutil.disk_usage(folder).free
    if free < need:  # per process: --num-gpus ranks each check the same free space
        raise NucleiDataError(f"{folder}: no room for the {width}x{height} label map's scratch file "
                              f"({need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free); free some, or raise "
                              "--label-map-ram-gib to hold the map in memory")


def _predict_and_write(predictor, source, paths: Dict[str, str], image_id: int, tissue,
                       label_map_ram_gib: float, scratch_target: str, before_writing: Callable[[], None],
                       label_pyramid: bool) -> int:
    """Predict one opened input and write its outputs; returns its number of nuclei. A label map
    over ``label_map_ram_gib`` lives in a scratch file beside ``scratch_target`` until this returns.
    ``before_writing`` runs between the two (the outputs' record: a run killed while writing
    leaves outputs that say where they came from)."""
    with contextlib.ExitStack() as stack:
        label_map_file = None
        if _largest_label_map_bytes(source.width, source.height) > label_map_ram_gib * 2**30:
            _require_scratch_room(scratch_target, source.width, source.height)
            label_map_file = stack.enter_context(scratch_path(scratch_target))
        result = predictor.predict_source(source, tissue_mask=tissue, label_map_file=label_map_file)
        before_writing()
        write_outputs(result, source, paths, image_id, label_pyramid)
        return result.num_nuclei


def _print_summary(summaries: List[Dict], num_inputs: int) -> None:
    done = sum(len(s["done"]) for s in summaries)
    skipped = sum(len(s["skipped"]) for s in summaries)
    failed = [line for s in summaries for _, line in s["failed"]]
    setup_errors = sorted({s["setup_error"] for s in summaries if s["setup_error"]})
    for message in setup_errors:
        print(f"error: {message}", file=sys.stderr, flush=True)
    not_run = num_inputs - done - skipped - len(failed)
    print(f"nucseg-predict: {num_inputs} inputs: {done} done, {skipped} skipped (outputs exist), "
          f"{len(failed)} failed" + (f", {not_run} not run" if not_run else ""), flush=True)
    for line in failed:
        print(f"  failed: {line}", flush=True)


# Written into the output folder: a re-run that skips existing outputs must be one of the same settings.
SETTINGS_FILE = "nucseg_predict_settings.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prediction_settings(args, weights: str) -> Dict:
    """What decides the predicted nuclei (not --formats, --device, --batch-size or --quiet), by
    content, so that machines sharing the output folder, a moved checkout or copied weights agree:
    the config file's SHA-256 (a _BASE_ of it is not followed) and that of ``weights``, the
    checkpoint the run loads (:func:`_run_weights`; about a second for a 0.5 GB checkpoint), or
    the address it is fetched from."""
    if "://" in weights:
        weights_recorded = {"address": weights}
    else:
        weights_recorded = {"sha256": _sha256(weights)}
    settings = {
        "config_sha256": _sha256(args.config_file),
        "opts": list(args.opts), "weights": weights_recorded, "level": args.level, "mpp": args.mpp,
        "roi": list(args.roi) if args.roi else None, "tile_size": args.tile_size, "overlap": args.overlap,
        "tta": bool(args.tta), "tissue_mask": args.tissue_mask,
    }
    if args.mpp is not None:
        # Before 2026-11-28 --mpp analysed the nearest finer level as it was; folders it filled then
        # lack this key, so their outputs are not mixed with resampled ones.
        settings["mpp_rule"] = "the level within 10 %, else resampled"
    return settings


def _check_settings(args, weights: str) -> Tuple[Optional[str], Optional[Dict], Dict]:
    """(None, the settings to record once the model is loaded, or None when recorded already,
    the settings) when the output folder may take this run, else (the problem, None, the
    settings): its outputs came from other settings, and skipping them would mix the two runs
    (GeoJSON ids against another label map, a region never analysed)."""
    settings = prediction_settings(args, weights)
    path = os.path.join(args.output, SETTINGS_FILE)
    if os.path.isfile(path) and not args.overwrite:
        try:
            with open(path) as stream:
                recorded = json.load(stream)
        except (OSError, ValueError) as err:
            return f"{path}: cannot read the settings of the outputs there ({err}); --overwrite to redo", None, settings
        if not isinstance(recorded, dict):
            return (f"{path}: cannot read the settings of the outputs there (not a JSON object); --overwrite to redo",
                    None, settings)
        differing = sorted(key for key in set(settings) | set(recorded) if settings.get(key) != recorded.get(key))
        if differing:
            # The weights may have come from the config: name the file, which the command line may not.
            named = [f"weights {weights}" if key == "weights" else key for key in differing]
            return (f"{args.output} holds predictions made with other settings ({', '.join(named)}: see "
                    f"{path}); give another --output, or --overwrite to redo every input"), None, settings
        return None, None, settings
    return None, settings, settings


def input_record_path(path: str, output_dir: str) -> str:
    """Where the record of which file and settings made an input's outputs is kept."""
    return os.path.join(output_dir, f".{input_stem(path)}.nucseg_input.json")


def _input_record(path: str, settings: Dict) -> Dict:
    # Name and size, not the path (a moved slide folder is the same slide) nor a checksum (a
    # slide's gigabytes would be read again on every re-run). Settings of value None are left out
    # of the hash, as the folder's check counts a missing key and None alike.
    given = {key: value for key, value in settings.items() if value is not None}
    return {"file": os.path.basename(path), "size": os.path.getsize(path),
            "settings_sha256": hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()}


def _read_input_record(record_path: str) -> Dict:
    """The record (FileNotFoundError when there is none); NucleiDataError when unreadable."""
    try:
        with open(record_path) as stream:
            recorded = json.load(stream)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise NucleiDataError(f"{record_path}: cannot read which input made the outputs there ({err}); "
                              "--overwrite to redo") from err
    if not isinstance(recorded, dict):
        raise NucleiDataError(f"{record_path}: cannot read which input made the outputs there (not a JSON "
                              "object); --overwrite to redo")
    return recorded


def _take_over_outputs(path: str, output_dir: str, settings: Dict, overwrite: bool) -> None:
    """Record that ``path`` with ``settings`` makes its outputs from now on, once predicted and
    before they are written. Under ``--overwrite``, outputs another file or other settings made
    are removed first, in every format, those not asked for this time included: left beside the
    new record, a later run would take them as this run's (and a write failing midway would
    leave old files under it)."""
    record_path, record = input_record_path(path, output_dir), _input_record(path, settings)
    if overwrite:
        try:
            previous = _read_input_record(record_path)
        except (FileNotFoundError, NucleiDataError):
            previous = None
        if previous != record:
            for output in output_paths(path, output_dir, FORMATS).values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(output)
    with atomic_path(record_path) as temp_path, open(temp_path, "w") as stream:
        json.dump(record, stream)


def _outputs_of_another_input(path: str, output_dir: str, settings: Dict) -> Optional[str]:
    """Why the existing outputs named after ``path``'s stem are not its own, or None: made from
    another file of that stem (another slide1.svs), or with other settings than the folder's
    (an ``--overwrite`` run over other inputs changed the folder's). Outputs without a record
    (written before records were kept) are trusted by their names, as they were then."""
    try:
        recorded = _read_input_record(input_record_path(path, output_dir))
    except FileNotFoundError:
        return None
    except NucleiDataError as err:
        return str(err)
    if not os.path.isfile(path):
        return None  # it fails with its own error when predicted
    current = _input_record(path, settings)
    if (recorded.get("file"), recorded.get("size")) != (current["file"], current["size"]):
        return (f"{path}: the outputs named {input_stem(path)}* in {output_dir} were made from another file "
                f"({recorded.get('file')}, {recorded.get('size')} bytes; this one has {current['size']}); give "
                "another --output, or --overwrite to replace them")
    if recorded.get("settings_sha256") != current["settings_sha256"]:
        return (f"{path}: its outputs in {output_dir} were made with other settings than the folder's "
                f"{SETTINGS_FILE} (a run with --overwrite over other inputs changed it); --overwrite to redo it")
    return None


def _record_settings(output: str, settings: Dict) -> None:
    with atomic_path(os.path.join(output, SETTINGS_FILE)) as temp_path, open(temp_path, "w") as stream:
        json.dump(settings, stream, indent=1)


def _global_status(summaries: List[Dict]) -> int:
    if any(s["setup_error"] for s in summaries):
        return EXIT_SETUP_ERROR
    return EXIT_FAILED_INPUTS if any(s["failed"] for s in summaries) else EXIT_OK


def _worker(args, inputs: List[Tuple[int, str]], status_file: str) -> None:
    """Entry point of every rank (called by Detectron2's ``launch``).

    Every rank learns the batch's status from the gathered summaries; local rank 0 writes it to
    ``status_file`` for its machine's launching process, so all ranks exit normally (a non-zero
    exit would make torch terminate the other ranks mid-write). With several ranks it does not
    return: each ends through ``leave_distributed_worker``.
    """
    from detectron2.utils import comm

    rank, world_size = comm.get_rank(), comm.get_world_size()
    if world_size > 1 and not torch.cuda.is_available():
        # CPU ranks share the machine's cores instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    summary = _process_inputs(args, inputs[rank::world_size], rank, world_size)
    summaries = comm.all_gather(summary) if world_size > 1 else [summary]
    if rank == 0:
        _print_summary(summaries, len(inputs))
    if comm.get_local_rank() == 0:
        with open(status_file, "w") as stream:
            stream.write(str(_global_status(summaries)))
    if world_size > 1:
        leave_distributed_worker()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.overlap < 0 or args.tile_size <= args.overlap:
        print(f"error: need 0 <= --overlap < --tile-size (got {args.overlap}, {args.tile_size})", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if args.batch_size is not None and args.batch_size < 1:
        print(f"error: --batch-size must be >= 1 (got {args.batch_size})", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if not (math.isfinite(args.label_map_ram_gib) and args.label_map_ram_gib >= 0):
        print(f"error: --label-map-ram-gib must be a number >= 0 (got {args.label_map_ram_gib})", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if args.mpp is not None and not args.mpp > 0:
        print(f"error: --mpp must be > 0 micrometres per pixel (got {args.mpp})", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if not os.path.isfile(args.config_file):
        print(f"error: config file not found: {args.config_file}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    try:
        # Built here too, not only by the workers: the settings recorded (and compared) must hold
        # the weights MODEL.WEIGHTS names when --weights is not given.
        weights = _run_weights(args, build_predict_cfg(args.config_file, args.opts))
    except Exception as err:  # a bad config or override: one line, as when a worker builds it
        print(f"error: {_setup_error_line(err)}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if not weights:
        print(f"error: {NO_WEIGHTS}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if "://" not in weights and not os.path.isfile(weights):
        where = "" if args.weights else " (MODEL.WEIGHTS of the config)"
        print(f"error: {weights}: checkpoint file not found{where}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    problem = _check_output_dir(args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    try:
        paths = expand_inputs(args.inputs, args.output)
    except NucleiDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if not paths:
        print(f"error: no input images or slides found in {' '.join(args.inputs)}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    collisions = _stem_collisions(paths)
    if collisions:
        listed = "; ".join(f"{stem}: {', '.join(group)}" for stem, group in sorted(collisions.items()))
        print(f"error: inputs whose outputs would share a name (same file stem): {listed}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    # Held until the batch ends; a second run into the folder would remove this one's temp files
    # as stale and predict the same inputs again.
    lock_fd, problem = _lock_output_dir(args.output) if args.num_machines == 1 else (None, None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    try:
        return _run_batch(args, weights, paths)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # releases the lock


def _lock_output_dir(output_dir: str) -> Tuple[Optional[int], Optional[str]]:
    """(a descriptor of ``output_dir`` holding an exclusive flock on it, None), or (None, the
    problem) when another process holds it. Where the file system cannot lock (some network file
    systems), (None, None): the run goes on unguarded."""
    try:
        import fcntl  # POSIX only

        fd = os.open(output_dir, os.O_RDONLY)
    except (ImportError, OSError):
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, (f"{output_dir}: another nucseg-predict run is writing there; wait for it to end, or "
                      "give another --output")
    except OSError:
        os.close(fd)
        return None, None
    return fd, None


def _run_batch(args, weights: str, paths: List[str]) -> int:
    problem, args.settings_to_record, args.folder_settings = _check_settings(args, weights)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # COCO image ids: the input's 1-based position in the expanded list, the same on every rank.
    inputs = list(enumerate(paths, start=1))

    from detectron2.engine import launch

    with tempfile.TemporaryDirectory(prefix="nucseg-predict-") as scratch:
        status_file = os.path.join(scratch, "status")
        launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args, inputs, status_file))
        if not os.path.isfile(status_file):
            return EXIT_SETUP_ERROR
        with open(status_file) as stream:
            return int(stream.read())


if __name__ == "__main__":
    sys.exit(main())

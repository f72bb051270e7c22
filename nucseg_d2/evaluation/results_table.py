"""Markdown results tables generated from per-image CSVs, with the paper's significance stars.

Each run is a folder holding, per data set, ``<dataset>/per_image.csv`` (the layout of
``OUTPUT_DIR/inference`` and of ``results/<run>/``). The first run named is the baseline: every
other run is compared with it per image by a one-tailed paired t-test ("run better than
baseline"), as in the paper's Tables 2-4. A run may also be several folders, the same
configuration trained with different seeds: each image's metrics are then averaged over the seeds
before the tables and tests (``--run NAME=DIR1,DIR2``).

    python -m nucseg_d2.evaluation.results_table --dataset tnbc_test \
        --run Baseline=results/tnbc_maskrcnn --run Proposed=results/tnbc_proposed [--per-image]
    python -m nucseg_d2.evaluation.results_table --dataset tnbc_val --curve \
        --run Proposed=results/tnbc_proposed          # metric against iteration (training evals)
    python -m nucseg_d2.evaluation.results_table --dataset tnbc_test --run Baseline=... \
        --run Ab1=... --pair "Ab1 > Baseline"        # chosen comparisons, as the paper's Table 3
    python -m nucseg_d2.evaluation.results_table --dataset kumar_test --per-group \
        --run Baseline=... --run Proposed=...        # means per organ and subset, as the paper's Table 2
    python -m nucseg_d2.evaluation.results_table --dataset tnbc_test \
        --run Baseline=results/seed1,results/seed2 ...   # seeds: per-image means over the folders
    python -m nucseg_d2.evaluation.results_table --update docs/RESULTS.md   # regenerate its tables
"""
import argparse
import collections
import datetime
import gzip
import os
import re
import shlex
import sys
import zlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from ..data.datasets import nuclei_dataset_subsets
from ..utils import atomic_path
from .reporting import DEFAULT_METRICS, GROUP_FIELDS, PER_IMAGE_CSV, read_training_metrics
from .significance import compare_per_image_rows, numeric_column, read_per_image_rows, require_same_images

__all__ = [
    "results_table", "run_per_image_rows", "per_image_table", "group_table", "pairs_table", "accuracy_curve_table",
    "cost_table", "render", "update_markdown", "main",
]

TRAINING_METRICS_JSON = "training_metrics.json"
CURVE_METRICS = ("aji", "dice1", "pq")  # the accuracy/iterations table's default columns


RunFolders = Union[str, Sequence[str]]  # one run folder, or one per seed of the same configuration
SEED_SEPARATOR = ","  # --run NAME=DIR1,DIR2: the same configuration trained with different seeds


def _folders(run_folders: RunFolders) -> List[str]:
    return [run_folders] if isinstance(run_folders, str) else list(run_folders)


def _one_folder_each(runs: Sequence[Tuple[str, RunFolders]], table: str) -> List[Tuple[str, str]]:
    """The runs of a table that reads one training run's logs each, not per-image results; a run
    of several seeds is refused before any folder is read."""
    several = [name for name, run_folders in runs if len(_folders(run_folders)) != 1]
    if several:
        raise ValueError(f"the {table} table reads one training run per --run; give each seed its own "
                         f"--run (several folders: {', '.join(several)})")
    return [(name, _folders(run_folders)[0]) for name, run_folders in runs]


def _per_image_csv(run_dir: str, dataset: str) -> str:
    path = os.path.join(run_dir, dataset, PER_IMAGE_CSV)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no per-image results for data set {dataset!r}")
    return path


# Columns that describe the image, not a prediction: the same in every seed, never averaged.
IMAGE_COLUMNS = ("image_id", "num_gt") + GROUP_FIELDS


def run_per_image_rows(run_folders: RunFolders, dataset: str) -> Dict[str, Dict[str, str]]:
    """A run's per-image rows, ``{image id: {column: value}}``.

    For several folders (seeds of one configuration) every column but :data:`IMAGE_COLUMNS` (the
    metrics and ``num_pred``) is averaged per image over the seeds, which shrinks the seed-to-seed
    noise in what is compared; the image columns come from the first folder. The folders must hold
    the same images and columns, with a number in every averaged cell (an ``inf`` object
    Hausdorff stays ``inf`` in the mean). A paired t-test across images of such means still
    measures only image-to-image variation, not the spread between seeds.
    """
    folders = _folders(run_folders)
    if not folders or not all(folders):
        raise ValueError(f"a run needs one or more non-empty folder names, got {folders!r}")
    seed_tables = [(path, read_per_image_rows(path)) for path in (_per_image_csv(d, dataset) for d in folders)]
    first_path, first = seed_tables[0]
    if len(seed_tables) == 1:
        return first
    columns = list(next(iter(first.values())))
    for path, rows in seed_tables[1:]:
        require_same_images(first, rows, first_path, path)
        if list(next(iter(rows.values()))) != columns:
            raise ValueError(f"columns differ between {first_path} and {path}: "
                             f"{columns} against {list(next(iter(rows.values())))}")
        # The averaged rows keep the first seed's image columns: the seeds must agree on them.
        for column in IMAGE_COLUMNS:
            differing = sorted(i for i in first if column in columns and first[i][column] != rows[i][column])
            if differing:
                raise ValueError(f"{column} differs between {first_path} and {path} for {', '.join(differing)}")
    ids = list(first)
    averaged = {image_id: dict(row) for image_id, row in first.items()}
    for column in columns:
        if column in IMAGE_COLUMNS:
            continue
        means = np.mean([numeric_column(rows, ids, column, path) for path, rows in seed_tables], axis=0)
        for image_id, mean in zip(ids, means):
            averaged[image_id][column] = repr(float(mean))
    return averaged


def _source(run_folders: RunFolders, dataset: str) -> str:
    return " + ".join(os.path.join(d, dataset, PER_IMAGE_CSV) for d in _folders(run_folders))


def _require_columns(rows: Dict[str, Dict[str, str]], metrics: Sequence[str], source: str) -> None:
    """ValueError naming ``source`` and its columns when it lacks a requested metric column.

    Asked before any table is built, so a typo in --metrics is named as such, not as a bare KeyError.
    """
    columns = list(next(iter(rows.values()), {}))
    missing = [metric for metric in metrics if metric not in columns]
    if missing:
        raise ValueError(f"{source}: no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)})")


def _seeds_note(runs: Sequence[Tuple[str, RunFolders]],
                after: str = "; the ± and the tests are over images, not seeds.") -> List[str]:
    averaged = [f"{name} ({len(_folders(d))} seeds)" for name, d in runs if len(_folders(d)) > 1]
    if not averaged:
        return []
    return [f"Runs of several seeds ({', '.join(averaged)}): each image's metrics are first averaged "
            f"over the seeds{after}"]


def results_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str,
                  metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """Mean ± sample std (over images) per run and metric; stars compare each run with the first
    (baseline). A run may be several folders, seeds of one configuration: see :func:`run_per_image_rows`."""
    baseline_name, baseline_dirs = runs[0]
    rows_of_runs = [run_per_image_rows(run_dirs, dataset) for _, run_dirs in runs]
    for (_, run_dirs), rows in zip(runs, rows_of_runs):
        _require_columns(rows, metrics, _source(run_dirs, dataset))
    baseline_rows = rows_of_runs[0]
    header = ["run", "images"] + list(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (name, run_dirs), rows in zip(runs, rows_of_runs):
        stars = {}
        if _folders(run_dirs) != _folders(baseline_dirs):
            stars = {r["metric"]: r["stars"] for r in compare_per_image_rows(
                rows, baseline_rows, metrics, _source(run_dirs, dataset), _source(baseline_dirs, dataset))}
        cells = [name, str(len(rows))]
        for metric in metrics:
            values = numeric_column(rows, list(rows), metric, _source(run_dirs, dataset))
            std = values.std(ddof=1) if len(values) > 1 else float("nan")
            mark = f" {stars[metric]}" if metric in stars else ""
            cells.append(f"{values.mean():.4f} ± {std:.4f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = _seeds_note(runs)
    if len(runs) > 1:
        notes.append(f"Stars: one-tailed paired t-test of each run against {baseline_name} over the "
                     f"images of {dataset} (*** p < 0.01, ** p < 0.05, * p < 0.1, x p >= 0.1).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _group_key(rows: Dict[str, Dict[str, str]]) -> Optional[str]:
    """The first of GROUP_FIELDS (organ, patient) the per-image rows record, or None."""
    return next((key for key in GROUP_FIELDS if key in next(iter(rows.values()), {})), None)


def per_image_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str, metric: str = "aji") -> str:
    """One row per image (with its organ or patient when recorded), one column per run, as the
    paper's Table 2. Every run must hold the same images."""
    tables = [(name, run_per_image_rows(d, dataset), _source(d, dataset)) for name, d in runs]
    first_rows = tables[0][1]
    for _, rows, source in tables:
        _require_columns(rows, [metric], source)
        require_same_images(first_rows, rows, tables[0][2], source)
    group_key = _group_key(first_rows)
    image_ids = sorted(first_rows, key=lambda i: (first_rows[i][group_key] if group_key else "", i))
    header = ([group_key] if group_key else []) + ["image"] + [f"{name} {metric}" for name, _, _ in tables]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    values = [numeric_column(rows, image_ids, metric, source) for _, rows, source in tables]
    for k, image_id in enumerate(image_ids):
        cells = [first_rows[image_id][group_key]] if group_key else []
        cells.append(image_id)
        cells += [f"{column[k]:.4f}" for column in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str,
                metrics: Sequence[str] = CURVE_METRICS) -> str:
    """Each run's mean per group of images (Kumar's organs, TNBC's patients: the first of
    GROUP_FIELDS the per-image rows record), per named subset of the data set (Kumar's test set:
    same and different organ) and over all images, as the paper's Table 2 gives its Kumar
    results organ by organ. Means only: a group holds too few images for a test.
    Every run must hold the same images with the same group labels."""
    tables = [(name, run_per_image_rows(d, dataset), _source(d, dataset)) for name, d in runs]
    _, first_rows, first_source = tables[0]
    for _, rows, source in tables:
        _require_columns(rows, metrics, source)
    group_key = _group_key(first_rows)
    if group_key is None:
        raise ValueError(f"the per-group table needs a {' or '.join(GROUP_FIELDS)} column in {first_source}")
    for _, rows, source in tables[1:]:
        require_same_images(first_rows, rows, first_source, source)
        relabelled = [i for i in sorted(rows) if rows[i].get(group_key) != first_rows[i][group_key]]
        if relabelled:
            raise ValueError(f"{source} gives other {group_key} labels than {first_source} to "
                             f"{', '.join(relabelled)}")
    groups: Dict[str, List[str]] = {}
    for image_id in sorted(first_rows):
        groups.setdefault(first_rows[image_id][group_key], []).append(image_id)
    header = [group_key, "images"] + [f"{name} {metric}" for metric in metrics for name, _, _ in tables]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    subsets = _subsets_held(dataset, first_rows, first_source)
    for label, image_ids in sorted(groups.items()) + subsets + [("all", sorted(first_rows))]:
        cells = [label, str(len(image_ids))]
        for metric in metrics:
            for _, rows, source in tables:
                cells.append(f"{numeric_column(rows, image_ids, metric, source).mean():.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    of_each = f"each {group_key} (and subset)" if subsets else f"each {group_key}"
    notes = _seeds_note(runs, after=".") + [f"Means over the images of {of_each} of {dataset}."]
    if subsets:
        described = [f"{name} ({', '.join(sorted({first_rows[i][group_key] for i in ids}))})" for name, ids in subsets]
        notes.append(f"Subsets of {dataset}: {'; '.join(described)}.")
    return "\n".join(lines + [""] + notes)


def _subsets_held(dataset: str, rows: Dict[str, Dict[str, str]], source: str) -> List[Tuple[str, List[str]]]:
    """[(subset, image ids)] of the data set's named subsets (Kumar's test set: same and
    different organ) that the rows hold. A subset none of whose images the rows hold is left
    out (other images under the data set's name); one held in part is an error, as its mean
    would silently cover fewer images."""
    held = []
    for name, image_ids in nuclei_dataset_subsets(dataset).items():
        missing = [image_id for image_id in image_ids if image_id not in rows]
        if len(missing) == len(image_ids):
            continue
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} of the {len(image_ids)} images of "
                             f"{dataset}'s subset {name}: {', '.join(missing)}")
        held.append((name, sorted(image_ids)))
    return held


PAIR_SEPARATOR = " > "  # "A > B": H1 is "A better than B"


def pairs_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str, pairs: Sequence[Tuple[str, str]],
                metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One row per chosen comparison "A > B" of two named runs: per metric the mean difference
    A - B, the one-tailed paired t-test's p-value (H1: A better) and its stars. The paper's
    Table 3 tests each module against the model without it, not every run against one baseline."""
    run_dirs = dict(runs)
    rows: Dict[str, Dict[str, Dict[str, str]]] = {}  # each run read once, however many pairs name it
    header = ["comparison (H1: better)", "images"] + [f"{m}: A - B (p)" for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for better, worse in pairs:
        unknown = [name for name in (better, worse) if name not in run_dirs]
        if unknown:
            raise ValueError(f"--pair names runs that no --run gives: {', '.join(map(repr, unknown))} "
                             f"(runs: {', '.join(map(repr, run_dirs))})")
        for name in (better, worse):
            if name not in rows:
                rows[name] = run_per_image_rows(run_dirs[name], dataset)
                _require_columns(rows[name], metrics, _source(run_dirs[name], dataset))
        tests = {r["metric"]: r for r in compare_per_image_rows(
            rows[better], rows[worse], metrics, _source(run_dirs[better], dataset), _source(run_dirs[worse], dataset))}
        cells = [f"{better}{PAIR_SEPARATOR}{worse}", str(next(iter(tests.values()))["n"])]
        for metric in metrics:
            test = tests[metric]
            cells.append(f"{test['mean_a'] - test['mean_b']:+.4f} (p {test['p']:.3f}) {test['stars']}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + _seeds_note([(name, run_dirs[name]) for name in rows],
                                after="; the tests are over images, not seeds.")
    lines.append(f"One-tailed paired t-tests over the images of {dataset} "
                 "(*** p < 0.01, ** p < 0.05, * p < 0.1, x p >= 0.1).")
    return "\n".join(lines)


def _evaluated_with_others(run_dir: str, dataset: str) -> bool:
    """Whether the run's training evaluations name their data set in the metric keys.

    Detectron2's ``DefaultTrainer.test`` drops the ``<dataset>/`` prefix when ``DATASETS.TEST``
    holds a single data set, so the run's config decides which keys hold ``dataset``'s values.
    """
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: the run's config is needed to read its evaluations")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not a readable YAML config ({' '.join(str(e).split())})") from e
    datasets = config.get("DATASETS") if isinstance(config, dict) else None
    test_sets = datasets.get("TEST") if isinstance(datasets, dict) else None
    if not isinstance(test_sets, (list, tuple)):
        # An empty or cut file (a run killed while it was written) loads as None or a bare string.
        raise ValueError(f"{config_path}: no DATASETS.TEST list in the run's config (empty or damaged file?)")
    test_sets = list(test_sets)
    if dataset not in test_sets:
        raise ValueError(f"{run_dir}: {dataset} was not evaluated during training "
                         f"(DATASETS.TEST {test_sets})")
    return len(test_sets) > 1


def accuracy_curve_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str,
                         metrics: Sequence[str] = CURVE_METRICS) -> str:
    """Each metric on ``dataset`` at every iteration a run was evaluated during training.

    Reads ``<run>/training_metrics.json`` (Detectron2's metrics.json, where the evaluations of
    ``TEST.EVAL_PERIOD`` land as ``<dataset>/nuclei/<metric>``); "-" where a run has no value.
    """
    curves = []
    for name, run_dir in _one_folder_each(runs, "accuracy/iterations"):
        series = read_training_metrics(os.path.join(run_dir, TRAINING_METRICS_JSON))
        prefix = f"{dataset}/" if _evaluated_with_others(run_dir, dataset) else ""
        curves.append({m: series.get(f"{prefix}nuclei/{m}", {}) for m in metrics})
        if not any(curves[-1].values()):
            raise ValueError(f"{run_dir}: no {dataset} evaluation in {TRAINING_METRICS_JSON}")
    iterations = sorted({i for curve in curves for points in curve.values() for i in points})
    header = ["iteration"] + [f"{name} {m}" for name, _ in runs for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for iteration in iterations:
        cells = [str(iteration)]
        for curve in curves:
            cells += [f"{curve[m][iteration]:.4f}" if iteration in curve[m] else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_TRAINING_SPEED = re.compile(r"Overall training speed: (\d+) iterations in ([\d:.]+) \(([\d.]+) s / it\)")
_INFERENCE_TIME = re.compile(r"Total inference time: [\d:.]+ \(([\d.]+) s / iter per device")
_RESULTS_FOR = re.compile(r"Evaluation results for (\S+) in csv format")
RUN_LOGS = ("log.txt", "test_eval_log.txt")  # the training log, then a separate test evaluation
# results/ keeps its logs gzip-compressed (collect_results.sh): a GPU command carries the whole
# working tree within 64 MiB, and Detectron2's logs compress about tenfold.
GZIP_SUFFIX = ".gz"


def _run_log_lines(run_dir: str, name: str):
    """Lines of ``run_dir/name``, or of its gzip-compressed ``name.gz``; none when neither exists."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        path += GZIP_SUFFIX
        if not os.path.isfile(path):
            return
    try:
        opener = gzip.open if path.endswith(GZIP_SUFFIX) else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as stream:
            yield from stream
    # A bad header raises gzip.BadGzipFile (an OSError), damaged data zlib.error, a cut file EOFError.
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read the log ({e})") from e


class TrainingSpeed(NamedTuple):
    iterations: int  # timed iterations (Detectron2 leaves a few warm-up iterations of each start untimed)
    time: str  # h:mm:ss
    seconds_per_iteration: float


def _seconds(hms: str) -> float:
    seconds = 0.0
    for part in hms.split(":"):
        seconds = 60 * seconds + float(part)
    return seconds


def _training_speed(matches: Sequence[re.Match]) -> Optional[TrainingSpeed]:
    """One training-speed line as logged; a resumed run's starts (one line each, log.txt is appended
    to) summed."""
    if not matches:
        return None
    if len(matches) == 1:
        return TrainingSpeed(int(matches[0].group(1)), matches[0].group(2), float(matches[0].group(3)))
    iterations = sum(int(m.group(1)) for m in matches)
    seconds = sum(_seconds(m.group(2)) for m in matches)
    return TrainingSpeed(iterations, str(datetime.timedelta(seconds=int(seconds))), seconds / max(iterations, 1))


def _run_costs(run_dir: str, dataset: str) -> Tuple[Optional[TrainingSpeed], Optional[float]]:
    """Detectron2's training speed (summed over the starts of a resumed run), and seconds per image
    of inference on ``dataset``.

    Inference time is the evaluator's "Total inference time" (the first images, warm-up, are not
    counted) logged just before the results of ``dataset``; the last evaluation in the logs wins.
    """
    speeds, per_image, pending = [], None, None
    for name in RUN_LOGS:
        for line in _run_log_lines(run_dir, name):
            if match := _TRAINING_SPEED.search(line):
                speeds.append(match)
            elif match := _INFERENCE_TIME.search(line):
                pending = float(match.group(1))  # per image on one device (one process)
            elif match := _RESULTS_FOR.search(line):
                if match.group(1) == dataset and pending is not None:
                    per_image = pending
                pending = None
    return _training_speed(speeds), per_image


def cost_table(runs: Sequence[Tuple[str, RunFolders]], dataset: str) -> str:
    """Training iterations, wall time and s/iteration, and inference s/image on ``dataset``, per run,
    read from the Detectron2 logs kept in each run folder (``log.txt``, ``test_eval_log.txt``, each
    possibly gzip-compressed as ``.gz``)."""
    header = ["run", "timed iterations", "training time", "s / iteration", f"inference s / image ({dataset})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run_dir in _one_folder_each(runs, "cost"):
        speed, per_image = _run_costs(run_dir, dataset)
        if speed is None and per_image is None:
            raise ValueError(f"{run_dir}: no Detectron2 log ({' or '.join(RUN_LOGS)}, or the same "
                             f"gzip-compressed, {GZIP_SUFFIX}) with timings")
        cells = [name]
        cells += [str(speed.iterations), speed.time, f"{speed.seconds_per_iteration:.2f}"] if speed else ["-"] * 3
        cells.append(f"{per_image:.2f}" if per_image is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="data set folder inside each run")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="a run (the first is the baseline); repeat. NAME=DIR1,DIR2: seeds of one "
                             "configuration, each image's metrics averaged over them")
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated (default {','.join(DEFAULT_METRICS)}; "
                             f"with --curve or --per-group {','.join(CURVE_METRICS)})")
    parser.add_argument("--pair", action="append", default=[], metavar="'A > B'",
                        help="instead: test run A against run B (names of --run); repeat")
    parser.add_argument("--per-image", action="store_true", help="also print the per-image AJI table")
    parser.add_argument("--per-image-only", action="store_true", help="print only the per-image AJI table")
    parser.add_argument("--per-group", action="store_true",
                        help="instead: each run's mean per organ (or patient), per subset (Kumar test: "
                             "same / different organ) and over all images")
    parser.add_argument("--curve", action="store_true",
                        help="instead: the metrics at each evaluation during training")
    parser.add_argument("--cost", action="store_true",
                        help="instead: training time and inference time per image, from the run logs")
    parser.add_argument("--update", metavar="MARKDOWN",
                        help="regenerate every table block of this file in place (see update_markdown)")
    parser.add_argument("--check", metavar="MARKDOWN",
                        help="exit 1 when a table block of this file differs from its regeneration")
    return parser


def render(argv: Sequence[str]) -> str:
    """The table(s) that ``python -m nucseg_d2.evaluation.results_table ARGV`` prints."""
    return _render(_parser().parse_args(list(argv)))


def _render(args: argparse.Namespace) -> str:
    if not args.dataset or not args.run:
        raise ValueError("a table needs --dataset and at least one --run NAME=DIR")
    runs = [tuple(item.split("=", 1)) for item in args.run]
    if any(len(run) != 2 for run in runs):
        raise ValueError(f"--run takes NAME=DIR or NAME=DIR1{SEED_SEPARATOR}DIR2 (seeds), got {args.run}")
    repeated = sorted(name for name, count in collections.Counter(name for name, _ in runs).items() if count > 1)
    if repeated:  # --pair and the stars find runs by name
        raise ValueError(f"--run names must differ; repeated: {', '.join(repeated)}")
    # A folder whose own name holds the separator is one folder, not seeds.
    runs = [(name, dirs if os.path.isdir(dirs) else dirs.split(SEED_SEPARATOR)) for name, dirs in runs]
    kinds = [flag for flag, asked in (("--cost", args.cost), ("--pair", args.pair), ("--curve", args.curve),
                                      ("--per-group", args.per_group), ("--per-image-only", args.per_image_only))
             if asked]
    if len(kinds) > 1 or (kinds and args.per_image):
        raise ValueError(f"{', '.join(kinds + (['--per-image'] if args.per_image else []))} "
                         "are separate tables; ask for one")
    if args.cost:
        return cost_table(runs, args.dataset)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.pair:
        pairs = [tuple(name.strip() for name in item.split(PAIR_SEPARATOR, 1)) for item in args.pair]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"--pair takes 'A{PAIR_SEPARATOR}B' (run names), got {args.pair}")
        return pairs_table(runs, args.dataset, pairs, metrics or DEFAULT_METRICS)
    if args.curve:
        return accuracy_curve_table(runs, args.dataset, metrics or CURVE_METRICS)
    if args.per_group:
        return group_table(runs, args.dataset, metrics or CURVE_METRICS)
    if args.per_image_only:
        return per_image_table(runs, args.dataset)
    text = results_table(runs, args.dataset, metrics or DEFAULT_METRICS)
    if args.per_image:
        text += "\n\n" + per_image_table(runs, args.dataset)
    return text


# A generated block in a Markdown file: the arguments in an opening comment, the table, a closing one.
_BLOCK = re.compile(r"(<!-- results_table (?P<args>.+?) -->\n)(?P<body>.*?)(<!-- end results_table -->)", re.S)


def update_markdown(path: str, check_only: bool = False) -> List[str]:
    """Regenerate each block ``<!-- results_table ARGS -->`` ... ``<!-- end results_table -->`` of
    ``path`` with :func:`render` (ARGS split as a shell would); returns the ARGS of the blocks that
    were stale. Unless ``check_only``, the file is rewritten atomically when any was."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stale: List[str] = []

    def regenerate(match: re.Match) -> str:
        body = render(shlex.split(match.group("args"))) + "\n"
        if body != match.group("body"):
            stale.append(match.group("args"))
        return match.group(1) + body + match.group(4)

    new_text = _BLOCK.sub(regenerate, text)
    if stale and not check_only:
        with atomic_path(path) as temp:
            with open(temp, "w", encoding="utf-8") as f:
                f.write(new_text)
    return stale


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.update or args.check:
            stale = update_markdown(args.update or args.check, check_only=bool(args.check))
            verb = "out of date" if args.check else "regenerated"
            for block in stale:
                print(f"{args.update or args.check}: {verb}: {block}")
            return 1 if (stale and args.check) else 0
        print(_render(args))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-tailed paired t-tests between two methods' per-image results, with the paper's stars.

Liu et al. (IJCAI 2019), Tables 2-4: "one-tailed paired t-test", *** p < 0.01, ** p < 0.05,
* p < 0.1, ✗ otherwise (printed here as "x"). Pairs are images, matched by id.

Command line::

    python -m nucseg_d2.evaluation.significance ours/per_image.csv theirs/per_image.csv \
        [--metrics aji,dice1] [--key image_id] [--names Proposed "Mask R-CNN"]

H1 for every metric is "A is better than B": mean(A - B) > 0, or mean(B - A) > 0 for the
metrics where lower is better (object Hausdorff).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from scipy import stats

from .metrics import LOWER_IS_BETTER, metric_keys

__all__ = [
    "PairedTTest",
    "paired_one_tailed_ttest",
    "significance_stars",
    "compare_per_image_csv",
    "compare_per_image_rows",
    "read_per_image_rows",
    "numeric_column",
    "require_same_images",
    "format_table",
    "main",
]


_EQUAL_DIFFERENCES_RTOL = 1e-12


class PairedTTest(NamedTuple):
    statistic: float  # t = mean(d) / (std(d, ddof=1) / sqrt(n)), d = a - b
    pvalue: float  # one-tailed, H1: mean(a - b) > 0
    num_pairs: int
    mean_difference: float


def paired_one_tailed_ttest(a: Sequence[float], b: Sequence[float]) -> PairedTTest:
    """Paired t-test of H1: mean(a - b) > 0 (``scipy.stats.ttest_rel(a, b, alternative="greater")``).

    ``a[k]`` and ``b[k]`` must be the same image. Needs at least two pairs. When every difference
    is equal (up to float rounding) the t statistic is undefined: the result is NaN, whatever the
    sign of the difference, not scipy's ±inf or the huge t that rounding noise gives.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got shapes {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {a.size}")
    differences = a - b
    mean_difference = float(np.mean(differences))
    if not np.all(np.isfinite(differences)):
        # An infinite value (object Hausdorff of an image where a method found nothing) leaves the
        # mean and variance of the differences undefined: NaN, which compare_per_image_rows explains.
        return PairedTTest(float("nan"), float("nan"), int(a.size), mean_difference)
    # 0.6 - 0.5 and 0.7 - 0.6 differ in the last bits: without a tolerance such "equal" differences
    # would give t ~ 1e15 and '***'.
    if np.ptp(differences) <= _EQUAL_DIFFERENCES_RTOL * max(1.0, float(np.max(np.abs(differences)))):
        return PairedTTest(float("nan"), float("nan"), int(a.size), mean_difference)
    result = stats.ttest_rel(a, b, alternative="greater")
    return PairedTTest(float(result.statistic), float(result.pvalue), int(a.size), mean_difference)


def significance_stars(p: float) -> str:
    """The paper's notation: p < 0.01 '***', p < 0.05 '**', p < 0.1 '*', otherwise 'x' (✗).

    A NaN p-value (no variation in the differences) gives 'n/a'.
    """
    if p is None or math.isnan(p):
        return "n/a"
    if p < 0.01:
        return "***"
    if p < 0.05:
        return "**"
    if p < 0.1:
        return "*"
    return "x"


def read_per_image_rows(path: str, key: str = "image_id") -> Dict[str, Dict[str, str]]:
    """A per-image CSV as ``{row[key]: row}``; ValueError on a missing key column, duplicates or no rows."""
    # utf-8-sig: a CSV saved again by a spreadsheet starts with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or key not in reader.fieldnames:
            raise ValueError(f"{path}: no {key!r} column (columns: {reader.fieldnames})")
        rows: Dict[str, Dict[str, str]] = {}
        duplicates = []
        for row in reader:
            if row[key] in rows:
                duplicates.append(row[key])
            rows[row[key]] = row
    if duplicates:
        raise ValueError(f"{path}: duplicate {key} values {sorted(set(duplicates))}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def numeric_column(rows: Mapping[str, Mapping[str, str]], ids: Sequence[str], column: str,
                   source: str) -> np.ndarray:
    """``column`` of the rows ``ids`` as floats; ValueError naming ``source`` and the image otherwise."""
    values = []
    for image_id in ids:
        text = rows[image_id].get(column)
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = float("nan")
        if math.isnan(value):  # float("nan") parses, but would turn a test or a seed mean into NaN silently
            raise ValueError(f"{source}: {column} of {image_id!r} is not a number: {text!r}")
        values.append(value)  # inf is kept: an object Hausdorff with nothing predicted
    return np.array(values)


def require_same_images(rows_a: Mapping[str, object], rows_b: Mapping[str, object], source_a: str,
                        source_b: str) -> None:
    """ValueError naming the ids found in only one of two per-image tables."""
    only_a = sorted(set(rows_a) - set(rows_b))
    only_b = sorted(set(rows_b) - set(rows_a))
    if only_a or only_b:
        raise ValueError(f"image ids differ between {source_a} and {source_b}: only in the first: {only_a}; "
                         f"only in the second: {only_b}")


def compare_per_image_csv(csv_a: str, csv_b: str, metrics: Optional[Sequence[str]] = None,
                          key: str = "image_id") -> List[Dict[str, object]]:
    """One-tailed paired t-test of "A better than B" per metric, pairing rows by ``key``.

    ``metrics`` default: the known metric columns (``metric_keys()``) present in both files.
    Raises ValueError when the two files do not hold the same image ids (naming the ids found
    in only one of them), on duplicate ids, or on non-numeric values. Returns one dict per
    metric: metric, better ("higher"/"lower"), n, mean_a, mean_b, t, p, stars, note (why a
    metric was not tested: the images where it is infinite; else "").
    """
    return compare_per_image_rows(read_per_image_rows(csv_a, key), read_per_image_rows(csv_b, key),
                                  metrics, csv_a, csv_b)


def compare_per_image_rows(rows_a: Mapping[str, Mapping[str, str]], rows_b: Mapping[str, Mapping[str, str]],
                           metrics: Optional[Sequence[str]] = None, source_a: str = "A",
                           source_b: str = "B") -> List[Dict[str, object]]:
    """:func:`compare_per_image_csv` on rows already read: ``{image id: {column: value}}``.

    ``source_a`` and ``source_b`` name where the rows came from in error messages.
    """
    require_same_images(rows_a, rows_b, source_a, source_b)
    if not rows_a:
        raise ValueError(f"{source_a}, {source_b}: no rows")
    ids = sorted(rows_a)
    columns_a = list(next(iter(rows_a.values())))
    columns_b = set(next(iter(rows_b.values())))
    if metrics is None:
        known = set(metric_keys())
        metrics = [c for c in columns_a if c in known and c in columns_b]
        if not metrics:
            raise ValueError(f"no known metric columns shared by {source_a} and {source_b}; pass metrics=")
    else:
        missing = [m for m in metrics if m not in columns_a or m not in columns_b]
        if missing:
            raise ValueError(f"metrics {missing} are not columns of both {source_a} and {source_b}")
    table = []
    for metric in metrics:
        a = numeric_column(rows_a, ids, metric, source_a)
        b = numeric_column(rows_b, ids, metric, source_b)
        lower_is_better = metric in LOWER_IS_BETTER
        test = paired_one_tailed_ttest(b, a) if lower_is_better else paired_one_tailed_ttest(a, b)
        infinite = [image_id for image_id, x, y in zip(ids, a, b) if not (math.isfinite(x) and math.isfinite(y))]
        table.append({
            "metric": metric,
            "better": "lower" if lower_is_better else "higher",
            "n": test.num_pairs,
            "mean_a": float(a.mean()),
            "mean_b": float(b.mean()),
            "t": test.statistic,
            "p": test.pvalue,
            "stars": significance_stars(test.pvalue),
            "note": f"not tested: {metric} is infinite for {', '.join(infinite)}" if infinite else "",
        })
    return table


def format_table(table: Sequence[Dict[str, object]], name_a: str = "A", name_b: str = "B") -> str:
    """Plain-text table of ``compare_per_image_csv`` rows."""
    header = ["metric", "better", "n", f"mean {name_a}", f"mean {name_b}", "t", "p (1-tailed)", "sig"]
    lines = [[str(r["metric"]), str(r["better"]), str(r["n"]), f"{r['mean_a']:.4f}", f"{r['mean_b']:.4f}",
              f"{r['t']:.3f}", f"{r['p']:.3g}", str(r["stars"])] for r in table]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    notes = [str(r["note"]) for r in table if r.get("note")]
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines] + notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nucseg_d2.evaluation.significance",
        description="One-tailed paired t-tests (H1: A better than B) between two per-image CSV files, "
                    "with the paper's stars (*** p<0.01, ** p<0.05, * p<0.1, x otherwise).",
    )
    parser.add_argument("csv_a", help="per-image results of method A (e.g. the proposed method)")
    parser.add_argument("csv_b", help="per-image results of method B (the comparison)")
    parser.add_argument("--metrics", help="comma-separated columns (default: known metric columns)")
    parser.add_argument("--key", default="image_id", help="column pairing the rows (default image_id)")
    parser.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), help="labels for A and B")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    name_a, name_b = args.names or (os.path.splitext(os.path.basename(p))[0] for p in (args.csv_a, args.csv_b))
    if name_a == name_b:
        name_a, name_b = "A", "B"
    try:
        table = compare_per_image_csv(args.csv_a, args.csv_b, metrics=metrics, key=args.key)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"A = {name_a} ({args.csv_a}); B = {name_b} ({args.csv_b})")
    print("one-tailed paired t-test, H1: A better than B; *** p<0.01, ** p<0.05, * p<0.1, x otherwise")
    print(format_table(table, name_a, name_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())

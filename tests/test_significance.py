"""Tests of nucseg_d2.evaluation.significance (one-tailed paired t-tests, the paper's stars)."""
import csv
import math
import os
import subprocess
import sys

import pytest

from nucseg_d2.evaluation.significance import (
    compare_per_image_csv,
    compare_per_image_rows,
    main,
    paired_one_tailed_ttest,
    significance_stars,
)

# Per-image results of the paper's Table 2 (14 Kumar test images, same image order in each list).
PROPOSED = {
    "aji": [0.5490, 0.6362, 0.6202, 0.5902, 0.5491, 0.5179, 0.6305, 0.6423, 0.6749, 0.4745, 0.4450, 0.4871,
            0.6909, 0.6871],
    "dice1": [0.7887, 0.8478, 0.8097, 0.7724, 0.7907, 0.7323, 0.8090, 0.7992, 0.8666, 0.6963, 0.7036, 0.7474,
              0.8795, 0.8668],
}
COMPARED = {
    "CNN3": {
        "aji": [0.4974, 0.5796, 0.4792, 0.6672, 0.5175, 0.5148, 0.4914, 0.3761, 0.5465, 0.4968, 0.4891, 0.5692,
                0.4538, 0.4378],
        "dice1": [0.6885, 0.7476, 0.6606, 0.7837, 0.6726, 0.7036, 0.8306, 0.7537, 0.9312, 0.6304, 0.7679, 0.7118,
                  0.8913, 0.8982],
    },
    "DIST": {
        "aji": [0.5334, 0.5884, 0.5648, 0.5420, 0.5466, 0.4432, 0.6273, 0.6294, 0.6475, 0.5467, 0.4240, 0.4484,
                0.6408, 0.6550],
        "dice1": [0.7761, 0.8380, 0.7805, 0.7606, 0.7877, 0.6684, 0.8030, 0.7903, 0.8623, 0.7768, 0.7212, 0.7360,
                  0.8547, 0.8520],
    },
    "Mask R-CNN": {
        "aji": [0.4960, 0.5577, 0.5794, 0.5286, 0.5183, 0.4577, 0.5934, 0.6282, 0.6237, 0.4677, 0.3691, 0.4354,
                0.6352, 0.6449],
        "dice1": [0.7486, 0.8026, 0.7742, 0.7285, 0.7816, 0.6881, 0.8032, 0.7937, 0.8385, 0.6944, 0.6251, 0.6907,
                  0.8323, 0.8329],
    },
    "U-Net": {
        "aji": [0.3831, 0.5505, 0.5386, 0.5020, 0.4773, 0.3794, 0.1807, 0.3118, 0.5115, 0.4621, 0.0786, 0.1305,
                0.4096, 0.4507],
        "dice1": [0.7492, 0.8144, 0.8039, 0.7786, 0.7648, 0.6313, 0.7889, 0.7919, 0.8258, 0.7648, 0.7121, 0.7599,
                  0.8647, 0.8629],
    },
}
# The "Significance" row of Table 2 (x = the paper's ✗).
PAPER_STARS = {
    "CNN3": {"aji": "**", "dice1": "*"},
    "DIST": {"aji": "***", "dice1": "x"},
    "Mask R-CNN": {"aji": "***", "dice1": "***"},
    "U-Net": {"aji": "***", "dice1": "*"},
}


@pytest.mark.parametrize("p, stars", [
    (0.0, "***"), (0.0099, "***"), (0.01, "**"), (0.0499, "**"), (0.05, "*"), (0.0999, "*"),
    (0.1, "x"), (0.7, "x"), (float("nan"), "n/a"),
])
def test_significance_stars_thresholds(p, stars):
    # Paper: *** under 0.01, ** from 0.01 to 0.05, * from 0.05 to 0.1, ✗ over 0.1.
    assert significance_stars(p) == stars


def test_paired_ttest_hand_worked():
    # d = a - b = [2, 3, 4]: mean 3, sample std 1, t = 3 / (1/sqrt(3)) = 3 sqrt(3).
    # Student t with 2 df has CDF 1/2 + t / (2 sqrt(2 + t^2)), so the one-tailed
    # p = 1/2 - 3 sqrt(3) / (2 sqrt(29)) = 0.017549...
    result = paired_one_tailed_ttest([3, 5, 7], [1, 2, 3])
    assert result.statistic == pytest.approx(3 * math.sqrt(3))
    assert result.pvalue == pytest.approx(0.5 - 3 * math.sqrt(3) / (2 * math.sqrt(29)))
    assert result.num_pairs == 3 and result.mean_difference == pytest.approx(3.0)
    # One-tailed: the other direction is 1 - p.
    assert paired_one_tailed_ttest([1, 2, 3], [3, 5, 7]).pvalue == pytest.approx(1 - result.pvalue)


def test_paired_ttest_rejects_bad_input_and_passes_undefined_on():
    with pytest.raises(ValueError, match="equal length"):
        paired_one_tailed_ttest([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_one_tailed_ttest([1], [0])
    same = paired_one_tailed_ttest([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert math.isnan(same.pvalue) and significance_stars(same.pvalue) == "n/a"
    # Equal non-zero differences: scipy gives t = inf (exact) or ~1e15 (0.6 - 0.5 != 0.7 - 0.6 in
    # floats), both '***'; the test is undefined either way.
    for a, b in (([0.5, 0.5], [0.4, 0.4]), ([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]), ([0.4, 0.5], [0.5, 0.6])):
        constant = paired_one_tailed_ttest(a, b)
        assert math.isnan(constant.statistic) and significance_stars(constant.pvalue) == "n/a"
        assert constant.mean_difference == pytest.approx(a[0] - b[0])
    assert paired_one_tailed_ttest([0.6, 0.7, 0.8], [0.5, 0.6, 0.6999]).pvalue < 0.5  # nearly equal is not equal


@pytest.mark.parametrize("method", sorted(COMPARED))
def test_reproduces_the_significance_row_of_the_papers_table_2(method):
    for metric in ("aji", "dice1"):
        result = paired_one_tailed_ttest(PROPOSED[metric], COMPARED[method][metric])
        assert significance_stars(result.pvalue) == PAPER_STARS[method][metric], (method, metric, result.pvalue)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def table_2_csvs(tmp_path, method="DIST", reverse_b=True):
    ids = [f"TCGA-{k:02d}" for k in range(14)]
    rows_a = [{"image_id": i, "organ": "x", "num_gt": 500, "aji": a, "dice1": f}
              for i, a, f in zip(ids, PROPOSED["aji"], PROPOSED["dice1"])]
    rows_b = [{"image_id": i, "organ": "x", "num_gt": 500, "aji": a, "dice1": f}
              for i, a, f in zip(ids, COMPARED[method]["aji"], COMPARED[method]["dice1"])]
    if reverse_b:
        rows_b.reverse()  # pairing must go by image id, not by row order
    return write_csv(tmp_path / "proposed.csv", rows_a), write_csv(tmp_path / "dist.csv", rows_b)


def test_compare_csv_pairs_by_image_id_and_picks_metric_columns(tmp_path):
    csv_a, csv_b = table_2_csvs(tmp_path)
    table = compare_per_image_csv(csv_a, csv_b)
    # Known metric columns only: organ (text) and num_gt (a count) are not tested.
    assert [row["metric"] for row in table] == ["aji", "dice1"]
    aji_row, dice_row = table
    expected = paired_one_tailed_ttest(PROPOSED["aji"], COMPARED["DIST"]["aji"])
    assert aji_row["p"] == pytest.approx(expected.pvalue) and aji_row["t"] == pytest.approx(expected.statistic)
    # Table 2 averages: Proposed 0.5854, DIST 0.5598 (AJI); stars *** and x as in the paper.
    assert round(aji_row["mean_a"], 4) == 0.5854 and round(aji_row["mean_b"], 4) == 0.5598
    assert aji_row["stars"] == "***" and dice_row["stars"] == "x" and aji_row["n"] == 14


def hausdorff_rows(distances):
    return [{"image_id": i, "object_hausdorff": h} for i, h in zip("pqr", distances)]


def test_compare_csv_hausdorff_is_better_when_lower(tmp_path):
    # A's distances are lower by 2, 3, 4 px: "A better" for Hausdorff is the t-test of B - A,
    # the hand-worked case above (p = 0.01755, '**').
    csv_a = write_csv(tmp_path / "a.csv", hausdorff_rows([1, 2, 3]))
    csv_b = write_csv(tmp_path / "b.csv", hausdorff_rows([3, 5, 7]))
    (row,) = compare_per_image_csv(csv_a, csv_b)
    assert row["better"] == "lower"
    assert row["p"] == pytest.approx(0.5 - 3 * math.sqrt(3) / (2 * math.sqrt(29)))
    assert row["stars"] == "**"


def test_an_infinite_value_leaves_the_metric_untested_and_says_where(tmp_path, capsys):
    # A found nothing in image r: its object Hausdorff is inf, and the differences have no mean.
    csv_a = write_csv(tmp_path / "a.csv", hausdorff_rows([1, 2, math.inf]))
    csv_b = write_csv(tmp_path / "b.csv", hausdorff_rows([3, 5, 7]))
    (row,) = compare_per_image_csv(csv_a, csv_b)
    assert math.isnan(row["p"]) and row["stars"] == "n/a"
    assert row["note"] == "not tested: object_hausdorff is infinite for r"
    assert main([csv_a, csv_b]) == 0
    assert "not tested: object_hausdorff is infinite for r" in capsys.readouterr().out
    (finite,) = compare_per_image_csv(csv_b, csv_b)  # equal differences, no inf: n/a without a note
    assert finite["note"] == ""


def test_a_csv_saved_with_a_byte_order_mark_compares_like_the_plain_one(tmp_path):
    csv_a, csv_b = table_2_csvs(tmp_path)
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + open(csv_a, "rb").read())
    assert compare_per_image_csv(str(with_bom), csv_b) == compare_per_image_csv(csv_a, csv_b)


def test_compare_rows_pairs_images_by_id_whatever_their_order():
    rows_a = {"img2": {"aji": "0.8"}, "img1": {"aji": "0.6"}, "img3": {"aji": "1.0"}}
    rows_b = {"img1": {"aji": "0.5"}, "img2": {"aji": "0.6"}, "img3": {"aji": "0.7"}}
    (row,) = compare_per_image_rows(rows_a, rows_b, ["aji"])
    # d = 0.1, 0.2, 0.3 once paired by id: t = 3.4641, 2 degrees of freedom, p = 0.0371.
    assert row["n"] == 3 and row["p"] == pytest.approx(0.0371, abs=1e-4) and row["stars"] == "**"
    with pytest.raises(ValueError, match="no rows"):
        compare_per_image_rows({}, {}, ["aji"], "mine", "theirs")
    with pytest.raises(ValueError, match=r"mine and theirs: only in the first: \['img3'\]"):
        compare_per_image_rows(rows_a, {k: v for k, v in rows_b.items() if k != "img3"}, ["aji"], "mine", "theirs")


def test_compare_csv_errors_name_the_problem(tmp_path):
    csv_a = write_csv(tmp_path / "a.csv", [{"image_id": i, "aji": 0.5} for i in ("img1", "img2", "img3")])
    csv_b = write_csv(tmp_path / "b.csv", [{"image_id": i, "aji": 0.4} for i in ("img1", "img2", "img4")])
    with pytest.raises(ValueError, match=r"only in the first: \['img3'\]; only in the second: \['img4'\]"):
        compare_per_image_csv(csv_a, csv_b)
    dup = write_csv(tmp_path / "dup.csv", [{"image_id": i, "aji": 0.4} for i in ("img1", "img1", "img2")])
    with pytest.raises(ValueError, match="duplicate image_id values \\['img1'\\]"):
        compare_per_image_csv(csv_a, dup)
    values = (("img1", "0.4"), ("img2", "n.a."), ("img3", "0.3"))
    bad = write_csv(tmp_path / "bad.csv", [{"image_id": i, "aji": v} for i, v in values])
    with pytest.raises(ValueError, match="aji of 'img2' is not a number"):
        compare_per_image_csv(csv_a, bad)
    # float("nan") parses; as a value it would make the test n/a without saying why.
    nan = write_csv(tmp_path / "nan.csv", [{"image_id": i, "aji": v} for i, v in (("img1", "0.4"), ("img2", "nan"),
                                                                                   ("img3", "0.3"))])
    with pytest.raises(ValueError, match="aji of 'img2' is not a number: 'nan'"):
        compare_per_image_csv(csv_a, nan)
    with pytest.raises(ValueError, match="no 'name' column"):
        compare_per_image_csv(csv_a, csv_a, key="name")
    with pytest.raises(ValueError, match="not columns of both"):
        compare_per_image_csv(csv_a, csv_a, metrics=["pq"])


def test_cli_prints_the_table(tmp_path, capsys):
    csv_a, csv_b = table_2_csvs(tmp_path)
    assert main([csv_a, csv_b, "--names", "Proposed", "DIST"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    # columns: metric, better, n, mean A, mean B, t, p, sig
    assert lines["aji"][2:5] == ["14", "0.5854", "0.5598"] and lines["aji"][-1] == "***"
    assert lines["dice1"][3:5] == ["0.7936", "0.7863"] and lines["dice1"][-1] == "x"
    assert "mean Proposed" in out and "mean DIST" in out


def test_cli_reports_errors_with_exit_status_2(tmp_path, capsys):
    csv_a = write_csv(tmp_path / "a.csv", [{"image_id": "img1", "aji": 0.5}, {"image_id": "img2", "aji": 0.6}])
    csv_b = write_csv(tmp_path / "b.csv", [{"image_id": "img1", "aji": 0.5}, {"image_id": "img9", "aji": 0.6}])
    assert main([csv_a, csv_b]) == 2
    assert "img9" in capsys.readouterr().err
    assert main([csv_a, str(tmp_path / "missing.csv")]) == 2


def test_module_runs_as_a_command(tmp_path):
    csv_a, csv_b = table_2_csvs(tmp_path, reverse_b=False)
    done = subprocess.run([sys.executable, "-m", "nucseg_d2.evaluation.significance", csv_a, csv_b,
                           "--metrics", "aji"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "***" in done.stdout and "dice1" not in done.stdout

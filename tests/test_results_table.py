"""Results tables from per-image CSVs: hand-checked means, stds and stars."""
import csv
import gzip
from pathlib import Path

import pytest

import nucseg_d2.data
from nucseg_d2.data import nuclei_dataset_subsets
from nucseg_d2.evaluation.results_table import (
    accuracy_curve_table, cost_table, group_table, main, pairs_table, per_image_table, render, results_table,
    run_per_image_rows, update_markdown,
)


def _write_run(folder, dataset, aji_values, organ=None):
    path = folder / dataset
    path.mkdir(parents=True)
    with open(path / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "organ", "aji"])
        writer.writeheader()
        for i, value in enumerate(aji_values):
            writer.writerow({"image_id": f"img{i}", "organ": organ or "Breast", "aji": value})
    return str(folder)


def test_table_means_stds_and_stars(tmp_path):
    base = _write_run(tmp_path / "base", "tnbc_test", [0.5, 0.6, 0.7, 0.4])
    better = _write_run(tmp_path / "better", "tnbc_test", [0.6, 0.71, 0.79, 0.52])
    table = results_table([("Baseline", base), ("Proposed", better)], "tnbc_test", ["aji"])
    rows = table.splitlines()
    # Baseline: mean 0.55, sample std sqrt(((.05)^2 + (.05)^2 + (.15)^2 + (.15)^2) / 3) = 0.1291.
    assert "| Baseline | 4 | 0.5500 ± 0.1291 |" in rows
    # Differences 0.10, 0.11, 0.09, 0.12: consistently better, p far below 0.01.
    assert rows[3].startswith("| Proposed | 4 | 0.6550") and rows[3].endswith("*** |")


def test_worse_run_gets_no_star(tmp_path):
    base = _write_run(tmp_path / "base", "d", [0.5, 0.6, 0.7])
    worse = _write_run(tmp_path / "worse", "d", [0.4, 0.55, 0.6])
    assert results_table([("B", base), ("W", worse)], "d", ["aji"]).splitlines()[3].endswith(" x |")


def test_pairs_table_tests_chosen_comparisons(tmp_path):
    base = _write_run(tmp_path / "base", "d", [0.5, 0.6, 0.7])
    ab1 = _write_run(tmp_path / "ab1", "d", [0.6, 0.8, 1.0])
    runs = [("Baseline", base), ("Ab1", ab1)]
    rows = pairs_table(runs, "d", [("Ab1", "Baseline"), ("Baseline", "Ab1")], ["aji"]).splitlines()
    # d = 0.1, 0.2, 0.3: mean 0.2, std 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641 with 2 degrees of
    # freedom, where P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0371.
    assert rows[2] == "| Ab1 > Baseline | 3 | +0.2000 (p 0.037) ** |"
    assert rows[3] == "| Baseline > Ab1 | 3 | -0.2000 (p 0.963) x |"
    argv = ["--dataset", "d", "--run", f"Baseline={base}", "--run", f"Ab1={ab1}", "--metrics", "aji"]
    assert render(argv + ["--pair", "Ab1 > Baseline"]).splitlines()[2] == rows[2]
    with pytest.raises(ValueError, match="Ab2"):
        render(argv + ["--pair", "Ab2 > Baseline"])
    with pytest.raises(ValueError, match="A > B"):
        render(argv + ["--pair", "Ab1>Baseline"])
    # Two runs of one name: the pair would be looked up by name and test Baseline against itself.
    with pytest.raises(ValueError, match="repeated: Ab1"):
        render(argv + ["--run", f"Ab1={base}", "--pair", "Ab1 > Baseline"])
    assert render(argv + ["--pair", "Ab1  >  Baseline"]).splitlines()[2] == rows[2]  # spaces trimmed
    for other in (["--cost"], ["--curve"], ["--per-image"], ["--per-image-only"]):
        with pytest.raises(ValueError, match="separate tables"):
            render(argv + ["--pair", "Ab1 > Baseline"] + other)


def test_per_image_table_and_missing_dataset(tmp_path, capsys):
    base = _write_run(tmp_path / "base", "kumar_test", [0.5, 0.6], organ="Colon")
    table = per_image_table([("Baseline", base)], "kumar_test")
    assert "| Colon | img1 | 0.6000 |" in table.splitlines()
    assert render(["--dataset", "kumar_test", "--run", f"Baseline={base}", "--per-image-only"]) == table
    alone = render(["--dataset", "kumar_test", "--run", f"Baseline={base}", "--metrics", "aji"])
    assert "Stars" not in alone and len(alone.splitlines()) == 3  # nothing to compare with
    assert main(["--dataset", "nope", "--run", f"B={base}"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="per_image.csv"):
        results_table([("B", base)], "tnbc_test")


def test_per_image_table_refuses_runs_of_other_images(tmp_path):
    base = _write_run(tmp_path / "base", "kumar_test", [0.5, 0.6])
    other = tmp_path / "other"
    _write_run(other, "kumar_test", [0.5, 0.6, 0.7])
    # img2 only in the second run would otherwise vanish from the table without a word.
    with pytest.raises(ValueError, match=r"only in the second: \['img2'\]"):
        per_image_table([("Baseline", base), ("Other", str(other))], "kumar_test")


def test_a_metric_no_run_holds_is_named_with_the_file_and_its_columns(tmp_path, capsys):
    base = _write_run(tmp_path / "base", "d", [0.5, 0.6, 0.7])
    other = _write_run(tmp_path / "other", "d", [0.4, 0.6, 0.8])
    both = ["--run", f"B={base}", "--run", f"O={other}"]
    for argv, named in ((["--run", f"B={base}"], "base"), (both, "base"), (both + ["--per-group"], "base"),
                        (both + ["--pair", "O > B"], "other")):
        assert main(["--dataset", "d", "--metrics", "aji, dic1", *argv]) == 2
        source = tmp_path / named / "d" / "per_image.csv"
        assert capsys.readouterr().err == f"error: {source}: no column 'dic1' (columns: image_id, organ, aji)\n"
    # The per-image table is of aji: a file without it is named the same way.
    (tmp_path / "plain" / "d").mkdir(parents=True)
    (tmp_path / "plain" / "d" / "per_image.csv").write_text("image_id,dice1\nimg0,0.5\n")
    with pytest.raises(ValueError, match=r"plain/d/per_image.csv: no column 'aji' \(columns: image_id, dice1\)"):
        per_image_table([("P", str(tmp_path / "plain"))], "d")


@pytest.mark.parametrize("cell", ["", "nan"])
def test_an_empty_or_nan_cell_is_named_with_the_file_and_image(tmp_path, capsys, cell):
    base = _write_run(tmp_path / "base", "d", [0.5, cell, 0.7])
    other = _write_run(tmp_path / "other", "d", [0.4, 0.6, 0.8])
    message = f"{tmp_path / 'base' / 'd' / 'per_image.csv'}: aji of 'img1' is not a number: {cell!r}"
    for argv in (["--run", f"B={base}"], ["--run", f"O={other}", "--run", f"B={base}"], ["--run", f"B={base}",
                 "--per-image-only"]):
        assert main(["--dataset", "d", "--metrics", "aji", *argv]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("config, problem", [
    ("", "no DATASETS.TEST list in the run's config"),
    ("DATASETS:\n  TEST: [tnbc_val\n", "not a readable YAML config"),
    ("DATASETS: null\n", "no DATASETS.TEST list in the run's config"),
])
def test_a_curve_from_an_empty_or_damaged_config_names_it(tmp_path, capsys, config, problem):
    run = _write_training_metrics(tmp_path / "run", ["tnbc_val"], [{"iteration": 19, "nuclei/aji": 0.4}])
    (tmp_path / "run" / "config.yaml").write_text(config)
    assert main(["--dataset", "tnbc_val", "--curve", "--run", f"P={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run' / 'config.yaml'}: {problem}") and len(err.splitlines()) == 1


def _write_organs(folder, dataset, rows):
    path = folder / dataset
    path.mkdir(parents=True)
    with open(path / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "organ", "aji", "dice1"])
        writer.writeheader()
        for image_id, organ, aji, dice1 in rows:
            writer.writerow({"image_id": image_id, "organ": organ, "aji": aji, "dice1": dice1})
    return str(folder)


def test_group_table_gives_each_runs_mean_per_organ(tmp_path):
    base = _write_organs(tmp_path / "base", "kumar_test",
                         [("a", "Colon", 0.5, 0.7), ("b", "Colon", 0.6, 0.8), ("c", "Breast", 0.4, 0.9)])
    prop = _write_organs(tmp_path / "prop", "kumar_test",
                         [("a", "Colon", 0.7, 0.7), ("b", "Colon", 0.7, 0.9), ("c", "Breast", 0.1, 0.5)])
    rows = group_table([("B", base), ("P", prop)], "kumar_test", ["aji", "dice1"]).splitlines()
    assert rows[0] == "| organ | images | B aji | P aji | B dice1 | P dice1 |"
    assert rows[2] == "| Breast | 1 | 0.4000 | 0.1000 | 0.9000 | 0.5000 |"
    assert rows[3] == "| Colon | 2 | 0.5500 | 0.7000 | 0.7500 | 0.8000 |"
    assert rows[4] == "| all | 3 | 0.5000 | 0.5000 | 0.8000 | 0.7000 |"
    argv = ["--dataset", "kumar_test", "--run", f"B={base}", "--run", f"P={prop}", "--metrics", "aji,dice1"]
    assert render(argv + ["--per-group"]).splitlines() == rows
    with pytest.raises(ValueError, match="separate tables"):
        render(argv + ["--per-group", "--curve"])
    short = _write_organs(tmp_path / "short", "kumar_test", [("a", "Colon", 0.7, 0.7)])
    with pytest.raises(ValueError, match=r"only in the first: \['b', 'c'\]"):
        group_table([("B", base), ("S", short)], "kumar_test", ["aji"])
    relabelled = _write_organs(tmp_path / "relabelled", "kumar_test",
                               [("a", "Colon", 0.7, 0.7), ("b", "Liver", 0.7, 0.9), ("c", "Breast", 0.1, 0.5)])
    with pytest.raises(ValueError, match="other organ labels .* to b$"):
        group_table([("B", base), ("R", relabelled)], "kumar_test", ["aji"])
    with pytest.raises(ValueError, match=r"per_image.csv: no column 'aji2' \(columns: image_id, organ, aji, dice1\)"):
        group_table([("B", base)], "kumar_test", ["aji2"])
    (tmp_path / "plain" / "d").mkdir(parents=True)
    (tmp_path / "plain" / "d" / "per_image.csv").write_text("image_id,aji\nimg0,0.5\n")
    with pytest.raises(ValueError, match="organ or patient"):
        group_table([("B", str(tmp_path / "plain"))], "d", ["aji"])


def test_group_table_adds_kumars_same_and_different_organ_subsets(tmp_path):
    subsets = nuclei_dataset_subsets("kumar_test")
    same, different = subsets["test_same_organ"], subsets["test_different_organ"]
    assert (len(same), len(different)) == (8, 6) and not set(same) & set(different)
    with open(Path(nucseg_d2.data.__file__).parent / "splits" / "kumar2017_split.csv", newline="") as f:
        organ_of = {row["image_id"]: row["organ_as_labelled_in_Kumar2017"] for row in csv.DictReader(f)}
    # AJI 0.60, 0.61, ... 0.67 on the same-organ images and 0.30 ... 0.35 on the others: subset
    # means 0.635 and 0.325, and (8 * 0.635 + 6 * 0.325) / 14 = 0.5021 over all.
    rows = ([(i, organ_of[i], 0.60 + 0.01 * k, 0.8) for k, i in enumerate(same)]
            + [(i, organ_of[i], 0.30 + 0.01 * k, 0.7) for k, i in enumerate(different)])
    base = _write_organs(tmp_path / "base", "kumar_test", rows)
    table = group_table([("B", base)], "kumar_test", ["aji"]).splitlines()
    assert len(table) == 2 + 7 + 2 + 1 + 3  # header, 7 organs, 2 subsets, all; a blank line, 2 notes
    assert table[9:12] == ["| test_same_organ | 8 | 0.6350 |", "| test_different_organ | 6 | 0.3250 |",
                           "| all | 14 | 0.5021 |"]
    assert table[-1] == ("Subsets of kumar_test: test_same_organ (Breast, Kidney, Liver, Prostate); "
                         "test_different_organ (Bladder, Colon, Stomach).")
    # No subset rows for another data set; a subset held in part is an error naming what lacks.
    other = _write_organs(tmp_path / "other", "tnbc_test", rows)
    assert "test_same_organ |" not in group_table([("B", other)], "tnbc_test", ["aji"])
    partial = _write_organs(tmp_path / "partial", "kumar_test", rows[1:])
    with pytest.raises(ValueError, match=f"lacks 1 of the 8 images of kumar_test's subset test_same_organ: {same[0]}"):
        group_table([("B", partial)], "kumar_test", ["aji"])


def test_per_image_table_names_each_images_patient(tmp_path):
    seed = _write_seed(tmp_path / "s", "tnbc_test", [0.5, 0.6, 0.7])
    table = per_image_table([("B", seed)], "tnbc_test").splitlines()
    assert table[0] == "| patient | image | B aji |"
    assert table[2:] == ["| 03 | 03_0 | 0.5000 |", "| 03 | 03_1 | 0.6000 |", "| 03 | 03_2 | 0.7000 |"]


def test_group_table_of_seed_runs_averages_each_image_first(tmp_path):
    seed1 = _write_organs(tmp_path / "s1", "kumar_test", [("a", "Colon", 0.5, 0.7), ("b", "Colon", 0.6, 0.8)])
    seed2 = _write_organs(tmp_path / "s2", "kumar_test", [("a", "Colon", 0.7, 0.9), ("b", "Colon", 0.2, 0.8)])
    table = group_table([("B", [seed1, seed2])], "kumar_test", ["aji"])
    # Per image (0.6, 0.4), then the organ's mean 0.5.
    assert "| Colon | 2 | 0.5000 |" in table.splitlines()
    assert "B (2 seeds)" in table and "averaged over the seeds." in table


def _write_seed(folder, dataset, aji_values, num_pred=(10, 20, 30), columns=("aji",)):
    """Per-image CSV with the real files' id, patient and count columns (all parse as numbers)."""
    path = folder / dataset
    path.mkdir(parents=True)
    with open(path / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "patient", "num_gt", "num_pred", *columns])
        writer.writeheader()
        for i, (value, count) in enumerate(zip(aji_values, num_pred)):
            writer.writerow({"image_id": f"03_{i}", "patient": "03", "num_gt": 15, "num_pred": count,
                             **{column: value for column in columns}})
    return str(folder)


def test_a_run_of_several_seeds_is_compared_on_per_image_means(tmp_path, capsys):
    base = _write_seed(tmp_path / "base", "d", [0.5, 0.6, 0.7])
    seed1 = _write_seed(tmp_path / "seed1", "d", [0.5, 0.8, 0.9], num_pred=(10, 20, 30))
    seed2 = _write_seed(tmp_path / "seed2", "d", [0.7, 0.8, 1.1], num_pred=(12, 20, 31))
    # Per-image means over the seeds: 0.6, 0.8, 1.0, i.e. base + 0.1, 0.2, 0.3 (as in the pairs test).
    runs = [("Baseline", base), ("Proposed", [seed1, seed2])]
    rows = pairs_table(runs, "d", [("Proposed", "Baseline")], ["aji"]).splitlines()
    assert rows[2] == "| Proposed > Baseline | 3 | +0.2000 (p 0.037) ** |"
    assert "Proposed (2 seeds)" in rows[4]
    table = results_table(runs, "d", ["aji"]).splitlines()
    # Mean 0.8, sample std of 0.6, 0.8, 1.0 = 0.2.
    assert table[3] == "| Proposed | 3 | 0.8000 ± 0.2000 ** |"
    averaged = run_per_image_rows([seed1, seed2], "d")
    # The image's own columns are kept as written although they parse as numbers ("03_0" -> 30.0
    # in Python); the predicted count is averaged.
    assert list(averaged) == ["03_0", "03_1", "03_2"]
    assert {k: averaged["03_0"][k] for k in ("image_id", "patient", "num_gt", "num_pred")} == {
        "image_id": "03_0", "patient": "03", "num_gt": "15", "num_pred": "11.0"}
    assert run_per_image_rows([base], "d") == run_per_image_rows(base, "d")
    argv = ["--dataset", "d", "--run", f"Baseline={base}", "--run", f"Proposed={seed1},{seed2}", "--metrics", "aji"]
    assert render(argv).splitlines()[3] == table[3]
    for kind in ("--cost", "--curve"):
        assert main(argv + [kind]) == 2
        assert "Proposed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="non-empty"):
        render(["--dataset", "d", "--run", f"Proposed={seed1},"])


def test_seeds_that_do_not_match_are_refused(tmp_path):
    seed1 = _write_seed(tmp_path / "seed1", "d", [0.5, 0.8, 0.9])
    fewer = _write_seed(tmp_path / "fewer", "d", [0.5, 0.6])
    with pytest.raises(ValueError, match="03_2"):
        run_per_image_rows([seed1, fewer], "d")
    other_columns = _write_seed(tmp_path / "other", "d", [0.5, 0.8, 0.9], columns=("aji", "pq"))
    with pytest.raises(ValueError, match="columns differ"):
        run_per_image_rows([seed1, other_columns], "d")
    relabelled = _write_seed(tmp_path / "relabelled", "d", [0.5, 0.8, 0.9])
    per_image = Path(relabelled) / "d" / "per_image.csv"
    per_image.write_text(per_image.read_text().replace("03_1,03,", "03_1,04,"))
    with pytest.raises(ValueError, match=r"patient differs between .*seed1.* and .*relabelled.* for 03_1"):
        run_per_image_rows([seed1, relabelled], "d")
    blank = _write_seed(tmp_path / "blank", "d", ["", 0.8, 0.9])
    with pytest.raises(ValueError, match=r"blank.*aji of '03_0' is not a number"):
        run_per_image_rows([seed1, blank], "d")


def _write_training_metrics(run, test_sets, lines):
    import json

    run.mkdir()
    (run / "config.yaml").write_text("DATASETS:\n  TEST: [%s]\n" % ", ".join(test_sets))
    (run / "training_metrics.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(run)


def test_accuracy_curve_table_from_training_metrics(tmp_path, capsys):
    # One data set evaluated: Detectron2 drops the "<dataset>/" prefix from the keys.
    alone = _write_training_metrics(tmp_path / "alone", ["tnbc_val"], [
        {"iteration": 9, "total_loss": 2.0},
        {"iteration": 19, "nuclei/aji": 0.41, "nuclei/pq": 0.3},
        {"iteration": 29, "nuclei/aji": 0.52, "nuclei/pq": 0.45, "nuclei/dice1": 0.7},
    ])
    # Two evaluated: the keys keep the prefix, and the other data set's values must not leak in.
    both = _write_training_metrics(tmp_path / "both", ["tnbc_val", "tnbc_test"], [
        {"iteration": 29, "tnbc_val/nuclei/aji": 0.6, "tnbc_test/nuclei/aji": 0.1},
    ])
    rows = accuracy_curve_table([("P", alone), ("Q", both)], "tnbc_val", ["aji", "dice1", "pq"]).splitlines()
    assert rows[0] == "| iteration | P aji | P dice1 | P pq | Q aji | Q dice1 | Q pq |"
    assert rows[2:] == ["| 19 | 0.4100 | - | 0.3000 | - | - | - |",
                        "| 29 | 0.5200 | 0.7000 | 0.4500 | 0.6000 | - | - |"]
    assert main(["--dataset", "tnbc_test", "--curve", "--run", f"P={alone}"]) == 2
    assert "tnbc_test was not evaluated during training" in capsys.readouterr().err
    assert main(["--dataset", "tnbc_val", "--curve", "--metrics", "pq", "--run", f"P={alone}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| 29 | 0.4500 |"
    assert main(["--dataset", "tnbc_val", "--curve", "--per-image", "--run", f"P={alone}"]) == 2


def test_cost_table_reads_training_and_inference_times_from_the_logs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text(
        "[t] d2.evaluation.evaluator INFO: Total inference time: 0:00:04.2 (2.000000 s / iter per device, on 1 devices)\n"
        "[t] d2.engine.defaults INFO: Evaluation results for tnbc_val in csv format:\n"
        "[t] d2.engine.hooks INFO: Overall training speed: 1098 iterations in 1:06:10 (3.6165 s / it)\n"
    )
    (run / "test_eval_log.txt").write_text(
        "[t] d2.evaluation.evaluator INFO: Total inference time: 0:00:16.9 (4.500000 s / iter per device, on 2 devices)\n"
        "[t] d2.engine.defaults INFO: Evaluation results for tnbc_test in csv format:\n"
    )
    rows = cost_table([("P", str(run))], "tnbc_test").splitlines()
    assert rows[2] == "| P | 1098 | 1:06:10 | 3.62 | 4.50 |"  # test batch 1: s / iter = s / image
    assert cost_table([("P", str(run))], "tnbc_val").splitlines()[2].endswith("| 2.00 |")
    assert cost_table([("P", str(run))], "kumar_test").splitlines()[2].endswith("| - |")
    # A resumed run: log.txt is appended to, one speed line per start; the costs add up.
    with open(run / "log.txt", "a") as log:
        log.write("[t] d2.engine.hooks INFO: Overall training speed: 99 iterations in 0:09:50 (5.9596 s / it)\n")
    # 1098 + 99 iterations in 3970 + 590 s: 4560 / 1197 = 3.81 s / it.
    assert cost_table([("P", str(run))], "tnbc_test").splitlines()[2] == "| P | 1197 | 1:16:00 | 3.81 | 4.50 |"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--dataset", "tnbc_test", "--cost", "--run", f"E={empty}"]) == 2
    assert "no Detectron2 log" in capsys.readouterr().err


def test_cost_table_reads_gzip_compressed_logs_and_names_a_corrupt_one(tmp_path, capsys):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    training_log = ("[t] d2.engine.hooks INFO: Overall training speed: 98 iterations in 0:01:40 (1.0204 s / it)\n"
                    "[t] d2.evaluation.evaluator INFO: Total inference time: 0:00:01 (0.250000 s / iter per device, "
                    "on 1 devices)\n[t] d2.engine.defaults INFO: Evaluation results for tnbc_test in csv format:\n")
    compressed = gzip.compress(training_log.encode())
    (plain / "log.txt").write_text(training_log)
    (packed / "log.txt.gz").write_bytes(compressed)
    rows = cost_table([("plain", str(plain)), ("packed", str(packed))], "tnbc_test").splitlines()
    assert rows[2:] == ["| plain | 98 | 0:01:40 | 1.02 | 0.25 |", "| packed | 98 | 0:01:40 | 1.02 | 0.25 |"]
    damaged_data = compressed[:12] + bytes(b ^ 0xFF for b in compressed[12:-8]) + compressed[-8:]
    for broken in (b"not gzip at all", damaged_data, compressed[: len(compressed) // 2]):
        (packed / "test_eval_log.txt.gz").write_bytes(broken)
        assert main(["--dataset", "tnbc_test", "--cost", "--run", f"P={packed}"]) == 2
        assert f"{packed / 'test_eval_log.txt.gz'}: cannot read the log" in capsys.readouterr().err


def test_update_markdown_regenerates_only_the_table_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_run(tmp_path / "base", "tnbc_test", [0.5, 0.6])
    fresh = render(["--dataset", "tnbc_test", "--run", "B=base", "--metrics", "aji"])
    doc = tmp_path / "RESULTS.md"
    text = ("# Results\nprose stays\n"
            "<!-- results_table --dataset tnbc_test --run 'B=base' --metrics aji -->\nstale table\n"
            "<!-- end results_table -->\nmiddle\n"
            f"<!-- results_table --dataset tnbc_test --run B=base --metrics aji -->\n{fresh}\n"
            "<!-- end results_table -->\n")
    doc.write_text(text)
    assert update_markdown(str(doc), check_only=True) == ["--dataset tnbc_test --run 'B=base' --metrics aji"]
    assert doc.read_text() == text  # a check writes nothing
    assert main(["--check", str(doc)]) == 1
    assert main(["--update", str(doc)]) == 0
    assert doc.read_text() == text.replace("stale table", fresh)
    assert main(["--check", str(doc)]) == 0


@pytest.mark.parametrize("markdown", ["docs/RESULTS.md", "README.md"])
def test_the_repository_results_tables_are_up_to_date(monkeypatch, markdown):
    """The published tables show exactly what the committed results/ folders give."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    assert update_markdown(markdown, check_only=True) == []

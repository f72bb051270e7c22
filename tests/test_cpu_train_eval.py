"""scripts/cpu_train_eval.sh: the training call it makes, fresh and resumed, through a stand-in python
that records its arguments and fails (nothing after training runs)."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "cpu_train_eval.sh")


def _training_call(tmp_path, run_folder_files=(), last_iteration=None, stand_in_status=3, full=False):
    """Run the script on run 'r' with a stand-in python; return (exit status, its argument list),
    or with ``full`` the completed process too. ``last_iteration``: the last training row of metrics.json,
    followed, as Detectron2 and the time limit write it, by the final evaluation's under the next number."""
    recorded = tmp_path / "argv.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{recorded}"\nexit {stand_in_status}\n')
    stand_in.chmod(0o755)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    for name in run_folder_files:
        (run / name).write_text("saved\n")
    if last_iteration is not None:
        (run / "metrics.json").write_text("".join(
            f'{{"iteration": {i}, "total_loss": 1.0}}\n' for i in [*range(19, last_iteration, 20), last_iteration])
            + f'{{"nuclei/aji": 0.5, "iteration": {last_iteration + 1}}}\n')
    done = subprocess.run(["bash", SCRIPT, "configs/kumar_ab1.yaml", "r", "SEED", "7"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=str(stand_in), RUNS_DIR=str(tmp_path / "runs"),
                                              ITERS="44"))
    argv = recorded.read_text().splitlines()
    return (done.returncode, argv, done) if full else (done.returncode, argv)


@pytest.mark.parametrize("files, config, resumed", [
    ((), "configs/kumar_ab1.yaml", False),
    (("config.yaml",), "configs/kumar_ab1.yaml", False),  # a config without a checkpoint: nothing to resume
    (("last_checkpoint", "config.yaml"), "{run}/config.yaml", True),
    (("last_checkpoint",), "configs/kumar_ab1.yaml", True),  # no saved config: CONFIG is all there is
])
def test_a_resumed_run_keeps_the_config_it_started_with(tmp_path, files, config, resumed):
    status, argv = _training_call(tmp_path, files)
    assert status == 3  # the stand-in's failure stops the script after the training call
    assert argv[:3] == ["train_net.py", "--config-file", config.format(run=tmp_path / "runs" / "r")]
    assert ("--resume" in argv) == resumed
    # The schedule and the caller's overrides are passed either way.
    assert argv[argv.index("SOLVER.MAX_ITER") + 1] == "44"
    assert argv[argv.index("OUTPUT_DIR") + 1] == str(tmp_path / "runs" / "r")
    assert argv[-2:] == ["SEED", "7"]


def test_a_finished_schedule_goes_to_the_test_evaluation(tmp_path):
    status, argv = _training_call(tmp_path, ("model_final.pth", "last_checkpoint", "config.yaml"), last_iteration=43)
    assert status == 3 and "--eval-only" in argv and "train_net.py" == argv[0]


def test_a_time_limited_model_final_is_resumed_not_scored(tmp_path):
    # Before commit b4e0802 the time limit saved model_final (at iteration 30 of 44): the schedule continues.
    status, argv = _training_call(tmp_path, ("model_final.pth", "last_checkpoint", "config.yaml"), last_iteration=30)
    assert status == 3 and "--resume" in argv and "--eval-only" not in argv


def test_training_stopped_by_the_time_limit_is_not_scored(tmp_path):
    # The training call ends (status 0) with the schedule unfinished: no test evaluation follows.
    status, argv, done = _training_call(tmp_path, ("last_checkpoint", "config.yaml"), last_iteration=30,
                                        stand_in_status=0, full=True)
    assert status == 0 and "--eval-only" not in argv
    assert "training stopped after 31 of 44 iterations (time limit): run the same command again" in done.stdout


def test_a_stop_one_iteration_short_is_not_scored(tmp_path):
    # Its final evaluation is logged under iteration 43, the number of iterations done: not a 44th.
    status, argv, done = _training_call(tmp_path, ("last_checkpoint", "config.yaml"), last_iteration=42,
                                        stand_in_status=0, full=True)
    assert status == 0 and "--eval-only" not in argv
    assert "training stopped after 43 of 44 iterations (time limit)" in done.stdout


def test_a_resume_with_another_schedule_is_refused(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("SOLVER:\n  BASE_LR: 0.01\n  MAX_ITER: 1100\n  STEPS: [825, 1000]\n")
    (run / "last_checkpoint").write_text("model_0000549.pth")

    def script(iters):
        return subprocess.run(["bash", SCRIPT, "configs/kumar_ab1.yaml", "r"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHON="false", RUNS_DIR=str(tmp_path / "runs"), ITERS=iters))

    other = script("44")
    assert other.returncode == 2
    assert "was started for 1100 iterations; ITERS=44 would change its schedule half-way" in other.stderr
    same = script("1100")
    assert same.returncode == 1 and "was started for" not in same.stderr  # on to training (a stand-in that fails)


def test_a_model_final_without_metrics_is_scored(tmp_path):
    # Weights put in the run folder by hand (no training log): scored, not trained over.
    status, argv = _training_call(tmp_path, ("model_final.pth", "config.yaml"))
    assert status == 3 and "--eval-only" in argv


def test_a_results_folder_of_another_run_is_refused_before_training(tmp_path):
    # collect_results.sh would refuse it only after the training (hours).
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    published = tmp_path / "results" / "r"
    published.mkdir(parents=True)
    (published / "config.yaml").write_text("SEED: 1\n")

    def script(**env):
        return subprocess.run(["bash", SCRIPT, "configs/kumar_ab1.yaml", "r"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHON="false", RUNS_DIR=str(tmp_path / "runs"),
                                       RESULTS_DIR=str(tmp_path / "results"), ITERS="44", **env))

    fresh = script()
    assert fresh.returncode == 2 and f"{published} holds another collected run" in fresh.stderr
    assert (published / "config.yaml").read_text() == "SEED: 1\n"
    (run / "config.yaml").write_text("SEED: 2\n")  # a run started under that name with other settings
    assert script().returncode == 2
    # FORCE=1, or the run already collected there (its config.yaml), goes on to training (a stand-in that fails).
    forced = script(FORCE="1")
    assert forced.returncode == 1 and "holds another" not in forced.stderr
    (run / "config.yaml").write_text("SEED: 1\n")
    same = script()
    assert same.returncode == 1 and "holds another" not in same.stderr

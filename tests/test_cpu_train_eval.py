"""scripts/cpu_train_eval.sh: the training call it makes, fresh and resumed, through a stand-in python
that records its arguments and fails (nothing after training runs)."""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "cpu_train_eval.sh")


def _training_call(tmp_path, run_folder_files=()):
    """Run the script on run 'r' with a stand-in python; return (exit status, its argument list)."""
    recorded = tmp_path / "argv.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{recorded}"\nexit 3\n')
    stand_in.chmod(0o755)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    for name in run_folder_files:
        (run / name).write_text("saved\n")
    done = subprocess.run(["bash", SCRIPT, "configs/kumar_ab1.yaml", "r", "SEED", "7"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=str(stand_in), RUNS_DIR=str(tmp_path / "runs"),
                                              ITERS="44"))
    return done.returncode, recorded.read_text().splitlines()


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

"""TrainingTimeLimit: every rank must stop at the same iteration, or the ranks that go on wait
forever in the next collective (the gradient all-reduce on GPUs); on its own, when it stops,
what it leaves for the trainer, what it refuses."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch.multiprocessing as mp
from process_group import free_port, join_gloo_group

from nucseg_d2.engine import TrainingTimeLimit, TrainingTimeLimitReached
from nucseg_d2.utils import leave_distributed_worker


class _Storage:
    def __init__(self):
        self.scalars = {}

    def put_scalar(self, name, value, smoothing_hint=True):
        self.scalars[name] = value


# (ranks whose clock is past the limit, whether all ranks stop)
SCENARIOS = [
    ((0,), True),    # only the main process is past the limit: all stop
    ((1,), False),   # only the other one is: none stops (the main process's clock decides)
    ((0, 1), True),
    ((), False),
]


def _rank_decides(rank, world_size, port, result_dir):
    join_gloo_group(rank, world_size, port)
    decisions = []
    for over_limit_ranks, _ in SCENARIOS:
        hook = TrainingTimeLimit(60)
        hook.trainer = SimpleNamespace(iter=3, max_iter=10, storage=_Storage(), checkpointer=None)
        hook.before_train()
        if rank in over_limit_ranks:
            hook._start -= 3600  # this rank's clock says the limit is long past
        try:
            hook.after_step()
            stopped = False
        except TrainingTimeLimitReached:
            stopped = True
        decisions.append({"stopped": stopped, "max_iter": hook.trainer.max_iter,
                          "stop_iter": hook.trainer.storage.scalars.get("time_limit_stop_iter")})
    (result_dir / f"rank{rank}.json").write_text(json.dumps(decisions))
    # An exception above fails spawn(), which then terminates the other rank.
    leave_distributed_worker()


def test_all_ranks_follow_the_main_process_clock(tmp_path):
    world_size = 2  # one spawn for all scenarios: starting the processes is most of the cost
    mp.spawn(_rank_decides, args=(world_size, free_port(), tmp_path), nprocs=world_size)
    per_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    for index, (over_limit_ranks, expect_stop) in enumerate(SCENARIOS):
        expected = {"stopped": expect_stop, "max_iter": 4 if expect_stop else 10,
                    "stop_iter": 4 if expect_stop else None}
        assert [decisions[index] for decisions in per_rank] == [expected] * world_size, over_limit_ranks


def test_single_process_stops_past_the_limit_but_not_at_the_last_iteration():
    hook = TrainingTimeLimit(60)
    hook.trainer = SimpleNamespace(iter=9, max_iter=10, storage=_Storage(), checkpointer=None)
    hook.before_train()
    hook._start -= 3600
    hook.after_step()  # the schedule ends here anyway: nothing to cut short
    assert hook.trainer.max_iter == 10
    hook.trainer.iter = 8
    with pytest.raises(TrainingTimeLimitReached):
        hook.after_step()
    assert hook.trainer.max_iter == 9 and hook.trainer.storage.scalars["time_limit_stop_iter"] == 9


def test_non_positive_limit_is_refused():
    with pytest.raises(ValueError, match="time limit must be positive, got 0"):
        TrainingTimeLimit(0)


class _CountingCheckpointer:
    path_manager = None  # read by fvcore's PeriodicCheckpointer, used only with max_to_keep

    def __init__(self):
        self.saved = []

    def save(self, name, **extra):
        self.saved.append(name)


def _train_until_the_limit(tmp_path, stop_after, eval_period=0, checkpoint_period=0, max_iter=50):
    """A bare Detectron2 training loop with DefaultTrainer's hook order (checkpointer, evaluation,
    writer, then the limit), whose clock passes the limit when iteration ``stop_after`` ends.
    Returns the evaluations run, the checkpoint names saved and the rows of metrics.json."""
    from detectron2.engine import hooks
    from detectron2.engine.train_loop import TrainerBase
    from detectron2.utils.events import JSONWriter

    import nucseg_d2.engine

    class Trainer(TrainerBase):
        def run_step(self):
            self.storage.put_scalar("total_loss", 1.0)

    evaluations = []

    def evaluate():
        evaluations.append(trainer.iter)
        return {"nuclei": {"aji": 0.5}}

    trainer = Trainer()
    trainer.checkpointer = _CountingCheckpointer()
    readings = iter([0.0] + [0.0] * stop_after + [1e9] * max_iter)  # before_train, then one per step
    limit = TrainingTimeLimit(10, eval_period, checkpoint_period)
    hook_list = [hooks.IterationTimer(warmup_iter=3), hooks.EvalHook(eval_period, evaluate),
                 hooks.PeriodicWriter([JSONWriter(str(tmp_path / "metrics.json"))], period=20), limit]
    if checkpoint_period:
        hook_list.insert(1, hooks.PeriodicCheckpointer(trainer.checkpointer, checkpoint_period))
    trainer.register_hooks(hook_list)
    original_clock = nucseg_d2.engine.perf_counter
    nucseg_d2.engine.perf_counter = lambda: next(readings)
    try:
        with pytest.raises(TrainingTimeLimitReached):
            trainer.train(0, max_iter)
    finally:
        nucseg_d2.engine.perf_counter = original_clock
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    return evaluations, trainer.checkpointer.saved, rows


@pytest.mark.parametrize("stop_after", [5, 19])  # 19: PeriodicWriter has just written that iteration
def test_the_stop_and_its_final_evaluation_reach_metrics_json(tmp_path, stop_after):
    evaluations, saved, rows = _train_until_the_limit(tmp_path, stop_after)
    assert len(evaluations) == 1
    assert saved == [f"model_{stop_after:07d}"]
    final = [row for row in rows if "nuclei/aji" in row]
    # Under the number of iterations done, as a finished schedule's final evaluation.
    assert [row["iteration"] for row in final] == [stop_after + 1]
    assert final[0]["time_limit_stop_iter"] == stop_after + 1
    trained = [row["iteration"] for row in rows if "total_loss" in row]
    assert trained[-1] == stop_after  # nothing trained past the stop


def test_the_training_speed_line_counts_the_iterations_as_a_finished_schedule_would(tmp_path, caplog):
    # IterationTimer leaves out its 3 warm-up iterations and counts one past storage.iter: for the
    # 20 done, 20 + 1 - 3 = 18, as after a schedule of 20 (and as results_table reads it).
    with caplog.at_level(logging.INFO, logger="detectron2.engine.hooks"):
        _train_until_the_limit(tmp_path, 19)
    assert "Overall training speed: 18 iterations in" in caplog.text


def test_a_stop_after_a_periodic_evaluation_and_checkpoint_repeats_neither(tmp_path):
    evaluations, saved, rows = _train_until_the_limit(tmp_path, 19, eval_period=10, checkpoint_period=10)
    assert evaluations == [9, 19]  # EvalHook's periodic ones only
    assert saved == ["model_0000009", "model_0000019"]  # PeriodicCheckpointer's only
    # (Detectron2's writer keeps each key's latest value: iteration 9's is replaced before it writes.)
    assert [row["iteration"] for row in rows if "nuclei/aji" in row] == [19]
    assert [row["iteration"] for row in rows if "time_limit_stop_iter" in row] == [20]


def test_a_stop_between_checkpoints_saves_its_own(tmp_path):
    evaluations, saved, _ = _train_until_the_limit(tmp_path, 14, eval_period=10, checkpoint_period=10)
    assert evaluations == [9, 15]  # the periodic one, then the final one of the 15 iterations done
    assert saved == ["model_0000009", "model_0000014"]

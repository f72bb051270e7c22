"""TrainingTimeLimit: every rank must stop at the same iteration, or the ranks that go on wait
forever in the next collective (the gradient all-reduce on GPUs); on its own, when it stops,
what it leaves for the trainer, what it refuses."""
import json
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

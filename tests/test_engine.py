"""TrainingTimeLimit on its own: when it stops, what it leaves for the trainer, what it refuses.
(Its multi-process agreement, all_gather of the main process's decision, is not tested here: a
two-process gloo test aborted a rank at teardown in some fresh-clone runs.)"""
from types import SimpleNamespace

import pytest

from nucseg_d2.engine import TrainingTimeLimit, TrainingTimeLimitReached


class _Storage:
    def __init__(self):
        self.scalars = {}

    def put_scalar(self, name, value, smoothing_hint=True):
        self.scalars[name] = value


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

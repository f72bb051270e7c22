"""Training hooks that Detectron2's DefaultTrainer lacks."""
import logging
from time import perf_counter

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

logger = logging.getLogger(__name__)


class TrainingTimeLimitReached(BaseException):
    """Raised between iterations to end training early; not an ``Exception``, so the training
    loop ends (running every hook's ``after_train``) without logging it as a failure."""


class TrainingTimeLimit(HookBase):
    """End training after ``seconds`` of wall time, as if the schedule ended there.

    A device command has a hard wall-clock limit; a run that would overrun it is better stopped
    early, with its final weights saved and evaluated, than killed with nothing to show. After
    the first iteration that ends past the limit, the trainer's ``max_iter`` becomes the number of
    iterations done (so Detectron2's ``EvalHook`` runs its final evaluation), the weights are
    saved with the trainer's state as ``model_<iteration>`` (named as Detectron2's periodic
    checkpoints: ``model_final`` stays the name of a finished schedule, which evaluation and
    prediction take for a trained model; ``--resume`` continues at the next iteration, towards
    the configured ``SOLVER.MAX_ITER``), and :class:`TrainingTimeLimitReached` ends the loop; the
    caller catches it. Register it last, so that every other hook has finished the iteration.
    With several processes, the main process's clock decides for all of them. ``eval_period``
    is ``TEST.EVAL_PERIOD``: a stop right after a periodic evaluation does not evaluate the same
    weights again. ``checkpoint_period`` is ``SOLVER.CHECKPOINT_PERIOD``: a stop where the periodic
    checkpointer has just saved ``model_<iteration>`` does not write it again.

    The trainer is then left as a finished loop of that many iterations leaves it (``iter`` =
    ``max_iter`` = iterations done), so that what ``after_train`` records (EvalHook's final
    evaluation, ``time_limit_stop_iter``) goes under the next iteration number: Detectron2's
    ``JSONWriter`` drops scalars of an iteration it has already written, which ``PeriodicWriter``
    does at every 20th. ``IterationTimer``'s "Overall training speed" line then counts as after a
    finished schedule of that many iterations.
    """

    def __init__(self, seconds: float, eval_period: int = 0, checkpoint_period: int = 0):
        if seconds <= 0:
            raise ValueError(f"time limit must be positive, got {seconds}")
        self.seconds = float(seconds)
        self.eval_period = int(eval_period)
        self.checkpoint_period = int(checkpoint_period)
        self._start = None

    def before_train(self):
        self._start = perf_counter()

    def after_step(self):
        trainer = self.trainer
        elapsed = perf_counter() - self._start
        stop = elapsed >= self.seconds and trainer.iter + 1 < trainer.max_iter
        if comm.get_world_size() > 1:
            stop = comm.all_gather(stop)[0]
        if not stop:
            return
        scheduled = trainer.max_iter
        done = trainer.iter + 1
        checkpoint_name = f"model_{trainer.iter:07d}"  # PeriodicCheckpointer's name for this iteration
        logger.warning(
            "Training time limit of %.0f s reached after %d of %d iterations (%.0f s): "
            "stopping here, saving %s and evaluating these weights.",
            self.seconds, done, scheduled, elapsed, checkpoint_name,
        )
        checkpointer = getattr(trainer, "checkpointer", None)
        saved_already = self.checkpoint_period > 0 and done % self.checkpoint_period == 0
        if checkpointer is not None and not saved_already:
            checkpointer.save(checkpoint_name)  # with the trainer's state at this iteration: resumable
        trainer.iter = trainer.max_iter = done
        trainer.storage.iter = done
        trainer.storage.put_scalar("time_limit_stop_iter", done, smoothing_hint=False)
        if self.eval_period > 0 and done % self.eval_period == 0:
            # EvalHook has just evaluated these weights (its after_step ran before this hook's);
            # its after_train evaluates when iter + 1 >= max_iter, which this keeps false.
            trainer.max_iter = done + 2
        raise TrainingTimeLimitReached(done)


def reseed_resumed_training_data(trainer, build_train_loader) -> bool:
    """After ``trainer.resume_or_load``: a run resumed at iteration k > 0 gets its training data
    from random streams seeded with ``SEED + k + rank``, and a new loader built by ``build_train_loader``
    (no argument). Returns whether it did.

    Detectron2 seeds every start of a process with ``SEED``, and its sampler and the mapper's crops
    and flips start from that seed again: without this, the iterations after each resume would
    see the same images, crops and flips as iterations 0, 1, ... did (a run of the CPU route
    resumes often). The resumed run stays reproducible: the seed depends on where it resumed.
    A negative ``SEED`` (a new seed at every start) repeats nothing, and is left alone.
    """
    if trainer.start_iter <= 0 or trainer.cfg.SEED < 0:
        return False
    # Each process its own stream, as default_setup's SEED + rank.
    seed_all_rng(trainer.cfg.SEED + trainer.start_iter + comm.get_rank())
    trainer._trainer.reset_data_loader(build_train_loader)
    logger.info("Resumed at iteration %d: training data seeded with SEED + %d + rank",
                trainer.start_iter, trainer.start_iter)
    return True

"""The job the chaos harness runs: the user's job, plus a callback that reports progress.

`cluster_trainer.chaos` cannot see inside a training process, so this wrapper
writes the global step after every batch to `CLUSTER_TRAINER_CHAOS_PROGRESS`.
It is loaded as a job file (`cluster-trainer run .../chaos_job.py`), in the
uninterrupted reference run too, so both runs have the same callback list.

Environment:
    CLUSTER_TRAINER_CHAOS_JOB             the user's job file (required)
    CLUSTER_TRAINER_CHAOS_PROGRESS        where to write the global step
    CLUSTER_TRAINER_CHAOS_EVERY_STEPS     override the checkpoint interval (a number, or "auto")
    CLUSTER_TRAINER_CHAOS_HISTORY_STEPS   log history rows every N steps, to check them too
"""

from __future__ import annotations

import dataclasses
import os

import keras

from cluster_trainer.errors import JobError
from cluster_trainer.job import load_job

if "CLUSTER_TRAINER_CHAOS_JOB" not in os.environ:
    raise JobError("chaos_job.py is run by `python -m cluster_trainer.chaos`; it needs CLUSTER_TRAINER_CHAOS_JOB")
_base = load_job(os.environ["CLUSTER_TRAINER_CHAOS_JOB"])


class ReportProgress(keras.callbacks.Callback):
    """Writes the optimizer's step count after each batch (a whole small file: never half-read)."""

    def __init__(self, path: str | None):
        super().__init__()
        self._path = path

    # Where this process reports is not run state: keep it out of the checkpoint.
    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def on_train_batch_end(self, batch, logs=None):
        if self._path:
            temporary = f"{self._path}.tmp"
            with open(temporary, "w") as f:
                f.write(str(int(self.model.optimizer.iterations.numpy())))
            os.replace(temporary, self._path)


def _callbacks(config, run):
    user = dataclasses.replace(_base, config=config).make_callbacks(run)  # config after --set
    return [*user, ReportProgress(os.environ.get("CLUSTER_TRAINER_CHAOS_PROGRESS"))]


_every = os.environ.get("CLUSTER_TRAINER_CHAOS_EVERY_STEPS")
_history_steps = os.environ.get("CLUSTER_TRAINER_CHAOS_HISTORY_STEPS")
job = dataclasses.replace(
    _base,
    callbacks=_callbacks,
    checkpoint=dataclasses.replace(_base.checkpoint, every_steps=_every if _every == "auto" else int(_every))
    if _every else _base.checkpoint,
    history_every_steps=int(_history_steps) if _history_steps else _base.history_every_steps,
)

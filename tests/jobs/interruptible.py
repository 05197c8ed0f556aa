"""Test jobs: the example jobs plus a callback that parks the process at a chosen moment.

`CT_TEST_PAUSE_AT=<hook>:<global step>` (e.g. `train_batch_begin:12`,
`test_begin:16`) makes `PauseForKill` write `CT_TEST_PAUSE_MARKER` and sleep
when that hook runs with the optimizer at that step, so the test can SIGKILL
the process at an exact point, right after the checkpoint committed before it.
Without the variable the callback does nothing, and it is in the uninterrupted
reference runs too, so both runs have the same callback list.

`CT_TEST_JOB=mlp|cnn` picks the example job; `CT_TEST_EVERY_STEPS` overrides
its checkpoint interval.
"""

import dataclasses
import os
import time

import keras

import cluster_trainer as ct

HERE = os.path.dirname(os.path.abspath(__file__))
base = ct.load_job(os.path.join(HERE, "..", "..", "jobs", f"{os.environ.get('CT_TEST_JOB', 'mlp')}.py"))


class PauseForKill(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        hook, _, step = os.environ.get("CT_TEST_PAUSE_AT", ":").partition(":")
        self._hook, self._step = hook, int(step) if step else None
        self._marker = os.environ.get("CT_TEST_PAUSE_MARKER")

    # Where to pause is this process's business, not the run's: keep it out of the checkpoint.
    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def _maybe_pause(self, hook):
        if hook == self._hook and int(self.model.optimizer.iterations.numpy()) == self._step:
            with open(self._marker, "w") as f:
                f.write(f"{hook}:{self._step}\n")
            time.sleep(600)  # the test kills us here

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe_pause("train_batch_begin")

    def on_test_begin(self, logs=None):
        self._maybe_pause("test_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._maybe_pause("epoch_begin")


def callbacks(config, run):
    return list(base.callbacks(config, run)) + [PauseForKill()]


every = os.environ.get("CT_TEST_EVERY_STEPS")
job = dataclasses.replace(
    base,
    name=f"{base.name}-test",
    callbacks=callbacks,
    checkpoint=dataclasses.replace(base.checkpoint, every_steps=int(every)) if every else base.checkpoint,
)

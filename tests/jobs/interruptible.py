"""Test jobs: the example jobs plus a callback that parks the process at a chosen moment.

`CT_TEST_PAUSE_AT=<hook>:<global step>` (e.g. `train_batch_begin:12`,
`test_begin:16`) makes `PauseForKill` write `CT_TEST_PAUSE_MARKER` and sleep
when that hook runs with the optimizer at that step, so the test can SIGKILL
the process at an exact point, right after the checkpoint committed before it.
Without the variable the callback does nothing, and it is in the uninterrupted
reference runs too, so both runs have the same callback list.

`CT_TEST_NOTICE_AT=<hook>:<global step>` makes the process send itself SIGTERM
(a preemption notice) there, `CT_TEST_NOTICE_COUNT` times (default once).
`CT_TEST_STEP_SLEEP=<seconds>` slows every training step, to give a test time
to act while the run is training.

`CT_TEST_JOB=mlp|cnn` picks the example job (a name found in `tests/jobs/`,
like `realistic_cnn`, picks that test job); `CT_TEST_EVERY_STEPS` overrides its
checkpoint interval (a number, or `auto`).
"""

import dataclasses
import os
import signal
import time

import keras

import cluster_trainer as ct

HERE = os.path.dirname(os.path.abspath(__file__))
_name = os.environ.get("CT_TEST_JOB", "mlp")
_test_job = os.path.join(HERE, f"{_name}.py")
base = ct.load_job(_test_job if os.path.isfile(_test_job) else os.path.join(HERE, "..", "..", "jobs", f"{_name}.py"))


class PauseForKill(keras.callbacks.Callback):
    def __init__(self, others=()):
        super().__init__()
        self._others = list(others)
        hook, _, step = os.environ.get("CT_TEST_PAUSE_AT", ":").partition(":")
        self._hook, self._step = hook, int(step) if step else None
        self._marker = os.environ.get("CT_TEST_PAUSE_MARKER")
        hook, _, step = os.environ.get("CT_TEST_NOTICE_AT", ":").partition(":")
        self._notice_hook, self._notice_step = hook, int(step) if step else None
        self._notices = int(os.environ.get("CT_TEST_NOTICE_COUNT", "1"))
        self._step_sleep = float(os.environ.get("CT_TEST_STEP_SLEEP", "0"))

    # Where to pause is this process's business, not the run's: keep it out of the checkpoint.
    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def _maybe_pause(self, hook):
        # Steps taken: with gradient accumulation, `iterations` counts updates instead.
        step = int(getattr(self.model.optimizer, "_iterations", self.model.optimizer.iterations).numpy())
        if hook == self._notice_hook and step == self._notice_step:
            self._notice_step = None  # once, even if this step's hooks run again after a resume
            for _ in range(self._notices):
                os.kill(os.getpid(), signal.SIGTERM)
        if hook == self._hook and step == self._step:
            # What TensorBoard buffered since the last commit reaches the disk before the kill, as
            # its writers' own flush (every 10 events or 120 s) would have done in a longer run.
            for callback in self._others:
                for writer in getattr(callback, "_writers", {}).values():
                    writer.flush()
            with open(self._marker, "w") as f:
                f.write(f"{hook}:{self._step}\n")
            time.sleep(600)  # the test kills us here

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe_pause("train_batch_begin")

    def on_train_batch_end(self, batch, logs=None):
        if self._step_sleep:
            time.sleep(self._step_sleep)

    def on_test_begin(self, logs=None):
        self._maybe_pause("test_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._maybe_pause("epoch_begin")


def callbacks(config, run):
    others = dataclasses.replace(base, config=config).make_callbacks(run)
    return others + [PauseForKill(others)]


every = os.environ.get("CT_TEST_EVERY_STEPS")
job = dataclasses.replace(
    base,
    name=f"{base.name}-test",
    callbacks=callbacks,
    checkpoint=dataclasses.replace(base.checkpoint, every_steps=every if every == "auto" else int(every))
    if every else base.checkpoint,
)

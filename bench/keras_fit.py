"""Plain `model.fit` with Keras `BackupAndRestore`: the baseline of the steps-re-run benchmark.

What a Keras 3 user does to survive preemption without cluster-trainer: the
same model and data as `bench/bench_job.py`'s "mlp", `fit` with
`BackupAndRestore(backup_dir, save_freq=...)`, and the same command run again
after the process dies. Configured through the environment:

    BENCH_SAMPLES, BENCH_BATCH, BENCH_EPOCHS   as in bench_job.py
    BENCH_BACKUP_DIR   BackupAndRestore's directory
    BENCH_SAVE_FREQ    "epoch" or a number of batches
    BENCH_PROGRESS     "FIRST LAST T_FIRST" after every batch, in *data* steps:
                       epoch * steps_per_epoch + batch, i.e. where in the run this batch is,
                       whatever the optimizer's counter says after a restore
    BENCH_SIGNAL_AT    "SIGKILL:S": kill this process right after data step S

The progress callback comes before BackupAndRestore in the list, so a kill due
at a batch where a backup is also due lands before that backup (as
cluster-trainer's SIGKILL lands before a commit due at that step).
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from bench.bench_job import Progress, build_model, env_int, make_data  # noqa: E402


class DataProgress(Progress):
    """`Progress`, counting steps by data position: a restarted `fit` has a fresh optimizer step
    counter only until BackupAndRestore loads its backup, so the step a batch stands for comes
    from (epoch, batch)."""

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.report(self._epoch * self.steps_per_epoch + batch + 1)


def main() -> int:
    samples, batch, epochs = env_int("BENCH_SAMPLES", 4096), env_int("BENCH_BATCH", 32), env_int("BENCH_EPOCHS", 3)
    save_freq = os.environ.get("BENCH_SAVE_FREQ", "epoch")
    save_freq = save_freq if save_freq == "epoch" else int(save_freq)
    keras.utils.set_random_seed(0)
    x, y = make_data(samples)
    model = build_model({"model": "mlp"})
    callbacks = [DataProgress(math.ceil(samples / batch)),
                 keras.callbacks.BackupAndRestore(os.environ["BENCH_BACKUP_DIR"], save_freq=save_freq)]
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=callbacks)
    print("keras fit: completed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

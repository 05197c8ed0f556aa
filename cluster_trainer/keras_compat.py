"""Every private entry point of Keras and TensorFlow the trainer relies on, in one place.

The loop drives Keras's own compiled step instead of `model.fit`, and the
state capture reads what `fit` never exposes (each replica's part of a
distributed variable). These reach into Keras 3.15 and TensorFlow 2.21, the
versions pyproject.toml pins: `check_versions()` runs before a run starts and
says in one line when the installed ones differ, so an upgrade breaks here,
with a clear message, and nowhere else.

What is used, and why:

- `Model._symbolic_build(data_batch=...)`: create every variable (layers,
  optimizer slots, metric accumulators) before the first step, as `fit` does,
  so that state can be restored before any step runs.
- `Model._get_metrics_result_or_logs(logs)`: the epoch's logs as `fit` reports
  them (metric results, or the step's logs for a model without metrics).
- `keras.src.utils.python_utils.pythonify_logs`: logs as plain Python numbers.
- `keras.src.backend.common.global_state` / `keras.src.random.seed_generator`:
  Keras's global SeedGenerator, part of a run's RNG state.
- `KerasVariable._value`: the TensorFlow variable behind a Keras variable, and
  `tensorflow.python.distribute.values.SyncOnReadVariable` with `.values`: each
  replica's part of a metric accumulator (restoring the sum changes the
  reported metric in the last digit); `MirroredVariable.values`: each
  replica's copy of a mirrored variable, which layers such as
  BatchNormalization update from their replica's part of the batch, so the
  copies differ (as they do in `fit`).
- `CallbackList._flush_futures`: Keras runs batch-end callbacks asynchronously
  for some callbacks; their state is read only once they have run.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from tensorflow.python.distribute import values as tf_distribute_values

from cluster_trainer.errors import ClusterTrainerError

# (package, the version prefix it was checked on); pyproject.toml pins the same ranges.
CHECKED_ON = {"keras": "3.15", "tensorflow": "2.21"}


def configured_backend() -> str:
    """The backend Keras will load, read as Keras reads it (`KERAS_BACKEND`, else `keras.json`), without
    importing Keras: with another backend configured, importing Keras may fail on a missing package first."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def check_versions() -> None:
    """One line, exit code 2, unless Keras runs on TensorFlow and both are the versions this was checked on.

    Call it before a job file is loaded (it imports Keras).
    """
    backend = configured_backend()
    if backend != "tensorflow":
        raise ClusterTrainerError(
            f"Keras is set to the {backend!r} backend; cluster-trainer drives TensorFlow's distribution strategies: "
            "set KERAS_BACKEND=tensorflow (or \"backend\": \"tensorflow\" in ~/.keras/keras.json)"
        )
    import keras

    for name, installed in (("keras", keras.__version__), ("tensorflow", tf.__version__)):
        wanted = CHECKED_ON[name]
        if installed != wanted and not installed.startswith(wanted + "."):
            raise ClusterTrainerError(
                f"{name} {installed} is installed; cluster-trainer uses private parts of {name} checked on {wanted}.x "
                f"only (see cluster_trainer/keras_compat.py): install {name}=={wanted}.*"
            )


def symbolic_build(model, data_batch) -> None:
    """Create every variable of a compiled `model` from one batch, as `fit` does before its first step."""
    model._symbolic_build(data_batch=data_batch)


def metrics_result_or_logs(model, logs: dict) -> dict:
    """The logs `fit` reports for an epoch: the model's metric results, or `logs` without metrics."""
    return model._get_metrics_result_or_logs(logs)


def pythonify_logs(logs: dict) -> dict:
    """Logs with tensors and NumPy scalars turned into Python numbers."""
    from keras.src.utils.python_utils import pythonify_logs as pythonify

    return pythonify(logs)


def global_seed_generator(create: bool = True):
    """Keras's process-global SeedGenerator (the one `keras.random` draws from without a seed).

    With `create=False`, None when nothing has created it yet.
    """
    if not create:
        from keras.src.backend.common import global_state

        return global_state.get_global_attribute("global_seed_generator")
    from keras.src.random.seed_generator import global_seed_generator as get

    return get()


def backing_variable(variable):
    """The backend variable behind a Keras variable (a tf.Variable, or a distributed one)."""
    return getattr(variable, "_value", variable)


def sync_on_read_parts(variable) -> list | None:
    """Each replica's component of a SyncOnRead variable (a metric accumulator under a strategy), else None."""
    backing = backing_variable(variable)
    if isinstance(backing, tf_distribute_values.SyncOnReadVariable):
        return list(backing.values)
    return None


def mirrored_copies(variable) -> list | None:
    """Each replica's copy of a mirrored variable, else None.

    TensorFlow keeps the copies equal only for updates it aggregates. A variable with
    aggregation NONE that a layer assigns in replica context (BatchNormalization's
    moving statistics) is updated from each replica's own part of the batch, so
    its copies differ, under `fit` as here.
    """
    backing = backing_variable(variable)
    if isinstance(backing, tf_distribute_values.MirroredVariable):
        return list(backing.values)
    return None


def flush_async_callbacks(callbacks) -> None:
    """Wait for batch-end callbacks Keras runs asynchronously, so their state is complete."""
    flush = getattr(callbacks, "_flush_futures", None)
    if flush is not None:
        flush()

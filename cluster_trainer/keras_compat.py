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
  reported metric in the last digit).
- `CallbackList._flush_futures`: Keras runs batch-end callbacks asynchronously
  for some callbacks; their state is read only once they have run.
- `keras.src.backend.common.global_state.GLOBAL_STATE_TRACKER` and the module
  settings of `keras.src.backend.config`: what a process that trains one run
  after another (a warm sweep worker) snapshots and puts back between runs, so
  a run in a reused process is bitwise the run of a fresh one
  (`process_state_snapshot`, `restore_process_state`).
- `MirroredStrategy._collective_key_base`: where a new strategy starts numbering
  its collective ops. A second strategy in one process reuses the first one's
  keys, and TensorFlow's collective runtime then refuses a reduction of another
  dtype (checked: a float64 run after a mixed-precision one failed with
  "Collective instance 100 expected type 0 and data_type 1 but got type 0 and
  data_type 2"). TensorFlow's own tests move the base on by 100000 for each new
  strategy; `fresh_collective_keys` does the same.
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


def flush_async_callbacks(callbacks) -> None:
    """Wait for batch-end callbacks Keras runs asynchronously, so their state is complete."""
    flush = getattr(callbacks, "_flush_futures", None)
    if flush is not None:
        flush()


# -- a process that trains one run after another (warm sweep workers) -----------------------------

# Keras settings kept as module globals of keras.src.backend.config, each with its public getter and setter.
_CONFIG_SETTINGS = ("floatx", "epsilon", "image_data_format", "max_epochs", "max_steps_per_epoch")


def process_state_snapshot() -> dict:
    """What a later run in this process must find as this moment left it: Keras's settings, Keras's global state, RNGs.

    - Keras's settings: floatx, epsilon, image data format, max epochs and steps per
      epoch (`keras.config`), and whether NNX is on;
    - the plain values of Keras's global state (kept per thread): the dtype policy
      (mixed precision), the seed set by `keras.utils.set_random_seed`, logging and
      traceback switches, and the like. Objects there (models' name counters, the
      global SeedGenerator) are not kept: `restore_process_state` starts them afresh;
    - Python's and NumPy's global random generators.

    Take it where a fresh process would be: right after importing Keras, or right
    after loading a job file (which may set a policy at import).
    """
    import random

    import keras
    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.dtype_policies.dtype_policy import DTypePolicy

    plain = (bool, int, float, str, type(None), DTypePolicy)
    return {
        "config": {name: getattr(keras.config, name)() for name in _CONFIG_SETTINGS},
        "nnx": keras.config.is_nnx_enabled(),
        "global_state": {k: v for k, v in vars(global_state.GLOBAL_STATE_TRACKER).items() if isinstance(v, plain)},
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def restore_process_state(snapshot: dict) -> None:
    """Put back a `process_state_snapshot`, after dropping everything Keras holds globally.

    `keras.backend.clear_session()` drops Keras's global state in every thread (models'
    name counters, the global SeedGenerator, the dtype policy, ...) and TensorFlow's
    default graph and kernel cache; then the snapshot's settings and plain global
    values come back, on the calling thread (the one that trains next), and the RNGs.
    The next MirroredStrategy gets collective keys of its own (`fresh_collective_keys`).
    What this cannot undo: a job file's own module-level objects (load the job file
    again to reset those) and TensorFlow settings fixed once per process (logical
    devices, op determinism), which every run of a sweep sets alike.
    """
    import random

    import keras
    import numpy as np
    from keras.src.backend.common import global_state

    keras.backend.clear_session(free_memory=True)
    for name, value in snapshot["config"].items():
        if getattr(keras.config, name)() != value:
            getattr(keras.config, f"set_{name}")(value)
    if keras.config.is_nnx_enabled() != snapshot["nnx"]:
        from keras.src.backend import config as backend_config

        backend_config.set_nnx_enabled(snapshot["nnx"])
    for name, value in snapshot["global_state"].items():
        global_state.set_global_attribute(name, value)
    random.setstate(snapshot["python_rng"])
    np.random.set_state(snapshot["numpy_rng"])
    fresh_collective_keys()


# How far each new MirroredStrategy's collective keys move on (what TensorFlow's strategy_combinations uses).
_COLLECTIVE_KEY_STEP = 100_000


def fresh_collective_keys() -> None:
    """Make the next MirroredStrategy in this process use collective keys no earlier strategy here used.

    The keys only name the reductions: a run's numbers do not depend on them.
    """
    from tensorflow.python.distribute import mirrored_strategy

    for strategy_class in (mirrored_strategy.MirroredStrategy, mirrored_strategy.MirroredStrategyV1):
        strategy_class._collective_key_base += _COLLECTIVE_KEY_STEP

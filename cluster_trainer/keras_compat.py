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
- `keras.src.backend.tensorflow.trainer.reduce_per_replica`: under a
  multi-worker strategy Keras reduces the step's scalar outputs with
  `strategy.reduce("MEAN", v, axis=0)`, which TensorFlow rejects for a 0-d
  tensor (keras-team/keras#20585); `fix_multi_worker_step_reduction` makes
  that reduction `axis=None`, the mean over replicas that Keras computes on a
  single worker, of all the step's scalars in one all-reduce that also carries
  the workers' votes (`cluster_trainer.agreement`).
- `CollectiveAllReduceExtended._initialize_local_devices`: a multi-worker
  strategy takes every local GPU, or exactly one CPU;
  `multi_worker_strategy` hands it N logical CPU devices per worker instead,
  so a machine without GPUs runs N replicas as `--devices N` does on one.
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
- The TensorFlow optimizer's `_backend_apply_gradients` and the update methods
  it calls: with `gradient_accumulation_steps`, Keras puts the gradient
  all-reduce and `merge_call`s inside a `cond`, which fails under any
  MirroredStrategy, in `fit` too; `distribute_gradient_accumulation` moves the
  all-reduce before the `cond` and keeps the updates on each replica's copy.
- `multi_device_iterator_ops._create_device_dataset`: the per-device pipelines
  of a strategy's input iterator, which TensorFlow autotunes though they have
  nothing to tune; the loop turns the autotuner off there, whose thread made
  every epoch's end wait (`untuned_device_pipelines`).
- `Dataset._variant_tensor` (through `DatasetToGraphV2`): a `tf.data.Dataset`'s
  graph, read to refuse an order that changes per iteration and to tell
  batched from unbatched.
- `keras.src.trainers.data_adapters`: `PyDatasetAdapter` reads a PyDataset as
  `fit` does (its workers, its queue, its class weights);
  `make_class_weight_map_fn` and `class_weight_to_sample_weights` apply
  `class_weight` as `fit` does for datasets and for arrays.
"""

from __future__ import annotations

import contextlib
import json
import os
import types

import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as tf_collective_strategy
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


STEP_VOTES = "cluster_trainer_votes"  # the key under which a step returns the workers' votes

# The vote table of this process's group (a process joins one multi-worker run: TensorFlow's
# collectives are configured once) and the replica that contributes this worker's row.
_step_votes: dict = {}


def fix_multi_worker_step_reduction(votes: tf.Variable | None = None, voting_replica: int = 0) -> None:
    """Make Keras's compiled steps reduce their scalar outputs over every worker's replicas.

    Keras 3.15's `reduce_per_replica` calls `strategy.reduce("MEAN", v, axis=0)` under a
    multi-worker strategy, and TensorFlow refuses axis 0 for the step's scalar losses and
    metrics. The replacement reduces the float32 scalars with `axis=None` (the mean over
    replicas, as Keras computes on one worker), all of them packed into one all-reduce, and
    hands everything else to Keras's own function.

    With `votes` (a float32 `[workers, fields]` variable holding this worker's row, zeros
    elsewhere), the same all-reduce carries the sum of every worker's variable as it was at the
    step's end (`read_votes_after`), returned in the step's logs under `STEP_VOTES`: the workers
    learn each other's votes at no extra collective. It takes effect for steps made after the call.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    original = getattr(trainer, "reduce_per_replica", None)
    if original is None or not hasattr(trainer, "_collective_all_reduce_multi_worker"):
        raise ClusterTrainerError(
            "this Keras has no keras.src.backend.tensorflow.trainer.reduce_per_replica to fix for multi-worker "
            f"runs (checked on Keras {CHECKED_ON['keras']}.x): install keras=={CHECKED_ON['keras']}.*"
        )
    if votes is not None:
        _step_votes.update(variable=votes, replica=voting_replica)
    if getattr(original, "fixes_multi_worker_scalars", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction)

        def local(value):
            return strategy.experimental_local_results(value)[0]

        def reduce(value):
            if local(value).shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        if not isinstance(values, dict):
            return tree.map_structure(reduce, values)
        packed = [k for k, v in values.items() if local(v).shape.rank == 0 and local(v).dtype == tf.float32]
        outputs = {k: reduce(v) for k, v in values.items() if k not in packed}
        votes = _step_votes.get("variable")
        replicas = strategy.num_replicas_in_sync

        def pack(*scalars):
            parts = [tf.stack(scalars)] if scalars else []
            if votes is not None:
                context = tf.distribute.get_replica_context()
                mine = tf.cast(tf.equal(context.replica_id_in_sync_group, _step_votes["replica"]), tf.float32)
                # Read once the step's results exist and its update is applied (after the gradients'
                # all-reduce, a step's longest part), so that a vote cast during the step rides it.
                after = _step_votes.get("after")
                with tf.control_dependencies([*scalars, *([after.read_value()] if after is not None else [])]):
                    row = votes.read_value()
                # The mean over replicas of (row * replicas) on one replica per worker: every worker's row.
                parts.append(tf.reshape(row * (mine * replicas), [-1]))
            return tf.concat(parts, 0)

        if packed or votes is not None:
            means = strategy.reduce("MEAN", strategy.run(pack, args=tuple(values[k] for k in packed)), axis=None)
            outputs.update({k: means[i] for i, k in enumerate(packed)})
            if votes is not None:
                outputs[STEP_VOTES] = tf.reshape(means[len(packed):], votes.shape)
        return {k: outputs[k] for k in (*values, STEP_VOTES) if k in outputs}  # Keras's order of logs

    reduce_per_replica.fixes_multi_worker_scalars = True
    trainer.reduce_per_replica = reduce_per_replica


def read_votes_after(variable) -> None:
    """Make the steps traced from now on read the vote table only once `variable` (a Keras variable every
    step updates: the model's last trainable one) holds the step's update; None: once the step's losses exist.

    The update waits for the gradients' all-reduce, the longest part of a step on several workers, so a
    notice cast while it runs still rides that step instead of the next one.
    """
    _step_votes["after"] = None if variable is None else backing_variable(variable)


def multi_worker_strategy(cluster_resolver, cpu_devices: int, communication_options):
    """A MultiWorkerMirroredStrategy with `cpu_devices` logical CPU devices on this worker, one replica each.

    TensorFlow gives a multi-worker strategy every GPU, or exactly one CPU, per worker.
    The logical devices must exist already (`tf.config.set_logical_device_configuration`),
    and this must run before TensorFlow's context is initialised.
    """
    cls = tf_collective_strategy.CollectiveAllReduceExtended
    if not hasattr(cls, "_initialize_local_devices"):
        raise ClusterTrainerError(
            f"this TensorFlow cannot run several CPU devices per worker (checked on TensorFlow "
            f"{CHECKED_ON['tensorflow']}.x): install tensorflow=={CHECKED_ON['tensorflow']}.*, or use one device per worker"
        )

    def local_devices(self, resolver, worker_device):
        return tuple(f"{worker_device}/device:CPU:{i}" for i in range(cpu_devices)), "CPU"

    with _replaced(cls, "_initialize_local_devices", local_devices):
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver, communication_options)


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
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


# -- the step and the data, as fit has them ---------------------------------------------------------


def distribute_gradient_accumulation(optimizer) -> None:
    """Make an optimizer with `gradient_accumulation_steps` train under a distribution strategy.

    Keras 3.15 (TensorFlow backend) accumulates each replica's own gradients and,
    every N-th step, inside an `ops.cond`, averages them, applies weight decay
    through a `merge_call` and all-reduces them (`_backend_update_step`). TensorFlow
    rejects a `merge_call` or an all-reduce inside a `cond` branch ("merge_call called
    while defining a new graph or a tf.function"), so `fit` fails at its first step
    under any MirroredStrategy, with or without weight decay.

    Here the gradients are all-reduced (summed over replicas, as Keras does before
    its update) on every step, before the `cond`; inside it every replica then
    accumulates, decays and updates its own copy of each variable with Keras's
    replica-local methods (the variables have aggregation NONE, so an update in
    replica context touches that replica's copy only). All copies get the same
    values, so they stay equal. On one replica this is exactly Keras's arithmetic;
    on several, `clipnorm`/`clipvalue` clip the global gradient instead of each
    replica's part. An optimizer without gradient accumulation is left as it is.
    """
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    target = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer wraps the one that accumulates
    if not getattr(target, "gradient_accumulation_steps", None):
        return
    apply_local = target._backend_apply_gradients

    def apply_reduced(grads, trainable_variables):
        reduced = target._all_reduce_sum_gradients(list(zip(grads, trainable_variables)))
        return apply_local([grad for grad, _ in reduced], trainable_variables)

    target._backend_apply_gradients = apply_reduced
    for name in ("_backend_update_step", "_apply_weight_decay", "_backend_increment_gradient_accumulators"):
        setattr(target, name, types.MethodType(getattr(BaseOptimizer, name), target))


@contextlib.contextmanager
def untuned_device_pipelines():
    """Within: the per-device pipelines of a distribution strategy's input iterators run without tf.data's autotuner.

    TensorFlow's MultiDeviceIterator (the input of every MirroredStrategy and
    MultiWorkerMirroredStrategy) feeds each device through a pipeline of its own
    (`multi_device_iterator_ops._create_device_dataset`: a generator, then a
    `prefetch` of a fixed size), made with default options, so autotuned, though
    it has nothing to tune. Deleting the iterator at an epoch's end then waits on
    that pipeline's autotuner thread: 0.1-0.3 s at most epochs' ends on one CPU
    replica (TF 2.21, epochs of 64 steps of ~5 ms), 1 ms without it. No element,
    order or buffer size changes. `fit`, outside, keeps TensorFlow's behaviour.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops

    create = multi_device_iterator_ops._create_device_dataset
    options = tf.data.Options()
    options.autotune.enabled = False

    def create_untuned(*args, **kwargs):
        return create(*args, **kwargs).with_options(options)

    with _replaced(multi_device_iterator_ops, "_create_device_dataset", create_untuned):
        yield


def dataset_graph(dataset):
    """The GraphDef of a `tf.data.Dataset`'s pipeline (`Dataset._variant_tensor` is private), to read its ops:
    how it shuffles, whether its elements are batches. State it captures (a generator) is left out."""
    from tensorflow.core.framework import graph_pb2

    serialized = tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor, external_state_policy=1,
                                             strip_device_assignment=True)
    graph = graph_pb2.GraphDef()
    graph.ParseFromString(serialized.numpy())
    return graph


def py_dataset_batches(py_dataset, output_signature=None, class_weight: dict | None = None):
    """A PyDataset's batches as `fit` reads them: Keras's adapter, with the dataset's workers and queue.

    Returns `(dataset, stop, output_signature)`: a `tf.data.Dataset` of batches in
    index order (with per-example class weights added, if given), a function that
    stops the adapter's workers (call it when leaving the pass early), and the
    batches' TensorSpecs (read from the first two batches unless given, as `fit`
    does once).
    """
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(py_dataset, class_weight=class_weight, shuffle=False)
    if output_signature is not None:
        adapter._output_signature = output_signature
    dataset = adapter.get_tf_dataset()
    return dataset, adapter.on_epoch_end, adapter._output_signature


def class_weight_map_fn(class_weight: dict):
    """Keras's map from batches `(x, y)` to `(x, y, per-example class weight)`, the one `fit` applies."""
    from keras.src.trainers.data_adapters.tf_dataset_adapter import make_class_weight_map_fn

    return make_class_weight_map_fn(class_weight)


def class_weight_to_sample_weights(y, class_weight: dict):
    """Each example's weight from its class, as `fit` computes it for array data (1 for a class not listed)."""
    from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights as weights

    return weights(y, class_weight)

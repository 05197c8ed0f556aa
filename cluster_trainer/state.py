"""Capture and strict restore of a model's complete training state.

What is captured, in four groups that together are what
`model.get_state_tree()` holds:

- trainable and non-trainable variables (non-trainable includes every
  Dropout's `SeedGenerator` state, so dropout masks continue where they were),
- optimizer variables (iteration, learning rate, slots),
- metric accumulators, *per replica*: under MirroredStrategy they are
  SyncOnRead variables whose replicas hold partial sums; restoring the sum
  (which `assign` splits evenly) changes the last digit of the reported
  metric, restoring each replica's part keeps it bitwise equal,
- layer state whose replica copies differ, *per replica*: BatchNormalization's
  moving statistics are mirrored variables that each replica updates from its
  own part of the batch (in `fit` too), so the copies drift apart; restoring
  one copy to every replica changes validation after a resume. Non-trainable
  variables are read on every replica and stored per replica when the copies
  differ (weights and optimizer slots are updated in step on every replica);
  on several workers (MultiWorkerMirroredStrategy) every worker's metric parts
  and layer-state copies are gathered at each capture, so every worker must
  capture at the same step,

plus the process-global RNGs a callback or layer may draw from (Keras's global
SeedGenerator, NumPy's and Python's global generators).

Keys do not depend on auto-generated layer names (`dense_1` in one process is
`dense_3` in another): a variable is keyed by its group and position, and its
path with numeric suffixes removed is kept beside it as a check. Restore is
strict: every variable matched, same normalised path, shape and dtype, or a
`StateMismatchError` naming the first differences.
"""

from __future__ import annotations

import random
import re
import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from cluster_trainer import keras_compat
from cluster_trainer.devices import local_replica_ids, on_several_workers
from cluster_trainer.errors import StateMismatchError

_AUTO_NAME_SUFFIX = re.compile(r"_\d+(?=_|/|$)")
_KERAS_GLOBAL_RNG_KEY = "rng/keras_global_seed_generator"
_NUMPY_RNG_KEY = "rng/numpy_mt19937"


def stable_path(path: str) -> str:
    """A variable path without Keras's auto-generated numeric suffixes.

    Example:
        >>> stable_path("sequential_1/dense_3/kernel")
        'sequential/dense/kernel'
    """
    return _AUTO_NAME_SUFFIX.sub("", path)


def _variable_groups(model) -> dict[str, list]:
    optimizer = getattr(model, "optimizer", None)
    return {
        "trainable": list(model.trainable_variables),
        "non_trainable": list(model.non_trainable_variables),
        "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "metrics": list(model.metrics_variables),
    }


def _describe(model) -> list[dict]:
    entries = []
    for group, variables in _variable_groups(model).items():
        for i, variable in enumerate(variables):
            entries.append(
                {
                    "key": f"model/{group}/{i:05d}",
                    "path": variable.path,
                    "stable_path": stable_path(variable.path),
                    "shape": list(variable.shape),
                    "dtype": str(variable.dtype),
                    "variable": variable,
                }
            )
    return entries


def _group_of(entry: dict) -> str:
    return entry["key"].split("/")[1]


def _per_replica(variable, group: str) -> list | None:
    """Each replica's part of a SyncOnRead variable, or each replica's copy of a mirrored
    non-trainable one (layer state, which may differ between replicas); else None."""
    parts = keras_compat.sync_on_read_parts(variable)
    if parts is None and group == "non_trainable":
        parts = keras_compat.mirrored_copies(variable)
    return parts


def _components(variable, group: str) -> list:
    """The plain variables to read for `variable`: each replica's part of a SyncOnRead variable,
    each replica's copy of a mirrored non-trainable one (layer state, which may differ between
    replicas), the primary replica of another mirrored one, else the variable itself."""
    parts = _per_replica(variable, group)
    if parts is not None:
        return parts
    backing = keras_compat.backing_variable(variable)
    return [getattr(backing, "primary", backing)]


# One compiled read of every variable per model: a save reads them all in one call rather than
# one eager read and conversion per variable (0.4 ms against 2.3 ms for the 24 variables of a
# 3-layer MLP with Adam, on 2 CPU cores).
_READERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Reader:
    """Reads the given variables. An object rather than a lambda: TensorFlow counts traces per
    code object, and every model's reader would share a lambda's, which after five models in
    one process (tests, sweeps, notebooks) warns of "excessive retracing"."""

    def __init__(self, variables: list):
        self.variables = variables

    def __call__(self) -> list:
        return [variable.read_value() for variable in self.variables]


class _GroupReader:
    """Under a strategy with replicas on several workers: `_Reader`'s reads, except that each
    per-replica variable is read on every replica of every worker (one all-gather per dtype),
    so each worker gets all of them, in replica order. Every worker must call it together."""

    def __init__(self, strategy, local: list, per_replica: list):
        self.strategy = strategy
        self.local = local
        self.per_replica = per_replica  # distributed variables: a read in replica context is that replica's

    def __call__(self) -> tuple[list, list]:
        gathered = self.strategy.experimental_local_results(self.strategy.run(self._gather))[0]
        replicas = self.strategy.num_replicas_in_sync
        values = []
        for dtype, variables in self._by_dtype().items():
            columns = [int(np.prod(v.shape)) for v in variables]
            for variable, column in zip(variables, tf.split(gathered[dtype.name], columns, axis=1)):
                values.append(tf.unstack(tf.reshape(column, [replicas, *variable.shape]), num=replicas))
        return [variable.read_value() for variable in self.local], values

    def _by_dtype(self) -> dict:
        groups: dict = {}
        for variable in self.per_replica:
            groups.setdefault(variable.dtype, []).append(variable)
        return groups

    def _gather(self) -> dict:
        context = tf.distribute.get_replica_context()
        return {
            dtype.name: context.all_gather(tf.concat([tf.reshape(v.read_value(), [1, -1]) for v in variables], 1), 0)
            for dtype, variables in self._by_dtype().items()
        }


def _read_all(model, entries: list[dict]) -> list[list]:
    """Each variable's component values, as tensors, read in one `tf.function` call.

    On several workers, a per-replica variable's values (metric parts, copies of layer
    state) are every replica's, gathered from all workers (a collective: every worker
    must read at the same step).
    """
    components = [_components(e["variable"], _group_of(e)) for e in entries]
    strategy = model.distribute_strategy
    if on_several_workers(strategy):
        return _read_all_workers(model, strategy, entries, components)
    flat = [c for group in components for c in group]
    ids = tuple(id(c) for c in flat)
    cached = _READERS.get(model)
    if cached is None or cached[0] != ids:
        cached = (ids, tf.function(_Reader(flat), autograph=False))
        _READERS[model] = cached
    values = iter(cached[1]())
    return [[next(values) for _ in group] for group in components]


def _read_all_workers(model, strategy, entries: list[dict], components: list[list]) -> list[list]:
    gathered = [_per_replica(e["variable"], _group_of(e)) is not None for e in entries]  # metric parts, layer state
    local = [c for group, kept in zip(components, gathered) if not kept for c in group]
    distributed = [keras_compat.backing_variable(e["variable"]) for e, kept in zip(entries, gathered) if kept]
    ids = tuple(id(c) for c in local + distributed)
    cached = _READERS.get(model)
    if cached is None or cached[0] != ids:
        cached = (ids, tf.function(_GroupReader(strategy, local, distributed), autograph=False))
        _READERS[model] = cached
    local_values, gathered_values = cached[1]()
    local_values, gathered_values = iter(local_values), iter(gathered_values)
    return [next(gathered_values) if kept else [next(local_values) for _ in group]
            for group, kept in zip(components, gathered)]


def take_part_in_capture(model) -> None:
    """What `capture_model_state` does that involves the other workers (gathering each replica's
    metric parts), for a worker that stores nothing itself; at the same step as the capture."""
    if on_several_workers(model.distribute_strategy):
        _read_all(model, _describe(model))


def prepare_capture(model) -> None:
    """Compile the read that `capture_model_state` makes, so the first save does not pay for it."""
    _read_all(model, _describe(model))


def capture_model_state(model, copy: bool = True) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every variable of `model` in host memory.

    With `copy` (the default), each array is a copy of its own: the upload runs
    in the background while training updates the variables. Without it (a
    preemption flush: training has stopped), an array may share the read
    tensor's memory, which on a CPU is the variable's own buffer (a read
    aliases it until the next update), and so spares a copy of the whole state
    on the way to storage.

    Returns `(tensors, index)`: arrays by key, and a JSON-able description of
    each variable (key, path, shape, dtype, replicas) for strict restore.
    """
    entries = _describe(model)
    read = _read_all(model, entries)
    variables = [entry.pop("variable") for entry in entries]
    as_array = np.array if copy else np.asarray
    tensors: dict[str, np.ndarray] = {}
    for entry, variable, values in zip(entries, variables, read):
        per_replica = [np.asarray(v) for v in values] if len(values) > 1 else None
        if per_replica is not None and (keras_compat.sync_on_read_parts(variable) is not None
                                        or any(not np.array_equal(per_replica[0], v) for v in per_replica[1:])):
            tensors[entry["key"]] = np.stack(per_replica)  # a new array
            entry["replicas"] = len(values)
        else:
            tensors[entry["key"]] = as_array(values[0])
    return tensors, entries


def check_model_fits(model, index: list[dict]) -> None:
    """Raise `StateMismatchError` unless `index` describes exactly `model`'s variables."""
    current = _describe(model)
    stored_by_key = {e["key"]: e for e in index}
    current_keys = {e["key"] for e in current}
    differences = []
    for entry in current:
        stored = stored_by_key.get(entry["key"])
        if stored is None:
            differences.append(f"{entry['path']} {tuple(entry['shape'])} is new (not in the checkpoint)")
        elif (stored["stable_path"], stored["shape"], stored["dtype"]) != (
            entry["stable_path"],
            entry["shape"],
            entry["dtype"],
        ):
            differences.append(
                f"{entry['key']}: checkpoint has {stored['path']} {tuple(stored['shape'])} {stored['dtype']}, "
                f"model has {entry['path']} {tuple(entry['shape'])} {entry['dtype']}"
            )
    for stored in index:
        if stored["key"] not in current_keys:
            differences.append(f"{stored['path']} {tuple(stored['shape'])} is in the checkpoint but not in the model")
    if differences:
        shown = "; ".join(differences[:3])
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise StateMismatchError(
            f"the checkpoint was written by a different model: {shown}{more}. "
            "Restore the job's original model, or start a new run with another --storage URI"
        )


def restore_model_state(model, tensors: dict[str, np.ndarray], index: list[dict]) -> list[str]:
    """Assign stored values to every variable of `model`; strict (see `check_model_fits`).

    Checks everything before assigning anything, so a mismatch leaves the
    model untouched. Per-replica values (metric parts, differing copies of layer
    state) are restored per replica when the replica count is the same (on
    several workers, each worker its own replicas' values); else a metric's
    aggregate, or the first replica's copy of layer state, is assigned to every
    replica.

    Returns the paths of the variables restored that way (not bitwise what the
    run that wrote the checkpoint would have continued with); empty when none.
    """
    check_model_fits(model, index)
    stored_by_key = {e["key"]: e for e in index}
    replica_ids = None  # this worker's replicas among all: asked once, if needed
    fell_back = []
    for entry in _describe(model):
        variable = entry["variable"]
        value = tensors[entry["key"]]
        replicas = stored_by_key[entry["key"]].get("replicas")
        parts = keras_compat.sync_on_read_parts(variable)
        if parts is None:
            parts = keras_compat.mirrored_copies(variable)
        if replicas is None:
            variable.assign(value)
        elif parts is not None and replicas == model.distribute_strategy.num_replicas_in_sync:
            replica_ids = replica_ids or local_replica_ids(model.distribute_strategy)
            for part, replica in zip(parts, replica_ids):
                part.assign(value[replica])
        else:
            variable.assign(_aggregate(variable, value, layer_state=entry["key"].startswith("model/non_trainable/")))
            fell_back.append(entry["path"])
    return fell_back


def _aggregate(variable, per_replica: np.ndarray, layer_state: bool) -> np.ndarray:
    """What a read gives: the first replica's copy of layer state, the sum or mean of a metric's parts."""
    if layer_state:
        return per_replica[0]
    aggregation = str(getattr(variable, "aggregation", "sum")).lower()
    if "sum" in aggregation:
        return per_replica.sum(axis=0).astype(per_replica.dtype)
    if "mean" in aggregation:
        return per_replica.mean(axis=0).astype(per_replica.dtype)
    return per_replica[0]


def capture_rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Process-global RNG state: Python's, NumPy's and Keras's global SeedGenerator."""
    tensors = {}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[_NUMPY_RNG_KEY] = np.asarray(keys)
    state: dict[str, Any] = {
        "python": _listify(random.getstate()),
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    generator = keras_compat.global_seed_generator(create=False)
    if generator is not None:
        tensors[_KERAS_GLOBAL_RNG_KEY] = np.asarray(keras.ops.convert_to_numpy(generator.state.value))
    return state, tensors


def restore_rng_state(state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    random.setstate(_tuplify(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            tensors[_NUMPY_RNG_KEY],
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if _KERAS_GLOBAL_RNG_KEY in tensors:
        keras_compat.global_seed_generator().state.assign(tensors[_KERAS_GLOBAL_RNG_KEY])


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value

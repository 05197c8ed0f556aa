"""The shape of a run's `state.json`, checked before anything reads it.

A checkpoint's checksums say its files are the ones its manifest lists; they do
not say the state is one the loop wrote (whoever can write the run's prefix can
write a matching manifest). `check` is therefore run on every checkpoint a run,
`status`, `history` or `export` reads, inside `CheckpointStore.load_latest`: a
state that is not an object, lacks a field, has one of the wrong type, or
describes tensors the checkpoint does not hold, is a `CheckpointError`, and the
store falls back to the previous checkpoint as it does for a corrupt file.

What is checked is what the readers use: the position, the variable index
against the stored tensors, the callback and RNG state's outer shape, the job
summary and the history rows. Callbacks' own attributes are decoded by
`callback_state.restore`, which refuses what it cannot decode.

Example:
    >>> check_state({"position": {"epoch": 0}}, {}, "doc")
    Traceback (most recent call last):
    ...
    cluster_trainer.errors.CheckpointError: doc/state.json: variables is missing or not a JSON array
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster_trainer.errors import CheckpointError

# The fields of `loop.Position` (a test keeps the two equal).
POSITION_FIELDS = ("epoch", "batch", "global_step", "stop_training", "finished", "train_logs", "data_pass",
                   "data_offset")
# `loop._fit_arguments`: what a resume compares with the job's (older checkpoints have none).
FIT_ARGUMENTS = ("steps_per_epoch", "shuffle", "class_weight", "validation_steps", "validation_batch_size",
                 "validation_freq")
_PYTHON_RNG_WORDS = 625  # random.getstate(): (3, 624 words and the index, gauss)


def check(checkpoint, where: str) -> None:
    """`check_state` of a `Checkpoint`, as `CheckpointStore(check_state=...)` calls it."""
    check_state(checkpoint.state, checkpoint.tensors, where)


def check_state(state: dict[str, Any], tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise `CheckpointError` unless `state` is a run's state whose tensors are in `tensors`."""
    problem = _problem(state, tensors)
    if problem:
        raise CheckpointError(f"{where}/state.json: {problem}")


def _natural(value: Any) -> bool:
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(state: dict[str, Any], tensors: dict[str, np.ndarray]) -> str | None:
    for field, kind in (("position", dict), ("variables", list), ("callbacks", dict), ("rng", dict), ("job", dict),
                        ("history", dict)):
        if not isinstance(state.get(field), kind):
            return f"{field} is missing or not a JSON {'object' if kind is dict else 'array'}"
    if state.get("run_id") is not None and not isinstance(state["run_id"], str):
        return "run_id is not a string"
    return (_position_problem(state["position"]) or _variables_problem(state["variables"], tensors)
            or _callbacks_problem(state["callbacks"]) or _rng_problem(state["rng"], tensors)
            or _job_problem(state["job"]) or _history_problem(state["history"]))


def _position_problem(position: dict) -> str | None:
    unknown = sorted(set(position) - set(POSITION_FIELDS))
    if unknown:
        return f"position has unknown fields {unknown}"
    for field in ("epoch", "batch", "global_step"):
        if not _natural(position.get(field)):
            return f"position.{field} is missing or not an integer >= 0"
    for field in ("stop_training", "finished"):
        if field in position and not isinstance(position[field], bool):
            return f"position.{field} is not true or false"
    if position.get("train_logs") is not None and not isinstance(position["train_logs"], dict):
        return "position.train_logs is not an object"
    if position.get("data_pass") is not None and not _natural(position["data_pass"]):
        return "position.data_pass is not an integer >= 0"
    if not _natural(position.get("data_offset", 0)):
        return "position.data_offset is not an integer >= 0"
    return None


def _variables_problem(variables: list, tensors: dict[str, np.ndarray]) -> str | None:
    for entry in variables:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("key", "path", "stable_path", "dtype")):
            return f"variable entry {entry!r:.80} lacks a key, path or dtype"
        shape, replicas = entry.get("shape"), entry.get("replicas")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            return f"variable {entry['key']!r}: shape {shape!r:.40} is not a list of integers >= 0"
        if replicas is not None and not (_natural(replicas) and replicas > 0):
            return f"variable {entry['key']!r}: replicas {replicas!r:.20} is not an integer >= 1"
        stored = tensors.get(entry["key"])
        expected = tuple(([replicas] if replicas else []) + shape)
        if stored is None or stored.shape != expected or not _same_dtype(stored.dtype, entry["dtype"]):
            found = "missing" if stored is None else f"{stored.dtype} of shape {stored.shape}"
            return f"variable {entry['key']!r}: its tensor is {found}, the index says {entry['dtype']} {expected}"
    return None


def _same_dtype(stored: np.dtype, named: str) -> bool:
    try:
        return stored == np.dtype(named)
    except TypeError:  # a dtype NumPy does not name (bfloat16): safetensors' own reader judged it
        return True


def _callbacks_problem(callbacks: dict) -> str | None:
    for key, value in callbacks.items():
        if not isinstance(value, dict) or not isinstance(value.get("__extra__", {}), dict):
            return f"callback state {key!r} is not an object"
        extra = value.get("__extra__", {})  # file lengths a resume cuts CSV and event files back to
        events = extra.get("event_bytes", {})
        if not (_natural(extra.get("csv_bytes", 0)) and isinstance(events, dict)
                and all(_natural(size) for size in events.values())):
            return f"callback {key!r}: the stored file lengths are not byte counts"
    return None


def _rng_problem(rng: dict, tensors: dict[str, np.ndarray]) -> str | None:
    python, numpy_state = rng.get("python"), rng.get("numpy")
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)
            and len(python[1]) == _PYTHON_RNG_WORDS and all(_natural(w) and w < 2**32 for w in python[1])
            and type(python[0]) is int and (python[2] is None or _number(python[2]))):
        return "rng.python is not the state of Python's random generator"
    if not (isinstance(numpy_state, dict) and isinstance(numpy_state.get("kind"), str) and _natural(numpy_state.get("pos"))
            and _natural(numpy_state.get("has_gauss")) and _number(numpy_state.get("cached_gaussian"))):
        return "rng.numpy is not the state of NumPy's global generator"
    keys = tensors.get("rng/numpy_mt19937")
    if keys is None or keys.shape != (624,) or keys.dtype.kind not in "ui":
        return "the NumPy generator's key tensor is missing or not 624 integers"
    return None


def _job_problem(job: dict) -> str | None:
    if not isinstance(job.get("name"), str) or not isinstance(job.get("config"), dict):
        return "job.name or job.config is missing"
    for field in ("epochs", "batch_size", "seed"):
        if not _natural(job.get(field)):
            return f"job.{field} is missing or not an integer >= 0"
    if job.get("steps_per_epoch") is not None and not _natural(job["steps_per_epoch"]):
        return "job.steps_per_epoch is not an integer >= 0"
    every = job.get("checkpoint_every_steps")  # CheckpointPolicy.every_steps: steps, "auto" or None
    if every is not None and every != "auto" and not _natural(every):
        return 'job.checkpoint_every_steps is not an integer >= 0 or "auto"'
    if job.get("source_path") is not None and not isinstance(job["source_path"], str):
        return "job.source_path is not a string"
    return _fit_arguments_problem(job.get("fit_arguments"))


def _fit_arguments_problem(arguments: Any) -> str | None:
    if arguments is None:
        return None
    if not isinstance(arguments, dict) or sorted(arguments) != sorted(FIT_ARGUMENTS):
        return f"job.fit_arguments is not an object of {', '.join(FIT_ARGUMENTS)}"
    for field in ("steps_per_epoch", "validation_steps", "validation_batch_size"):
        if arguments[field] is not None and not _natural(arguments[field]):
            return f"job.fit_arguments.{field} is not an integer >= 0"
    weights, freq = arguments["class_weight"], arguments["validation_freq"]
    if not isinstance(arguments["shuffle"], bool) or not (weights is None or isinstance(weights, list) and all(
            isinstance(pair, list) and len(pair) == 2 and _natural(pair[0]) and _number(pair[1]) for pair in weights)):
        return "job.fit_arguments.shuffle or class_weight is of the wrong type"
    if not (_natural(freq) or isinstance(freq, list) and all(_natural(epoch) for epoch in freq)):
        return "job.fit_arguments.validation_freq is not an integer or a list of integers"
    return None


def _history_problem(history: dict) -> str | None:
    for field in ("epochs", "steps"):
        rows = history.get(field)
        if not isinstance(rows, list) or not all(isinstance(row, dict) and _natural(row.get("epoch")) for row in rows):
            return f"history.{field} is not a list of rows with an epoch"
    if not all(_number(row.get("epoch_seconds", 0.0)) and isinstance(row.get("resumed", False), bool)
               for row in history["epochs"]):
        return "history.epochs has a row whose epoch_seconds or resumed is of the wrong type"
    if not _number(history.get("epoch_seconds")):
        return "history.epoch_seconds is not a number"
    return None

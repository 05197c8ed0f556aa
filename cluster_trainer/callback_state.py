"""State of Keras callbacks, so a resumed run makes the same callback decisions.

Stock Keras callbacks keep their state in attributes, and several reset it in
`on_train_begin`; `restore` therefore runs *after* `on_train_begin`. What is
kept, per stock callback:

| callback          | attributes                                                    |
|-------------------|---------------------------------------------------------------|
| EarlyStopping     | wait, stopped_epoch, best, best_weights, best_epoch           |
| ReduceLROnPlateau | wait, cooldown_counter, best (the LR itself is optimizer state)|
| ModelCheckpoint   | best, _batches_seen_since_last_saving, _last_batch_seen, _current_epoch |
| TensorBoard       | _global_train_batch, _global_test_batch, _previous_epoch_iterations, and the event files' lengths (writers flushed at every capture; on resume the files are cut back to them) |
| CSVLogger         | keys, and the file's length: on resume the file is cut back to it and appended to |
| History           | epoch, history                                                |

Any other callback (user callbacks, subclasses of stock ones) resumes without
code changes: its attributes holding data (numbers, strings, lists, tuples,
sets, dicts, NumPy arrays, Keras or TF variables, `random.Random` and NumPy
`Generator`s) that *changed since the
callback was constructed* are captured and set again. Attributes that still
hold their constructed value are configuration, not state: a resumed run keeps
what the job builds now (so `--set` can change them). Attributes holding
anything else (a function, a model) are skipped with a warning. A callback
that defines `get_state()` / `set_state(state)` is captured through those
instead. Arrays (EarlyStopping's `best_weights`) go to the tensor shards, the
rest to JSON; nothing is pickled.

Example:
    >>> class Counter(keras.callbacks.Callback):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.counter = 0
    ...     def on_train_batch_end(self, batch, logs=None):
    ...         self.counter += 1
    >>> c = Counter()
    >>> before = baseline([c])
    >>> c.counter = 7
    >>> state, tensors = capture([c], before)
    >>> d = Counter(); restore([d], state, tensors); d.counter
    7
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import stat
import time
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from cluster_trainer.confined import UnsafePathError
from cluster_trainer.errors import JobError, StateMismatchError

log = logging.getLogger(__name__)

STOCK_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_weights", "best_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
    keras.callbacks.ModelCheckpoint: ("best", "_batches_seen_since_last_saving", "_last_batch_seen", "_current_epoch"),
    keras.callbacks.TensorBoard: ("_global_train_batch", "_global_test_batch", "_previous_epoch_iterations"),
    # append_header is not state: in append mode on_train_begin derives it from the (cut back) file.
    keras.callbacks.CSVLogger: ("keys",),
    keras.callbacks.History: ("epoch", "history"),
    keras.callbacks.LearningRateScheduler: (),
    keras.callbacks.TerminateOnNaN: (),
    keras.callbacks.LambdaCallback: (),
}

_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
# Attributes every callback has that describe the current process, not the run.
_NOT_STATE = {"model", "_model", "params", "validation_data", "_cluster_trainer_warned"}


def tracked(callbacks: Sequence[Any]) -> list:
    """The callbacks whose state belongs to the run (everything but the progress bar)."""
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            raise JobError(
                "remove keras.callbacks.BackupAndRestore from the job: cluster-trainer checkpoints and "
                "resumes the run itself, mid-epoch, and the two would fight over the model's state"
            )
    return [c for c in callbacks if not isinstance(c, keras.callbacks.ProgbarLogger)]


def _key(index: int, callback) -> str:
    return f"{index:02d}-{type(callback).__name__}"


class _Uncapturable(Exception):
    pass


def _encode(value: Any, name: str, tensors: dict[str, np.ndarray]) -> Any:
    """Encode a value as JSON data, moving arrays into `tensors` under `name`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return {"__numpy_scalar__": value.dtype.str, "value": value.item()}
    if isinstance(value, random.Random):
        return {"__python_random__": _encode(value.getstate(), name, tensors)}
    if isinstance(value, np.random.Generator):
        return {"__numpy_generator__": value.bit_generator.state}
    if isinstance(value, (keras.Variable, tf.Variable)):
        return {"__variable__": _encode(np.asarray(keras.ops.convert_to_numpy(value)), name, tensors)}
    if isinstance(value, np.ndarray) or keras.ops.is_tensor(value):
        array = np.array(keras.ops.convert_to_numpy(value), copy=True)  # uploaded in the background
        if array.dtype.kind in "USO":  # safetensors holds numbers only
            if array.dtype.kind == "O":
                raise _Uncapturable("object array")
            return {"__text_array__": array.dtype.str, "value": array.tolist()}
        tensors[name] = array
        return {"__tensor__": name}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(sorted(value, key=repr))]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, f"{name}/k{i}", tensors), _encode(v, f"{name}/v{i}", tensors)]
                              for i, (k, v) in enumerate(value.items())]}
    raise _Uncapturable(type(value).__name__)


def _decode(value: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            array = tensors[value["__tensor__"]]
            return array if array.flags.writeable else array.copy()  # a callback may change it in place
        if "__numpy_scalar__" in value:
            return np.dtype(value["__numpy_scalar__"]).type(value["value"])
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__set__" in value:
            return {_decode(v, tensors) for v in value["__set__"]}
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        if "__text_array__" in value:
            return np.array(value["value"], dtype=value["__text_array__"])
        if "__python_random__" in value:
            generator = random.Random()
            generator.setstate(_decode(value["__python_random__"], tensors))
            return generator
        if "__numpy_generator__" in value:
            state = value["__numpy_generator__"]
            if state.get("bit_generator") not in _BIT_GENERATORS:  # a name from storage never picks what is called
                raise ValueError(f"unknown NumPy bit generator {state.get('bit_generator')!r}")
            generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
            generator.bit_generator.state = state
            return generator
        if "__variable__" in value:
            return _Variable(_decode(value["__variable__"], tensors))
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _attributes(callback) -> dict[str, Any]:
    """The raw state of one callback, before encoding."""
    if hasattr(callback, "get_state") and hasattr(callback, "set_state"):
        return dict(callback.get_state())
    names = STOCK_ATTRIBUTES.get(type(callback))
    if names is not None:
        return {name: getattr(callback, name, None) for name in names}
    return {k: v for k, v in vars(callback).items() if k not in _NOT_STATE}


def _before_capture(callback) -> dict[str, Any]:
    """Make side effects durable up to now; return extra state they need."""
    if isinstance(callback, keras.callbacks.TensorBoard):
        for writer in getattr(callback, "_writers", {}).values():
            writer.flush()
        return {"event_bytes": _event_file_sizes(callback.log_dir)}
    if isinstance(callback, keras.callbacks.CSVLogger):
        csv_file = getattr(callback, "csv_file", None)
        if csv_file is not None and not csv_file.closed:
            csv_file.flush()
            return {"csv_bytes": csv_file.tell()}
        return {"csv_bytes": _file_size(callback.filename)}
    return {}


class _Variable:
    """A stored variable's value, assigned into the callback's existing variable on restore."""

    def __init__(self, value):
        self.value = value


def _is_user_state(callback) -> bool:
    return type(callback) not in STOCK_ATTRIBUTES and not (hasattr(callback, "get_state") and hasattr(callback, "set_state"))


def _fingerprint(value: Any) -> str | None:
    """A comparable form of an attribute value (arrays by content), or None if it is not data."""
    tensors: dict[str, np.ndarray] = {}
    try:
        encoded = _encode(value, "x", tensors)
    except _Uncapturable:
        return None
    digests = {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in tensors.items()}
    return json.dumps(encoded, sort_keys=True, default=str) + repr(sorted(digests.items()))


def baseline(callbacks: Sequence[Any]) -> dict[str, dict[str, str | None]]:
    """Fingerprints of user callbacks' attributes right after construction (see `capture`)."""
    return {
        _key(i, c): {name: _fingerprint(value) for name, value in _attributes(c).items()}
        for i, c in enumerate(callbacks)
        if _is_user_state(c)
    }


def capture(
    callbacks: Sequence[Any], initial: dict[str, dict[str, str | None]] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Capture `callbacks` (as returned by `tracked`) as JSON state plus arrays.

    For user callbacks, only attributes that differ from `initial` (their
    `baseline` right after construction) are captured.
    """
    state: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    initial = initial or {}
    for index, callback in enumerate(callbacks):
        key = _key(index, callback)
        entry = {"__extra__": _before_capture(callback)}
        user = _is_user_state(callback)
        for name, value in _attributes(callback).items():
            if user and name in initial.get(key, {}):
                fingerprint = _fingerprint(value)
                if fingerprint is not None and fingerprint == initial[key][name]:
                    continue  # still as constructed: configuration, not state
            try:
                entry[name] = _encode(value, f"callbacks/{key}/{name}", tensors)
            except _Uncapturable as e:
                if not user:
                    raise JobError(f"callback {key}: state {name!r} holds a {e}, which cannot be stored as data") from None
                _warn_once(callback, key, name, str(e))
        state[key] = entry
    return state, tensors


def _warn_once(callback, key: str, name: str, kind: str) -> None:
    warned = callback.__dict__.setdefault("_cluster_trainer_warned", set())
    if name not in warned:
        warned.add(name)
        log.warning("callback %s: attribute %r holds a %s, which is not stored with checkpoints; "
                    "define get_state()/set_state() on the callback if it must survive a restart", key, name, kind)


def prepare_resume(callbacks: Sequence[Any], state: dict[str, Any], built_at: float) -> None:
    """Before `on_train_begin` of a resumed run: undo side effects past the checkpoint.

    `built_at`: when this attempt started building its callbacks (`time.time()`); event files
    this process opened since then are its own.
    """
    for index, callback in enumerate(callbacks):
        extra = state.get(_key(index, callback), {}).get("__extra__", {})
        if isinstance(callback, keras.callbacks.CSVLogger):
            # Rows written after the checkpoint would be written again: cut them, then append.
            _truncate(callback.filename, extra.get("csv_bytes", 0))
            callback.append = True
        if isinstance(callback, keras.callbacks.TensorBoard) and "event_bytes" in extra:
            # Events written after the checkpoint would be written again, by a new event file: TensorBoard
            # would show both. Event files are append-only records, so the committed length is a whole file.
            _cut_back_event_files(callback.log_dir, extra["event_bytes"], built_at)


def check_matches(callbacks: Sequence[Any], state: dict[str, Any]) -> None:
    """Raise `StateMismatchError` unless `state` was captured from the same callback list."""
    expected = list(state)
    actual = [_key(i, c) for i, c in enumerate(callbacks)]
    if expected != actual:
        raise StateMismatchError(
            f"the job's callbacks changed since the checkpoint: it has {expected}, the job makes {actual}. "
            "Restore the job's callback list, or start a new run with another --storage URI"
        )


def restore(callbacks: Sequence[Any], state: dict[str, Any], tensors: dict[str, np.ndarray], mid_epoch: bool = False) -> None:
    """Restore captured state into `callbacks`; call after `on_train_begin`.

    With `mid_epoch`, also set up what callbacks create in `on_epoch_begin`,
    which a run resumed inside an epoch does not call again.
    """
    check_matches(callbacks, state)
    for index, callback in enumerate(callbacks):
        key = _key(index, callback)
        try:
            values = {k: _decode(v, tensors) for k, v in state[key].items() if k != "__extra__"}
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise StateMismatchError(f"callback {key}: its stored state cannot be decoded ({type(e).__name__}: {e}); "
                                     "the checkpoint is damaged: start a new run with another --storage URI") from None
        if hasattr(callback, "get_state") and hasattr(callback, "set_state"):
            callback.set_state(values)
        else:
            for name, value in values.items():
                if isinstance(value, _Variable):
                    existing = getattr(callback, name, None)
                    if existing is not None and hasattr(existing, "assign"):
                        existing.assign(value.value)
                        continue
                    value = value.value
                setattr(callback, name, value)
        if mid_epoch and isinstance(callback, keras.callbacks.TensorBoard):
            # on_epoch_begin sets these for steps-per-second summaries (the time of the interruption is lost).
            callback._epoch_start_time = time.time()
            callback._batch_start_time = time.time()


def _event_file_sizes(log_dir: str) -> dict[str, int]:
    """Sizes of the TensorBoard event files below `log_dir`, by path relative to it."""
    sizes = {}
    if not tf.io.gfile.isdir(log_dir):
        return sizes
    for directory, _, names in tf.io.gfile.walk(log_dir):
        for name in names:
            if ".tfevents." in name:
                path = os.path.join(directory, name)
                sizes[os.path.relpath(path, log_dir)] = tf.io.gfile.stat(path).length
    return sizes


def _opened_by_this_attempt(name: str, built_at: float) -> bool:
    """Whether an event file is this attempt's own (TensorBoard's `set_model` opens one before a resume).

    Event file names are `events.out.tfevents.<seconds>.<host>.<pid>.<n>...`; a file with our host and
    pid that is older than this attempt is an earlier attempt's (a restarted container with the same pid,
    or an earlier `train()` call in this process).
    """
    if f".{socket.gethostname()}.{os.getpid()}." not in name:
        return False
    try:
        return int(name.split(".tfevents.", 1)[1].split(".", 1)[0]) >= int(built_at)
    except (IndexError, ValueError):
        return False


def _cut_back_event_files(log_dir: str, committed: dict[str, int], built_at: float) -> None:
    """Cut every earlier attempt's event file below `log_dir` back to its length at the checkpoint.

    A file written entirely after the checkpoint is cut to nothing; nothing is deleted.
    """
    cut = 0
    for relative, size in _event_file_sizes(log_dir).items():
        keep = committed.get(relative, 0)
        if size > keep and not _opened_by_this_attempt(os.path.basename(relative), built_at):
            _truncate(os.path.join(log_dir, relative), keep)
            cut += size - keep
    if cut:
        log.info("TensorBoard: cut %d bytes of events written after the checkpoint under %s", cut, log_dir)


def _file_size(path: str) -> int:
    import tensorflow as tf

    return tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else 0


def _truncate(path: str, size: int) -> None:
    """Cut the file at `path` to `size` bytes; locally never through a symbolic link, and only a regular file."""
    import tensorflow as tf

    if os.path.lexists(path):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(f"{path} is a symbolic link; cluster-trainer never cuts back a file through "
                                      "one: remove it") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(f"{path} is not a regular file; it is not cut back: remove it")
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    elif tf.io.gfile.exists(path):  # object stores have no truncate: rewrite the kept prefix
        with tf.io.gfile.GFile(path, "rb") as f:
            kept = f.read(size)
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(kept)

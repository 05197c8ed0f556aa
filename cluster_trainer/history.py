"""The run's history: one row per epoch (and optionally every N steps), exactly once.

The rows live in the checkpoint state, so they always match the state a
resumed run continues from: an epoch that was trained twice because a process
died before committing it appears once, with the values of the run that
committed it. After each commit that changed them, the rows are also written
as Parquet under the run, for pandas, pyarrow and anything else that reads
Parquet:

    <run>/history/epochs.parquet   one row per finished epoch
    <run>/history/steps.parquet    one row every `Job.history_every_steps` steps

Each file is rewritten whole, after the checkpoint's manifest: it holds the
rows of a committed checkpoint, never a row twice. If a process dies between
the manifest and the Parquet write, the file lags by those rows until the
resumed run's first commit rewrites it.

Epoch rows: `epoch` (0-based, as Keras counts), `global_step`, every train and
validation metric, `learning_rate`, `epoch_seconds` (training and validation
time across attempts), `attempt` and `host` (the process that finished the
epoch), `resumed` (the epoch was continued from a mid-epoch checkpoint after an
interruption), `ended_at` (UTC).
"""

from __future__ import annotations

import io
import math
import socket
import time
from typing import Callable

import pandas as pd

from cluster_trainer import run_state
from cluster_trainer.checkpoint import Checkpoint, CheckpointStore
from cluster_trainer.errors import CheckpointError, ConfigError
from cluster_trainer.storage import Storage

EPOCHS_FILE = "history/epochs.parquet"
STEPS_FILE = "history/steps.parquet"
# Columns that describe how the run went, not what it computed: they differ between an
# interrupted run and an uninterrupted one by design.
RUN_COLUMNS = ("epoch_seconds", "attempt", "host", "resumed", "ended_at")


class HistoryRecorder:
    """Collects the run's rows; `state()` goes into each checkpoint, `tables()` into Parquet.

    Example:
        >>> recorder = HistoryRecorder(attempt=1)
        >>> recorder.begin_epoch(0)
        >>> recorder.end_epoch(0, global_step=16, logs={"loss": 0.5}, learning_rate=1e-3)
        >>> [(r["epoch"], r["loss"], r["attempt"]) for r in recorder.epochs]
        [(0, 0.5, 1)]
    """

    def __init__(self, attempt: int, every_steps: int | None = None, host: str | None = None):
        self.attempt = attempt
        self.every_steps = every_steps
        self.host = host or socket.gethostname()
        self.epochs: list[dict] = []
        self.steps: list[dict] = []
        self._epoch_seconds_before = 0.0  # time the current epoch ran in earlier attempts, up to their commit
        self._epoch_started = time.monotonic()
        self._resumed = False
        self.changed = True  # a new attempt publishes once, whatever the lag it inherited

    def restore(self, state: dict, mid_epoch: bool) -> None:
        self.epochs = list(state["epochs"])
        self.steps = list(state["steps"])
        self._epoch_seconds_before = state["epoch_seconds"] if mid_epoch else 0.0
        self._resumed = mid_epoch
        self._epoch_started = time.monotonic()

    def begin_epoch(self, epoch: int) -> None:
        self._epoch_seconds_before = 0.0
        self._resumed = False
        self._epoch_started = time.monotonic()

    def step_due(self, global_step: int) -> bool:
        return self.every_steps is not None and global_step % self.every_steps == 0

    def add_step(self, epoch: int, batch: int, global_step: int, logs: dict, learning_rate: float) -> None:
        """A row for the step just trained (`batch` is its 0-based index in `epoch`)."""
        self.steps.append({"epoch": epoch, "batch": batch, "global_step": global_step, **_numbers(logs),
                           "learning_rate": learning_rate, "attempt": self.attempt, "ended_at": _now()})
        self.changed = True

    def end_epoch(self, epoch: int, global_step: int, logs: dict, learning_rate: float) -> None:
        row = {"epoch": epoch, "global_step": global_step, **_numbers(logs)}
        row.setdefault("learning_rate", learning_rate)  # ReduceLROnPlateau logs it itself
        row.update(epoch_seconds=self._epoch_seconds(), attempt=self.attempt, host=self.host,
                   resumed=self._resumed, ended_at=_now())
        self.epochs.append(row)
        self.changed = True

    def _epoch_seconds(self) -> float:
        return self._epoch_seconds_before + (time.monotonic() - self._epoch_started)

    def state(self) -> dict:
        """For the checkpoint: the rows, and how long the current epoch has run so far."""
        return {"epochs": list(self.epochs), "steps": list(self.steps), "epoch_seconds": self._epoch_seconds()}

    def tables(self) -> dict[str, bytes]:
        """The rows as Parquet files keyed by their path under the run (empty tables are not written)."""
        return self.deferred_tables()()

    def deferred_tables(self) -> Callable[[], dict[str, bytes]]:
        """`tables` of the rows as they are now, encoded when called: the checkpoint writer
        encodes them on its thread, so the training thread only copies two lists."""
        self.changed = False
        snapshot = ((EPOCHS_FILE, list(self.epochs)), (STEPS_FILE, list(self.steps)))
        return lambda: {path: _parquet(rows) for path, rows in snapshot if rows}


def _numbers(logs: dict) -> dict:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat()  # a string: the rows travel in the checkpoint's JSON


def _columns(rows: list[dict]) -> list[str]:
    """A fixed column order (rows restored from a checkpoint's JSON come back with sorted keys):
    position, loss and metrics, their `val_` twins, learning rate, then how the run went."""
    keys = {key for row in rows for key in row}
    first = [k for k in ("epoch", "batch", "global_step") if k in keys]
    last = [k for k in ("learning_rate", *RUN_COLUMNS) if k in keys]
    metrics = sorted(keys - set(first) - set(last) - {k for k in keys if k.startswith("val_")},
                     key=lambda k: (k != "loss", k))
    validation = [f"val_{k}" for k in metrics if f"val_{k}" in keys]
    others = sorted(keys - set(first) - set(last) - set(metrics) - set(validation))
    return first + metrics + validation + others + last


def _parquet(rows: list[dict]) -> bytes:
    # A metric logged in some rows only (a callback's key) is null elsewhere.
    columns = _columns(rows)
    frame = pd.DataFrame(rows, columns=columns)
    frame["ended_at"] = pd.to_datetime(frame["ended_at"], utc=True)
    sink = io.BytesIO()
    frame.to_parquet(sink, index=False)
    return sink.getvalue()


# -- reading ---------------------------------------------------------------------


def latest_checkpoint(uri: str, storage_options: dict | None = None) -> Checkpoint:
    """The newest verified checkpoint under `uri`; `CheckpointError` if there is none."""
    storage = Storage(uri, storage_options)
    storage.check()
    checkpoint = CheckpointStore(storage, check_state=run_state.check).load_latest()
    if checkpoint is None:
        raise CheckpointError(f"no committed checkpoint under {uri}: is this the run's --storage URI?")
    return checkpoint


def read_history(uri: str, storage_options: dict | None = None, steps: bool = False) -> pd.DataFrame:
    """The history of the run stored at `uri`: one row per epoch, or per logged step with `steps=True`.

    Example:
        >>> df = read_history("runs/mlp")                          # doctest: +SKIP
        >>> df[["epoch", "loss", "val_loss", "learning_rate"]].tail(3)  # doctest: +SKIP

    The same table, without cluster-trainer:
    `pandas.read_parquet("runs/mlp/history/epochs.parquet")`.
    """
    storage = Storage(uri, storage_options)
    storage.check()
    path = STEPS_FILE if steps else EPOCHS_FILE
    try:
        data = storage.get(path)
    except FileNotFoundError:
        if not CheckpointStore(storage).committed():
            raise CheckpointError(f"no run under {uri}: no committed checkpoint; is this the run's --storage URI?") from None
        if steps:
            raise ConfigError(f"the run at {uri} logs no step rows: set Job(history_every_steps=N)") from None
        return pd.DataFrame({"epoch": pd.Series(dtype="int64")})  # no epoch has finished yet
    return parquet_frame(data)


def parquet_frame(data: bytes) -> pd.DataFrame:
    """A Parquet file's bytes as a DataFrame.

    Read with `ParquetFile`, not `pandas.read_parquet`: the latter goes through
    pyarrow's dataset API, whose threads made about one process in twenty abort
    at exit here ("terminate called without an active exception", pyarrow 25
    and 26 under load).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(data)).read().to_pandas()


def plot_history(frame: pd.DataFrame, output: str, title: str = "") -> None:
    """Draw each metric (with its `val_` twin) and the learning rate against epoch, into a PNG.

    Epochs finished by a later attempt than the one before are marked: that is
    where the run was interrupted and resumed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'cluster-trainer[plot]'") from None
    if frame.empty:
        raise ConfigError("the run has no finished epoch yet: nothing to plot")
    skip = {"epoch", "global_step", "learning_rate", *RUN_COLUMNS}
    metrics = [c for c in frame.columns if c not in skip and not c.startswith("val_")]
    metrics += [c[4:] for c in frame.columns if c.startswith("val_") and c[4:] not in metrics]
    panels = metrics + (["learning_rate"] if "learning_rate" in frame else [])
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    epochs = frame["epoch"] + 1  # as Keras prints them
    resumed_at = []
    if "attempt" in frame:
        changed = frame["attempt"].ne(frame["attempt"].shift()) & (frame.index > 0)
        resumed_at = list(epochs[changed | frame.get("resumed", False)])
    for axis, name in zip(axes.flat, panels):
        for column, style in ((name, "-o"), (f"val_{name}", "--s")):
            if column in frame:
                axis.plot(epochs, frame[column], style, markersize=3, label=column)
        if name == "learning_rate":
            axis.set_yscale("log")
        for i, epoch in enumerate(sorted(set(resumed_at))):
            axis.axvline(epoch, color="tab:red", alpha=0.35, linestyle=":", label="resumed" if i == 0 else None)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)

"""The run's epoch history, read from its newest committed checkpoint.

The history lives in the checkpoint itself (the state of Keras's `History`
callback), so it is always consistent with the state a resumed run continues
from: an epoch appears once, as in the uninterrupted run.
"""

from __future__ import annotations

import pandas as pd

from cluster_trainer.checkpoint import Checkpoint, CheckpointStore
from cluster_trainer.errors import CheckpointError
from cluster_trainer.storage import Storage


def latest_checkpoint(uri: str, storage_options: dict | None = None) -> Checkpoint:
    """The newest verified checkpoint under `uri`; `CheckpointError` if there is none."""
    storage = Storage(uri, storage_options)
    storage.check()
    checkpoint = CheckpointStore(storage).load_latest()
    if checkpoint is None:
        raise CheckpointError(f"no committed checkpoint under {uri}: is this the run's --storage URI?")
    return checkpoint


def history_frame(checkpoint: Checkpoint) -> pd.DataFrame:
    """One row per finished epoch: `epoch` (0-based, as Keras counts) and every logged metric."""
    for key, state in checkpoint.state["callbacks"].items():
        if key.endswith("-History"):
            # A metric logged in some epochs only (a callback's key) has a shorter list: it is padded with NaN.
            frame = pd.DataFrame({k: pd.Series(v, dtype="float64") for k, v in state["history"].items()})
            frame.insert(0, "epoch", state["epoch"])
            return frame
    return pd.DataFrame({"epoch": []})


def read_history(uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The epoch history of the run stored at `uri`, as a DataFrame.

    Example:
        >>> df = read_history("runs/mlp")          # doctest: +SKIP
        >>> df[["epoch", "loss", "val_loss"]].tail(3)  # doctest: +SKIP
    """
    return history_frame(latest_checkpoint(uri, storage_options))

"""Checkpoints: the format (`format`), where they live (`store`), which are kept
(`retention`), who may write (`fencing`) and writing in the background (`writer`)."""

from cluster_trainer.checkpoint.fencing import SupersededError, register_attempt
from cluster_trainer.checkpoint.format import Checkpoint, checkpoint_name
from cluster_trainer.checkpoint.retention import Retention
from cluster_trainer.checkpoint.store import CheckpointStore
from cluster_trainer.checkpoint.writer import CheckpointWriter

__all__ = [
    "Checkpoint", "CheckpointStore", "CheckpointWriter", "Retention", "SupersededError", "checkpoint_name",
    "register_attempt",
]  # fmt: skip

"""Export a run's model as a standard `.keras` file that `keras.models.load_model` opens."""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from cluster_trainer.data import as_source
from cluster_trainer.errors import JobError
from cluster_trainer.history import latest_checkpoint
from cluster_trainer.job import load_job
from cluster_trainer.loop import build_compiled_model
from cluster_trainer.state import restore_model_state


def export_model(uri: str, output: str, job_path: str | None = None, storage_options: dict | None = None) -> keras.Model:
    """Rebuild the job's model, load the newest checkpoint of `uri` into it, save to `output`.

    The job file is needed for the architecture (custom layers are code, and
    checkpoints never hold code); by default it is the path the run recorded.

    Example:
        >>> export_model("runs/mlp", "mlp.keras")          # doctest: +SKIP
        >>> keras.models.load_model("mlp.keras").summary() # doctest: +SKIP
    """
    if not output.endswith(".keras"):
        raise JobError(f"export writes the .keras format: name the output file *.keras, got {output!r}")
    checkpoint = latest_checkpoint(uri, storage_options)
    stored_job = checkpoint.state["job"]
    path = job_path or stored_job.get("source_path")
    if not path or not os.path.isfile(path):
        raise JobError(f"the run's job file {path!r} is not here; pass --job JOB.py (the job that trained {uri})")
    job = dataclasses.replace(load_job(path), config=stored_job["config"])
    keras.utils.set_random_seed(job.seed)
    source = as_source(job.train_data, shuffle=True, what="train_data")
    model = build_compiled_model(job, tf.distribute.get_strategy(), source)
    restore_model_state(model, checkpoint.tensors, checkpoint.state["variables"])
    model.save(output)
    return model

"""Export a run's model as a standard `.keras` file that `keras.models.load_model` opens."""

from __future__ import annotations

import dataclasses
import os

from cluster_trainer.errors import ClusterTrainerError, JobError


def check_arguments(output: str, job_path: str | None) -> None:
    """Refuse, in one line and before anything is read, an export that cannot work or would run stored code.

    Example:
        >>> check_arguments("mlp.keras", None)
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.JobError: export needs --job JOB.py, the job file that trained the run: the architecture is code, and export never imports a file named by what the run stores
    """
    if not job_path:
        raise JobError("export needs --job JOB.py, the job file that trained the run: the architecture is code, "
                       "and export never imports a file named by what the run stores")
    if not output.endswith(".keras"):
        raise JobError(f"export writes the .keras format: name the output file *.keras, got {output!r}")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ClusterTrainerError(f"cannot write {output}: the directory {directory} does not exist; create it first")


def export_model(uri: str, output: str, job_path: str | None = None, storage_options: dict | None = None):
    """Rebuild the job's model, load the newest checkpoint of `uri` into it, save to `output`.

    The job file (`job_path`) is required: the architecture (custom layers) is code, checkpoints
    never hold code, and the job path a run records is never imported on its own (whoever can
    write the run's storage could point it at any file). The run's stored config is applied.

    Example:
        >>> export_model("runs/mlp", "mlp.keras", job_path="jobs/mlp.py")   # doctest: +SKIP
        >>> keras.models.load_model("mlp.keras").summary()                   # doctest: +SKIP
    """
    import keras
    import tensorflow as tf

    from cluster_trainer.data import as_source
    from cluster_trainer.history import latest_checkpoint
    from cluster_trainer.job import load_job
    from cluster_trainer.loop import build_compiled_model
    from cluster_trainer.state import restore_model_state

    check_arguments(output, job_path)
    checkpoint = latest_checkpoint(uri, storage_options)
    job = dataclasses.replace(load_job(job_path), config=checkpoint.state["job"]["config"])
    keras.utils.set_random_seed(job.seed)
    source = as_source(job.train_data, shuffle=True, what="train_data")
    model = build_compiled_model(job, tf.distribute.get_strategy(), source)
    restore_model_state(model, checkpoint.tensors, checkpoint.state["variables"])
    model.save(output)
    return model

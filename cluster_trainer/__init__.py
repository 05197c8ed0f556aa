"""cluster-trainer: Keras 3 training that resumes at the exact next batch after preemption.

The public API:

- `Job`, `CheckpointPolicy`, `RunContext`, `Resources`: what a job file defines.
- `load_job(path)`: load the `job` of a job file.
- `run(job, storage)`: run a job on Ray (a cluster, or a local Ray started for it) and keep it
  alive across preemptions and lost nodes; `run(..., local=True)` trains in this process.
- `train(job, storage)`: run a job in this process, resuming from `storage`.
- `sweep(job, space, storage=...)`: a hyperparameter sweep on Ray Tune whose trials survive
  preemption; returns the trials table.
- `read_history(uri)`: a run's epoch history as a pandas DataFrame.
"""

from cluster_trainer.job import CheckpointPolicy, Job, Resources, RunContext, load_job

__all__ = ["CheckpointPolicy", "Job", "Resources", "RunContext", "load_job", "run", "sweep", "train", "read_history",
           "export_model"]
__version__ = "0.1.0"


def __getattr__(name):
    # TensorFlow is imported only when training-side API is used, so that
    # job files and `cluster-trainer --help` load fast.
    if name == "run":
        from cluster_trainer.on_ray.driver import run

        return run
    if name == "sweep":
        from cluster_trainer.sweep import sweep

        return sweep
    if name == "train":
        from cluster_trainer.loop import train

        return train
    if name == "read_history":
        from cluster_trainer.history import read_history

        return read_history
    if name == "export_model":
        from cluster_trainer.export import export_model

        return export_model
    raise AttributeError(f"module 'cluster_trainer' has no attribute {name!r}")

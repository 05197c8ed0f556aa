"""The training actor: one attempt of a run on one Ray node.

The driver makes `TrainActor` remote with the job's resources; the actor loads
the job file on its own node (so the job's code and data never travel through
Ray), runs `cluster_trainer.loop.train` with the Ray notice sources, and
returns a plain dict: nothing raised in here crosses Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import traceback

from cluster_trainer.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SUPERSEDED,
    ClusterTrainerError,
    JobError,
)
from cluster_trainer.job import Job, load_job
from cluster_trainer.on_ray.notices import DriverStop, RayDrainNotice
from cluster_trainer.workers import Workers

# Environment a driver passes on to its actors (on other nodes they do not inherit it):
# the trainer's own settings and where the stores are. Not credentials: those come from
# each node's own identity (workload identity, IRSA, instance profiles), or the job's
# runtime_env if you must (see docs/RAY.md).
FORWARDED_ENV_PREFIXES = ("CLUSTER_TRAINER_",)
FORWARDED_ENV = (
    "TF_CPP_MIN_LOG_LEVEL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "STORAGE_EMULATOR_HOST",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
)
# Job fields that are code or data: an actor gets them by loading the job file itself.
_CODE_FIELDS = ("build_model", "train_data", "validation_data", "callbacks", "source_path")


def forwarded_env() -> dict[str, str]:
    """The part of this process's environment every actor gets (see `FORWARDED_ENV`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}


class TrainActor:
    """One attempt of a run on one Ray node: load the job, train, return a plain result.

    Made remote by the driver (`ray.remote(TrainActor).options(...)`) with the
    job's resources, `max_restarts=0` (the driver decides what happens next) and
    `max_concurrency=2`, so `stop()` and `where()` are served while `train()` runs.
    In a group of several workers (`cluster_trainer.on_ray.group`), the spec's
    `cluster` (every worker's `ip:port` and this one's index) is the loop's
    `Workers`, and it trains under MultiWorkerMirroredStrategy.
    Nothing raised in here crosses Ray: `train()` returns a dict with `status`
    (completed, already_complete, preempted, failed, bad_input, superseded),
    `exit_code` and `message`, plus the position and metrics when it finished.
    """

    def __init__(self):
        self._stop = DriverStop()

    def where(self) -> dict:
        """Node id, IP, host name, PID and GPU ids of this actor."""
        import ray

        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
        }

    def stop(self, reason: str, deadline_ms: int | None = None) -> None:
        """Ask the running loop to commit at the next batch boundary and stop (status preempted), by
        `deadline_ms` (ms since the Unix epoch) if given, else within the grace period."""
        self._stop.request(reason, deadline_ms)

    def free_port(self) -> int:
        """A TCP port free now on this actor's node, for this worker's collective server."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def train(self, spec: dict) -> dict:
        try:
            return self._train(spec)
        except ClusterTrainerError as e:
            status = {EXIT_PREEMPTED: "preempted", EXIT_SUPERSEDED: "superseded", EXIT_BAD_INPUT: "bad_input"}
            return {"status": status.get(e.exit_code, "failed"), "exit_code": e.exit_code, "message": str(e)}
        except Exception as e:  # training failed: the traceback goes to the driver's log, the summary in the result
            traceback.print_exc()
            return {"status": "failed", "exit_code": EXIT_FAILURE, "message": f"{type(e).__name__}: {e}"}

    def _train(self, spec: dict) -> dict:
        log_to_stderr()
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() not in ("0", "1"):
            from cluster_trainer.native_logs import import_tensorflow_quietly

            import_tensorflow_quietly()
        from cluster_trainer.loop import train
        from cluster_trainer.preemption import notice_sources, sources_from_environment

        job = self._load_job(spec)
        workers = Workers(spec["cluster"]["workers"], spec["cluster"]["index"]) if spec.get("cluster") else None
        sources = [RayDrainNotice(), self._stop]
        sources += notice_sources(spec["notices"]) if spec["notices"] else sources_from_environment()
        result = train(
            job, spec["storage"], devices=spec["devices"], epochs=spec["epochs"], verbose=spec["verbose"],
            storage_options=spec["storage_options"], notice_sources=sources,
            handle_signals=False,  # no usable SIGTERM in a Ray actor; handlers here could interfere with Ray's
            workers=workers,
        )
        position = {k: getattr(result.position, k) for k in ("epoch", "batch", "global_step")}
        return {
            "status": result.status, "exit_code": EXIT_OK, "message": "", "uri": result.uri,
            "attempt": result.attempt, "position": position, "checkpoint": result.checkpoint,
            "history": {k: list(v) for k, v in result.history.items()},
        }

    def _load_job(self, spec: dict) -> Job:
        """The job to train (`cluster_trainer.on_ray.pool.WarmTrainActor` keeps it loaded between runs)."""
        return job_from_spec(spec)


def log_to_stderr() -> None:
    """The package's log lines, as the CLI prints them; Ray forwards the actor's stderr to the driver."""
    package_log = logging.getLogger("cluster_trainer")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cluster-trainer: %(levelname)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def job_spec(job: Job, working_dir: str | None) -> dict:
    """How the actor gets the job: the file's path when there is one (the actor loads it, so
    its code and data never travel through Ray), else the Job itself, through Ray's pickling.

    Every plain field (config with `--set` overrides, epochs, batch size, seed, checkpoint
    policy, ...) travels as it is in the driver, so what the actor trains is what was asked.
    Under a Ray `working_dir` (`ray job submit --working-dir .`) the path is relative to it:
    each node unpacks its own copy, at its own path.
    """
    if job.source_path is None:
        return {"job": job}
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in _CODE_FIELDS}
    path = job.source_path
    if working_dir is not None:
        relative = os.path.relpath(path, working_dir)
        if relative.startswith(os.pardir + os.sep):
            raise JobError(f"the job file {path} is outside the Ray working_dir {working_dir}, so Ray does not ship "
                           "it to the nodes: put it inside the directory you pass to --working-dir")
        path = relative
    return {"job_path": path, "job_fields": fields}


def job_from_spec(spec: dict) -> Job:
    """The `Job` a `job_spec` describes, loaded on this node."""
    if "job" in spec:
        return spec["job"]
    path = os.path.abspath(spec["job_path"])  # a relative path is relative to this node's working_dir copy
    if not os.path.isfile(path):
        raise JobError(
            f"job file {path} is not on node {socket.gethostname()}: submit with `ray job submit --working-dir DIR` "
            "(DIR holding the job file) so Ray ships it, or put it at the same path on every node (e.g. in the image)"
        )
    return dataclasses.replace(load_job(path), **spec["job_fields"])

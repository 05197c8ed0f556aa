"""Run a job on Ray: one actor per attempt, and a driver that keeps the run alive.

The run's loop (`cluster_trainer.loop.train`) runs inside a Ray actor that asks
for the job's `Resources` (CPUs, GPUs, custom resources, node labels), with
MirroredStrategy over the actor's GPUs, or over `devices` logical CPU devices
where it has none. The driver (this process: a terminal, or the entrypoint of
`ray job submit`) watches it:

- the actor finishes: print the run URI and final metrics, exit 0;
- the actor's node is drained (a spot VM's shutdown, a Kubernetes pod being
  deleted: `ray start --block` drains its node with reason PREEMPTION on
  SIGTERM; the autoscaler and `ray drain-node` drain too): `RayDrainNotice`
  tells the loop inside the actor, which commits at the next batch boundary
  and stops (the loop's "preempted" status, exit 75); the driver starts a new
  actor wherever Ray finds resources, which resumes from storage;
- the actor or its node dies without notice (`RayActorError`, SIGKILL, OOM,
  a lost node): a new actor resumes from the last committed checkpoint;
- no node has the resources (all busy, or none big enough until the
  autoscaler adds one): the new actor waits in Ray's queue and the driver
  says, at growing intervals, what it is waiting for.

Preemptions (a drained node, `RayActorError.preempted`, the loop's preempted
status) count against `max_preemptions` (unlimited by default: preemption is
not failure); real failures (an exception in training, a killed actor, a lost
node that was not drained) against `max_failures`, with backoff between
retries. Bad input (a job file that raises, a `--set` key, a checkpoint that
does not fit: exit 2) is never retried, and a superseded run (exit 3: another
process resumed it) stops. The exit code is that of the last attempt, so
`ray job submit` reports SUCCEEDED or FAILED.

A Ray actor never gets a usable SIGTERM (when a node stops, Ray drains it and
then sends SIGTERM and SIGKILL to its workers in the same millisecond), and
Python signal handlers in a Ray worker can interfere with Ray's own, so the
loop runs with `handle_signals=False` there and learns of preemption by
polling: the node's drain state, the driver's stop request (Ctrl-C or SIGTERM
of the driver, e.g. `ray job stop`), and the sources named in
`CLUSTER_TRAINER_NOTICE` / `--notice`.

This is the only module that imports Ray, and only inside functions, so
`--no-ray` runs never load it. Ray's private APIs used here are wrapped in
`_RayPrivate`, checked on the Ray range pinned in pyproject.toml (2.60).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Callable, Sequence

from cluster_trainer.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SUPERSEDED,
    ClusterTrainerError,
    ConfigError,
    JobError,
)
from cluster_trainer.job import Job, Resources, load_job

log = logging.getLogger(__name__)

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
# Between retries after a failure: 2 s, 4 s, 8 s, ... at most 60 s. A preemption retries at once.
BACKOFF_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0
# When to say that the next actor is still waiting for a node: after 5 s, 15 s, 45 s, ... then every 10 min.
WAITING_REPORT_FIRST = 5.0
WAITING_REPORT_MAX = 600.0
# How often the driver looks at the actor's node's drain state (for its own messages).
DRAIN_CHECK_SECONDS = 2.0
# How often `run(on_progress=...)` is called while an actor trains.
PROGRESS_SECONDS = 2.0
# Ray forwards actor output to the driver asynchronously; give the last lines time to arrive.
LOG_FLUSH_SECONDS = 1.0
# Job fields that are code or data: an actor gets them by loading the job file itself.
_CODE_FIELDS = ("build_model", "train_data", "validation_data", "callbacks", "source_path")
_PREEMPTED_TAIL = ". Run the same command again to resume"


# -- Ray's private APIs, in one place ---------------------------------------------------------


class _RayPrivate:
    """Every private Ray API this module relies on. Checked on Ray 2.60 (pyproject pins >=2.60,<2.61).

    - `ray._private.state.state.get_draining_nodes()`: the GCS's draining-nodes table,
      `{node_id_hex: deadline_ms}` with the deadline in milliseconds since the Unix epoch and
      0 for a drain without a deadline (`ray drain-node` without `--deadline-remaining-seconds`).
      Public Ray has no way to ask "is my node being drained?".
    - `ray.init(_node_ip_address=...)`: a "hidden option" of `ray.init`, to keep the embedded
      local cluster on 127.0.0.1.
    """

    @staticmethod
    def draining_nodes() -> dict[str, int]:
        from ray._private.state import state

        return dict(state.get_draining_nodes())

    @staticmethod
    def init_local(**kwargs):
        import ray

        return ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


# -- notices inside the actor -----------------------------------------------------------------


class RayDrainNotice:
    """A preemption notice source for a Ray actor: its node is being drained.

    `poll()` returns the seconds left before the drain's deadline, `math.inf`
    for a drain without one (the loop then uses its grace period,
    `CLUSTER_TRAINER_GRACE_SECONDS`), or None while the node is not draining.
    Whatever the reason of the drain, the node is going away: the loop commits
    at the next batch boundary and stops.

    Example (inside an actor):
        >>> notice = RayDrainNotice()        # doctest: +SKIP
        >>> notice.poll()                     # doctest: +SKIP
        >>> # ray drain-node --node-id <this node> --reason DRAIN_NODE_REASON_PREEMPTION \\
        >>> #     --reason-message spot --deadline-remaining-seconds 30
        >>> notice.poll()                     # doctest: +SKIP
        29.4
    """

    def __init__(self, node_id: str | None = None):
        if node_id is None:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        self.node_id = node_id
        self.name = f"Ray drain of node {node_id[:8]}"

    def poll(self) -> float | None:
        deadline_ms = _RayPrivate.draining_nodes().get(self.node_id)
        if deadline_ms is None:
            return None
        if not deadline_ms:
            return math.inf
        return deadline_ms / 1000.0 - time.time()


class _DriverStop:
    """A notice source the driver sets through the actor (Ctrl-C or SIGTERM of the driver)."""

    def __init__(self):
        self.name = "stop requested by the driver"
        self._requested = threading.Event()

    def request(self, reason: str) -> None:
        self.name = f"{reason} of the driver"
        self._requested.set()

    def poll(self) -> float | None:
        return math.inf if self._requested.is_set() else None


# -- the actor ----------------------------------------------------------------------------------


class TrainActor:
    """One attempt of a run on one Ray node: load the job, train, return a plain result.

    Made remote by the driver (`ray.remote(TrainActor).options(...)`) with the
    job's resources, `max_restarts=0` (the driver decides what happens next) and
    `max_concurrency=2`, so `stop()` and `where()` are served while `train()` runs.
    Nothing raised in here crosses Ray: `train()` returns a dict with `status`
    (completed, already_complete, preempted, failed, bad_input, superseded),
    `exit_code` and `message`, plus the position and metrics when it finished.
    """

    def __init__(self):
        self._stop = _DriverStop()

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

    def stop(self, reason: str) -> None:
        """Ask the running loop to commit at the next batch boundary and stop (status preempted)."""
        self._stop.request(reason)

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
        _log_to_stderr()
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() not in ("0", "1"):
            from cluster_trainer.native_logs import import_tensorflow_quietly

            import_tensorflow_quietly()
        from cluster_trainer.loop import train
        from cluster_trainer.preemption import notice_sources, sources_from_environment

        job = _job_from_spec(spec)
        sources = [RayDrainNotice(), self._stop]
        sources += notice_sources(spec["notices"]) if spec["notices"] else sources_from_environment()
        result = train(
            job, spec["storage"], devices=spec["devices"], epochs=spec["epochs"], verbose=spec["verbose"],
            storage_options=spec["storage_options"], notice_sources=sources,
            handle_signals=False,  # no usable SIGTERM in a Ray actor; handlers here could interfere with Ray's
        )
        position = {k: getattr(result.position, k) for k in ("epoch", "batch", "global_step")}
        return {
            "status": result.status, "exit_code": EXIT_OK, "message": "", "uri": result.uri,
            "attempt": result.attempt, "position": position, "checkpoint": result.checkpoint,
            "history": {k: list(v) for k, v in result.history.items()},
        }


def _log_to_stderr() -> None:
    """The package's log lines, as the CLI prints them; Ray forwards the actor's stderr to the driver."""
    package_log = logging.getLogger("cluster_trainer")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cluster-trainer: %(levelname)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def _job_spec(job: Job, working_dir: str | None) -> dict:
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


def _job_from_spec(spec: dict) -> Job:
    if "job" in spec:
        return spec["job"]
    path = os.path.abspath(spec["job_path"])  # a relative path is relative to this node's working_dir copy
    if not os.path.isfile(path):
        raise JobError(
            f"job file {path} is not on node {socket.gethostname()}: submit with `ray job submit --working-dir DIR` "
            "(DIR holding the job file) so Ray ships it, or put it at the same path on every node (e.g. in the image)"
        )
    return dataclasses.replace(load_job(path), **spec["job_fields"])


# -- the driver ---------------------------------------------------------------------------------


@dataclasses.dataclass
class RunOutcome:
    """What `run` returns when the run completed (or was already complete).

    Attributes:
        uri: the run's storage URI.
        status: "completed" or "already_complete".
        attempt: the run's attempt number (`<run>/attempts/`) of the process that finished it.
        position: `{"epoch", "batch", "global_step"}` where it ended.
        history: the epoch history of the final process (`{"loss": [...], ...}`).
        checkpoint: the name of the last committed checkpoint.
        actors: Ray actors this call started (1 for an in-process run).
        preemptions: of those, how many were preempted.
        failures: of those, how many failed (and were retried).
    """

    uri: str
    status: str
    attempt: int | None
    position: dict
    history: dict
    checkpoint: str | None
    actors: int = 1
    preemptions: int = 0
    failures: int = 0

    @property
    def metrics(self) -> dict:
        """The last epoch's metrics."""
        return {k: v[-1] for k, v in self.history.items() if v}

    def summary(self) -> str:
        """The final status line: `run completed: URI (epoch 9, global step 144, attempt 2) loss=...`."""
        p = self.position
        counts = (f"; {self.actors} Ray actor(s), {self.preemptions} preempted, {self.failures} failed"
                  if self.actors > 1 or self.preemptions or self.failures else "")
        metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(self.metrics.items()) if isinstance(v, float))
        return (f"run {self.status}: {self.uri} (epoch {p['epoch']}, global step {p['global_step']}, "
                f"attempt {self.attempt}{counts}) {metrics}").rstrip()


class RunError(ClusterTrainerError):
    """The run did not complete on Ray; `exit_code` is the last attempt's (1, 2, 3 or 75)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run(
    job: Job,
    storage: str,
    *,
    address: str | None = None,
    devices: int | None = None,
    epochs: int | None = None,
    resources: Resources | None = None,
    max_failures: int = 3,
    max_preemptions: int | None = None,
    storage_options: dict | None = None,
    local: bool = False,
    verbose: int | str = "auto",
    notices: Sequence[str] | None = None,
    echo: Callable[[str], None] | None = None,
    on_progress: Callable[[], None] | None = None,
) -> RunOutcome:
    """Train `job` on Ray until it completes, surviving preemptions and lost nodes; resumes `storage`.

    Args:
        job: the `Job` (loaded with `load_job`, so actors on other nodes load the same file).
        storage: the run's URI (a path, file://, gs://, s3://). Every node must reach it: on a
            cluster of several machines, an object store or a shared file system.
        address: the Ray cluster: "auto" (the one `ray start` ran on this machine), "HOST:PORT",
            or None: `RAY_ADDRESS` if set (as under `ray job submit`), else a new local Ray
            started in this process on 127.0.0.1 and stopped at the end.
        devices: replicas for MirroredStrategy in the actor (default: the actor's GPUs, else 1 CPU).
        epochs: override `job.epochs`.
        resources: what each actor asks for (default `job.resources`).
        max_failures: failures retried (with backoff) before giving up; preemptions do not count.
        max_preemptions: preemptions retried before giving up with exit code 75 (default: no limit).
        storage_options: fsspec options for the store (override the job's).
        local: run the loop in this process instead (no Ray: debugging, plain Kubernetes pods).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, "auto" (in an actor: 2).
        notices: extra preemption notice sources (`gce`, `aws`, `file:PATH`) polled by each
            attempt; default `CLUSTER_TRAINER_NOTICE`.
        echo: where the driver prints its one-line messages (default: stderr).
        on_progress: called in the driver every few seconds while an actor trains (e.g. to
            report the run's committed history to Ray Tune); whatever it raises ends the run,
            its actor killed, and propagates. Not called with `local=True`.

    Returns a `RunOutcome`; raises `RunError` (or, with `local=True`, the loop's own errors),
    whose `exit_code` says why it stopped: 1 failed more than `max_failures` times, 2 bad input,
    3 superseded, 75 preempted more than `max_preemptions` times or stopped by Ctrl-C/SIGTERM
    after committing its state.

    Example:
        >>> import cluster_trainer as ct
        >>> job = ct.load_job("jobs/mlp.py").with_overrides(["lr=3e-3"])     # doctest: +SKIP
        >>> outcome = ct.run(job, "runs/mlp", devices=2)                     # doctest: +SKIP
        >>> outcome.metrics["val_loss"], outcome.preemptions                 # doctest: +SKIP
        (1.09, 0)
        >>> ct.run(job, "gs://bucket/runs/mlp", address="auto",              # doctest: +SKIP
        ...        resources=ct.Resources(num_gpus=4, label_selector={"pool": "spot"}))
    """
    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    if not isinstance(max_failures, int) or isinstance(max_failures, bool) or max_failures < 0:
        raise ConfigError(f"--max-failures must be an integer >= 0, got {max_failures!r}")
    if max_preemptions is not None and (
        not isinstance(max_preemptions, int) or isinstance(max_preemptions, bool) or max_preemptions < 0
    ):
        raise ConfigError(f"--max-preemptions must be an integer >= 0 (or unset: no limit), got {max_preemptions!r}")
    if resources is not None and not isinstance(resources, Resources):
        raise ConfigError(f"resources must be a cluster_trainer.Resources, got {resources!r}")
    if local:
        if address is not None:
            raise ConfigError("--no-ray trains in this process; it cannot be combined with --ray-address")
        return _run_here(job, storage, devices, epochs, storage_options, verbose, notices, echo)
    from cluster_trainer.storage import Storage

    # Bad input fails here, before Ray starts: a notice source typo, a URI no filesystem takes.
    if notices:
        from cluster_trainer.preemption import notice_sources

        notice_sources(notices)
    local_storage = Storage(storage, {**job.storage_options, **(storage_options or {})}).is_local
    if local_storage and "://" not in storage:
        storage = os.path.abspath(storage)  # an actor's working directory is not this one
    driver = _Driver(job, storage, address=address, resources=resources or job.resources, echo=echo,
                     max_failures=max_failures, max_preemptions=max_preemptions, local_storage=local_storage,
                     on_progress=on_progress,
                     attempt_args={"devices": devices, "epochs": epochs, "verbose": verbose,
                                   "storage_options": dict(storage_options or {}), "notices": list(notices or [])})
    return driver.run()


def _run_here(job, storage, devices, epochs, storage_options, verbose, notices, echo) -> RunOutcome:
    from cluster_trainer.loop import train
    from cluster_trainer.preemption import notice_sources

    sources = notice_sources(notices) if notices else None
    result = train(job, storage, devices=devices, epochs=epochs, verbose=verbose,
                   storage_options=storage_options, echo=echo, notice_sources=sources)
    position = {k: getattr(result.position, k) for k in ("epoch", "batch", "global_step")}
    return RunOutcome(result.uri, result.status, result.attempt, position, dict(result.history), result.checkpoint)


def connect(address: str | None = None, echo: Callable[[str], None] | None = None) -> bool:
    """Connect this process to Ray, as `run` does; True if this call connected (then call `disconnect()`).

    `address`: "auto", "HOST:PORT" (the GCS), or None: `RAY_ADDRESS` if set, else a new local Ray
    on 127.0.0.1 (usage stats and dashboard off), stopped by `disconnect()`. Returns False, and
    changes nothing, when Ray is already initialised here (a notebook, a Tune trial). A closed
    address fails in seconds with `RunError` (exit code 2), not after Ray's minutes of retries.

    Example:
        >>> connected = connect("auto")        # doctest: +SKIP
        >>> # ... tasks, actors, cluster_trainer.run(...) ...
        >>> if connected:                      # doctest: +SKIP
        ...     disconnect()
    """
    import ray

    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not sys.stderr.isatty():  # a log file or `ray job logs`: no colour codes around Ray's line prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        echo("starting a local Ray on 127.0.0.1 (pass --ray-address to use a running cluster, "
             "--no-ray to train in this process)")
        try:
            _RayPrivate.init_local(include_dashboard=False, **quiet)
        except Exception as e:
            raise RunError(f"could not start a local Ray: {type(e).__name__}: {e}; pass --no-ray to train "
                           "in this process", EXIT_FAILURE) from e
        return True
    # As ray.init reads it: RAY_ADDRESS wins over no address and over "auto".
    where = os.environ["RAY_ADDRESS"] if address in (None, "auto") and os.environ.get("RAY_ADDRESS") else address
    fix = ("check the address (HOST:PORT of the cluster's GCS, or auto for the cluster `ray start` ran on this "
           "machine), or pass --no-ray to train in this process")
    _check_reachable(where, fix)
    try:
        ray.init(address=address, **quiet)
    except Exception as e:
        raise RunError(f"cannot connect to Ray at {where}: {type(e).__name__}: {_first_line(e)}; {fix}",
                       EXIT_BAD_INPUT) from e
    echo(f"connected to Ray at {where} ({sum(1 for n in ray.nodes() if n.get('Alive'))} node(s))")
    return True


def disconnect() -> None:
    """Leave Ray (stopping a local Ray `connect` started), once the actors' last lines have arrived."""
    import ray

    time.sleep(LOG_FLUSH_SECONDS)  # Ray forwards actor output asynchronously
    ray.shutdown()


class _Stopped(Exception):
    """The driver was asked to stop (Ctrl-C, SIGTERM) before an actor trained."""


class _Driver:
    def __init__(self, job: Job, storage: str, *, address, resources: Resources, echo, max_failures,
                 max_preemptions, local_storage: bool, attempt_args: dict, on_progress=None):
        self.job = job
        self.storage = storage
        self.address = address
        self.resources = resources
        self.echo = echo
        self.max_failures = max_failures
        self.max_preemptions = max_preemptions
        self.attempt_args = attempt_args
        self.local_storage = local_storage
        self.on_progress = on_progress
        self.actors = self.preemptions = self.failures = 0
        self.stop_reason: str | None = None  # set by the first Ctrl-C / SIGTERM
        self.kill_now = False  # a second Ctrl-C
        self._previous_handlers: dict = {}

    # -- connection and signals ---------------------------------------------------------------

    def _connect(self) -> bool:
        connected = connect(self.address, self.echo)
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if self.local_storage and len(nodes) > 1:
            self.echo(f"warning: --storage {self.storage} is a local path: an actor on another node resumes the run "
                      "only if every node sees the same directory (a shared file system); use gs:// or s3:// on a cluster")
        return connected

    def _install_signal_handlers(self) -> None:
        # After ray.init, which installs its own SIGTERM handler (sys.exit) in drivers.
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def _on_signal(self, number, frame) -> None:
        if self.stop_reason is not None and number == signal.SIGINT:
            self.kill_now = True  # a second Ctrl-C: stop now, without waiting for the commit
            return
        self.stop_reason = signal.Signals(number).name

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        connected = self._connect()
        self._install_signal_handlers()
        try:
            return self._attempts()
        finally:
            self._restore_signal_handlers()
            if connected:
                disconnect()

    def _attempts(self) -> RunOutcome:
        import ray

        working_dir = os.getcwd() if (ray.get_runtime_context().runtime_env or {}).get("working_dir") else None
        spec = {**_job_spec(self.job, working_dir), "storage": self.storage, **self.attempt_args}
        if working_dir is not None and "job_path" in spec:
            self.echo(f"each actor loads {spec['job_path']} from its node's copy of Ray's working_dir")
        options = {**self.resources.ray_options(), "max_restarts": 0, "max_concurrency": 2,
                   # Never inside the caller's placement group (a Tune trial's holds only the trial's
                   # own small bundle): the actor asks the cluster for the job's resources itself.
                   "scheduling_strategy": "DEFAULT"}
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}
        if env:
            options["runtime_env"] = {"env_vars": env}  # Ray merges it with the job's runtime_env
        actor_class = ray.remote(TrainActor).options(**options)
        while True:
            self.actors += 1
            number = self.actors
            actor = actor_class.remote()
            try:
                kind, message, result = self._attempt(actor, number, spec)
            except _Stopped:
                raise RunError(f"stopped by {self.stop_reason} while actor {number} was waiting for a node; nothing "
                               "was trained in it. Run the same command again to resume", EXIT_PREEMPTED) from None
            finally:
                _kill(actor)  # a finished actor frees its node; a lost one is gone already

            if kind == "done":
                return RunOutcome(result["uri"], result["status"], result["attempt"], result["position"],
                                  result["history"], result["checkpoint"], self.actors, self.preemptions, self.failures)
            if kind == "bad_input":
                raise RunError(message, EXIT_BAD_INPUT)
            if kind == "superseded":
                raise RunError(message, EXIT_SUPERSEDED)
            if self.stop_reason is not None:
                code = EXIT_FAILURE if kind == "failed" else EXIT_PREEMPTED
                raise RunError(f"stopped by {self.stop_reason}: {message}. Run the same command again to resume", code)
            if kind == "preempted":
                self.preemptions += 1
                if self.max_preemptions is not None and self.preemptions > self.max_preemptions:
                    raise RunError(f"actor {number} preempted: {message}; that is {self.preemptions} preemption(s), more "
                                   f"than --max-preemptions {self.max_preemptions}. The state is committed: run the "
                                   "same command again to resume", EXIT_PREEMPTED)
                self.echo(f"actor {number} preempted: {message}; starting actor {number + 1} ({self._budget()})")
                continue
            self.failures += 1
            if self.failures > self.max_failures:
                raise RunError(f"actor {number} failed: {message}; that is {self.failures} failure(s), more than "
                               f"--max-failures {self.max_failures}: giving up. The run keeps its last committed "
                               f"checkpoint under {self.storage}", EXIT_FAILURE)
            delay = min(BACKOFF_SECONDS * 2 ** (self.failures - 1), BACKOFF_MAX_SECONDS)
            self.echo(f"actor {number} failed: {message}; starting actor {number + 1} in {delay:.0f}s, resuming from "
                      f"the last committed checkpoint ({self._budget()})")
            self._sleep(delay)

    def _budget(self) -> str:
        limit = "no limit" if self.max_preemptions is None else f"at most {self.max_preemptions}"
        return f"{self.preemptions} preemption(s), {limit}; {self.failures} failure(s), at most {self.max_failures}"

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.stop_reason is None:
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))

    def _attempt(self, actor, number: int, spec: dict) -> tuple[str, str, dict | None]:
        """Place the actor, train on it; returns (kind, message, result) with kind one of
        done, preempted, failed, bad_input, superseded."""
        import ray
        from ray.exceptions import RayActorError, RayError, RuntimeEnvSetupError

        node = None
        watch = {"drained": False}
        try:
            where = self._wait_for_placement(actor, number)
            node = where["node_id"]
            gpus = f", GPUs {','.join(where['gpus'])}" if where["gpus"] else ""
            self.echo(f"actor {number} running on node {node[:8]} ({where['ip']}, {where['host']}, "
                      f"pid {where['pid']}{gpus})")
            ref = actor.train.remote(spec)
            self._wait(actor, ref, node, watch)
            result = ray.get(ref)
        except RuntimeEnvSetupError as e:
            return "bad_input", f"Ray could not set up the actor's runtime environment: {_first_line(e)}", None
        except RayActorError as e:
            drained = watch["drained"] or (node is not None and _draining(node))
            if e.preempted or drained:
                where = "its node" if node is None else f"its node {node[:8]}"
                return "preempted", f"{where} went away after a drain ({_reason(e)})", None
            return "failed", f"the actor or its node died without notice ({_reason(e)})", None
        except RayError as e:
            return "failed", f"{type(e).__name__}: {_reason(e)}", None
        status = result["status"]
        if status in ("completed", "already_complete"):
            return "done", "", result
        return status, result["message"].removesuffix(_PREEMPTED_TAIL), result

    def _wait_for_placement(self, actor, number: int) -> dict:
        """Until the actor runs on a node; says what it waits for while no node has the resources."""
        import ray

        ref = actor.where.remote()
        started = time.monotonic()
        report_at = WAITING_REPORT_FIRST
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                return ray.get(ref)  # raises if the actor could not start (e.g. its runtime_env failed)
            if self.stop_reason is not None:
                raise _Stopped()
            waited = time.monotonic() - started
            if waited >= report_at:
                self.echo(f"actor {number} has waited {waited:.0f}s for a node with {self.resources.describe()}: "
                          f"{_why_pending(self.resources)}")
                report_at = min(report_at * 3, waited + WAITING_REPORT_MAX)

    def _wait(self, actor, ref, node: str, watch: dict) -> None:
        """Until `ref` is ready; meanwhile pass on a stop request and watch the node's drain state."""
        import ray

        stop_sent = False
        next_drain_check = 0.0
        next_progress = time.monotonic() + PROGRESS_SECONDS
        while not ray.wait([ref], timeout=0.5)[0]:
            if self.on_progress is not None and time.monotonic() >= next_progress:
                self.on_progress()
                next_progress = time.monotonic() + PROGRESS_SECONDS
            if self.kill_now:
                raise KeyboardInterrupt  # the caller kills the actor
            if self.stop_reason is not None and not stop_sent:
                self.echo(f"{self.stop_reason}: asking the actor to commit at the next batch boundary and stop "
                          "(Ctrl-C again to stop at once)")
                actor.stop.remote(self.stop_reason)
                stop_sent = True
            if not watch["drained"] and time.monotonic() >= next_drain_check:
                next_drain_check = time.monotonic() + DRAIN_CHECK_SECONDS
                deadline_ms = _draining_deadline(node)
                if deadline_ms is not None:
                    watch["drained"] = True
                    left = f"{deadline_ms / 1000 - time.time():.0f}s before its deadline" if deadline_ms else "no deadline"
                    self.echo(f"node {node[:8]} is being drained ({left}): the actor commits at the next batch "
                              "boundary and stops")


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # Ray unreachable while stopping: nothing more to do about this actor here
        log.debug("could not kill actor: %s", e)


def _check_reachable(address: str, fix: str) -> None:
    """Fail in seconds, with one line, where `ray.init` would retry a closed port for minutes."""
    if address == "auto" or "://" in address:
        return  # Ray finds the local cluster itself / Ray Client has its own errors
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RunError(f"--ray-address {address!r} is not HOST:PORT or auto; {fix}", EXIT_BAD_INPUT)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RunError(f"cannot connect to Ray at {address}: {e.strerror or e}; {fix}", EXIT_BAD_INPUT) from None


def _draining_deadline(node: str) -> int | None:
    try:
        return _RayPrivate.draining_nodes().get(node)
    except Exception as e:  # the GCS briefly unreachable: look again next time
        log.debug("could not read the draining nodes: %s", e)
        return None


def _draining(node: str) -> bool:
    return _draining_deadline(node) is not None


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _reason(error: BaseException) -> str:
    """Ray's actor-death messages are several lines (class, id, pid, ip, then the cause): keep the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines[1:] if not line.split(":")[0] in ("class_name", "actor_id", "pid", "name",
                                                                           "namespace", "ip")]
    return " ".join(details) or (lines[0] if lines else type(error).__name__)


def _why_pending(resources: Resources) -> str:
    """Why no node takes the actor now: none is big enough (autoscaler?), or all are busy."""
    import ray

    asked = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}
    asked = {k: v for k, v in asked.items() if v}
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        draining = _RayPrivate.draining_nodes()
        free = ray.available_resources()
    except Exception as e:
        return f"(could not read the cluster's state: {e})"
    fits = [n for n in nodes if all(n.get("Resources", {}).get(k, 0) >= v for k, v in asked.items())
            and n["NodeID"] not in draining]
    free_text = ", ".join(f"{k}={free.get(k, 0):g}" for k in asked) or "nothing asked"
    drain_text = f"; {len(draining)} node(s) draining" if draining else ""
    labels = f" and labels {resources.label_selector}" if resources.label_selector else ""
    if not fits:
        return (f"no live node has that much{labels} ({len(nodes)} node(s){drain_text}); waiting for one to join "
                "(an autoscaler adds nodes; else check --num-gpus/--num-cpus/--resource)")
    return f"{len(fits)} node(s) could take it but are busy (free now: {free_text}{drain_text})"

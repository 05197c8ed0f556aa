"""The driver of a run on Ray: start an attempt, watch it, start the next after a preemption or failure.

The run's loop (`cluster_trainer.loop.train`) runs inside a Ray actor
(`cluster_trainer.on_ray.actor.TrainActor`) that asks for the job's
`Resources` (CPUs, GPUs, custom resources, node labels), with MirroredStrategy
over the actor's GPUs, or over `devices` logical CPU devices where it has none.
The driver (this process: a terminal, or the entrypoint of `ray job submit`)
watches it:

- the actor finishes: print the run URI and final metrics, exit 0;
- the actor's node is drained: `RayDrainNotice` tells the loop inside the
  actor, which commits at the next batch boundary and stops (the loop's
  "preempted" status, exit 75); the driver starts a new actor wherever Ray
  finds resources, which resumes from storage;
- the actor or its node dies without notice (`RayActorError`, SIGKILL, OOM,
  a lost node): a new actor resumes from the last committed checkpoint;
- no node has the resources (all busy, or none big enough until the
  autoscaler adds one): the new actor waits in Ray's queue and the driver
  says, at growing intervals, what it is waiting for.

With `workers=N` an attempt is a group of N actors on N distinct nodes
(`cluster_trainer.on_ray.group`) training one run under
MultiWorkerMirroredStrategy; a drain of any worker's node stops the whole
group after the same step, and a worker lost without notice ends the group at
once. Either way the driver starts a new group, which resumes from storage.

What happens after an attempt ends (budgets for preemptions and failures,
backoff) is `cluster_trainer.on_ray.retry.RetryPolicy`. The exit code is that
of the last attempt, so `ray job submit` reports SUCCEEDED or FAILED.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Sequence

from cluster_trainer.errors import EXIT_PREEMPTED, ConfigError, RunError
from cluster_trainer.job import Job, Resources
from cluster_trainer.on_ray.actor import forwarded_env, job_spec
from cluster_trainer.on_ray.connection import connect, disconnect
from cluster_trainer.on_ray.group import Stopped, WorkerGroup, check_group
from cluster_trainer.on_ray.pool import FreshActors
from cluster_trainer.on_ray.retry import RetryPolicy
from cluster_trainer.preemption import early_notice

log = logging.getLogger(__name__)

# How long a group waits for N free nodes before trying a smaller one (with min_workers < workers).
SHRINK_AFTER_SECONDS = 300.0


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
        actors: attempts this call started: Ray actors, or groups of actors with `workers` > 1
            (1 for an in-process run).
        preemptions: of those, how many were preempted.
        failures: of those, how many failed (and were retried).
        group_sizes: the number of workers of each attempt (empty for an in-process run).
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
    group_sizes: list[int] = dataclasses.field(default_factory=list)

    @property
    def metrics(self) -> dict:
        """The last epoch's metrics."""
        return {k: v[-1] for k, v in self.history.items() if v}

    def summary(self) -> str:
        """The final status line: `run completed: URI (epoch 9, global step 144, attempt 2) loss=...`."""
        p = self.position
        counts = (f"; {self.actors} Ray actor(s), {self.preemptions} preempted, {self.failures} failed"
                  if self.actors > 1 or self.preemptions or self.failures else "")
        if any(size > 1 for size in self.group_sizes):
            sizes = ", ".join(map(str, self.group_sizes))
            counts = (f"; {self.actors} Ray worker group(s) ({sizes} workers), {self.preemptions} preempted, "
                      f"{self.failures} failed")
        metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(self.metrics.items()) if isinstance(v, float))
        return (f"run {self.status}: {self.uri} (epoch {p['epoch']}, global step {p['global_step']}, "
                f"attempt {self.attempt}{counts}) {metrics}").rstrip()


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
    workers: int = 1,
    min_workers: int | None = None,
    shrink_after: float = SHRINK_AFTER_SECONDS,
    storage_options: dict | None = None,
    local: bool = False,
    verbose: int | str = "auto",
    notices: Sequence[str] | None = None,
    echo: Callable[[str], None] | None = None,
    on_progress: Callable[[], None] | None = None,
    actors=None,
) -> RunOutcome:
    """Train `job` on Ray until it completes, surviving preemptions and lost nodes; resumes `storage`.

    Args:
        job: the `Job` (loaded with `load_job`, so actors on other nodes load the same file).
        storage: the run's URI (a path, file://, gs://, s3://). Every node must reach it: on a
            cluster of several machines, an object store or a shared file system.
        address: the Ray cluster: "auto" (the one `ray start` ran on this machine), "HOST:PORT",
            or None: `RAY_ADDRESS` if set (as under `ray job submit`), else a new local Ray
            started in this process on 127.0.0.1 and stopped at the end.
        devices: replicas in each actor (default: the actor's GPUs, else 1 CPU device).
        epochs: override `job.epochs`.
        resources: what each actor asks for (default `job.resources`); with `workers` > 1, each worker.
        max_failures: failures retried (with backoff) before giving up; preemptions do not count.
        max_preemptions: preemptions retried before giving up with exit code 75 (default: no limit).
        workers: actors on distinct nodes that train the run together under
            MultiWorkerMirroredStrategy (a placement group, STRICT_SPREAD); the global batch
            is split over all their replicas. 1 (default): one actor, MirroredStrategy.
        min_workers: the smallest group to start when `workers` nodes are not free for
            `shrink_after` seconds (default `workers`: always wait for all). A smaller group
            keeps the global batch; bitwise equality is promised only for the same replica count.
        shrink_after: seconds a group waits for its nodes before trying a smaller one.
        storage_options: fsspec options for the store (override the job's).
        local: run the loop in this process instead (no Ray: debugging, plain Kubernetes pods).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, "auto" (in an actor: 2).
        notices: extra preemption notice sources (`gce`, `aws`, `file:PATH`) polled by each
            attempt; default `CLUSTER_TRAINER_NOTICE`.
        echo: where the driver prints its one-line messages (default: stderr).
        on_progress: called in the driver every few seconds while an actor trains (e.g. to
            report the run's committed history to Ray Tune); whatever it raises ends the run,
            its actor killed, and propagates. Not called with `local=True`.
        actors: where each single-worker attempt's actor comes from and goes: `acquire(options)`
            returns one, `release(actor, healthy)` takes it back (healthy: its run finished).
            Default `cluster_trainer.on_ray.pool.FreshActors()`, a new actor per attempt; a
            sweep passes `WarmActors`, whose workers train one run after another.

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
        >>> ct.run(job, "gs://bucket/runs/big", address="auto", workers=4,   # doctest: +SKIP
        ...        min_workers=2, resources=ct.Resources(num_gpus=8))
    """
    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    retry = RetryPolicy(max_failures, max_preemptions, storage=storage)  # validates both budgets
    if resources is not None and not isinstance(resources, Resources):
        raise ConfigError(f"resources must be a cluster_trainer.Resources, got {resources!r}")
    if local:
        if address is not None:
            raise ConfigError("--no-ray trains in this process; it cannot be combined with --ray-address")
        if workers != 1:
            raise ConfigError("--workers places workers on Ray nodes; it cannot be combined with --no-ray")
        return _run_here(job, storage, devices, epochs, storage_options, verbose, notices, echo)
    resources = resources or job.resources
    gpus = int(resources.num_gpus) if resources.num_gpus >= 1 else (1 if resources.num_gpus else 0)
    sizes = check_group(workers, workers if min_workers is None else min_workers, resources, job.batch_size,
                        devices or gpus or 1)
    from cluster_trainer.storage import Storage

    # Bad input fails here, before Ray starts: a notice source typo, a URI no filesystem takes.
    if notices:
        from cluster_trainer.preemption import notice_sources

        notice_sources(notices)
    local_storage = Storage(storage, {**job.storage_options, **(storage_options or {})}).is_local
    if local_storage and "://" not in storage:
        storage = os.path.abspath(storage)  # an actor's working directory is not this one
    retry.storage = storage
    driver = _Driver(job, storage, address=address, resources=resources, echo=echo,
                     retry=retry, local_storage=local_storage, sizes=sizes, shrink_after=shrink_after,
                     on_progress=on_progress, actors=actors,
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


class _Driver:
    def __init__(self, job: Job, storage: str, *, address, resources: Resources, echo, retry: RetryPolicy,
                 local_storage: bool, attempt_args: dict, sizes: list[int] = (1,),
                 shrink_after: float = SHRINK_AFTER_SECONDS, on_progress=None, actors=None):
        self.job = job
        self.storage = storage
        self.address = address
        self.resources = resources
        self.echo = echo
        self.retry = retry
        self.attempt_args = attempt_args
        self.local_storage = local_storage
        self.on_progress = on_progress
        self.sizes = list(sizes)  # group sizes allowed, largest first; [1]: one actor per attempt
        self.shrink_after = shrink_after
        self.actor_options: dict = {}
        self.actor_source = actors or FreshActors()
        self.actors = 0
        self.group_sizes: list[int] = []
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
        self.stop_reason = self.stop_reason or early_notice()  # a SIGTERM while the command started up

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
        spec = {**job_spec(self.job, working_dir), "storage": self.storage, **self.attempt_args}
        if working_dir is not None and "job_path" in spec:
            self.echo(f"each actor loads {spec['job_path']} from its node's copy of Ray's working_dir")
        options = {**self.resources.ray_options(), "max_restarts": 0, "max_concurrency": 2}
        env = forwarded_env()
        if env:
            options["runtime_env"] = {"env_vars": env}  # Ray merges it with the job's runtime_env
        self.actor_options = options
        noun = "actor" if self.sizes == [1] else "group"
        while True:
            self.actors += 1
            number = self.actors
            group = self._start_actors(number)
            kind = None
            try:
                kind, message, result = group.run(spec, self)
            except Stopped:
                raise RunError(f"stopped by {self.stop_reason} while {group.name} was waiting for "
                               f"{'a node' if noun == 'actor' else 'its nodes'}; nothing was trained in it. Run the "
                               "same command again to resume", EXIT_PREEMPTED) from None
            finally:
                self._release(group, healthy=kind == "done")
            self.group_sizes.append(group.size)

            if kind == "done":
                return RunOutcome(result["uri"], result["status"], result["attempt"], result["position"],
                                  result["history"], result["checkpoint"], self.actors, self.retry.preemptions,
                                  self.retry.failures, self.group_sizes)
            decision = self.retry.after(kind, number, message, self.stop_reason, noun=noun)
            if not decision.retry:
                raise RunError(decision.message, decision.exit_code)
            self.echo(decision.message)
            self._sleep(decision.delay)

    def _start_actors(self, number: int) -> WorkerGroup:
        """The actors of attempt `number` (created and placed by `WorkerGroup.run`): one actor, or a
        group of `self.sizes[0]` on distinct nodes. Never inside the caller's placement group (a Tune
        trial's holds only the trial's own small bundle): they ask the cluster for the job's resources."""
        return WorkerGroup(number, self.sizes, self.actor_options, self.resources, shrink_after=self.shrink_after,
                           actors=self.actor_source)

    def _release(self, group: WorkerGroup, healthy: bool) -> None:
        """Free the attempt's actors and nodes (`healthy`: its run finished, so a warm actor may be kept)."""
        group.release(healthy=healthy)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.stop_reason is None:
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))

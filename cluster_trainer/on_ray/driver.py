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
from cluster_trainer.on_ray import private
from cluster_trainer.on_ray.actor import forwarded_env, job_spec
from cluster_trainer.on_ray.connection import connect, disconnect, first_line
from cluster_trainer.on_ray.pool import FreshActors
from cluster_trainer.on_ray.retry import RetryPolicy
from cluster_trainer.preemption import early_notice

log = logging.getLogger(__name__)

# When to say that the next actor is still waiting for a node: after 5 s, 15 s, 45 s, ... then every 10 min.
WAITING_REPORT_FIRST = 5.0
WAITING_REPORT_MAX = 600.0
# How often the driver looks at the actor's node's drain state (for its own messages).
DRAIN_CHECK_SECONDS = 2.0
# How often `run(on_progress=...)` is called while an actor trains.
PROGRESS_SECONDS = 2.0
_PREEMPTED_TAIL = ". Run the same command again to resume"


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
    """
    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    retry = RetryPolicy(max_failures, max_preemptions, storage=storage)  # validates both budgets
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
    retry.storage = storage
    driver = _Driver(job, storage, address=address, resources=resources or job.resources, echo=echo,
                     retry=retry, local_storage=local_storage,
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


class _Stopped(Exception):
    """The driver was asked to stop (Ctrl-C, SIGTERM) before an actor trained."""


class _Driver:
    def __init__(self, job: Job, storage: str, *, address, resources: Resources, echo, retry: RetryPolicy,
                 local_storage: bool, attempt_args: dict, on_progress=None, actors=None):
        self.job = job
        self.storage = storage
        self.address = address
        self.resources = resources
        self.echo = echo
        self.retry = retry
        self.attempt_args = attempt_args
        self.local_storage = local_storage
        self.on_progress = on_progress
        self.actor_source = actors or FreshActors()
        self.actors = 0
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
        options = {**self.resources.ray_options(), "max_restarts": 0, "max_concurrency": 2,
                   # Never inside the caller's placement group (a Tune trial's holds only the trial's
                   # own small bundle): the actor asks the cluster for the job's resources itself.
                   "scheduling_strategy": "DEFAULT"}
        env = forwarded_env()
        if env:
            options["runtime_env"] = {"env_vars": env}  # Ray merges it with the job's runtime_env
        while True:
            self.actors += 1
            number = self.actors
            actor = self.actor_source.acquire(options)
            kind = None
            try:
                kind, message, result = self._attempt(actor, number, spec)
            except _Stopped:
                raise RunError(f"stopped by {self.stop_reason} while actor {number} was waiting for a node; nothing "
                               "was trained in it. Run the same command again to resume", EXIT_PREEMPTED) from None
            finally:
                self.actor_source.release(actor, healthy=kind == "done")

            if kind == "done":
                return RunOutcome(result["uri"], result["status"], result["attempt"], result["position"],
                                  result["history"], result["checkpoint"], self.actors, self.retry.preemptions,
                                  self.retry.failures)
            decision = self.retry.after(kind, number, message, self.stop_reason)
            if not decision.retry:
                raise RunError(decision.message, decision.exit_code)
            self.echo(decision.message)
            self._sleep(decision.delay)

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
            return "bad_input", f"Ray could not set up the actor's runtime environment: {first_line(e)}", None
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


def _draining_deadline(node: str) -> int | None:
    try:
        return private.draining_nodes().get(node)
    except Exception as e:  # the GCS briefly unreachable: look again next time
        log.debug("could not read the draining nodes: %s", e)
        return None


def _draining(node: str) -> bool:
    return _draining_deadline(node) is not None


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
        draining = private.draining_nodes()
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

"""Where a run's training actors come from: a fresh actor per attempt, or warm workers that train run after run.

The driver (`cluster_trainer.on_ray.driver.run`) asks an actor source for each
single-worker attempt, `acquire(options)`, and hands the actor back when the
attempt ends, `release(actor, healthy)`; `healthy` is True only when the attempt
finished its run.

- `FreshActors` (the default): a new `TrainActor` per attempt, killed after it.
  Each one starts a process, imports TensorFlow and loads the job file: about
  10 s on a busy 2-core machine, noise for a long run.
- `WarmActors` (sweeps): a `WarmTrainActor` that finished a run trains the next
  one, already holding TensorFlow and the job file; between runs it puts back
  Keras's global state as it was right after the job file was loaded
  (`keras_compat.restore_process_state`), so a run is bitwise the same in a
  reused process as in a fresh one. An actor whose attempt failed, was
  preempted or lost is killed, never reused: the next attempt gets a fresh one
  and resumes from the run's checkpoints, as with `FreshActors`. A run stopped
  by its caller (`interrupt`: Ray Tune's scheduler stopping a trial) commits at
  the next batch boundary and its actor goes back to the pool.

`WarmActors` lives in the process that drives the runs: in a sweep, each Ray
Tune trial actor (which Tune reuses from trial to trial) keeps one, so the
warm workers it created are owned by it and end with it, whatever kills it.

Example:
    >>> from cluster_trainer.on_ray.pool import process_pool      # doctest: +SKIP
    >>> import cluster_trainer as ct                              # doctest: +SKIP
    >>> for lr in (1e-2, 1e-3):                                   # doctest: +SKIP
    ...     ct.run(job.with_overrides([f"lr={lr}"]), f"runs/lr-{lr}", actors=process_pool())
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading

from cluster_trainer.job import Job
from cluster_trainer.on_ray.actor import TrainActor, job_from_spec
from cluster_trainer.on_ray.notices import DriverStop

log = logging.getLogger(__name__)

# How long a warm worker asked to stop (its trial stopped by Tune) may take to commit and finish
# its run before the next run gets a fresh actor instead.
STOP_WAIT_SECONDS = 120.0


def kill_actor(actor) -> None:
    """`ray.kill` without restart; an actor Ray cannot reach any more is left to Ray."""
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # Ray unreachable while stopping: nothing more to do about this actor here
        log.debug("could not kill actor: %s", e)


class FreshActors:
    """A new `TrainActor` for every attempt, killed when the attempt ends (what `run` does by default)."""

    def acquire(self, options: dict):
        import ray

        return ray.remote(TrainActor).options(**options).remote()

    def release(self, actor, healthy: bool) -> None:
        kill_actor(actor)  # a finished actor frees its node; a lost one is gone already


class WarmTrainActor(TrainActor):
    """A `TrainActor` that trains one run after another in the same process.

    The job file is loaded once per file (again if it changed on disk), and a
    snapshot of Keras's and the RNGs' global state is taken right after: each run
    starts from that snapshot, as it would in a fresh process that had just loaded
    the file. The job module's own objects are shared by the runs: build what a
    run changes inside `build_model`, the data functions and `callbacks`, as a
    job file does anyway. A stop asked for one run never reaches the next.
    """

    def __init__(self):
        super().__init__()
        self._pristine: dict | None = None  # the process right after importing Keras
        self._jobs: dict[str, tuple] = {}  # job path -> (file signature, loaded Job, state right after loading it)
        self._idle = threading.Event()
        self._idle.set()

    def train(self, spec: dict) -> dict:
        self._idle.clear()
        self._stop = DriverStop()  # a stop sent to the previous run does not stop this one
        try:
            return super().train(spec)
        finally:
            self._idle.set()

    def wait_idle(self, timeout: float) -> bool:
        """Until no run trains here (True), or `timeout` seconds (False)."""
        return self._idle.wait(timeout)

    def _load_job(self, spec: dict) -> Job:
        from cluster_trainer import keras_compat

        if self._pristine is None:
            self._pristine = keras_compat.process_state_snapshot()
        if "job" not in spec:  # a job file: loaded once, its state right after loading put back for each run
            path = os.path.abspath(spec["job_path"])
            signature = _file_signature(path)
            cached = self._jobs.get(path)
            if cached is None or cached[0] != signature:
                keras_compat.restore_process_state(self._pristine)
                loaded = job_from_spec({**spec, "job_fields": {}})
                cached = self._jobs[path] = (signature, loaded, keras_compat.process_state_snapshot())
            keras_compat.restore_process_state(cached[2])
            return dataclasses.replace(cached[1], **spec["job_fields"])
        keras_compat.restore_process_state(self._pristine)  # a Job object travels whole: nothing to keep loaded
        return job_from_spec(spec)


def _file_signature(path: str) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class WarmActors:
    """Warm `WarmTrainActor`s for the runs this process drives one after another (a sweep's trials).

    `acquire(options)` returns an idle actor created with the same options (resources,
    environment), or creates one; `release(actor, healthy)` keeps it for the next run
    if its run finished, or if `interrupt()` stopped the run, and kills it otherwise
    (failed, preempted, lost: the next attempt resumes in a fresh actor).
    """

    def __init__(self, stop_wait: float = STOP_WAIT_SECONDS):
        self.stop_wait = stop_wait
        self._lock = threading.Lock()
        self._idle: dict[str, list] = {}  # options key -> actors ready for a run, or finishing a stopped one
        self._leased: dict[int, tuple] = {}  # id(actor) -> (actor, options key, interrupted)

    def acquire(self, options: dict):
        import ray

        key = json.dumps(options, sort_keys=True, default=str)
        while True:
            with self._lock:
                waiting = self._idle.get(key) or []
                actor = waiting.pop(0) if waiting else None
            if actor is None:
                actor = ray.remote(WarmTrainActor).options(**options).remote()
                break
            if self._finished_last_run(actor):
                break
            kill_actor(actor)  # still busy or gone: a fresh one instead
        with self._lock:
            self._leased[id(actor)] = (actor, key, False)
        return actor

    def release(self, actor, healthy: bool) -> None:
        with self._lock:
            _, key, interrupted = self._leased.pop(id(actor), (actor, None, False))
            if key is not None and (healthy or interrupted):
                self._idle.setdefault(key, []).append(actor)
                return
        kill_actor(actor)

    def interrupt(self, reason: str) -> None:
        """Ask every leased actor to commit at the next batch boundary and stop; when released, it is kept."""
        with self._lock:
            leased = list(self._leased.items())
            for number, (actor, key, _) in leased:
                self._leased[number] = (actor, key, True)
        for _, (actor, _, _) in leased:
            actor.stop.remote(reason)

    def _finished_last_run(self, actor) -> bool:
        import ray

        try:
            return bool(ray.get(actor.wait_idle.remote(self.stop_wait), timeout=self.stop_wait + 30))
        except Exception as e:  # the actor or its node died while it was idle
            log.debug("warm actor unusable: %s", e)
            return False


_PROCESS_POOL: WarmActors | None = None


def process_pool() -> WarmActors:
    """This process's `WarmActors` (created on first use; its actors end with this process)."""
    global _PROCESS_POOL
    if _PROCESS_POOL is None:
        _PROCESS_POOL = WarmActors()
    return _PROCESS_POOL

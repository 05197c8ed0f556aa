"""The workers of one attempt: one training actor anywhere, or N actors on N distinct nodes.

A run with `workers=1` is one actor (`TrainActor`) that Ray places on any
node with the job's resources. A run with `workers=N` is a group: a placement
group of N bundles, each the job's per-worker resources (CPUs, GPUs, custom
resources, node labels), with strategy STRICT_SPREAD (no two bundles on one
node), and one actor in each bundle. Each actor picks a free port on its own
node; the group gives every worker the list of `ip:port` addresses and its
index (`Workers`), and the loop trains under MultiWorkerMirroredStrategy,
worker 0 (the chief) alone writing to storage.

The life of a group, in `WorkerGroup`:

- **create and place**: the placement group (N > 1) and the actors. Until Ray
  has placed them, the group says at growing intervals what it waits for (N
  nodes that each have the resources; how many could take a worker now).
  With `min_workers < N`, after `shrink_after` seconds of waiting it tries
  smaller groups, largest first, among the sizes whose replica count divides
  the global batch (`group_sizes`).
- **start**: gather each actor's node and port, give each its cluster, call
  `train` on all.
- **watch**: pass the driver's stop request (Ctrl-C, SIGTERM, `ray job stop`)
  to every worker; look at every worker's node drain state and pass a drain
  of one node to the workers on the others (the loop, which also learns of it
  from the drained node's own `RayDrainNotice`, makes all of them stop after
  the same step); collect each worker's result.
- **tear down**: a worker lost without notice (SIGKILL, OOM, its node gone)
  ends the group at once: the others, blocked in a collective, are killed.
  Ray reports a dead process within seconds; a machine that vanished without
  closing its connections it may declare dead only after a minute or more
  (its health checks), so the driver also pings each worker and takes one
  that has not answered for `UNRESPONSIVE_SECONDS` (30 s) as lost: a lost
  worker ends its group in under a minute either way. A worker that ends
  with an error gives the others `STRAGGLER_SECONDS` to end too, then they
  are killed.

The group's outcome is that of its workers, the most telling first: bad
input, superseded, preempted (a drained node explains the rest), failed, done
(the chief's result).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Protocol

from cluster_trainer.errors import ConfigError
from cluster_trainer.job import Resources
from cluster_trainer.on_ray import private
from cluster_trainer.on_ray.connection import first_line
from cluster_trainer.on_ray.pool import FreshActors, kill_actor

log = logging.getLogger(__name__)

# When to say that the actors are still waiting for nodes: after 5 s, 15 s, 45 s, ... then every 10 min.
WAITING_REPORT_FIRST = 5.0
WAITING_REPORT_MAX = 600.0
# How often the driver looks at the workers' nodes' drain state.
DRAIN_CHECK_SECONDS = 2.0
# How often `on_progress` is called while the group trains.
PROGRESS_SECONDS = 2.0
# After a worker ended with an error (or after the chief ended), how long the others get to end on
# their own before they are killed: they may be blocked in a collective that will never complete.
STRAGGLER_SECONDS = 10.0
# After a worker other than the chief ended cleanly (done, or preempted at the agreed step), how long
# the chief gets to finish its commit before it is killed as failed.
CHIEF_FINISH_SECONDS = 300.0
# A worker of a group that has not answered the driver for this long is lost: Ray may take over a
# minute to declare a node dead that vanished without closing its connections (5 health checks of up
# to 10 s each, 3 s apart, by default), while the other workers wait for it in a collective.
UNRESPONSIVE_SECONDS = 30.0
# When shrinking, how long Ray gets to place each smaller group before the next smaller one is tried.
PROBE_SECONDS = 5.0
STRATEGY = "STRICT_SPREAD"
_PREEMPTED_TAIL = ". Run the same command again to resume"
# The outcomes of an attempt, the one that decides a group's outcome first.
_PRIORITY = ("bad_input", "superseded", "preempted", "failed", "done")


class Stopped(Exception):
    """The driver was asked to stop (Ctrl-C, SIGTERM) before the actors trained."""


class Control(Protocol):
    """What a group reads from its driver while it runs."""

    echo: Callable[[str], None]
    stop_reason: str | None  # set by the first Ctrl-C / SIGTERM
    kill_now: bool  # a second Ctrl-C
    on_progress: Callable[[], None] | None


def group_sizes(workers: int, min_workers: int, batch_size: int, replicas_per_worker: int) -> list[int]:
    """The group sizes a run may use, largest first: from `workers` down to `min_workers`, keeping
    those whose replica count (`size * replicas_per_worker`) divides the global batch.

    Example:
        >>> group_sizes(4, 1, batch_size=32, replicas_per_worker=1)
        [4, 2, 1]
        >>> group_sizes(4, 4, batch_size=32, replicas_per_worker=2)
        [4]
    """
    return [n for n in range(workers, min_workers - 1, -1)
            if n == workers or batch_size % (n * replicas_per_worker) == 0]


def check_group(workers: int, min_workers: int, resources: Resources, batch_size: int,
                replicas_per_worker: int) -> list[int]:
    """One-line errors for a group that cannot run, before Ray starts; returns `group_sizes`."""
    for flag, value in (("--workers", workers), ("--min-workers", min_workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
    if min_workers > workers:
        raise ConfigError(f"--min-workers {min_workers} is more than --workers {workers}: give at most {workers}")
    replicas = workers * replicas_per_worker
    if workers > 1 and batch_size % replicas:
        raise ConfigError(f"--workers {workers} with {replicas_per_worker} replica(s) each makes {replicas} replicas, "
                          f"which do not divide the global batch size {batch_size}: choose --workers/--devices so "
                          f"that {batch_size} is a multiple of their product")
    if workers > 1:
        if not _bundle(resources):
            raise ConfigError("--workers spreads workers over nodes by what each asks for, and they ask for nothing: "
                              "give --num-cpus, --num-gpus or --resource a value above 0")
        pinned = _node_ids(resources.label_selector.get("ray.io/node-id", ""))
        if pinned is not None and len(pinned) < workers:
            raise ConfigError(f"--label-selector ray.io/node-id={resources.label_selector['ray.io/node-id']} allows "
                              f"{len(pinned)} node(s), but the {workers} workers of a run each need a node of their "
                              "own: leave out the node id, or select by a label many nodes share (e.g. pool=spot)")
    return group_sizes(workers, min_workers, batch_size, replicas_per_worker)


def _node_ids(value: str) -> list[str] | None:
    """The node ids a `ray.io/node-id` selector allows (None: any but some, e.g. `!id`)."""
    if not value or value.startswith("!"):
        return None
    if value.startswith("in(") and value.endswith(")"):
        return [v.strip() for v in value[3:-1].split(",") if v.strip()]
    return [value]


def _bundle(resources: Resources) -> dict[str, float]:
    """One worker's bundle of the placement group: its resources, without zeros (Ray refuses empty bundles)."""
    bundle = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}
    return {k: float(v) for k, v in bundle.items() if v}


@dataclasses.dataclass
class Worker:
    """One actor of a group and what is known of it."""

    index: int
    actor: Any
    where: dict | None = None
    ref: Any = None
    outcome: tuple[str, str, dict | None] | None = None  # (kind, message, result) once it ended
    ping: Any = None  # an unanswered `where()` the driver sent to see that the worker still answers
    pinged_at: float = 0.0


class WorkerGroup:
    """The actors of attempt `number`: `sizes[0]` workers, placed, started, watched and torn down.

    Args:
        number: the attempt's number (messages say "actor 2" for one worker, "group 2" for several).
        sizes: the group sizes allowed, largest first (`group_sizes`); `[1]` is one actor.
        actor_options: Ray actor options for each actor (resources, runtime_env, restarts).
        resources: the per-worker `Resources` (for the bundles and the waiting messages).
        shrink_after: seconds to wait for a placement before trying the next smaller size.
        actors: where a group of one gets its actor and gives it back (`acquire(options)`,
            `release(actor, healthy)`; default `pool.FreshActors()`, a new `TrainActor`). A sweep
            passes warm workers; the actors of a group of several are always fresh.
    """

    def __init__(self, number: int, sizes: list[int], actor_options: dict, resources: Resources,
                 shrink_after: float = math.inf, actors=None):
        self.number = number
        self.sizes = sizes
        self.size = sizes[0]
        self.actor_options = actor_options
        self.resources = resources
        self.shrink_after = shrink_after
        self.actors = actors or FreshActors()
        self.workers: list[Worker] = []
        self.placement_group = None
        self.drained: dict[str, int] = {}  # node id -> deadline_ms of the workers' nodes seen draining

    @property
    def name(self) -> str:
        return f"actor {self.number}" if self.sizes == [1] else f"group {self.number}"

    # -- create and place ----------------------------------------------------------------------------

    def place(self, control: Control) -> None:
        """Until every actor runs on a node; says what it waits for. Raises `Stopped` on a stop request."""
        import ray

        if self.sizes == [1]:
            self.workers = [Worker(0, self.actors.acquire({**self.actor_options, "scheduling_strategy": "DEFAULT"}))]
            waiting_for = self._waiting_for
        else:
            self._reserve_nodes(control)
            fresh = FreshActors()
            self.workers = [Worker(i, fresh.acquire(self._bundle_options(i))) for i in range(self.size)]
            waiting_for = lambda: "its actors to start on the nodes reserved for them"  # noqa: E731
        refs = [w.actor.where.remote() for w in self.workers]
        self._wait_for(refs, control, what=waiting_for)
        # The address Ray itself reaches each node at (what `ray start --node-ip-address` set), not the
        # one the actor guesses from its routes: the other workers connect to it.
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        for worker, ref in zip(self.workers, refs):
            worker.where = ray.get(ref)  # raises if the actor could not start (e.g. its runtime_env failed)
            worker.where["ip"] = addresses.get(worker.where["node_id"], worker.where["ip"])
            self._say_where(worker, control)

    def _bundle_options(self, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = {k: v for k, v in self.actor_options.items() if k != "label_selector"}  # the bundle has it
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self.placement_group, placement_group_bundle_index=index, placement_group_capture_child_tasks=False)
        return options

    def _reserve_nodes(self, control: Control) -> None:
        """A placement group of `size` bundles on distinct nodes, shrunk down `sizes` while none is placed."""
        self.placement_group = self._create_placement_group(self.size)
        started = time.monotonic()
        shrink_at = started + self.shrink_after
        while True:
            remaining = max(shrink_at - time.monotonic(), 0) if len(self.sizes) > 1 else math.inf
            if self._wait_for([self.placement_group.ready()], control, self._waiting_for, timeout=remaining,
                              started=started):
                return
            if self._shrink(control, waited=time.monotonic() - started):
                return
            shrink_at = math.inf  # waits at the smallest size from now on

    def _shrink(self, control: Control, waited: float) -> bool:
        """Try each smaller size, largest first; True once one is placed. Otherwise wait at the smallest."""
        import ray

        wanted = self.size
        self._remove_placement_group()
        smaller = [n for n in self.sizes if n < wanted]
        for size in smaller:
            self.placement_group = self._create_placement_group(size)
            ready, _ = ray.wait([self.placement_group.ready()], timeout=PROBE_SECONDS)
            if ready:
                self.size = size
                control.echo(f"{self.name}: {wanted} nodes with {self.resources.describe()} were not free for "
                             f"{waited:.0f}s (--shrink-after): starting with {size} worker(s) instead; the run keeps "
                             "its global batch, and the next group tries "
                             f"{self.sizes[0]} again")
                return True
            self._remove_placement_group()
        self.size = self.sizes[-1]
        self.placement_group = self._create_placement_group(self.size)
        control.echo(f"{self.name}: no group of {', '.join(map(str, smaller))} worker(s) could be placed either; "
                     f"waiting for {self.size} nodes (--min-workers)")
        return False

    def _create_placement_group(self, size: int):
        import ray

        selector = self.resources.label_selector
        return ray.util.placement_group([_bundle(self.resources)] * size, strategy=STRATEGY,
                                        bundle_label_selector=[dict(selector)] * size if selector else None)

    def _remove_placement_group(self) -> None:
        import ray

        if self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception as e:  # Ray unreachable while stopping: its owner's exit removes it
                log.debug("could not remove the placement group: %s", e)
            self.placement_group = None

    def _wait_for(self, refs: list, control: Control, what: Callable[[], str], timeout: float = math.inf,
                  started: float | None = None) -> bool:
        """Until all `refs` are ready (True) or `timeout` passed (False); reports what it waits for."""
        import ray

        started = time.monotonic() if started is None else started
        end = time.monotonic() + timeout
        report_at = WAITING_REPORT_FIRST
        while True:
            if not ray.wait(refs, num_returns=len(refs), timeout=0.5)[1]:
                return True
            if control.stop_reason is not None:
                raise Stopped()
            waited = time.monotonic() - started
            if waited >= report_at:
                control.echo(f"{self.name} has waited {waited:.0f}s for {what()}")
                while report_at <= waited:  # the next of 5 s, 15 s, 45 s, ..., then every 10 min
                    report_at = min(report_at * 3, report_at + WAITING_REPORT_MAX)
            if time.monotonic() >= end:
                return False

    def _waiting_for(self) -> str:
        if self.sizes == [1]:
            return f"a node with {self.resources.describe()}: {_why_pending(self.resources, 1)}"
        return (f"{self.size} nodes with {self.resources.describe()} each (one worker per node): "
                f"{_why_pending(self.resources, self.size)}")

    def _say_where(self, worker: Worker, control: Control) -> None:
        where = worker.where
        gpus = f", GPUs {','.join(where['gpus'])}" if where["gpus"] else ""
        who = self.name if self.sizes == [1] else f"{self.name} worker {worker.index}"
        control.echo(f"{who} running on node {where['node_id'][:8]} ({where['ip']}, {where['host']}, "
                     f"pid {where['pid']}{gpus})")

    # -- start and watch -----------------------------------------------------------------------------

    def run(self, spec: dict, control: Control) -> tuple[str, str, dict | None]:
        """Place the actors and train on them until the group ends; returns (kind, message, result), kind
        one of done, preempted, failed, bad_input, superseded (result: the chief's, when done).

        Raises `Stopped` when asked to stop before the actors were placed, `KeyboardInterrupt` on a
        second Ctrl-C; the caller tears the group down (`release`) in any case.
        """
        from ray.exceptions import RayActorError, RayError, RuntimeEnvSetupError

        try:
            self.place(control)
            return self.train(spec, control)
        except RuntimeEnvSetupError as e:
            return "bad_input", f"Ray could not set up the actor's runtime environment: {first_line(e)}", None
        except RayActorError as e:  # an actor died before it trained
            if e.preempted:
                return "preempted", f"its node went away after a drain ({_reason(e)})", None
            return "failed", f"the actor or its node died without notice ({_reason(e)})", None
        except RayError as e:
            return "failed", f"{type(e).__name__}: {_reason(e)}", None

    def train(self, spec: dict, control: Control) -> tuple[str, str, dict | None]:
        """Train on every placed worker until the group ends (see `run`)."""
        import ray

        if self.size == 1:
            self.workers[0].ref = self.workers[0].actor.train.remote(spec)
        else:
            ports = ray.get([w.actor.free_port.remote() for w in self.workers])
            addresses = [f"{w.where['ip']}:{port}" for w, port in zip(self.workers, ports)]
            control.echo(f"{self.name}: {self.size} workers at {', '.join(addresses)}; worker 0 is the chief "
                         "and alone writes to storage")
            for worker in self.workers:
                worker_spec = {**spec, "cluster": {"workers": addresses, "index": worker.index}}
                if worker.index:
                    worker_spec["verbose"] = 0  # Ray forwards every actor's output: the chief's progress is enough
                worker.ref = worker.actor.train.remote(worker_spec)
        self._watch(control)
        return self.outcome()

    def _watch(self, control: Control) -> None:
        import ray

        pending = {w.ref: w for w in self.workers}
        stop_sent = False
        next_drain_check = 0.0
        next_progress = time.monotonic() + PROGRESS_SECONDS
        deadline, grace = math.inf, 0.0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for ref in ready:
                worker = pending.pop(ref)
                worker.outcome = self._collect(worker)
                kind = self._kind(worker)
                if kind == "failed" and worker.outcome[0] == "lost":
                    return  # lost without notice: the others may wait for it in a collective forever
                # A clean end of a worker other than the chief: the chief may still be committing.
                waits = CHIEF_FINISH_SECONDS if worker.index and kind in ("done", "preempted") else STRAGGLER_SECONDS
                if time.monotonic() + waits < deadline:
                    deadline, grace = time.monotonic() + waits, waits
            if not pending:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(str(w.index) for w in pending.values())
                control.echo(f"{self.name}: worker(s) {names} did not end within {grace:.0f}s of the others: "
                             "stopping them")
                return
            if control.on_progress is not None and time.monotonic() >= next_progress:
                control.on_progress()
                next_progress = time.monotonic() + PROGRESS_SECONDS
            if control.kill_now:
                raise KeyboardInterrupt  # the caller tears the group down
            if control.stop_reason is not None and not stop_sent:
                workers = "the actor" if self.size == 1 else f"all {self.size} workers"
                control.echo(f"{control.stop_reason}: asking {workers} to commit at the next batch boundary and "
                             "stop (Ctrl-C again to stop at once)")
                for worker in self.workers:
                    worker.actor.stop.remote(control.stop_reason)
                stop_sent = True
            if time.monotonic() >= next_drain_check:
                next_drain_check = time.monotonic() + DRAIN_CHECK_SECONDS
                self._check_drains(control)
                if self.size > 1 and self._unresponsive(pending.values()):
                    return

    def _unresponsive(self, running) -> bool:
        """Ping each running worker; True once one has not answered for `UNRESPONSIVE_SECONDS` (it is lost)."""
        import ray

        for worker in running:
            if worker.ping is not None and ray.wait([worker.ping], timeout=0)[0]:
                worker.ping = None  # answered (or raised: then its `train` reports the actor's death)
            if worker.ping is None:
                worker.ping, worker.pinged_at = worker.actor.where.remote(), time.monotonic()
            elif time.monotonic() - worker.pinged_at > UNRESPONSIVE_SECONDS:
                node = worker.where["node_id"]
                worker.outcome = ("lost", f"worker {worker.index} on node {node[:8]} has not answered for "
                                          f"{UNRESPONSIVE_SECONDS:.0f}s (its node unreachable?)", None)
                return True
        return False

    def _check_drains(self, control: Control) -> None:
        """Say when a worker's node is being drained; with several workers, tell those on other nodes."""
        try:
            draining = private.draining_nodes()
        except Exception as e:  # the GCS briefly unreachable: look again next time
            log.debug("could not read the draining nodes: %s", e)
            return
        for worker in self.workers:
            node = worker.where["node_id"]
            if node not in draining or node in self.drained:
                continue
            deadline_ms = draining[node]
            self.drained[node] = deadline_ms
            left = f"{deadline_ms / 1000 - time.time():.0f}s before its deadline" if deadline_ms else "no deadline"
            if self.size == 1:
                control.echo(f"node {node[:8]} is being drained ({left}): the actor commits at the next batch "
                             "boundary and stops")
                continue
            control.echo(f"node {node[:8]} of worker {worker.index} is being drained ({left}): all {self.size} "
                         "workers stop after the same step, and the chief commits there")
            for other in self.workers:
                if other.where["node_id"] != node and other.outcome is None:
                    other.actor.stop.remote(f"Ray drain of node {node[:8]} (worker {worker.index})",
                                            deadline_ms or None)

    def _collect(self, worker: Worker) -> tuple[str, str, dict | None]:
        """A finished worker's (kind, message, result); kind "lost" when its actor died."""
        import ray
        from ray.exceptions import RayActorError, RayError, RuntimeEnvSetupError

        node = worker.where["node_id"]
        who = "the actor" if self.size == 1 else f"worker {worker.index}"
        try:
            result = ray.get(worker.ref)
        except RuntimeEnvSetupError as e:
            return "bad_input", f"Ray could not set up the actor's runtime environment: {first_line(e)}", None
        except RayActorError as e:
            if e.preempted or node in self.drained or _draining(node):
                self.drained.setdefault(node, 0)
                where = f"its node {node[:8]}" if self.size == 1 else f"node {node[:8]} of worker {worker.index}"
                return "lost", f"{where} went away after a drain ({_reason(e)})", None
            where = "the actor or its node" if self.size == 1 else f"worker {worker.index} or its node {node[:8]}"
            return "lost", f"{where} died without notice ({_reason(e)})", None
        except RayError as e:
            return "failed", f"{type(e).__name__}: {_reason(e)}", None
        status = result["status"]
        if status in ("completed", "already_complete"):
            return "done", "", result
        message = result["message"].removesuffix(_PREEMPTED_TAIL)
        if self.size > 1 and not message.startswith(f"{who} "):
            message = f"{who}: {message}"
        return status, message, result

    def _kind(self, worker: Worker) -> str:
        """An ended worker's outcome: a lost actor is a preemption if its node was drained, else a failure."""
        kind = worker.outcome[0]
        if kind == "lost":
            return "preempted" if worker.where["node_id"] in self.drained else "failed"
        return kind

    def outcome(self) -> tuple[str, str, dict | None]:
        """The group's (kind, message, result) from its workers' outcomes (see the module docstring)."""
        # A worker lost first in each kind: the others' errors (a collective that lost its peer) follow from it.
        ended = sorted((w for w in self.workers if w.outcome is not None), key=lambda w: w.outcome[0] != "lost")
        kinds = [(self._kind(w), *w.outcome[1:], w.index) for w in ended]
        chief = next((k for k in kinds if k[3] == 0), None)
        if chief is not None and chief[0] == "done":
            return chief[:3]
        for kind in _PRIORITY[:-1]:
            for found in kinds:
                if found[0] == kind:
                    return found[:3]
        return "failed", "the chief did not finish", None

    # -- tear down -------------------------------------------------------------------------------

    def release(self, healthy: bool = False) -> None:
        """Give back a group of one's actor (`healthy`: its run finished; warm workers keep it), kill the
        actors of a group of several (a finished actor frees its node; a lost one is gone already), and
        free the nodes."""
        if self.sizes == [1]:
            for worker in self.workers:
                self.actors.release(worker.actor, healthy=healthy)
        else:
            for worker in self.workers:
                kill_actor(worker.actor)
        self._remove_placement_group()


def _draining(node: str) -> bool:
    try:
        return node in private.draining_nodes()
    except Exception as e:  # the GCS briefly unreachable
        log.debug("could not read the draining nodes: %s", e)
        return False


def _reason(error: BaseException) -> str:
    """Ray's actor-death messages are several lines (class, id, pid, ip, then the cause): keep the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines[1:] if not line.split(":")[0] in ("class_name", "actor_id", "pid", "name",
                                                                           "namespace", "ip")]
    return " ".join(details) or (lines[0] if lines else type(error).__name__)


def _why_pending(resources: Resources, needed: int) -> str:
    """Why Ray places nothing now: too few nodes big enough (autoscaler?), or they are busy."""
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
    if not fits or len(fits) < needed:
        have = "no live node has" if not fits else f"only {len(fits)} live node(s) have"
        return (f"{have} that much{labels} ({len(nodes)} node(s){drain_text}); waiting for "
                f"{'one' if needed - len(fits) == 1 else needed - len(fits)} to join (an autoscaler adds nodes; "
                "else check --num-gpus/--num-cpus/--resource)")
    what = "it" if needed == 1 else "a worker"
    return f"{len(fits)} node(s) could take {what} but are busy (free now: {free_text}{drain_text})"

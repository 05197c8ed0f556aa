"""Preemption notice sources inside a Ray actor (`cluster_trainer.preemption.NoticeSource`).

- `RayDrainNotice`: the actor's node is being drained (a spot VM's shutdown, a
  Kubernetes pod being deleted: `ray start --block` drains its node with reason
  PREEMPTION on SIGTERM; the autoscaler and `ray drain-node` drain too).
- `DriverStop`: the driver asked the actor to stop (Ctrl-C or SIGTERM of the
  driver, e.g. `ray job stop`).

A Ray actor never gets a usable SIGTERM (when a node stops, Ray drains it and
then sends SIGTERM and SIGKILL to its workers in the same millisecond), so the
loop runs with `handle_signals=False` in an actor and polls these instead.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
import time

from cluster_trainer.on_ray import private

# Ray drains a node that gets SIGTERM for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default): a
# drain that leaves more than this, plus twice the flush, is far enough away to train on for a while.
DRAIN_LEAD_SECONDS = 30.0


def drain_is_far(seconds_left: float, flush_seconds: float | None) -> bool:
    """Whether a drain `seconds_left` away leaves time to train on before flushing.

    Far: more than `DRAIN_LEAD_SECONDS` plus twice what a flush takes now. Until
    a commit was measured nothing is far: the run flushes at once.

    Example:
        >>> drain_is_far(600, flush_seconds=2.0), drain_is_far(33, flush_seconds=2.0), drain_is_far(600, None)
        (True, False, False)
    """
    return flush_seconds is not None and seconds_left > DRAIN_LEAD_SECONDS + 2 * flush_seconds


class RayDrainNotice:
    """A preemption notice source for a Ray actor: its node is being drained.

    `poll()` returns the seconds left before the drain's deadline, `math.inf`
    for a drain without one (the loop then uses its grace period,
    `CLUSTER_TRAINER_GRACE_SECONDS`), or None while the node is not draining.
    Whatever the reason of the drain, the node is going away: the loop commits
    at the next batch boundary and stops.

    A drain whose deadline is far away (`drain_is_far`: beyond Ray's default
    30 s plus twice what a flush takes, as the watcher keeps it in
    `flush_seconds`) is first an early warning (`poll_warning()`: the run saves
    once and trains on), and becomes the notice when the deadline comes that
    close.

    Example (inside an actor):
        >>> notice = RayDrainNotice()        # doctest: +SKIP
        >>> notice.poll()                     # doctest: +SKIP
        >>> # ray drain-node --node-id <this node> --reason DRAIN_NODE_REASON_PREEMPTION \\
        >>> #     --reason-message spot --deadline-remaining-seconds 30
        >>> notice.poll()                     # doctest: +SKIP
        29.4
    """

    window_name = "Ray's drain of a stopping node (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)"
    window_fix = ("raise RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S on the Ray nodes, and the pods' "
                  "terminationGracePeriodSeconds above it")

    def __init__(self, node_id: str | None = None):
        if node_id is None:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        self.node_id = node_id
        self.name = f"Ray drain of node {node_id[:8]}"
        self.window_seconds = float(os.environ.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", DRAIN_LEAD_SECONDS))
        self.flush_seconds: float | None = None  # kept up to date by the watcher
        self._warning: str | None = None

    def poll(self) -> float | None:
        self._warning = None
        deadline_ms = private.draining_nodes().get(self.node_id)
        if deadline_ms is None:
            return None
        if not deadline_ms:
            return math.inf
        left = deadline_ms / 1000.0 - time.time()
        if drain_is_far(left, self.flush_seconds):
            when = datetime.datetime.fromtimestamp(deadline_ms / 1000.0, datetime.timezone.utc)
            self._warning = f"node drain with a deadline at {when:%H:%M:%S} UTC"
            return None
        return left

    def poll_warning(self) -> str | None:
        """A drain far enough away to train on (read by the `poll()` just before)."""
        return self._warning


class DriverStop:
    """A notice source the driver sets through the actor: Ctrl-C or SIGTERM of the driver, or the
    drain of another worker's node in a group (then with that drain's deadline)."""

    def __init__(self):
        self.name = "stop requested by the driver"
        self._requested = threading.Event()
        self._deadline_ms: int | None = None

    def request(self, reason: str, deadline_ms: int | None = None) -> None:
        if self._requested.is_set():
            return  # the first request wins
        self.name = f"{reason} of the driver" if deadline_ms is None else f"{reason}, passed on by the driver"
        self._deadline_ms = deadline_ms
        self._requested.set()

    def poll(self) -> float | None:
        if not self._requested.is_set():
            return None
        return math.inf if not self._deadline_ms else self._deadline_ms / 1000.0 - time.time()

"""Preemption notices: learn that the machine is going away, and by when.

A notice source sets a flag and a deadline; the loop checks it between steps,
commits the state at that batch boundary, and ends with `PreemptedError`
(exit code 75: "resume me"). The handler itself only records the notice:
nothing heavy runs inside a signal handler.

Sources here: SIGTERM and SIGINT in the main process (a Kubernetes pod, a local
run, `ray job stop`). The grace period, i.e. how long after the notice the
machine goes away, defaults to 30 s (Kubernetes' default
terminationGracePeriodSeconds); set `CLUSTER_TRAINER_GRACE_SECONDS` to match
the platform (GKE spot pods ~15 s, AWS spot 120 s).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

from cluster_trainer.errors import EXIT_PREEMPTED, ClusterTrainerError

DEFAULT_GRACE_SECONDS = 30.0


class PreemptedError(ClusterTrainerError):
    """The run stopped on a preemption notice after committing its state; run it again to resume."""

    exit_code = EXIT_PREEMPTED


@dataclasses.dataclass
class Notice:
    source: str
    received_at: float  # time.monotonic()
    deadline: float  # time.monotonic() by which the state must be committed

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


class PreemptionWatcher:
    """Collects notices from the installed sources; `notice` is None until one arrives.

    Example:
        >>> watcher = PreemptionWatcher(grace_seconds=15)
        >>> watcher.notify("test")
        >>> watcher.notice.source, round(watcher.notice.seconds_left())
        ('test', 15)
    """

    def __init__(self, grace_seconds: float | None = None):
        if grace_seconds is None:
            grace_seconds = float(os.environ.get("CLUSTER_TRAINER_GRACE_SECONDS", DEFAULT_GRACE_SECONDS))
        self.grace_seconds = grace_seconds
        self.notice: Notice | None = None
        self._previous: dict[int, object] = {}

    def notify(self, source: str, deadline_in: float | None = None) -> None:
        """Record a notice (the first one wins; a second notice does not move the deadline)."""
        if self.notice is None:
            now = time.monotonic()
            self.notice = Notice(source, now, now + (self.grace_seconds if deadline_in is None else deadline_in))

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT become notices (main thread only; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number, frame) -> None:
        if self.notice is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the flush
        self.notify(signal.Signals(number).name)

    def restore_signal_handlers(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

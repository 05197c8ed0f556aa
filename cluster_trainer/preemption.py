"""Preemption notices: learn that the machine is going away, and by when.

A notice sets a flag and a deadline; the loop checks the flag between steps,
commits the state at that batch boundary, and ends with `PreemptedError`
(exit code 75: "resume me"). Nothing heavy runs where a notice arrives.

Where notices come from:

- SIGTERM and SIGINT in the main process (a Kubernetes pod, a local run,
  `ray job stop`): the handler only records the notice. Python runs a signal
  handler only between bytecodes of the main thread, so not until the
  compiled step in progress returns; a thread woken through
  `signal.set_wakeup_fd` records the signal's arrival time at once, so the
  deadline counts from the signal, not from the end of that step.
- Polled sources, each a small object with a `poll()` that returns the seconds
  left before the machine goes away, or None: the GCE metadata server
  (`GceMetadataNotice`), the AWS spot instance-action endpoint
  (`AwsSpotNotice`), a file (`FileNotice`, for tests and for sidecars that
  learn of preemption some other way), and, inside a Ray actor, the node's
  drain state (`cluster_trainer.on_ray.notices`, so that nothing here imports Ray).
  A daemon thread polls them every `poll_seconds`.

Some sources also give early warnings, which are not yet notices: an EC2
rebalance recommendation (the instance is at elevated risk of interruption),
a GCE live migration about to start, a Ray drain whose deadline is still far
away. A source reports them from `poll_warning()`; the loop then commits once,
at once, and trains on. If the notice never comes, nothing was lost; if it
comes, the work since that commit is all a kill without notice could cost.

When a source does not say how long is left (a signal, GCE's `preempted`
flag), the grace period applies: `CLUSTER_TRAINER_GRACE_SECONDS`, 30 s by
default (Kubernetes' default terminationGracePeriodSeconds); set it to match
the platform (GKE spot pods ~15 s, AWS spot 120 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, Protocol, Sequence

from cluster_trainer.errors import EXIT_PREEMPTED, ClusterTrainerError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_POLL_SECONDS = 1.0


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


@dataclasses.dataclass(frozen=True)
class EarlyWarning:
    """A warning that is not yet a notice (`NoticeSource.poll_warning`): save now, train on."""

    source: str
    reason: str
    received_at: float  # time.monotonic()


class NoticeSource(Protocol):
    """Something to ask "is this machine going away?"; polled from a background thread.

    Optional, where a source has them:

    - `poll_warning()`: an early warning that is not yet a notice, as a short
      description (the same text for as long as the warning stands), or None.
      Each new warning makes the loop commit once and train on.
    - `window_seconds`, `window_name`, `window_fix`: the time its platform gives
      from notice to stop, and what lengthens it, for `cluster_trainer.deadlines`.
    - `flush_seconds`: the watcher keeps it set to what a flush takes now (None
      until a commit was measured), for a source that times its notice by it.
    """

    name: str

    def poll(self) -> float | None:
        """Seconds left before the machine goes away (`math.inf` if unknown), or None if no notice."""


class PreemptionWatcher:
    """Collects notices from signals and polled sources; `notice` is None until one arrives.

    Early warnings (`poll_warning()` of a source) queue up until the loop takes
    them (`take_warnings()`); a warning that stands is reported once.

    Example:
        >>> watcher = PreemptionWatcher(grace_seconds=15)
        >>> watcher.warn("EC2", "rebalance recommendation")
        >>> watcher.warn("EC2", "rebalance recommendation")   # the same warning, still standing
        >>> [w.reason for w in watcher.take_warnings()], watcher.take_warnings()
        (['rebalance recommendation'], [])
        >>> watcher.notify("test")
        >>> watcher.notice.source, round(watcher.notice.seconds_left())
        ('test', 15)
    """

    def __init__(self, sources: Sequence[NoticeSource] = (), grace_seconds: float | None = None,
                 poll_seconds: float = DEFAULT_POLL_SECONDS):
        if grace_seconds is None:
            grace_seconds = float(os.environ.get("CLUSTER_TRAINER_GRACE_SECONDS", DEFAULT_GRACE_SECONDS))
        self.grace_seconds = grace_seconds
        self.sources = list(sources)
        self.poll_seconds = poll_seconds
        self.notice: Notice | None = None
        # Called with the notice, from the thread that recorded it, when the first one arrives.
        self.listeners: list[Callable[[Notice], None]] = []
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) of the signal wakeup pipe
        self._handled_signal = False
        # Re-entrant: a signal handler may run in the main thread while it is inside `notify`.
        self._notice_lock = threading.RLock()
        self._warnings: list[EarlyWarning] = []  # not yet taken by the loop
        self._standing: dict[str, str] = {}  # source name -> the warning it reports now
        # What a flush takes now, for sources that time their notice by it (`Cadence.flush_seconds`).
        self.flush_estimate: Callable[[], float | None] = lambda: None

    def notify(self, source: str, deadline_in: float | None = None, received_at: float | None = None) -> None:
        """Record a notice (the first one wins; a later notice does not move the deadline).

        `deadline_in` is capped at the grace period: a source that does not know
        the deadline, or reports a far one, still gets the state committed soon.
        `received_at` (`time.monotonic()`) is when it came, if not now.
        """
        now = time.monotonic() if received_at is None else received_at
        with self._notice_lock:  # the signal handler and the wakeup thread may record the same signal
            if self.notice is not None:
                return
            left = self.grace_seconds if deadline_in is None else min(deadline_in, self.grace_seconds)
            self.notice = Notice(source, now, now + left)
        for listener in self.listeners:
            listener(self.notice)

    def warn(self, source: str, reason: str | None) -> None:
        """Record `source`'s early warning (None: it has none now); a warning already standing is not new."""
        with self._notice_lock:
            if reason is None:
                self._standing.pop(source, None)
            elif self._standing.get(source) != reason:
                self._standing[source] = reason
                self._warnings.append(EarlyWarning(source, reason, time.monotonic()))

    def take_warnings(self) -> list[EarlyWarning]:
        """The early warnings that arrived since the last call (the loop saves once for all of them)."""
        with self._notice_lock:
            taken, self._warnings = self._warnings, []
        return taken

    # -- lifecycle ---------------------------------------------------------------

    def start(self, handle_signals: bool = True) -> None:
        """Install the signal handlers (main thread only) and start polling the sources."""
        if handle_signals:
            self._install_signal_handlers()
        if self.sources:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll_forever, name="cluster-trainer-notices", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=self.poll_seconds + 5)
            self._poller = None
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        global _handling_signals
        if _handling_signals is self:
            _handling_signals = None
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])  # the reader thread sees end-of-file and ends, closing its end
            self._wakeup = None

    def _poll_forever(self) -> None:
        while self.notice is None and not self._stop.is_set():
            for source in self.sources:
                if hasattr(source, "flush_seconds"):
                    source.flush_seconds = self.flush_estimate()
                try:
                    left = source.poll()
                    if left is not None:
                        self.notify(source.name, left)
                        break
                    if hasattr(source, "poll_warning"):
                        self.warn(source.name, source.poll_warning())
                except Exception as e:  # a metadata hiccup must not stop training
                    log.debug("notice source %s failed: %s", source.name, e)
            self._stop.wait(self.poll_seconds)

    def _install_signal_handlers(self) -> None:
        global _handling_signals
        if threading.current_thread() is not threading.main_thread():
            return  # Python only delivers signals to the main thread
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._on_signal)
        _handling_signals = self
        if _early_notices:  # a signal while the command started up: the first notice
            self._handled_signal = True
            self.notify(*_early_notices[0])
        self._watch_signal_arrivals()

    def _watch_signal_arrivals(self) -> None:
        """Timestamp SIGTERM/SIGINT when they arrive, not when the main thread gets to the handler.

        Left out if something else in the process (an asyncio loop) already owns the wakeup fd.
        """
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        try:
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            previous = None
        if previous != -1:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(read_end)
            os.close(write_end)
            return
        self._wakeup = (read_end, write_end)
        threading.Thread(target=self._read_wakeups, args=(read_end,), name="cluster-trainer-signals",
                         daemon=True).start()

    def _read_wakeups(self, read_end: int) -> None:
        try:
            while chunk := os.read(read_end, 64):
                for number in chunk:
                    if number in (signal.SIGTERM, signal.SIGINT):
                        self.notify(signal.Signals(number).name)
        finally:
            os.close(read_end)

    def _on_signal(self, number, frame) -> None:
        # Not `self.notice`: the wakeup thread may have recorded this very signal already.
        if self._handled_signal and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the flush
        self._handled_signal = True
        self.notify(signal.Signals(number).name)


# The watcher whose signal handlers are installed in this process, if any.
_handling_signals: PreemptionWatcher | None = None
_fork_masks = threading.local()  # the forking thread's signal mask, while it forks
_NOTICE_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _block_notice_signals_before_fork() -> None:
    """A process forked while a watcher's handlers are installed (a PyDataset's worker processes) inherits
    them and the signal wakeup pipe it shares with this process: the SIGTERM that ends such a worker would
    reach this process's pipe as a preemption notice, and the worker would shrug it off, leaving its pool
    waiting for it. SIGTERM and SIGINT stay blocked in the forking thread until the child has dropped both."""
    if _handling_signals is not None:
        _fork_masks.previous = signal.pthread_sigmask(signal.SIG_BLOCK, _NOTICE_SIGNALS)


def _unblock_after_fork_in_parent() -> None:
    previous = getattr(_fork_masks, "previous", None)
    if previous is not None:
        _fork_masks.previous = None
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _forget_signals_after_fork_in_child() -> None:
    """The child gets Python's own handlers back (SIGTERM ends it, SIGINT raises KeyboardInterrupt), not
    the watcher's nor the start-up recorder's, and no wakeup pipe; a signal sent to it meanwhile waited,
    blocked, and now gets them."""
    previous = getattr(_fork_masks, "previous", None)
    if _handling_signals is None or previous is None:
        return
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the child's main thread: Python installed nothing there to undo
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


os.register_at_fork(before=_block_notice_signals_before_fork, after_in_parent=_unblock_after_fork_in_parent,
                    after_in_child=_forget_signals_after_fork_in_child)


# -- start-up ----------------------------------------------------------------------

_early_notices: list[tuple[str, float]] = []  # (signal name, time.monotonic()) of a SIGTERM during start-up


@contextlib.contextmanager
def early_signals() -> Iterator[None]:
    """While a command starts (TensorFlow imports for seconds, the job file loads), SIGTERM is recorded
    instead of killing the process; a `PreemptionWatcher` started inside takes it as its first notice.

    The run then stops before training, with exit code 75 (`started_too_late`): nothing was
    committed, and the same command resumes or starts it. Main thread only; elsewhere a no-op.

    Example:
        >>> with early_signals():
        ...     early_notice() is None
        True
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(number, frame):
        if not _early_notices:
            _early_notices.append((signal.Signals(number).name, time.monotonic()))

    previous = signal.signal(signal.SIGTERM, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _early_notices.clear()


def early_notice() -> str | None:
    """The signal `early_signals` recorded (e.g. "SIGTERM"), or None."""
    return _early_notices[0][0] if _early_notices else None


def started_too_late(source: str) -> PreemptedError:
    """The error of a run noticed before its first step: nothing was written."""
    return PreemptedError(f"preempted ({source}) before training started; nothing was written. "
                          "Run the same command again")


# -- polled sources --------------------------------------------------------------


class FileNotice:
    """A notice when `path` exists; if the file holds a number, it is the seconds left.

    For tests, and for a sidecar or preStop hook that learns of preemption its
    own way: `echo 20 > /tmp/preempt`.
    """

    def __init__(self, path: str):
        self.path = path
        self.name = f"file {path}"

    def poll(self) -> float | None:
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        try:
            return float(text)
        except ValueError:
            return float("inf")  # empty or not a number: a notice without a deadline


class GceMetadataNotice:
    """GCE: `instance/preempted` turns TRUE ~30 s before a spot VM stops (a notice);
    `instance/maintenance-event` announces host maintenance 60 s ahead.

    `TERMINATE_ON_HOST_MAINTENANCE` (the VM will be stopped: spot VMs, VMs with
    GPUs, or a TERMINATE host-maintenance policy) is a notice;
    `MIGRATE_ON_HOST_MAINTENANCE` is an early warning: the VM is live-migrated
    and keeps running, but a migration that fails ends in a stop, so the run
    saves once and trains on. Any other value but NONE is taken for a notice.

    The server is `GCE_METADATA_HOST` (the variable Google's client libraries read), else
    `metadata.google.internal`.
    """

    name = "GCE metadata"
    window_name = "GCE spot preemption"
    window_seconds = 30.0
    window_fix = "Compute Engine stops a spot VM 30 s after its notice, and that cannot be raised"

    def __init__(self, host: str | None = None, timeout: float = 2.0):
        self.base = f"http://{host or os.environ.get('GCE_METADATA_HOST', 'metadata.google.internal')}"
        self.timeout = timeout
        self._maintenance = "NONE"

    def _get(self, path: str) -> str:
        request = urllib.request.Request(f"{self.base}/computeMetadata/v1/instance/{path}",
                                         headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode().strip()

    def poll(self) -> float | None:
        if self._get("preempted").upper() == "TRUE":
            return float("inf")
        self._maintenance = self._get("maintenance-event").upper() or "NONE"
        if self._maintenance not in ("NONE", "MIGRATE_ON_HOST_MAINTENANCE"):
            return float("inf")
        return None

    def poll_warning(self) -> str | None:
        """A live migration about to start (read by the `poll()` just before)."""
        if self._maintenance == "MIGRATE_ON_HOST_MAINTENANCE":
            return "maintenance-event MIGRATE_ON_HOST_MAINTENANCE (a live migration within 60 s)"
        return None


class AwsSpotNotice:
    """AWS: `spot/instance-action` answers 404 until a spot interruption is scheduled, then
    `{"action": "terminate"|"stop"|"hibernate", "time": "2026-11-24T16:02:00Z"}`, two minutes ahead.

    `events/recommendations/rebalance` answers 404 until EC2 recommends a
    rebalance (the instance is at elevated risk of interruption; it may come
    well before the interruption, with it, or for nothing), then
    `{"noticeTime": "2026-11-24T15:58:00Z"}`: an early warning.

    Uses IMDSv2 (a session token first). The endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT`
    (botocore's variable), else http://169.254.169.254.
    """

    name = "AWS spot instance-action"
    window_name = "EC2 spot interruption"
    window_seconds = 120.0
    window_fix = "EC2 stops a spot instance two minutes after its notice, and that cannot be raised"

    def __init__(self, endpoint: str | None = None, timeout: float = 2.0):
        self.base = (endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254")).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def _session_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expires:
            request = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode().strip()
            self._token_expires = time.monotonic() + 21600 - 60
        return self._token

    def _get_json(self, path: str) -> dict | None:
        """The JSON document at `path`, or None while it answers 404."""
        request = urllib.request.Request(f"{self.base}/latest/meta-data/{path}",
                                         headers={"X-aws-ec2-metadata-token": self._session_token()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:
                self._token = None  # expired token: a new one next time
            raise

    def poll(self) -> float | None:
        action = self._get_json("spot/instance-action")
        if action is None:
            return None
        when = datetime.datetime.fromisoformat(action["time"].replace("Z", "+00:00"))
        return when.timestamp() - time.time()

    def poll_warning(self) -> str | None:
        recommendation = self._get_json("events/recommendations/rebalance")
        if recommendation is None:
            return None
        return f"EC2 rebalance recommendation of {str(recommendation.get('noticeTime', 'unknown time'))[:40]}"


def notice_sources(specs: Sequence[str]) -> list[NoticeSource]:
    """Sources from names: `gce`, `aws`, `file:PATH` (what `--notice` and `CLUSTER_TRAINER_NOTICE` take).

    Example:
        >>> [s.name for s in notice_sources(["gce", "file:/tmp/preempt"])]
        ['GCE metadata', 'file /tmp/preempt']
    """
    sources: list[NoticeSource] = []
    for spec in specs:
        kind, _, argument = spec.strip().partition(":")
        if kind == "gce" and not argument:
            sources.append(GceMetadataNotice())
        elif kind == "aws" and not argument:
            sources.append(AwsSpotNotice())
        elif kind == "file" and argument:
            sources.append(FileNotice(argument))
        else:
            raise ConfigError(f"unknown notice source {spec!r}: use gce, aws or file:PATH")
    return sources


def sources_from_environment() -> list[NoticeSource]:
    """The sources named in `CLUSTER_TRAINER_NOTICE` (comma-separated), e.g. `gce` on GKE spot nodes."""
    value = os.environ.get("CLUSTER_TRAINER_NOTICE", "")
    return notice_sources([s for s in value.split(",") if s.strip()])

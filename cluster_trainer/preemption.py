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

When a source does not say how long is left (a signal, GCE's `preempted`
flag), the grace period applies: `CLUSTER_TRAINER_GRACE_SECONDS`, 30 s by
default (Kubernetes' default terminationGracePeriodSeconds); set it to match
the platform (GKE spot pods ~15 s, AWS spot 120 s).
"""

from __future__ import annotations

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
from typing import Callable, Protocol, Sequence

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


class NoticeSource(Protocol):
    """Something to ask "is this machine going away?"; polled from a background thread."""

    name: str

    def poll(self) -> float | None:
        """Seconds left before the machine goes away (`math.inf` if unknown), or None if no notice."""


class PreemptionWatcher:
    """Collects notices from signals and polled sources; `notice` is None until one arrives.

    Example:
        >>> watcher = PreemptionWatcher(grace_seconds=15)
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

    def notify(self, source: str, deadline_in: float | None = None) -> None:
        """Record a notice (the first one wins; a later notice does not move the deadline).

        `deadline_in` is capped at the grace period: a source that does not know
        the deadline, or reports a far one, still gets the state committed soon.
        """
        now = time.monotonic()
        with self._notice_lock:  # the signal handler and the wakeup thread may record the same signal
            if self.notice is not None:
                return
            left = self.grace_seconds if deadline_in is None else min(deadline_in, self.grace_seconds)
            self.notice = Notice(source, now, now + left)
        for listener in self.listeners:
            listener(self.notice)

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
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])  # the reader thread sees end-of-file and ends, closing its end
            self._wakeup = None

    def _poll_forever(self) -> None:
        while self.notice is None and not self._stop.is_set():
            for source in self.sources:
                try:
                    left = source.poll()
                except Exception as e:  # a metadata hiccup must not stop training
                    log.debug("notice source %s failed: %s", source.name, e)
                    continue
                if left is not None:
                    self.notify(source.name, left)
                    break
            self._stop.wait(self.poll_seconds)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only delivers signals to the main thread
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._on_signal)
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
    """GCE: `instance/preempted` turns TRUE ~30 s before a spot VM stops; a maintenance event
    other than NONE means the host is going away too.

    The server is `GCE_METADATA_HOST` (the variable Google's client libraries read), else
    `metadata.google.internal`.
    """

    name = "GCE metadata"

    def __init__(self, host: str | None = None, timeout: float = 2.0):
        self.base = f"http://{host or os.environ.get('GCE_METADATA_HOST', 'metadata.google.internal')}"
        self.timeout = timeout

    def _get(self, path: str) -> str:
        request = urllib.request.Request(f"{self.base}/computeMetadata/v1/instance/{path}",
                                         headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode().strip()

    def poll(self) -> float | None:
        if self._get("preempted").upper() == "TRUE":
            return float("inf")
        if self._get("maintenance-event").upper() not in ("NONE", ""):
            return float("inf")
        return None


class AwsSpotNotice:
    """AWS: `spot/instance-action` answers 404 until a spot interruption is scheduled, then
    `{"action": "terminate"|"stop"|"hibernate", "time": "2026-11-24T16:02:00Z"}`, two minutes ahead.

    Uses IMDSv2 (a session token first). The endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT`
    (botocore's variable), else http://169.254.169.254.
    """

    name = "AWS spot instance-action"

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

    def poll(self) -> float | None:
        request = urllib.request.Request(f"{self.base}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": self._session_token()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                action = json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:
                self._token = None  # expired token: a new one next time
            raise
        when = datetime.datetime.fromisoformat(action["time"].replace("Z", "+00:00"))
        return when.timestamp() - time.time()


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

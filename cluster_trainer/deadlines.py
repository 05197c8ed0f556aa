"""Does a flush fit the notice window? The measured flush time against each window the run has.

On a preemption notice the run finishes its step, commits and exits. How long
that takes is known from the commits it has already made (`Cadence`
measures them). How long it has depends on who gives the notice:

- every notice is capped by the grace period, `CLUSTER_TRAINER_GRACE_SECONDS`
  (30 s by default, Kubernetes' default terminationGracePeriodSeconds; set it to
  the platform's own: GKE spot pods get ~15 s of the node's 30 s unless a node
  pool on GKE >= 1.35 raises it, up to 120 s);
- a source may say what its platform gives (`window_seconds` on the source):
  GCE spot 30 s, Ray's drain of a stopping node 30 s
  (`RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`), EC2 spot 120 s.

`FlushDeadline.check` warns when a flush would not fit a window: once, after
the first measured commit, and again only when that changes (another window,
or a flush half as long again), with the numbers and what to change. A notice
that leaves less time than a flush needs is still acted on: a commit the
deadline cuts off is never loaded (the manifest is written last), and the
next attempt resumes from the previous one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

GRACE = "the grace period (CLUSTER_TRAINER_GRACE_SECONDS)"
GRACE_FIX = ("raise it together with the platform's own (Kubernetes terminationGracePeriodSeconds; on GKE >= 1.35 "
             "a spot node pool can give pods up to 120 s)")
SHORTER = "or shorten the flush: a store nearer the nodes, or a smaller state"
RELOG_GROWTH = 1.5  # warn again when the flush has grown by half since the last warning


@dataclasses.dataclass(frozen=True)
class Window:
    """How long one kind of notice leaves for the flush, and what lengthens it."""

    name: str
    seconds: float
    fix: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def notice_windows(grace_seconds: float, sources: Sequence = ()) -> list[Window]:
    """The grace period, and each source's own window where it is shorter (the grace period caps the rest).

    Example:
        >>> class Gce:
        ...     name, window_name, window_seconds, window_fix = "GCE metadata", "GCE spot", 30.0, "it is fixed"
        >>> [(w.name, w.seconds) for w in notice_windows(120, [Gce()])]
        [('the grace period (CLUSTER_TRAINER_GRACE_SECONDS)', 120), ('GCE spot', 30.0)]
        >>> [w.name for w in notice_windows(15, [Gce()])]
        ['the grace period (CLUSTER_TRAINER_GRACE_SECONDS)']
    """
    windows = [Window(GRACE, grace_seconds, GRACE_FIX)]
    for source in sources:
        seconds = getattr(source, "window_seconds", None)
        if seconds is not None and seconds < grace_seconds:
            windows.append(Window(getattr(source, "window_name", source.name), seconds,
                                  getattr(source, "window_fix", "")))
    return windows


class FlushDeadline:
    """Warns when a flush would not fit a notice window; once, and again when that changes.

    Args:
        windows: the windows to check (`notice_windows`).

    Example:
        >>> deadline = FlushDeadline([Window("GKE spot", 15, "raise terminationGracePeriodSeconds")])
        >>> print(deadline.check(34.2, 4.1e9, 120e6))
        warning: a flush of 4.1 GB would take ~34.2 s at the measured 120 MB/s; GKE spot gives 15 s: raise
        terminationGracePeriodSeconds; or shorten the flush: a store nearer the nodes, or a smaller state
        >>> deadline.check(35.0, 4.1e9, 118e6) is None       # said once
        True
        >>> deadline.check(3.0, 4.1e9, 1.4e9)
        'a flush fits the notice windows again: ~3.0 s for 4.1 GB (shortest window: GKE spot, 15 s)'
    """

    def __init__(self, windows: Sequence[Window]):
        self.windows = list(windows)
        self._warned: tuple[tuple[str, ...], float] | None = None

    def check(self, seconds: float, nbytes: int, bytes_per_second: float) -> str | None:
        """A message if the verdict for a flush of `seconds` changed since the last one, else None."""
        short = [w for w in self.windows if seconds > w.seconds]
        if not short:
            if self._warned is None:
                return None
            self._warned = None
            shortest = min(self.windows, key=lambda w: w.seconds)
            return (f"a flush fits the notice windows again: ~{seconds:.1f} s for {format_size(nbytes)} "
                    f"(shortest window: {shortest.name}, {shortest.seconds:g} s)")
        names = tuple(w.name for w in short)
        if self._warned is not None and self._warned[0] == names and seconds < RELOG_GROWTH * self._warned[1]:
            return None
        self._warned = (names, seconds)
        reasons = "; ".join(f"{w.name} gives {w.seconds:g} s: {w.fix}" for w in short)
        rate = f" at the measured {format_size(bytes_per_second)}/s" if math.isfinite(bytes_per_second) else ""
        return f"warning: a flush of {format_size(nbytes)} would take ~{seconds:.1f} s{rate}; {reasons}; {SHORTER}"


def late_notice_warning(seconds_left: float, flush_seconds: float | None, last_committed: str | None) -> str | None:
    """What to say when a notice leaves less time than a flush takes (None when it fits or nothing is measured).

    Example:
        >>> late_notice_warning(4.0, 9.5, "c00000007-s0000000070-a0001")
        'warning: 4.0 s to the deadline and a flush takes ~9.5 s here: committing anyway; a commit the deadline cuts off is never loaded, and the next attempt resumes from c00000007-s0000000070-a0001'
        >>> late_notice_warning(20.0, 9.5, None) is None
        True
    """
    if flush_seconds is None or flush_seconds <= seconds_left:
        return None
    return (f"warning: {max(seconds_left, 0.0):.1f} s to the deadline and a flush takes ~{flush_seconds:.1f} s here: "
            "committing anyway; a commit the deadline cuts off is never loaded, and the next attempt resumes from "
            f"{last_committed or 'the start of the run'}")


def format_size(nbytes: float) -> str:
    """`812 kB`, `25.2 MB`, `4.1 GB` (decimal units, as the stores bill them).

    Example:
        >>> format_size(812_000), format_size(25.2e6), format_size(4.1e9)
        ('812 kB', '25.2 MB', '4.1 GB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}" if nbytes < 100 * scale else f"{nbytes / scale:.0f} {unit}"
    return f"{nbytes:.0f} B"

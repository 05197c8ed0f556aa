"""When to commit: a checkpoint interval paced by what the run measures.

`CheckpointPolicy(every_steps="auto")` leaves the interval to this module. It
is chosen, in `choose_interval`, from four measurements, as the largest of
three lower bounds:

- **budget**: a save costs training its host copy plus any wait for the
  background writer, on the training thread (`save_seconds`), and the steps
  that run slower while the writer uploads, sharing the CPU and memory with
  them (`slowdown_seconds`: what the steps run with a commit in flight took
  beyond the step time measured just before). Saving every `T` seconds of training costs `cost / T` of it; `T`
  is at least `cost / max_overhead` (aiming at `HEADROOM` of the budget, so
  that noise does not push past it).
- **writer**: a commit takes `commit_seconds` on this store, in the
  background; with `max_in_flight` commits at once, `T` is at least
  `WRITER_MARGIN * commit_seconds / max_in_flight`, so saves do not queue
  behind it. (And a save that comes due while the writer is still busy waits
  for it, training on, instead of blocking the training thread.)
- **Young-Daly**: with a mean time between interruptions `M`, the interval
  that minimises the time lost to saving plus the work done again after an
  interruption is about `sqrt(2 * save_seconds * M)`. `M` is the run's own
  training time (all its attempts) over the interruptions *without notice* its
  attempts have seen, plus one (as if one were about to come): a notice costs
  no work, since the run commits at that batch. Early in a run `M` is short,
  so the run saves as often as the budget allows; the longer it trains without
  being killed, the less often it saves; a run killed often saves more often,
  but never past the budget.

The interval is `T` in steps of the measured step time. A slower store, a
larger state or a run killed more often moves it at the next save; each change
is logged with its reason. Before anything is measured, a first save a few
steps in measures it.

`Cadence` keeps the measurements of the current attempt, starting from those
an earlier attempt stored in its checkpoint (`state()` goes into each
checkpoint's state.json, so an attempt on another node starts from what the
previous ones learned), and answers the one question the loop asks after each
step: `due(global_step)`. Its answer is a pure function of what this process
measured: in a run of several workers the chief's `Cadence` decides and the
others follow its answer. A commit never changes what is trained, so an
interval that depends on timing keeps resumed runs bitwise equal.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import threading
import time
from typing import Any, Callable, Sequence

from cluster_trainer.deadlines import FlushDeadline, Window, format_size
from cluster_trainer.job import CheckpointPolicy

HEADROOM = 0.8  # aim at 80% of the overhead budget: the measurements are noisy
WRITER_MARGIN = 1.25  # commits must finish this much faster than they are queued
FIRST_SAVE_STEPS = 3  # before any measurement: save after this many steps (the first one traces)
STEP_WINDOW = 64  # recent steps without a commit in flight, whose median is the step time
MIN_SAMPLES = 3  # steps measured before the slowdown of the steps that share the machine with a commit is
SAVE_WINDOW = 16  # recent saves whose mean is the cost of a save
COMMIT_WINDOW = 3  # recent commits whose median is the commit time: two slow ones move it
ATTEMPTS_KEPT = 20  # per-attempt summaries kept in the checkpoint
# A new interval is adopted (and logged) when it is longer by 1/HEADROOM (past that, saves would cost more
# than the budget), or shorter by a third (saving more often is optional: the Young-Daly optimum is flat).
LONGER, SHORTER = 1 / HEADROOM, 2 / 3


@dataclasses.dataclass(frozen=True)
class Measurements:
    """What the pacing decision is made from (seconds; None: not measured yet).

    Attributes:
        step_seconds: a training step (the median of recent ones without a commit in flight).
        save_seconds: what a save costs the training thread: the host copy plus
            any wait for the writer (the mean of recent saves).
        slowdown_seconds: what a commit in flight costs the steps that run
            meanwhile, in all: their time beyond the step time of the moment
            (the median over recent commits).
        commit_seconds: a commit in the background, on this store (recent mean).
        uptime_seconds: training time of all the run's attempts.
        interruptions: attempts that ended without notice (killed, lost, failed).
        max_in_flight: commits the writer runs at once.
    """

    step_seconds: float | None = None
    save_seconds: float | None = None
    slowdown_seconds: float = 0.0
    commit_seconds: float | None = None
    uptime_seconds: float = 0.0
    interruptions: int = 0
    max_in_flight: int = 1


@dataclasses.dataclass(frozen=True)
class Interval:
    """A checkpoint interval, the bound that set it and why, in words."""

    steps: int
    reason: str  # "first save", "budget", "writer", "Young-Daly", "fixed" or "epochs only"
    why: str
    seconds: float | None = None

    def describe(self) -> str:
        every = "never mid-epoch" if self.reason == "epochs only" else f"every {self.steps} steps"
        about = f" (~{_duration(self.seconds)})" if self.seconds else ""
        return f"{every}{about}: {self.why}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose_interval(m: Measurements, max_overhead: float) -> Interval:
    """The interval for `m`: the largest of the budget, writer and Young-Daly bounds, in steps.

    Args:
        m: what the run measured.
        max_overhead: the share of training time saves may cost the training thread.

    Example:
        >>> m = Measurements(step_seconds=0.02, save_seconds=0.012, commit_seconds=0.3, uptime_seconds=10)
        >>> interval = choose_interval(m, max_overhead=0.03)
        >>> interval.steps, interval.reason            # 0.012 s / (0.8 * 3%) = 0.5 s = 25 steps
        (25, 'budget')
        >>> choose_interval(dataclasses.replace(m, commit_seconds=2.0), 0.03).reason   # a slow store
        'writer'
        >>> hour = choose_interval(dataclasses.replace(m, uptime_seconds=3600), 0.03)  # an hour, never killed
        >>> hour.steps, hour.reason                    # sqrt(2 * 0.012 s * 3600 s) = 9.3 s
        (465, 'Young-Daly')
        >>> choose_interval(dataclasses.replace(m, uptime_seconds=3600, interruptions=59), 0.03).steps  # 1 a minute
        60
    """
    if m.step_seconds is None or m.save_seconds is None:
        return Interval(FIRST_SAVE_STEPS, "first save", "a first save measures what saving costs here")
    step = max(m.step_seconds, 1e-6)
    cost = m.save_seconds + m.slowdown_seconds
    between = m.uptime_seconds / (m.interruptions + 1)
    bounds = {
        "budget": cost / (max_overhead * HEADROOM),
        "writer": WRITER_MARGIN * (m.commit_seconds or 0.0) / m.max_in_flight,
        "Young-Daly": math.sqrt(2 * cost * between),
    }
    reason = max(bounds, key=bounds.get)
    steps = max(1, math.ceil(bounds[reason] / step - 1e-9))
    seconds = steps * step
    if reason == "budget":
        what = f"{_duration(m.save_seconds)} on the training thread (host copy and any wait for the writer)"
        if m.slowdown_seconds:
            what += f" and {_duration(m.slowdown_seconds)} of slower steps while it uploads"
        why = (f"a save costs training {what}; at {_duration(step)} a step, every {steps} steps keeps saving under "
               f"{max_overhead:.0%} of training time")
    elif reason == "writer":
        why = (f"a commit takes {_duration(m.commit_seconds)} on this store; every {steps} steps the writer keeps up "
               f"({m.max_in_flight} commit{'s' if m.max_in_flight > 1 else ''} in flight)")
    else:
        seen = (f"{m.interruptions} interruption{'s' if m.interruptions != 1 else ''} without notice"
                if m.interruptions else "no interruption without notice yet")
        why = (f"Young-Daly sqrt(2 x {_duration(cost)} a save x {_duration(between)} between interruptions): {seen} "
               f"in {_duration(m.uptime_seconds)} of training; saves cost under {max_overhead:.0%}")
    return Interval(steps, reason, why, seconds)


class Cadence:
    """The run's checkpoint cadence: measures saves, commits and steps, and says when to commit.

    Args:
        policy: the job's `CheckpointPolicy`; a fixed `every_steps` is kept as it is
            (the measurements still feed the flush-deadline check and `status`).
        windows: the notice windows a flush must fit in (`deadlines.notice_windows`).
        echo: where to say that the interval changed, or that a flush does not fit.
        clock: seconds, monotonic (tests pass their own).

    Example:
        >>> now = [0.0]
        >>> cadence = Cadence(CheckpointPolicy(every_steps="auto"), clock=lambda: now[0], echo=print)
        >>> cadence.begin(attempt=1, global_step=0)
        >>> [step for step in range(1, 6) if cadence.due(step)]     # nothing measured yet: a first save
        [3, 4, 5]
        >>> for _ in range(3):
        ...     cadence.step_done(0.02)
        >>> now[0] = 0.1
        >>> cadence.saved(3, seconds=0.012)
        checkpoints every 25 steps (~500 ms): a save costs training 12 ms on the training thread ...
        >>> cadence.due(27), cadence.due(28)
        (False, True)
    """

    def __init__(self, policy: CheckpointPolicy, *, windows: Sequence[Window] = (),
                 echo: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.auto = policy.every_steps == "auto"
        self._echo = echo or (lambda message: None)
        self._clock = clock
        self._lock = threading.Lock()  # commits are measured on the writer's thread
        self._steps: collections.deque[float] = collections.deque(maxlen=STEP_WINDOW)  # no commit in flight
        self._slowdowns: collections.deque[float] = collections.deque(maxlen=SAVE_WINDOW)  # per commit
        self._slowing: float | None = None  # the excess of the steps run so far with the current commit in flight
        self._slowdown_total = 0.0  # this attempt's
        self._saves: collections.deque[float] = collections.deque(maxlen=SAVE_WINDOW)
        self._commits: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=COMMIT_WINDOW)
        self._first_step = True
        self._commit_measured = False  # a commit finished since the flush was last checked against the windows
        self.deadline = FlushDeadline(windows)
        self.attempt: int | None = None
        self.started = clock()
        self.last_commit_step = 0
        self.uptime_before = 0.0  # training time of earlier attempts, as their checkpoints recorded it
        self.interruptions = 0
        self.notices = 0
        self.saves = 0  # all the run's attempts (in the lineage of the checkpoint resumed from)
        self.early_saves = 0  # the same, on early warnings
        self.attempt_saves = 0
        self.save_seconds_total = 0.0  # this attempt's saves, on the training thread
        self.earlier_attempts: list[dict] = []
        if self.auto:
            self.interval = choose_interval(Measurements(), policy.max_overhead)
        elif policy.every_steps is None:
            self.interval = Interval(0, "epochs only", "CheckpointPolicy(every_steps=None)")
        else:
            self.interval = Interval(policy.every_steps, "fixed", f"CheckpointPolicy(every_steps={policy.every_steps})")

    # -- the decision ------------------------------------------------------------

    def due(self, global_step: int, in_flight: int = 0, epoch_commit_in: int | None = None) -> bool:
        """Whether to commit after `global_step`: the loop's one question, asked after each step.

        Args:
            global_step: the step just trained.
            in_flight: commits the writer has not finished. With "auto" a save
                waits (training on) while the writer has no free slot, rather
                than block the training thread; the next decision then knows
                what that commit took.
            epoch_commit_in: steps to the epoch-end commit, if there is one. A
                save that would still be in flight then is left to it, so that
                it does not wait.
        """
        if not self.auto:
            return self.policy.due_at_step(global_step)
        if global_step - self.last_commit_step < self.interval.steps or in_flight >= self.policy.max_in_flight:
            return False
        self._decide()  # with what the commits finished since the last save measured
        if global_step - self.last_commit_step < self.interval.steps:
            return False
        if epoch_commit_in is not None:
            m = self.measurements()
            if m.step_seconds and m.commit_seconds and \
                    epoch_commit_in * m.step_seconds < WRITER_MARGIN * m.commit_seconds:
                return False
        return True

    def measurements(self) -> Measurements:
        with self._lock:
            return Measurements(
                step_seconds=statistics.median(self._steps) if self._steps else None,
                save_seconds=statistics.fmean(self._saves) if self._saves else None,
                slowdown_seconds=max(0.0, statistics.median(self._slowdowns)) if self._slowdowns else 0.0,
                commit_seconds=statistics.median(c[0] for c in self._commits) if self._commits else None,
                uptime_seconds=self.uptime_seconds(),
                interruptions=self.interruptions,
                max_in_flight=self.policy.max_in_flight,
            )

    # -- what the loop reports -------------------------------------------------------

    def begin(self, attempt: int, global_step: int, stored: dict | None = None, resumed_attempt: int | None = None,
              resumed_finished: bool = True) -> None:
        """Start this attempt at `global_step`, from the cadence state of the checkpoint it resumed from.

        `resumed_attempt` is the attempt that wrote that checkpoint. If the run
        was not finished there, that attempt was interrupted: by a notice when
        the checkpoint is its flush, else without one (killed, lost, failed),
        and so was every attempt registered since that never committed.
        """
        self.attempt = attempt
        self.started = self._clock()
        self.last_commit_step = global_step
        stored = stored if isinstance(stored, dict) else {}
        learned = self._restore(stored)
        if resumed_attempt is not None and not resumed_finished:
            if stored.get("flush") is True:
                self.notices += 1
            else:
                self.interruptions += 1
            self.interruptions += max(0, attempt - resumed_attempt - 1)
        if learned:
            self._decide(learned=True)

    def step_done(self, seconds: float, busy: bool = False) -> None:
        """A training step took `seconds` (callbacks included), `busy`: with a commit in flight.

        The attempt's first step, which traces, is left out. After a commit
        finished, checks that a flush still fits the notice windows.
        """
        if self._first_step:
            self._first_step = False
            return
        with self._lock:
            if not busy:
                if self._slowing is not None:  # the commit those steps shared the machine with is done
                    self._slowdowns.append(self._slowing)
                    self._slowdown_total += self._slowing
                    self._slowing = None
                self._steps.append(seconds)
            elif len(self._steps) >= MIN_SAMPLES:  # against the step time of the moment, not of another load
                self._slowing = (self._slowing or 0.0) + seconds - statistics.median(self._steps)
            check, self._commit_measured = self._commit_measured, False
        estimate = self.flush_estimate() if check else None
        if estimate is not None:
            message = self.deadline.check(*estimate)
            if message:
                self._echo(message)

    def saved(self, global_step: int, seconds: float, overhead: bool = True, early: bool = False) -> None:
        """A commit was queued after `global_step`; it cost the training thread `seconds`.

        `overhead=False` for saves that do not slow training down (the final
        save, a preemption flush). Decides the interval again.
        """
        with self._lock:
            self.last_commit_step = global_step
            self.saves += 1
            self.attempt_saves += 1
            self.early_saves += early
            if overhead:
                self._saves.append(seconds)
                self.save_seconds_total += seconds
        self._decide()

    def committed(self, report) -> None:
        """A background commit finished (`CommitReport`); called on the writer's thread."""
        total = sum(report.seconds.values())
        flush_like = total - report.seconds.get("prune", 0.0)  # a preemption flush does not prune
        with self._lock:
            self._commits.append((total, flush_like, report.nbytes))
            self._commit_measured = True

    # -- what it knows ----------------------------------------------------------------------

    def uptime_seconds(self) -> float:
        return self.uptime_before + (self._clock() - self.started)

    def overhead(self) -> float:
        """The share of this attempt's training time its saves cost: on the training thread, and in steps
        slowed down while commits were in flight (against the median step without one)."""
        elapsed = self._clock() - self.started
        with self._lock:
            slowdown = max(0.0, self._slowdown_total + (self._slowing or 0.0))
        return (self.save_seconds_total + slowdown) / elapsed if elapsed > 0 else 0.0

    def flush_estimate(self) -> tuple[float, int, float] | None:
        """`(seconds, bytes, bytes per second)` a flush would take now, from the measured commits
        and step time (the step in progress finishes first), or None before a commit was measured."""
        with self._lock:
            if not self._commits:
                return None
            seconds = statistics.median(c[1] for c in self._commits)
            nbytes = self._commits[-1][2]
            step = statistics.median(self._steps) if self._steps else 0.0
        return step + seconds, nbytes, nbytes / seconds if seconds > 0 else math.inf

    def flush_seconds(self) -> float | None:
        """What a flush would take now, in seconds (None before a commit was measured)."""
        estimate = self.flush_estimate()
        return estimate[0] if estimate else None

    def state(self, flush: bool = False) -> dict[str, Any]:
        """JSON for the checkpoint: the measurements, the interval, the interruptions seen.

        `flush` marks a preemption flush, so that the next attempt counts the
        interruption as one with notice.
        """
        m = self.measurements()
        estimate = self.flush_estimate()
        overhead = self.overhead()
        with self._lock:
            commit_seconds = statistics.median(c[1] for c in self._commits) if self._commits else None
            this_attempt = {
                "attempt": self.attempt, "step_seconds": m.step_seconds, "save_seconds": m.save_seconds,
                "commit_seconds": m.commit_seconds, "commit_bytes": self._commits[-1][2] if self._commits else None,
                "commit_bytes_per_second": estimate[2] if estimate and math.isfinite(estimate[2]) else None,
                "saves": self.attempt_saves, "save_seconds_total": self.save_seconds_total,
                "training_seconds": self._clock() - self.started, "overhead": overhead,
            }
        return {
            "policy": self.policy.every_steps,
            "max_overhead": self.policy.max_overhead,
            "interval": self.interval.as_dict(),
            "step_seconds": m.step_seconds,
            "save_seconds": m.save_seconds,
            "slowdown_seconds": m.slowdown_seconds,
            "commit_seconds": m.commit_seconds,
            "flush_commit_seconds": commit_seconds,
            "commit_bytes": this_attempt["commit_bytes"],
            "flush_seconds": estimate[0] if estimate else None,
            "uptime_seconds": m.uptime_seconds,
            "interruptions": self.interruptions,
            "notices": self.notices,
            "saves": self.saves,
            "early_saves": self.early_saves,
            "flush": flush,
            "windows": [window.as_dict() for window in self.deadline.windows],
            "attempts": (self.earlier_attempts + [this_attempt])[-ATTEMPTS_KEPT:],
        }

    # -- inside ----------------------------------------------------------------------

    def _restore(self, stored: dict) -> bool:
        """Take what an earlier attempt measured; returns whether it had measured a save."""
        self.uptime_before = _seconds(stored.get("uptime_seconds")) or 0.0
        self.interruptions = _count(stored.get("interruptions"))
        self.notices = _count(stored.get("notices"))
        self.saves = _count(stored.get("saves"))
        self.early_saves = _count(stored.get("early_saves"))
        attempts = stored.get("attempts")
        self.earlier_attempts = [a for a in attempts if isinstance(a, dict)][-ATTEMPTS_KEPT + 1:] \
            if isinstance(attempts, list) else []
        step, save = _seconds(stored.get("step_seconds")), _seconds(stored.get("save_seconds"))
        slowdown = _seconds(stored.get("slowdown_seconds"))
        commit, flush_like = _seconds(stored.get("commit_seconds")), _seconds(stored.get("flush_commit_seconds"))
        nbytes = _count(stored.get("commit_bytes"))
        with self._lock:
            if step is not None:  # as a few samples, so that the next slowdown is measured at once
                self._steps.extend([step] * MIN_SAMPLES)
            if slowdown is not None:
                self._slowdowns.append(slowdown)
            if save is not None:
                self._saves.append(save)
            if commit is not None:
                self._commits.append((commit, flush_like if flush_like is not None else commit, nbytes))
        return step is not None and save is not None

    def _decide(self, learned: bool = False) -> None:
        if not self.auto:
            return
        new = choose_interval(self.measurements(), self.policy.max_overhead)
        current = self.interval
        ratio = new.steps / current.steps
        if (current.reason == "first save" and new.reason != "first save") or ratio >= LONGER or ratio <= SHORTER:
            self.interval = new
            self._echo(f"checkpoints {new.describe()}" + (" (measured by earlier attempts)" if learned else ""))


def describe_state(stored: dict) -> list[str]:
    """`status` lines for the cadence state of a checkpoint: the interval and why, the flush against its windows.

    Example:
        >>> stored = {"policy": "auto", "interval": {"steps": 25, "reason": "budget", "seconds": 0.5,
        ...           "why": "a save costs training 12 ms"}, "flush_seconds": 0.8, "commit_bytes": 25e6,
        ...           "windows": [{"name": "the grace period", "seconds": 30.0, "fix": "..."}], "interruptions": 2,
        ...           "notices": 1, "early_saves": 1}
        >>> print("\\n".join(describe_state(stored)))
        saves      every 25 steps (~500 ms): a save costs training 12 ms (every_steps="auto")
        flush      ~0.8 s for 25.0 MB (measured), within the grace period (30 s)
        interrupted 2 times without notice, 1 with notice; 1 early save on a warning
    """
    lines = []
    interval = stored.get("interval")
    if isinstance(interval, dict) and isinstance(interval.get("steps"), int) and isinstance(interval.get("why"), str):
        described = Interval(interval["steps"], str(interval.get("reason")), interval["why"],
                             _seconds(interval.get("seconds"))).describe()
        lines.append(f"saves      {described}" + (' (every_steps="auto")' if stored.get("policy") == "auto" else ""))
    flush = _seconds(stored.get("flush_seconds"))
    if flush is not None:
        stored_windows = stored.get("windows")
        windows = [w for w in stored_windows if isinstance(w, dict) and _seconds(w.get("seconds")) is not None] \
            if isinstance(stored_windows, list) else []
        short = [w for w in windows if flush > w["seconds"]]
        named = lambda some: ", ".join(f"{w.get('name')} ({w['seconds']:g} s)" for w in some)  # noqa: E731
        verdict = f", longer than {named(short)}" if short else f", within {named(windows)}" if windows else ""
        size = format_size(_count(stored.get("commit_bytes")))
        lines.append(f"flush      ~{flush:.1f} s for {size} (measured){verdict}")
    killed, noticed, early = (_count(stored.get(k)) for k in ("interruptions", "notices", "early_saves"))
    if killed or noticed or early:
        lines.append(f"interrupted {killed} time{'s' if killed != 1 else ''} without notice, {noticed} with notice; "
                     f"{early} early save{'s' if early != 1 else ''} on a warning")
    return lines


def _seconds(value) -> float | None:
    """A stored duration, if it is one (what a checkpoint holds is input: anything else is ignored)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _count(value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _duration(seconds: float | None) -> str:
    """`12 ms`, `2.4 s`, `3.5 min`, `1.2 h`."""
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

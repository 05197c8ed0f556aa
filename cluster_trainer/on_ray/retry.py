"""What the driver does after an attempt ends: start another (at once, or after a backoff), or stop.

Plain code without Ray, so its rules are tested directly:

- a preemption (a drained node, `RayActorError.preempted`, the loop's
  "preempted" status) is not a failure: it counts against `max_preemptions`
  (unlimited by default) and the next attempt starts at once;
- a real failure (an exception in training, a killed actor, a node lost
  without notice) counts against `max_failures`, and the next attempt starts
  after an exponential backoff (2 s, 4 s, 8 s, ... at most 60 s);
- bad input (exit 2) is never retried, and a superseded run (exit 3: another
  process resumed it) stops;
- after the driver was asked to stop (Ctrl-C, SIGTERM), nothing is retried.

Example:
    >>> policy = RetryPolicy(max_failures=1)
    >>> policy.after("preempted", 1, "its node was drained").message
    'actor 1 preempted: its node was drained; starting actor 2 (1 preemption(s), no limit; 0 failure(s), at most 1)'
    >>> policy.after("failed", 2, "a worker died").delay
    2.0
    >>> decision = policy.after("failed", 3, "a worker died")
    >>> decision.retry, decision.exit_code
    (False, 1)
"""

from __future__ import annotations

import dataclasses

from cluster_trainer.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_PREEMPTED, EXIT_SUPERSEDED, ConfigError

BACKOFF_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Decision:
    """Retry after `delay` seconds (`retry`), or stop with `exit_code`; `message` says which and why."""

    retry: bool
    message: str
    delay: float = 0.0
    exit_code: int | None = None


@dataclasses.dataclass
class RetryPolicy:
    """Separate budgets for preemptions and failures, and the backoff between failed attempts.

    Args:
        max_failures: failures retried (with backoff) before giving up.
        max_preemptions: preemptions retried before stopping with exit code 75 (None: no limit).
        storage: the run's URI, named in the give-up message.
    """

    max_failures: int = 3
    max_preemptions: int | None = None
    storage: str = "the run's storage"
    backoff_seconds: float = BACKOFF_SECONDS
    backoff_max_seconds: float = BACKOFF_MAX_SECONDS
    preemptions: int = 0
    failures: int = 0

    def __post_init__(self):
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < 0:
            raise ConfigError(f"--max-failures must be an integer >= 0, got {self.max_failures!r}")
        limit = self.max_preemptions
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"--max-preemptions must be an integer >= 0 (or unset: no limit), got {limit!r}")

    def after(self, kind: str, number: int, message: str, stop_reason: str | None = None,
              noun: str = "actor") -> Decision:
        """The decision after attempt `number` (`noun` says what it was: "actor", "group") ended as `kind`.

        `kind` is one of preempted, failed, bad_input, superseded; `stop_reason` is set
        once the driver was asked to stop (e.g. "SIGTERM").
        """
        what, following = f"{noun} {number}", f"{noun} {number + 1}"
        if kind == "bad_input":
            return Decision(False, message, exit_code=EXIT_BAD_INPUT)
        if kind == "superseded":
            return Decision(False, message, exit_code=EXIT_SUPERSEDED)
        if stop_reason is not None:
            code = EXIT_FAILURE if kind == "failed" else EXIT_PREEMPTED
            return Decision(False, f"stopped by {stop_reason}: {message}. Run the same command again to resume",
                            exit_code=code)
        if kind == "preempted":
            self.preemptions += 1
            if self.max_preemptions is not None and self.preemptions > self.max_preemptions:
                return Decision(False, f"{what} preempted: {message}; that is {self.preemptions} preemption(s), more "
                                       f"than --max-preemptions {self.max_preemptions}. The state is committed: run "
                                       "the same command again to resume", exit_code=EXIT_PREEMPTED)
            return Decision(True, f"{what} preempted: {message}; starting {following} ({self.budget()})")
        if kind != "failed":
            raise ValueError(f"unknown attempt outcome {kind!r}")
        self.failures += 1
        if self.failures > self.max_failures:
            return Decision(False, f"{what} failed: {message}; that is {self.failures} failure(s), more than "
                                   f"--max-failures {self.max_failures}: giving up. The run keeps its last committed "
                                   f"checkpoint under {self.storage}", exit_code=EXIT_FAILURE)
        delay = min(self.backoff_seconds * 2 ** (self.failures - 1), self.backoff_max_seconds)
        return Decision(True, f"{what} failed: {message}; starting {following} in {delay:.0f}s, resuming from "
                              f"the last committed checkpoint ({self.budget()})", delay=delay)

    def budget(self) -> str:
        limit = "no limit" if self.max_preemptions is None else f"at most {self.max_preemptions}"
        return f"{self.preemptions} preemption(s), {limit}; {self.failures} failure(s), at most {self.max_failures}"

"""How the workers of a multi-worker run take the same decisions after the same step.

Every worker runs the same loop, and every step is a collective (the gradient
all-reduce): a worker that leaves the loop while the others go on leaves them
blocked. So whatever one worker learns alone (a preemption notice on its node,
that its attempt was superseded, that a checkpoint is wanted now) is shared,
and every worker acts on the same `Agreement` after the same step:

- Each worker casts its `Vote` before a step, and when a notice arrives (a
  small variable, rewritten only when the vote changes). The step reduces its losses and metrics over every
  replica anyway; under a multi-worker strategy it packs them and the votes of
  every worker into that one all-reduce (`keras_compat.fix_multi_worker_step_reduction`),
  so every worker gets every vote with the step's logs, at no extra collective.
  Measured on 2 loopback workers, one packed all-reduce made the step faster
  than Keras's one all-reduce per metric, and a separate all-reduce for the
  votes alone would have cost ~8-20% of a small model's step.
- Where there is no step (the end of an epoch, after validation; a step that
  returns no logs dict), `Group.agree` exchanges the votes in a collective of its own.
- What only the chief knows or does (which checkpoint to resume from, the
  attempt it registered, whether its final commit succeeded) reaches the others
  through `Group.from_chief`, which also raises the chief's error on every
  worker, in its own words, instead of leaving them waiting.

With one worker the same calls are local and cost nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from cluster_trainer import keras_compat
from cluster_trainer.devices import local_replica_ids
from cluster_trainer.errors import EXIT_FAILURE, ClusterTrainerError
from cluster_trainer.workers import Workers

_MESSAGE_BYTES = 400  # the chief's error message, as every worker prints it
_VOTE_FIELDS = 4  # has notice, seconds left, superseded, commit


class WorkerLostError(ClusterTrainerError):
    """Another worker stopped answering (killed, or its machine gone: its connection refused, or its
    heartbeats missed); the group cannot go on, and starting all workers again resumes from the last commit."""

    exit_code = EXIT_FAILURE


# What a collective raises when a peer is gone: its connection refused, or its heartbeats missed
# (no collective timeout is set, see devices.py).
PEER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                    tf.errors.AbortedError)


def peer_lost_reason(error: tf.errors.OpError) -> str:
    """The line of a collective's error that says why: "...tasks are unhealthy (stopped sending
    heartbeats): /job:worker/replica:0/task:1", "...Connection refused", a timeout.

    Example:
        >>> message = "Graph execution error:\\n\\nCollective ops is aborted by: peer gone:\\n/job:worker/task:1\\nmore"
        >>> peer_lost_reason(tf.errors.UnavailableError(None, None, message))
        'peer gone: /job:worker/task:1'
    """
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "aborted by:" in line:
            reason = line.split("aborted by:", 1)[1].strip()
            if reason.endswith(":") and i + 1 < len(lines):
                reason += " " + lines[i + 1]
            return reason[:300]
    useful = [line for line in lines if not line.startswith(("Graph execution error", "Detected at node", "File "))]
    return (useful[0] if useful else type(error).__name__)[:300]


class ChiefError(ClusterTrainerError):
    """The chief (worker 0) stopped with an error; this worker stops with the same exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class Vote:
    """What one worker brings to an agreement.

    Attributes:
        notice_seconds_left: this worker has a preemption notice, with that many seconds
            before its deadline (None: no notice).
        superseded: (the chief) a later attempt of the run registered; nobody may write.
        commit: asks for a checkpoint at this point (the chief's own cadence, a soft notice).
    """

    notice_seconds_left: float | None = None
    superseded: bool = False
    commit: bool = False


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What every worker does after an agreement point: the same, on every worker.

    Attributes:
        noticed_by: the workers that have a preemption notice; any one stops the group.
        seconds_left: the least time left before a noticed worker's deadline.
        superseded: the group's attempt was superseded: stop without writing.
        commit: commit a checkpoint here.
    """

    noticed_by: tuple[int, ...] = ()
    seconds_left: float | None = None
    superseded: bool = False
    commit: bool = False

    @property
    def stop(self) -> bool:
        return bool(self.noticed_by)


def _row(vote: Vote) -> list[float]:
    left = vote.notice_seconds_left
    return [left is not None, left or 0.0, vote.superseded, vote.commit]


def _agreement(table: np.ndarray) -> Agreement:
    """The agreement a table of every worker's vote row says (rounded: a step averages the votes)."""
    noticed = tuple(int(i) for i in np.flatnonzero(np.round(table[:, 0])))
    return Agreement(
        noticed_by=noticed,
        seconds_left=float(min(table[i, 1] for i in noticed)) if noticed else None,
        superseded=bool(np.round(table[:, 2]).any()),
        commit=bool(np.round(table[:, 3]).any()),
    )


class Group:
    """This process's place in a run's group of workers, and the collectives they agree through.

    Every method that takes part in a collective must be called by every worker at the same
    point of the loop. With `workers=None` (one process) they are local.

    Args:
        strategy: the run's strategy (a MultiWorkerMirroredStrategy when `workers` is given).
        workers: the group, or None for a run in one process.
    """

    def __init__(self, strategy: tf.distribute.Strategy, workers: Workers | None):
        self.strategy = strategy
        self.workers = workers
        self.index = workers.index if workers else 0
        self.count = workers.count if workers else 1
        self.local_replica_ids = local_replica_ids(strategy)
        self._cast: Vote | None = None
        self._cast_lock = threading.RLock()  # re-entrant: a signal handler may cast while the main thread is casting
        if workers is None:
            return
        first = self.local_replica_ids[0]
        # This worker's row of the vote table, zeros elsewhere: the steps sum it over workers.
        self._votes = tf.Variable(tf.zeros([self.count, _VOTE_FIELDS]), trainable=False, name="cluster_trainer_votes")
        keras_compat.fix_multi_worker_step_reduction(votes=self._votes, voting_replica=first)

        @tf.function
        def exchange(table):
            def on_replica(table):
                context = tf.distribute.get_replica_context()
                # One replica per worker contributes its row; the sum is every worker's row.
                mine = tf.cast(tf.equal(context.replica_id_in_sync_group, first), table.dtype)
                return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(table) * mine)

            return strategy.run(on_replica, args=(table,))

        self._exchange_fn = exchange

    def read_votes_after(self, model) -> None:
        """Have each step read the votes once it has updated `model`'s variables (see `cast`)."""
        if self.multi_worker:
            variables = model.trainable_variables
            keras_compat.read_votes_after(variables[-1] if variables else None)

    @property
    def multi_worker(self) -> bool:
        return self.workers is not None

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        """`2 workers x 1 device` (or `2 devices` in one process), for messages."""
        local = len(self.local_replica_ids)
        devices = f"{local} device{'s' if local != 1 else ''}"
        return f"{self.count} workers x {devices}" if self.multi_worker else devices

    def exchange(self, row: Sequence[float]) -> np.ndarray:
        """Every worker's `row` (the same length on each), as a table with a row per worker. A collective."""
        table = np.zeros((self.count, len(row)), np.float64)
        table[self.index] = row
        if not self.multi_worker:
            return table
        result = self._exchange_fn(tf.constant(table))
        return self.strategy.experimental_local_results(result)[0].numpy()

    # -- agreements between steps ------------------------------------------------

    def cast(self, vote: Vote) -> None:
        """This worker's vote, carried by the next step that reads it (to every worker).

        May be called from another thread while a step runs (a notice's): the step reads the
        votes at its end, once its update is applied (`read_votes_after`), so a notice cast during
        a step rides that step unless it comes in the step's last moments.
        """
        if not self.multi_worker:
            return
        with self._cast_lock:
            if vote != self._cast:
                self._votes.assign(self._table(_row(vote)))
                self._cast = vote

    def take_votes(self, logs) -> np.ndarray | None:
        """The votes a step carried, taken out of its `logs`; None with one worker, or from a step
        that carried none (it did not return a dict of logs)."""
        table = logs.pop(keras_compat.STEP_VOTES, None) if self.multi_worker and isinstance(logs, dict) else None
        return np.asarray(table) if table is not None else None

    def agreement_from(self, votes: np.ndarray) -> Agreement:
        """The agreement every worker reaches from the same votes (a step's)."""
        return _agreement(votes)

    def agree(self, vote: Vote) -> Agreement:
        """Every worker's vote, combined, in a collective of its own: where no step carries the votes."""
        if not self.multi_worker:
            left = vote.notice_seconds_left
            return Agreement((0,) if left is not None else (), left, vote.superseded, vote.commit)
        return _agreement(self.exchange(_row(vote)))

    def _table(self, row: list[float]) -> np.ndarray:
        table = np.zeros((self.count, len(row)), np.float32)
        table[self.index] = row
        return table

    # -- what only the chief knows ---------------------------------------------------

    def from_chief(self, produce: Callable[[], Sequence[float]], size: int) -> list[float]:
        """`produce()` run on the chief, its `size` numbers given to every worker. A collective.

        If `produce` raises on the chief, every other worker raises `ChiefError` with the
        chief's message and exit code (the chief re-raises its own error).
        """
        if not self.multi_worker:
            return [float(v) for v in produce()]
        row = np.zeros(2 + size + _MESSAGE_BYTES)
        error: BaseException | None = None
        if self.is_chief:
            try:
                values = list(produce())
                assert len(values) == size, (values, size)
                row[2:2 + size] = values
            except BaseException as e:  # every worker must hear of it, whatever it is
                error = e
                message = str(e) if isinstance(e, ClusterTrainerError) else f"{type(e).__name__}: {e}"
                encoded = np.frombuffer(message.encode()[:_MESSAGE_BYTES], np.uint8)
                row[0] = 1
                row[1] = getattr(e, "exit_code", EXIT_FAILURE)
                row[2 + size:2 + size + len(encoded)] = encoded
        chief = self.exchange(row)[0]
        if error is not None:
            raise error
        if chief[0]:
            text = bytes(chief[2 + size:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
            raise ChiefError(f"the chief (worker 0) stopped: {text}", int(chief[1]))
        return [float(v) for v in chief[2:2 + size]]

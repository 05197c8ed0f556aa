"""Commit checkpoints in the background: training waits only for the copy to host memory.

`save()` takes state already copied to host memory (NumPy arrays and JSON
data) and returns as soon as the commit is queued. At most `max_in_flight`
commits run at once; a save beyond that waits for the oldest, and the time it
waited is logged. A commit that fails after the storage layer's retries is
logged loudly and training goes on: the next save writes everything again.
`wait()` (the final save, a preemption flush) blocks until all are done and
raises if the last one failed, or if a later attempt superseded this one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from cluster_trainer.checkpoint.fencing import SupersededError
from cluster_trainer.checkpoint.store import CheckpointStore, CommitReport
from cluster_trainer.errors import CheckpointWriteError

log = logging.getLogger(__name__)


class CheckpointWriter:
    """Queues commits to a `CheckpointStore` on a background thread.

    Example:
        >>> import numpy as np
        >>> from cluster_trainer.storage import Storage
        >>> writer = CheckpointWriter(CheckpointStore(Storage("memory://doc-writer/run")))
        >>> writer.save(sequence=1, step=1, attempt=1, tensors={"w": np.zeros(2)}, state={})
        >>> writer.wait()
        'c00000001-s0000000001-a0001'
    """

    def __init__(self, store: CheckpointStore, max_in_flight: int = 1,
                 on_committed: Callable[[CommitReport], None] | None = None):
        self.store = store
        self.on_committed = on_committed  # told what each commit wrote and took, on the writer's thread
        self._slots = threading.Semaphore(max_in_flight)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="checkpoint")
        self._pending: list[concurrent.futures.Future] = []
        self.last_committed: str | None = None
        self.last_error: BaseException | None = None
        self.superseded: SupersededError | None = None
        self.stall_seconds = 0.0  # total time save() blocked on earlier commits

    def save(self, **commit_args: Any) -> None:
        """Queue a commit (arguments of `CheckpointStore.commit`); blocks only while too many are in flight."""
        if self.superseded is not None:
            raise self.superseded
        started = time.monotonic()
        self._slots.acquire()
        waited = time.monotonic() - started
        self.stall_seconds += waited
        if waited > 0.5:
            log.info("checkpoint %d waited %.2fs for the previous upload to finish", commit_args["sequence"], waited)
        future = self._executor.submit(self._commit, commit_args)
        self._pending = [f for f in self._pending if not f.done()] + [future]

    def in_flight(self) -> int:
        """Commits queued or running (called from the thread that saves)."""
        return sum(1 for future in self._pending if not future.done())

    def _commit(self, commit_args: dict[str, Any]) -> None:
        try:
            self.last_committed = self.store.commit(**commit_args)
            self.last_error = None
            report = self.store.last_commit
            if self.on_committed is not None and report is not None and report.name == self.last_committed:
                self.on_committed(report)
        except SupersededError as e:
            self.superseded = e
        except Exception as e:  # the store is down or full: training goes on, the next save tries again
            self.last_error = e
            log.error(
                "CHECKPOINT NOT SAVED (sequence %d, step %d): %s: %s. Training continues; the next save retries. "
                "Last committed: %s", commit_args["sequence"], commit_args["step"], type(e).__name__, e,
                self.last_committed or "none",
            )
        finally:
            self._slots.release()

    def wait(self) -> str | None:
        """Block until every queued commit is done; raise if the last failed or we were superseded."""
        for future in self._pending:
            future.result()
        self._pending = []
        if self.superseded is not None:
            raise self.superseded
        if self.last_error is not None:
            raise CheckpointWriteError(
                f"the final checkpoint could not be written to {self.store.storage.uri}: "
                f"{type(self.last_error).__name__}: {self.last_error}. Last committed: {self.last_committed or 'none'}"
            ) from self.last_error
        return self.last_committed

    def close(self) -> None:
        self._executor.shutdown(wait=True)

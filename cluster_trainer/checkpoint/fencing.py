"""One writer per run: attempts are numbered, and a superseded attempt's commits never count.

Every process that trains a run first registers an attempt,
`attempts/a000002.json`, saying which checkpoint it resumed from. From then on:

- a writer checks, before each commit, that no later attempt is registered;
  if one is, it stops without committing (`SupersededError`);
- a reader ignores any checkpoint of attempt `k` whose sequence is past the
  checkpoint a later attempt resumed from: it was written by a process that had
  already been replaced (a zombie whose commit raced the check above).

This needs no preconditions from the store (the GCS emulator ignores them).
Where the store has them (local exclusive create, S3 `If-None-Match`), two
processes can never register the same number; elsewhere a read-back of the
registration catches all but a near-simultaneous start.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

from cluster_trainer.errors import ClusterTrainerError, EXIT_SUPERSEDED
from cluster_trainer.storage import Storage

ATTEMPTS = "attempts"
_NAME = re.compile(r"^a(\d{6})\.json$")


class SupersededError(ClusterTrainerError):
    """A later attempt of this run has started: this process must stop writing."""

    exit_code = EXIT_SUPERSEDED


def _registered(storage: Storage) -> dict[int, str]:
    found = {}
    for path in storage.list_files(ATTEMPTS, maxdepth=1):
        match = _NAME.match(path.rsplit("/", 1)[-1])
        if match:
            found[int(match[1])] = path
    return found


def latest_attempt(storage: Storage) -> int:
    return max(_registered(storage), default=0)


def register_attempt(storage: Storage, resumed_from_sequence: int) -> int:
    """Allocate the next attempt number for this process and record where it resumed."""
    for _ in range(100):
        attempt = latest_attempt(storage) + 1
        record = {
            "attempt": attempt,
            "resumed_from_sequence": resumed_from_sequence,
            "host": socket.gethostname(),
            "started_at": time.time(),
            "nonce": uuid.uuid4().hex,
        }
        data = json.dumps(record, sort_keys=True).encode()
        path = f"{ATTEMPTS}/a{attempt:06d}.json"
        try:
            storage.put(path, data, exclusive=True)
        except FileExistsError:
            # Taken, unless it is our own put that went through before a retried timeout.
            if storage.get(path) != data:
                continue
        if storage.get(path) == data:  # a store without preconditions: did a concurrent writer win?
            return attempt
    raise ClusterTrainerError(f"could not register an attempt under {storage.path(ATTEMPTS)}: too many concurrent starts")


# Registrations of attempts older than the newest never change (each was created once, exclusively):
# read each once per process, not at every commit.
_settled: dict[str, int] = {}


def cutoffs(storage: Storage) -> dict[int, int]:
    """For each superseded attempt, the last sequence of its that still counts.

    Lists the attempts afresh each time (an attempt registered a moment ago must
    count before anything is pruned); only the settled registrations are cached.
    """
    registered = _registered(storage)
    newest = max(registered, default=0)
    resumed_from = {}
    for attempt, path in registered.items():
        key = storage.path(path)
        if key in _settled:
            resumed_from[attempt] = _settled[key]
            continue
        try:
            resumed_from[attempt] = json.loads(storage.get(path))["resumed_from_sequence"]
        except (ValueError, KeyError, FileNotFoundError):
            continue
        if attempt < newest:
            _settled[key] = resumed_from[attempt]
    limits: dict[int, int] = {}
    later_minimum = None
    for attempt in sorted(resumed_from, reverse=True):
        if later_minimum is not None:
            limits[attempt] = later_minimum
        later_minimum = resumed_from[attempt] if later_minimum is None else min(later_minimum, resumed_from[attempt])
    return limits


def check_not_superseded(storage: Storage, attempt: int) -> None:
    newest = latest_attempt(storage)
    if newest > attempt:
        raise SupersededError(
            f"attempt {attempt} of {storage.uri} was superseded by attempt {newest} (another process resumed the run); "
            "stopping without writing"
        )

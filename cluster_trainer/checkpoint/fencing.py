"""One writer per run: attempts are numbered, and a superseded attempt's commits never count.

Every process that trains a run first registers an attempt,
`attempts/a000002.json`, saying which checkpoint it resumed from and which run
it belongs to. From then on:

- a writer checks, before each commit, that no later attempt is registered;
  if one is (any record file, even one that does not parse: fail closed), it
  stops without committing (`SupersededError`);
- a reader ignores any checkpoint of attempt `k` whose sequence is past the
  checkpoint a later attempt resumed from: it was written by a process that had
  already been replaced (a zombie whose commit raced the check above).

Records are input too (whoever can write the run's prefix can plant one). A
record counts for the second rule only if it parses and belongs to this run,
and, where it would make committed checkpoints of earlier attempts not count,
only if it is believable: the attempt committed checkpoints of its own, or the
checkpoint it says it resumed from is committed by an earlier attempt. Anything
else is damaged: warned about and ignored, so a stray
`resumed_from_sequence: 0` can never hide a run's checkpoints and restart it
from scratch. The run's identity is the `run_id` its earliest attempt recorded.

This needs no preconditions from the store (the GCS emulator ignores them).
Where the store has them (local exclusive create, S3 `If-None-Match`), two
processes can never register the same number; elsewhere a read-back of the
registration catches all but a near-simultaneous start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import time
import uuid

from cluster_trainer.errors import ClusterTrainerError, EXIT_SUPERSEDED
from cluster_trainer.storage import Storage

ATTEMPTS = "attempts"
_NAME = re.compile(r"^a(\d{6,})\.json$")
RECORD_LIMIT = 64 * 1024  # a record is ~200 bytes; never read more than this
log = logging.getLogger(__name__)


class SupersededError(ClusterTrainerError):
    """A later attempt of this run has started: this process must stop writing."""

    exit_code = EXIT_SUPERSEDED


def _registered(storage: Storage) -> dict[int, str]:
    found = {}
    for path in storage.list_files(ATTEMPTS, maxdepth=1):
        match = _NAME.match(path.rsplit("/", 1)[-1])
        if match and int(match[1]) > 0:
            found[int(match[1])] = path
    return found


def latest_attempt(storage: Storage) -> int:
    return max(_registered(storage), default=0)


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """What an attempt recorded when it started: where it resumed, and the run it belongs to."""

    attempt: int
    resumed_from_sequence: int
    run_id: str | None


def register_attempt(storage: Storage, resumed_from_sequence: int, run_id: str | None = None) -> int:
    """Allocate the next attempt number for this process and record where it resumed, and which run it is."""
    for _ in range(100):
        attempt = latest_attempt(storage) + 1
        record = {
            "attempt": attempt,
            "resumed_from_sequence": resumed_from_sequence,
            "run_id": run_id,
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
            if storage.get(path, limit=RECORD_LIMIT) != data:
                continue
        if storage.get(path, limit=RECORD_LIMIT) == data:  # a store without preconditions: did a concurrent writer win?
            return attempt
    raise ClusterTrainerError(f"could not register an attempt under {storage.path(ATTEMPTS)}: too many concurrent starts")


def _parse(data: bytes, attempt: int) -> AttemptRecord | None:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    resumed_from, run_id = record.get("resumed_from_sequence"), record.get("run_id")
    if type(resumed_from) is not int or resumed_from < 0 or record.get("attempt", attempt) != attempt:
        return None
    if run_id is not None and not isinstance(run_id, str):
        return None
    return AttemptRecord(attempt, resumed_from, run_id)


# Registrations of attempts older than the newest never change (each was created once, exclusively):
# read each once per process, not at every commit.
_settled: dict[str, AttemptRecord | None] = {}
_warned: set[str] = set()


def read_records(storage: Storage) -> dict[int, AttemptRecord | None]:
    """Every registered attempt's record, None for one that does not parse.

    Lists the attempts afresh each time (an attempt registered a moment ago must
    count before anything is pruned); only the settled registrations are cached.
    """
    registered = _registered(storage)
    newest = max(registered, default=0)
    records: dict[int, AttemptRecord | None] = {}
    for attempt, path in registered.items():
        key = storage.path(path)
        if key in _settled:
            records[attempt] = _settled[key]
            continue
        try:
            records[attempt] = _parse(storage.get(path, limit=RECORD_LIMIT), attempt)
        except FileNotFoundError:
            continue
        except ClusterTrainerError:  # a link or a device where a record should be
            records[attempt] = None
        if attempt < newest:
            _settled[key] = records[attempt]
    return records


def run_identity(records: dict[int, AttemptRecord | None]) -> str | None:
    """The run's id, as its earliest attempt that recorded one recorded it (None: no attempt did yet)."""
    return next((r.run_id for _, r in sorted(records.items()) if r is not None and r.run_id), None)


def cutoffs(storage: Storage, committed: list[tuple[int, int]],
            records: dict[int, AttemptRecord | None] | None = None) -> dict[int, int]:
    """For each superseded attempt, the last sequence of its that still counts.

    `committed`: `(sequence, attempt)` of every committed checkpoint. Only believable records
    (see the module's docstring) supersede; a damaged one is warned about once per process.
    """
    records = read_records(storage) if records is None else records
    identity = run_identity(records)
    resumed_from = {}
    for attempt, record in records.items():
        problem = _damage(record, identity, committed)
        if problem is None:
            resumed_from[attempt] = record.resumed_from_sequence
            continue
        key = storage.path(f"{ATTEMPTS}/a{attempt:06d}.json")
        if key not in _warned:
            _warned.add(key)
            log.warning("ignoring attempt record %s: %s", key, problem)
    limits: dict[int, int] = {}
    later_minimum = None
    for attempt in sorted(resumed_from, reverse=True):
        if later_minimum is not None:
            limits[attempt] = later_minimum
        later_minimum = resumed_from[attempt] if later_minimum is None else min(later_minimum, resumed_from[attempt])
    return limits


def _damage(record: AttemptRecord | None, identity: str | None, committed: list[tuple[int, int]]) -> str | None:
    """Why `record` cannot be believed, or None."""
    if record is None:
        return "it does not parse as an attempt record"
    if identity is not None and record.run_id is not None and record.run_id != identity:
        return f"it belongs to run {record.run_id}, not to this run ({identity})"
    earlier = [sequence for sequence, attempt in committed if attempt < record.attempt]
    if all(sequence <= record.resumed_from_sequence for sequence in earlier):
        return None  # it makes no committed checkpoint not count: nothing to judge (its resume point may be pruned)
    if any(attempt == record.attempt for _, attempt in committed):
        return None  # the attempt trained and committed: what it resumed from may have been pruned since
    if record.resumed_from_sequence == 0:
        return "it says it started fresh, but earlier attempts had committed checkpoints"
    if record.resumed_from_sequence in earlier:
        return None
    return f"no committed checkpoint has the sequence {record.resumed_from_sequence} it says it resumed from"


def check_not_superseded(storage: Storage, attempt: int) -> None:
    newest = latest_attempt(storage)
    if newest > attempt:
        raise SupersededError(
            f"attempt {attempt} of {storage.uri} was superseded by attempt {newest} (another process resumed the run); "
            "stopping without writing"
        )

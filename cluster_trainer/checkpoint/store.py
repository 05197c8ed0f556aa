"""Writing, finding, verifying and pruning the checkpoints of one run."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import numpy as np

from cluster_trainer.checkpoint import fencing
from cluster_trainer.checkpoint.format import (
    DEFAULT_SHARD_BYTES,
    MANIFEST,
    MANIFEST_LIMIT,
    Checkpoint,
    EncodedFile,
    checkpoint_name,
    decode,
    encode_files,
    manifest_bytes,
    parse_manifest,
    parse_name,
)
from cluster_trainer.checkpoint.retention import Retention
from cluster_trainer.errors import CheckpointError, StorageError
from cluster_trainer.storage import Storage

PREFIX = "checkpoints"
log = logging.getLogger(__name__)


class ForeignCheckpointError(CheckpointError):
    """A checkpoint written by another run (its `run_id` differs from this run's): skipped, never pruned."""


class _StageClock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = now - self._last
        self._last = now


@dataclasses.dataclass
class CommitReport:
    """What one commit wrote and where its time went (seconds per stage, in order)."""

    name: str
    nbytes: int
    seconds: dict[str, float]

    def stages(self) -> str:
        return ", ".join(f"{stage} {seconds:.3f}s" for stage, seconds in self.seconds.items())

    def __str__(self) -> str:
        return f"{self.name} ({self.nbytes / 1e6:.1f} MB): {self.stages()}"


class CheckpointStore:
    """The checkpoints of the run at `storage`.

    Example:
        >>> store = CheckpointStore(Storage("memory://doc-store/run"), Retention(keep_last=2))
        >>> store.commit(sequence=1, step=5, attempt=1, tensors={"w": np.ones(3, "float32")}, state={})
        'c00000001-s0000000005-a0001'
        >>> store.load_latest().tensors["w"]
        array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, storage: Storage, retention: Retention = Retention(), shard_bytes: int = DEFAULT_SHARD_BYTES,
                 check_state: Callable[[Checkpoint, str], None] | None = None):
        """`check_state(checkpoint, where)` raises `CheckpointError` for a state its reader could not use
        (the run's schema, `cluster_trainer.run_state.check`): such a checkpoint is skipped like a corrupt one."""
        self.storage = storage
        self.retention = retention
        self.shard_bytes = shard_bytes
        self.check_state = check_state
        # Committed manifests already read: metrics and epoch for retention, run_id (or None if unreadable).
        self._manifests: dict[str, dict] = {}
        self.last_commit: CommitReport | None = None

    def _rel(self, name: str, file: str = "") -> str:
        return "/".join(p for p in (PREFIX, name, file) if p)

    # -- writing ---------------------------------------------------------------

    def commit(
        self, *, sequence: int, step: int, attempt: int, tensors: dict[str, np.ndarray], state: dict[str, Any],
        metrics: dict[str, float] | None = None, epoch_end: int | None = None, extra_files: dict[str, bytes] | None = None,
        run_id: str | None = None, position: dict[str, int] | None = None,
        published: dict[str, bytes] | Callable[[], dict[str, bytes]] | None = None, prune: bool = True,
    ) -> str:
        """Write a checkpoint, shards in parallel, and commit it by writing its manifest last.

        Each shard's upload starts as soon as it is encoded. `extra_files`
        (paths relative to the run) are written before the manifest too.
        `published` files (views of the committed state, such as the Parquet
        history; or a function returning them, called here, so that the
        writer's thread encodes them) are written after it, overwriting: a
        failure there is logged and does not undo the commit. Then retention
        prunes, unless `prune` is False (a preemption flush leaves that to the
        next attempt). Raises `SupersededError`, without committing, if a later
        attempt of the run has registered.
        """
        clock = _StageClock()
        name = checkpoint_name(sequence, step, attempt)
        encoded: list[EncodedFile] = []

        def files():
            for file in encode_files(tensors, state, self.shard_bytes):
                encoded.append(file)
                yield self._rel(name, file.name), file.parts
            yield from (extra_files or {}).items()

        self.storage.put_stream(files())
        clock.lap("shards")
        fencing.check_not_superseded(self.storage, attempt)
        clock.lap("fencing")
        manifest = manifest_bytes(sequence=sequence, step=step, attempt=attempt, files=encoded, metrics=metrics,
                                  epoch_end=epoch_end, run_id=run_id, position=position)
        self.storage.put(self._rel(name, MANIFEST), manifest)
        clock.lap("manifest")
        self._manifests[name] = {"metrics": metrics, "epoch_end": epoch_end, "run_id": run_id, "readable": True}
        try:
            self.storage.put_many((published() if callable(published) else published) or {})
        except Exception as e:  # the checkpoint is committed; the views catch up at the next commit
            log.warning("published files not updated after committing %s: %s: %s", name, type(e).__name__, e)
        clock.lap("published")
        if prune:
            try:
                self.prune(current_attempt=attempt)
            except Exception as e:  # committed all the same; the next commit prunes again
                log.warning("pruning after committing %s failed: %s: %s", name, type(e).__name__, e)
            clock.lap("prune")
        self.last_commit = CommitReport(name, sum(f.size for f in encoded), clock.laps)
        log.debug("committed %s", self.last_commit)
        return name

    # -- finding -----------------------------------------------------------------

    def _listing(self) -> tuple[list[str], list[str]]:
        """(committed names newest first, names of directories without a manifest), from one listing."""
        files = self.storage.list_files(PREFIX, maxdepth=2)
        directories, committed = set(), set()
        for path in files:
            parts = path.split("/")
            if len(parts) != 3 or parse_name(parts[1]) is None:
                continue
            directories.add(parts[1])
            if parts[2] == MANIFEST:
                committed.add(parts[1])
        newest_first = sorted(committed, key=lambda n: (parse_name(n)[0], parse_name(n)[2]), reverse=True)
        return newest_first, sorted(directories - committed)

    def highest_sequence(self) -> int:
        """The highest sequence number of any checkpoint directory, committed or not (0 if none).

        A new attempt numbers its commits after it, so they sort after
        everything already written, including checkpoints that failed
        verification or were left half-written.
        """
        committed, uncommitted = self._listing()
        return max((parse_name(name)[0] for name in committed + uncommitted), default=0)

    def committed(self) -> list[str]:
        """Names of the committed checkpoints that count (not from a superseded attempt), newest first.

        Foreign checkpoints (another run's) are among them: only reading a manifest tells them
        apart, which `load_latest` does.
        """
        names, _ = self._listing()
        return self._counting(names)[0]

    def run_id(self) -> str | None:
        """This run's id, as its first attempt recorded it (None before any attempt recorded one)."""
        return fencing.run_identity(fencing.read_records(self.storage))

    def _counting(self, names: list[str], records: dict | None = None) -> tuple[list[str], list[str]]:
        """`names` split into those that count and those a superseded attempt committed after it was
        replaced (which never count), both newest first. `records`: the attempts' (read if not given)."""
        limits = fencing.cutoffs(self.storage, [(parse_name(n)[0], parse_name(n)[2]) for n in names], records)
        valid, superseded = [], []
        for name in names:
            sequence, _, attempt = parse_name(name)
            if attempt in limits and sequence > limits[attempt]:
                log.debug("ignoring %s: written by attempt %d after it was superseded", name, attempt)
                superseded.append(name)
            else:
                valid.append(name)
        return valid, superseded

    def read(self, name: str, run_id: str | None = None) -> Checkpoint:
        """Read (files in parallel) and verify one checkpoint; `CheckpointError` names the bad object.

        Nothing is read past the sizes the manifest gives, and locally nothing through a symbolic
        link. With `run_id`, a checkpoint of another run is `ForeignCheckpointError`, found from
        its manifest before its shards are read.
        """
        where = self.storage.path(self._rel(name))
        try:
            data = self.storage.get(self._rel(name, MANIFEST), limit=MANIFEST_LIMIT + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise CheckpointError(f"{where}/{MANIFEST}: missing") from None
        except StorageError as e:  # a link or a device where the manifest should be
            raise CheckpointError(str(e)) from None
        manifest = self._fail_closed(where, lambda: parse_manifest(name, data, f"{where}/{MANIFEST}"))
        self._remember(name, manifest)
        if run_id is not None and manifest.get("run_id") != run_id:
            raise ForeignCheckpointError(f"{where} belongs to run {manifest.get('run_id')}, not to this run ({run_id})")
        sizes = {self._rel(name, entry["name"]): entry["size"] for entry in manifest["files"]}
        wanted = {self._rel(name, entry["name"]): entry["name"] for entry in manifest["files"]}
        fetched = {}
        try:
            try:
                fetched = self.storage.get_many(list(wanted), limits={r: size + 1 for r, size in sizes.items()})
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                for relative in wanted:  # one is missing: read them one by one, so decode() names it
                    try:
                        fetched[relative] = self.storage.get(relative, limit=sizes[relative] + 1)
                    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                        pass
        except StorageError as e:  # a link or a device where a file should be
            raise CheckpointError(str(e)) from None
        contents = {wanted[relative]: data for relative, data in fetched.items()}
        return self._fail_closed(where, lambda: self._verified(decode(name, manifest, contents, where), where))

    def _verified(self, checkpoint: Checkpoint, where: str) -> Checkpoint:
        if checkpoint.state.get("run_id", checkpoint.manifest.get("run_id")) != checkpoint.manifest.get("run_id"):
            raise CheckpointError(f"{where}/state.json: its run_id differs from the manifest's")
        if self.check_state is not None:
            self.check_state(checkpoint, where)
        return checkpoint

    @staticmethod
    def _fail_closed(where: str, read: Callable[[], Any]) -> Any:
        """`read()`, with whatever it raises that no check foresaw turned into a `CheckpointError`."""
        try:
            return read()
        except CheckpointError:
            raise
        except Exception as e:  # a defect of the checkpoint all the same: skip it, never crash the reader
            raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: {e})") from e

    def _remember(self, name: str, manifest: dict | None) -> None:
        if manifest is None:
            self._manifests[name] = {"metrics": None, "epoch_end": None, "run_id": None, "readable": False}
        else:
            self._manifests[name] = {"metrics": manifest.get("metrics"), "epoch_end": manifest.get("epoch_end"),
                                     "run_id": manifest.get("run_id"), "readable": True}

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint of this run that counts and verifies; None for a new run.

        A damaged checkpoint (corrupt, truncated, larger than its manifest says, crafted) is
        skipped with a warning naming the bad object, and kept for a person to look at; so is
        one of another run (its `run_id` is not the one the run's first attempt recorded). If
        checkpoints of this run exist but none verifies, that is an error: starting over would
        throw the run away.
        """
        problems = []
        for _ in range(5):
            vanished = False
            records = fencing.read_records(self.storage)
            run_id = fencing.run_identity(records)
            for name in self._counting(self._listing()[0], records)[0]:
                try:
                    return self.read(name, run_id)
                except ForeignCheckpointError as e:
                    log.warning("skipping checkpoint %s: %s; it is kept, never pruned", name, e)
                except CheckpointError as e:
                    if not self.storage.exists(self._rel(name, MANIFEST)):
                        vanished = True  # pruned by the run while we read it: not damage; look again
                        continue
                    log.warning("skipping checkpoint %s: %s", name, e)
                    problems.append(str(e))
            if not vanished:
                break
        if problems:
            raise CheckpointError(
                f"no usable checkpoint under {self.storage.path(PREFIX)}: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. "
                "Nothing was deleted; inspect the files or start a new run with another --storage URI"
            )
        return None

    # -- pruning -------------------------------------------------------------------

    def prune(self, current_attempt: int) -> None:
        """Apply retention, delete what superseded attempts committed after they were replaced,
        and what crashed older attempts left uncommitted.

        Only checkpoints whose manifest reads and names this run are ever deleted: another run's,
        or one whose manifest is damaged, is kept for a person to look at. A checkpoint is deleted
        manifest first, so a half-deleted one is never taken for committed. The newest committed
        checkpoint is never deleted, and an attempt that has been superseded deletes nothing.
        """
        records = fencing.read_records(self.storage)  # every registered attempt, damaged ones too
        if max(records, default=0) > current_attempt:
            return  # a zombie: the attempt that replaced it decides
        listed, uncommitted = self._listing()  # one listing per commit
        counting, superseded = self._counting(listed, records)  # a superseded attempt's checkpoints never count
        run_id = fencing.run_identity(records)
        for name in counting + superseded:
            if name not in self._manifests:
                try:
                    data = self.storage.get(self._rel(name, MANIFEST), limit=MANIFEST_LIMIT + 1)
                    self._remember(name, parse_manifest(name, data, name))
                except (CheckpointError, StorageError, FileNotFoundError):
                    self._remember(name, None)

        def ours(name: str) -> bool:
            known = self._manifests[name]
            return known["readable"] and (run_id is None or known["run_id"] == run_id)

        names = [name for name in counting if ours(name)]
        entries = [{"name": name, **self._manifests[name]} for name in names]
        kept = self.retention.kept(entries) | set(names[:1])
        doomed = [name for name in names if name not in kept] + [name for name in superseded if ours(name)]
        for name in doomed:
            self.storage.remove(self._rel(name, MANIFEST))
            self.storage.remove_tree(self._rel(name))
            self._manifests.pop(name, None)
        for name in uncommitted:
            if parse_name(name)[2] < current_attempt:  # never a directory our own writer may be filling
                self.storage.remove_tree(self._rel(name))

"""The checkpoint format: tensor shards and JSON state, committed by a manifest.

Layout under the run::

    checkpoints/
      c00000042-s0000000123-a0002/    one directory per commit: sequence, global step, attempt
        shard-00000.safetensors       tensors, split into shards of bounded size
        state.json                    loop position, callback state, variable index
        MANIFEST.json                 written last: the commit

A checkpoint exists only once its `MANIFEST.json` is in place (written in one
atomic put). The manifest lists every file with its size and SHA-256 and which
shard holds each tensor; readers verify all of them before using anything.
A directory without a manifest is an interrupted write and is ignored; a
checkpoint that fails verification is skipped with a warning naming the bad
object, and the previous committed one is used.

Tensors are stored with safetensors and state as JSON: loading never runs code.
The sequence number counts the run's commits (two can share a global step: the
last batch of an epoch, and the end of that epoch after validation); the attempt
number keeps two processes of one run from ever writing the same directory.
Newest means highest (sequence, attempt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cluster_trainer.errors import CheckpointError
from cluster_trainer.storage import Storage

FORMAT = "cluster-trainer-checkpoint/1"
MANIFEST = "MANIFEST.json"
STATE = "state.json"
PREFIX = "checkpoints"
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
_NAME = re.compile(r"^c(\d{8,})-s(\d{10,})-a(\d{4,})$")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """A committed, verified checkpoint read back into memory."""

    name: str
    sequence: int
    step: int
    attempt: int
    manifest: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, np.ndarray]


def checkpoint_name(sequence: int, step: int, attempt: int) -> str:
    return f"c{sequence:08d}-s{step:010d}-a{attempt:04d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shards(tensors: dict[str, np.ndarray], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Group tensors into shards of at most `shard_bytes` (a larger tensor gets one of its own)."""
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    for key in sorted(tensors):
        array = np.asarray(tensors[key])
        if not array.flags.c_contiguous:  # not np.ascontiguousarray: it turns scalars into shape (1,)
            array = array.copy(order="C")
        if current and current_bytes + array.nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[key] = array
        current_bytes += array.nbytes
    if current or not shards:
        shards.append(current)
    return shards


class CheckpointStore:
    """Writes, lists, verifies and prunes the checkpoints of one run.

    Example:
        >>> store = CheckpointStore(Storage("memory://doc-store/run"), keep_last=2)
        >>> store.commit(sequence=1, step=5, attempt=1, tensors={"w": np.ones(3, "float32")}, state={})
        'c00000001-s0000000005-a0001'
        >>> store.load_latest().tensors["w"]
        array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, storage: Storage, keep_last: int = 3, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.storage = storage
        self.keep_last = keep_last
        self.shard_bytes = shard_bytes

    def _rel(self, name: str, file: str = "") -> str:
        return "/".join(p for p in (PREFIX, name, file) if p)

    def commit(self, *, sequence: int, step: int, attempt: int, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> str:
        """Write a checkpoint and commit it by writing its manifest last; returns its name."""
        started = time.monotonic()
        name = checkpoint_name(sequence, step, attempt)
        files = []
        tensor_shard = {}
        for i, shard in enumerate(_shards(tensors, self.shard_bytes)):
            file = f"shard-{i:05d}.safetensors"
            data = save_safetensors(shard)
            self.storage.put(self._rel(name, file), data)
            files.append({"name": file, "size": len(data), "sha256": _sha256(data)})
            tensor_shard.update({key: file for key in shard})
        state_bytes = json.dumps(state, sort_keys=True, allow_nan=True).encode()
        self.storage.put(self._rel(name, STATE), state_bytes)
        files.append({"name": STATE, "size": len(state_bytes), "sha256": _sha256(state_bytes)})
        manifest = {
            "format": FORMAT,
            "sequence": sequence,
            "step": step,
            "attempt": attempt,
            "committed_at": time.time(),
            "files": files,
            "tensors": tensor_shard,
        }
        self.storage.put(self._rel(name, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        log.debug("committed %s in %.3fs", name, time.monotonic() - started)
        self._prune(keep=name)
        return name

    def committed(self) -> list[str]:
        """Names of checkpoints with a manifest, newest (highest sequence, then attempt) first."""
        names = []
        for name in self.storage.list_dirs(PREFIX):
            match = _NAME.match(name)
            if match and self.storage.exists(self._rel(name, MANIFEST)):
                names.append((int(match[1]), int(match[3]), name))
        return [name for _, _, name in sorted(names, reverse=True)]

    def read(self, name: str) -> Checkpoint:
        """Read and verify one checkpoint; raises `CheckpointError` naming the bad object."""
        try:
            manifest = json.loads(self.storage.get(self._rel(name, MANIFEST)))
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.storage.path(self._rel(name, MANIFEST))}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{name}: unknown checkpoint format {manifest.get('format')!r} (this version reads {FORMAT})")
        contents = {}
        for entry in manifest["files"]:
            file = entry["name"]
            if "/" in file or file.startswith("."):
                raise CheckpointError(f"{name}: manifest names {file!r}, outside the checkpoint directory")
            where = self.storage.path(self._rel(name, file))
            try:
                data = self.storage.get(self._rel(name, file))
            except FileNotFoundError:
                raise CheckpointError(f"{where}: missing") from None
            if len(data) != entry["size"]:
                raise CheckpointError(f"{where}: {len(data)} bytes, manifest says {entry['size']} (truncated?)")
            if _sha256(data) != entry["sha256"]:
                raise CheckpointError(f"{where}: checksum mismatch (corrupt)")
            contents[file] = data
        tensors: dict[str, np.ndarray] = {}
        for file, data in contents.items():
            if file.endswith(".safetensors"):
                tensors.update(load_safetensors(data))
        missing = set(manifest["tensors"]) - set(tensors)
        if missing:
            raise CheckpointError(f"{name}: tensors listed in the manifest are missing: {sorted(missing)[:3]}")
        return Checkpoint(
            name=name,
            sequence=manifest["sequence"],
            step=manifest["step"],
            attempt=manifest["attempt"],
            manifest=manifest,
            state=json.loads(contents[STATE]),
            tensors=tensors,
        )

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; None for a new run.

        A corrupt checkpoint is skipped with a warning (and kept, for a person
        to look at). If checkpoints exist but none verifies, that is an error:
        starting over would silently throw the run away.
        """
        names = self.committed()
        problems = []
        for name in names:
            try:
                return self.read(name)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", name, e)
                problems.append(str(e))
        if problems:
            raise CheckpointError(
                f"no usable checkpoint under {self.storage.path(PREFIX)}: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}. "
                "Nothing was deleted; inspect the files or start a new run with another --storage URI"
            )
        return None

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep_last` committed checkpoints; delete older ones, manifest first."""
        for name in self.committed()[self.keep_last :]:
            if name == keep:
                continue
            self.storage.remove(self._rel(name, MANIFEST))  # uncommit first: never a half-deleted "committed" one
            self.storage.remove_tree(self._rel(name))

"""The checkpoint format: tensor shards and JSON state, committed by a manifest.

Layout under the run::

    checkpoints/
      c00000042-s0000000123-a0002/    one directory per commit: sequence, global step, attempt
        shard-00000.safetensors       tensors, in shards of bounded size
        state.json                    loop position, callback state, variable index
        MANIFEST.json                 written last: the commit

A checkpoint exists only once its `MANIFEST.json` is in place (one atomic put).
The manifest lists every file with its size and SHA-256 and which shard holds
each tensor; readers verify all of them before using anything. Tensors are
safetensors and state is JSON: loading never runs code.

The sequence counts the run's commits (two can share a global step: the last
batch of an epoch, and the end of that epoch after validation); the attempt
keeps two processes of one run from ever writing the same directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cluster_trainer.errors import CheckpointError

FORMAT = "cluster-trainer-checkpoint/1"
MANIFEST = "MANIFEST.json"
STATE = "state.json"
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
NAME = re.compile(r"^c(\d{8,})-s(\d{10,})-a(\d{4,})$")


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


def parse_name(name: str) -> tuple[int, int, int] | None:
    """`(sequence, step, attempt)` of a checkpoint directory name, or None."""
    match = NAME.match(name)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _split(tensors: dict[str, np.ndarray], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Group tensors into shards of at most `shard_bytes`.

    A tensor larger than a shard is split along its first axis into pieces
    stored as `key@@part/N` and joined again on read.
    """
    pieces: list[tuple[str, np.ndarray]] = []
    for key in sorted(tensors):
        array = np.asarray(tensors[key])
        if not array.flags.c_contiguous:  # not np.ascontiguousarray: it turns scalars into shape (1,)
            array = array.copy(order="C")
        if array.nbytes > shard_bytes and array.ndim > 0 and array.shape[0] > 1:
            rows = max(1, shard_bytes // max(1, array[0].nbytes))
            for part, start in enumerate(range(0, array.shape[0], rows)):
                pieces.append((f"{key}@@part/{part:05d}", array[start : start + rows]))
        else:
            pieces.append((key, array))
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    for key, array in pieces:
        if current and current_bytes + array.nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[key] = array
        current_bytes += array.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def serialize(
    *, sequence: int, step: int, attempt: int, tensors: dict[str, np.ndarray], state: dict[str, Any],
    metrics: dict[str, float] | None = None, epoch_end: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
    run_id: str | None = None, position: dict[str, int] | None = None,
) -> tuple[dict[str, bytes], bytes]:
    """The files of a checkpoint (name -> bytes) and its manifest, to be written last."""
    files: dict[str, bytes] = {}
    tensor_files: dict[str, str] = {}
    for i, shard in enumerate(_split(tensors, shard_bytes)):
        file = f"shard-{i:05d}.safetensors"
        files[file] = save_safetensors(shard)
        tensor_files.update({key: file for key in shard})
    files[STATE] = json.dumps(state, sort_keys=True, allow_nan=True).encode()
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "position": position,  # epoch, batch (next to train), global_step
        "sequence": sequence,
        "step": step,
        "attempt": attempt,
        "committed_at": time.time(),
        "metrics": metrics,  # the epoch's logs, for keeping the best checkpoint
        "epoch_end": epoch_end,  # epochs done, when committed at the end of an epoch
        "files": [{"name": name, "size": len(data), "sha256": sha256(data)} for name, data in files.items()],
        "tensors": tensor_files,
    }
    return files, json.dumps(manifest, indent=1, sort_keys=True).encode()


def parse_manifest(name: str, data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{where}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format (this version reads {FORMAT})")
    try:
        names = [entry["name"] for entry in manifest["files"]]
        for entry in manifest["files"]:
            int(entry["size"]), str(entry["sha256"])
        identity = (manifest["sequence"], manifest["step"], manifest["attempt"])
        dict(manifest["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    for file in names:
        if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith("."):
            raise CheckpointError(f"{where}: manifest names {file!r}, outside the checkpoint directory")
    if STATE not in names:
        raise CheckpointError(f"{where}: malformed manifest (no {STATE})")
    if parse_name(name) != identity:
        raise CheckpointError(f"{where}: manifest does not belong to checkpoint {name}")
    return manifest


def decode(name: str, manifest: dict[str, Any], contents: dict[str, bytes], where: str) -> Checkpoint:
    """Verify every file against the manifest and rebuild the checkpoint."""
    for entry in manifest["files"]:
        data = contents.get(entry["name"])
        location = f"{where}/{entry['name']}"
        if data is None:
            raise CheckpointError(f"{location}: missing")
        if len(data) != entry["size"]:
            raise CheckpointError(f"{location}: {len(data)} bytes, manifest says {entry['size']} (truncated?)")
        if sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{location}: checksum mismatch (corrupt)")
    stored: dict[str, np.ndarray] = {}
    for file, data in contents.items():
        if file.endswith(".safetensors"):
            stored.update(load_safetensors(data))
    missing = set(manifest["tensors"]) - set(stored)
    if missing:
        raise CheckpointError(f"{where}: tensors listed in the manifest are missing: {sorted(missing)[:3]}")
    tensors: dict[str, np.ndarray] = {}
    parts: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, array in stored.items():
        base, marker, part = key.partition("@@part/")
        if marker:
            parts.setdefault(base, []).append((part, array))
        else:
            tensors[key] = array
    for base, pieces in parts.items():
        tensors[base] = np.concatenate([array for _, array in sorted(pieces)])
    return Checkpoint(
        name=name,
        sequence=manifest["sequence"],
        step=manifest["step"],
        attempt=manifest["attempt"],
        manifest=manifest,
        state=json.loads(contents["state.json"]),
        tensors=tensors,
    )

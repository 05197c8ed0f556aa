"""The checkpoint format: tensor shards and JSON state, committed by a manifest.

Layout under the run::

    checkpoints/
      c00000042-s0000000123-a0002/    one directory per commit: sequence, global step, attempt
        shard-00000.safetensors       tensors, in shards of bounded size
        state.json                    loop position, callback state, variable index
        MANIFEST.json                 written last: the commit

A checkpoint exists only once its `MANIFEST.json` is in place (one atomic put).
The manifest lists every file with its size and CRC-32 and which shard holds
each tensor; readers verify all of them before using anything. Tensors are
safetensors and state is JSON: loading never runs code.

Checksums are CRC-32 (zlib): they guard against truncation and bit rot, as the
stores' own CRC32C does, at ~4 GB/s on any buffer without a copy (SHA-256
took 0.06 s per 100 MB of every commit). An adversary who can rewrite a shard
can rewrite the manifest too, so a cryptographic hash would add nothing.
Manifests written with SHA-256 by earlier versions still verify.

Shards are encoded without copying the arrays: a file is a list of buffers (the
safetensors header, then each array's own memory), which local storage writes
as they are and object stores join once for the upload. `encode_files` yields
the files one by one, so the first upload starts while later shards are being
encoded.

The sequence counts the run's commits (two can share a global step: the last
batch of an epoch, and the end of that epoch after validation); the attempt
keeps two processes of one run from ever writing the same directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
import time
import zlib
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cluster_trainer.errors import CheckpointError

FORMAT = "cluster-trainer-checkpoint/1"
MANIFEST = "MANIFEST.json"
STATE = "state.json"
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
# A manifest lists files and tensor names: a few hundred bytes per tensor. Read no more than this.
MANIFEST_LIMIT = 64 * 1024 * 1024
NAME = re.compile(r"^c(\d{8,})-s(\d{10,})-a(\d{4,})$")


@dataclasses.dataclass
class Checkpoint:
    """A committed, verified checkpoint read back into memory (tensors are read-only views of the files)."""

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


# numpy dtypes (native byte order) and their safetensors names
_SAFETENSORS_DTYPES = {
    np.dtype(name): code
    for name, code in [
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("int64", "I64"), ("uint64", "U64"),
        ("int32", "I32"), ("uint32", "U32"), ("int16", "I16"), ("uint16", "U16"), ("int8", "I8"),
        ("uint8", "U8"), ("bool", "BOOL"),
    ]
}  # fmt: skip


_NUMPY_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def crc32(parts: list) -> str:
    """CRC-32 of the concatenation of `parts` (any buffers), as 8 hex digits."""
    value = 0
    for part in parts:
        value = zlib.crc32(part, value)
    return f"{value:08x}"


def checksum_matches(entry: dict[str, Any], data: bytes) -> bool:
    if "crc32" in entry:
        return crc32([data]) == entry["crc32"]
    return hashlib.sha256(data).hexdigest() == entry["sha256"]  # manifests of earlier versions


def safetensors_parts(tensors: dict[str, np.ndarray]) -> list:
    """The safetensors encoding of C-contiguous `tensors`, as buffers: the header, then each array's memory.

    `b"".join(parts)` is a file `safetensors.numpy.load` reads. A dtype
    safetensors' numpy reader does not know falls back to `safetensors.numpy.save`.

    Example:
        >>> parts = safetensors_parts({"w": np.arange(3, dtype="float32")})
        >>> load_safetensors(b"".join(parts))["w"]
        array([0., 1., 2.], dtype=float32)
    """
    header: dict[str, dict] = {}
    buffers = []
    offset = 0
    for key in sorted(tensors):
        array = tensors[key]
        code = _SAFETENSORS_DTYPES.get(array.dtype)
        if code is None or not array.flags.c_contiguous:
            return [save_safetensors(tensors)]
        header[key] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)))
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # as safetensors pads: the data starts 8-byte aligned
    return [struct.pack("<Q", len(encoded)) + encoded, *buffers]


def read_safetensors(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, as read-only arrays over `data` (no copy).

    The header is checked before anything is read through it: a dict of tensors, each with a
    dtype, a shape of non-negative integers and offsets inside the file that fit that shape. A
    dtype this reader does not map goes through `safetensors.numpy.load`; whatever it raises is
    a `CheckpointError` too.

    Example:
        >>> read_safetensors(b"".join(safetensors_parts({"w": np.arange(2, dtype="int64")})), "doc")["w"]
        array([0, 1])
    """
    try:
        (length,) = struct.unpack_from("<Q", data)
        header = json.loads(bytes(data[8 : 8 + length]))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        start = 8 + length
        tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
                raise ValueError(f"tensor {key!r} has no dtype")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
                raise ValueError(f"tensor {key!r}: shape {shape!r} or offsets {offsets!r} are not non-negative integers")
            dtype = _NUMPY_DTYPES.get(info["dtype"])
            if dtype is None:
                return _library_load(data)
            begin, end = offsets
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or start + end > len(data):
                raise ValueError(f"tensor {key!r} does not fit its offsets")
            tensors[key] = np.frombuffer(data, dtype, count, start + begin).reshape(shape)
        return tensors
    except (struct.error, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None


def _naturals(values: Any) -> bool:
    """Whether `values` is a list of non-negative integers (JSON's `true` is not one)."""
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _library_load(data: bytes) -> dict[str, np.ndarray]:
    try:
        return load_safetensors(bytes(data))
    except Exception as e:  # the library's own SafetensorError, or numpy's for a dtype it has not
        raise ValueError(f"{type(e).__name__}: {e}") from None


@dataclasses.dataclass
class EncodedFile:
    """One file of a checkpoint: the buffers it is made of, their total size and CRC-32."""

    name: str
    parts: list
    size: int
    crc32: str
    tensors: list[str]

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "crc32": self.crc32}

    def data(self) -> bytes:
        return b"".join(self.parts)


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


def _encoded(name: str, parts: list, tensors: list[str]) -> EncodedFile:
    return EncodedFile(name, parts, sum(memoryview(p).nbytes for p in parts), crc32(parts), tensors)


def encode_files(tensors: dict[str, np.ndarray], state: dict[str, Any], shard_bytes: int = DEFAULT_SHARD_BYTES,
                 ) -> Iterator[EncodedFile]:
    """The files of a checkpoint, one at a time: tensor shards, then the JSON state.

    The parts reference the arrays' memory: they must not change until written.
    """
    for i, shard in enumerate(_split(tensors, shard_bytes)):
        yield _encoded(f"shard-{i:05d}.safetensors", safetensors_parts(shard), list(shard))
    yield _encoded(STATE, [json.dumps(state, sort_keys=True, allow_nan=True).encode()], [])


def manifest_bytes(
    *, sequence: int, step: int, attempt: int, files: list[EncodedFile], metrics: dict[str, float] | None = None,
    epoch_end: int | None = None, run_id: str | None = None, position: dict[str, int] | None = None,
) -> bytes:
    """The manifest committing `files`, to be written after all of them."""
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
        "files": [file.entry() for file in files],
        "tensors": {key: file.name for file in files for key in file.tensors},
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def serialize(
    *, sequence: int, step: int, attempt: int, tensors: dict[str, np.ndarray], state: dict[str, Any],
    shard_bytes: int = DEFAULT_SHARD_BYTES, **manifest_fields: Any,
) -> tuple[dict[str, bytes], bytes]:
    """The files of a checkpoint (name -> bytes) and its manifest, all at once (tests, benchmarks)."""
    files = list(encode_files(tensors, state, shard_bytes))
    manifest = manifest_bytes(sequence=sequence, step=step, attempt=attempt, files=files, **manifest_fields)
    return {file.name: file.data() for file in files}, manifest


def parse_manifest(name: str, data: bytes, where: str) -> dict[str, Any]:
    """The manifest of checkpoint `name`, its structure checked before anything uses it.

    Every field a reader or retention relies on must have its type; file names must be plain
    names inside the checkpoint's directory (not empty, no `/`, `\\`, NUL or leading dot),
    each listed once, with a size and a checksum; tensors must map to listed shards.
    """
    if len(data) > MANIFEST_LIMIT:
        raise CheckpointError(f"{where}: larger than {MANIFEST_LIMIT} bytes; not a manifest this version writes")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: unreadable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format (this version reads {FORMAT})")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{where}: malformed manifest ({problem})")
    names = [entry["name"] for entry in manifest["files"]]
    for file in names:
        if not file or "/" in file or "\\" in file or "\0" in file or file.startswith(".") or file == MANIFEST:
            raise CheckpointError(f"{where}: manifest names {file!r}, outside the checkpoint directory")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: malformed manifest (a file is listed twice)")
    if STATE not in names:
        raise CheckpointError(f"{where}: malformed manifest (no {STATE})")
    if any(shard not in names or not shard.endswith(".safetensors") for shard in manifest["tensors"].values()):
        raise CheckpointError(f"{where}: malformed manifest (a tensor maps to a file it does not list as a shard)")
    if parse_name(name) != (manifest["sequence"], manifest["step"], manifest["attempt"]):
        raise CheckpointError(f"{where}: manifest does not belong to checkpoint {name}")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the types of a manifest's fields, or None."""
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(entry, dict) for entry in files):
        return "files is not a list of objects"
    for entry in files:
        if not isinstance(entry.get("name"), str) or type(entry.get("size")) is not int or entry["size"] < 0:
            return f"file entry {entry!r:.80} needs a name and a size"
        if not (_hex(entry.get("crc32"), 8) or ("crc32" not in entry and _hex(entry.get("sha256"), 64))):
            return f"file {entry['name']!r:.80} has no crc32 (or sha256) checksum"
    for field in ("sequence", "step", "attempt"):
        if type(manifest.get(field)) is not int:
            return f"{field} is not an integer"
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        return "tensors is not an object of tensor -> shard"
    for field, kinds in (("run_id", str), ("position", dict), ("metrics", dict), ("epoch_end", int)):
        value = manifest.get(field)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{field} is a {type(value).__name__}"
    return None


def _hex(value: Any, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and all(c in "0123456789abcdef" for c in value)


def decode(name: str, manifest: dict[str, Any], contents: dict[str, bytes], where: str) -> Checkpoint:
    """Verify every file against the manifest and rebuild the checkpoint.

    Each shard must hold exactly the tensors the manifest maps to it; the state must be a JSON
    object. Anything the decoders raise is a `CheckpointError` naming the file.
    """
    for entry in manifest["files"]:
        data = contents.get(entry["name"])
        location = f"{where}/{entry['name']}"
        if data is None:
            raise CheckpointError(f"{location}: missing")
        if len(data) > entry["size"]:
            raise CheckpointError(f"{location}: larger than the {entry['size']} bytes the manifest says (not read further)")
        if len(data) != entry["size"]:
            raise CheckpointError(f"{location}: {len(data)} bytes, manifest says {entry['size']} (truncated?)")
        if not checksum_matches(entry, data):
            raise CheckpointError(f"{location}: checksum mismatch (corrupt)")
    stored: dict[str, np.ndarray] = {}
    for file, data in contents.items():
        if file.endswith(".safetensors"):
            found = read_safetensors(data, f"{where}/{file}")
            expected = {key for key, shard in manifest["tensors"].items() if shard == file}
            if set(found) != expected:
                raise CheckpointError(f"{where}/{file}: holds other tensors than the manifest says "
                                      f"({sorted(set(found) ^ expected)[:3]})")
            stored.update(found)
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
        try:
            tensors[base] = np.concatenate([array for _, array in sorted(pieces, key=lambda piece: piece[0])])
        except ValueError as e:
            raise CheckpointError(f"{where}: the parts of tensor {base!r} do not join ({e})") from None
    try:
        state = json.loads(contents[STATE])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}/{STATE}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}/{STATE}: a JSON {type(state).__name__}, not an object")
    return Checkpoint(
        name=name,
        sequence=manifest["sequence"],
        step=manifest["step"],
        attempt=manifest["attempt"],
        manifest=manifest,
        state=state,
        tensors=tensors,
    )

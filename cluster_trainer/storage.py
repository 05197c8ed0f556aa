"""Storage of a run through fsspec: one place for URIs, atomic puts and listing.

A run lives under one URI: a local path, `file://`, `memory://` (tests),
and, through gcsfs and s3fs, `gs://` and `s3://`. Everything above this module
speaks in paths relative to the run.

Atomic put: on object stores a single PUT of the whole object is atomic (it is
visible whole or not at all). Locally a file is written beside its target,
fsynced and renamed over it. Never stream into the final name: fsspec commits a
partially written object when an exception leaves `with fs.open(...)`.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec

from cluster_trainer.errors import StorageError


class Storage:
    """The files of one run, addressed relative to its URI.

    Example:
        >>> s = Storage("memory://doc-example/run")
        >>> s.put("a/b.json", b"{}")
        >>> s.get("a/b.json"), s.list_dirs("a"), s.list_dirs("missing")
        (b'{}', [], [])
    """

    def __init__(self, uri: str, **storage_options):
        self.uri = uri
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri, **storage_options)
        except (ValueError, ImportError) as e:
            raise StorageError(
                f"cannot use storage URI {uri!r}: {e}. Use a local path, file://, gs://BUCKET/PATH or s3://BUCKET/PATH"
            ) from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = "file" in _protocols(self.fs)

    def local_path(self) -> str | None:
        """The run's directory when the storage is the local disk, else None."""
        return self.root if self.is_local else None

    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def put(self, relative: str, data: bytes) -> None:
        """Write `data` to `relative` atomically: readers see the old object, or all of the new one."""
        target = self.path(relative)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        _fsync_directory(os.path.dirname(target))

    def get(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def size(self, relative: str) -> int:
        return int(self.fs.size(self.path(relative)))

    def list_dirs(self, relative: str) -> list[str]:
        """Names of the directories directly under `relative` (empty if it does not exist)."""
        try:
            entries = self.fs.ls(self.path(relative), detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    def remove_tree(self, relative: str) -> None:
        try:
            self.fs.rm(self.path(relative), recursive=True)
        except FileNotFoundError:
            pass

    def remove(self, relative: str) -> None:
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            pass


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _fsync_directory(path: str) -> None:
    """Make a rename in `path` durable (a crash after rename could otherwise undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

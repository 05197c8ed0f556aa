"""Storage of a run through fsspec: URIs, atomic and parallel puts, retries, listing.

A run lives under one URI: a local path, `file://`, `memory://` (tests),
`gs://` (gcsfs) and `s3://` (s3fs). Everything above this module speaks in
paths relative to the run.

Credentials come from each cloud's standard mechanisms: application default
credentials or workload identity for GCS, the AWS environment, profile or IRSA
for S3. Endpoints for emulators and S3-compatible stores too:
`AWS_ENDPOINT_URL_S3`, `STORAGE_EMULATOR_HOST`, fsspec's
`FSSPEC_<PROTOCOL>_<OPTION>` environment variables, or explicit storage
options (`--storage-option endpoint_url=...`). Option values are never
logged or stored.

Atomic put: on object stores a single PUT of a whole object is atomic (visible
whole or not at all). Locally a file is written beside its target, fsynced and
renamed over it. Never stream into the final name: fsspec commits a partially
written object when an exception leaves `with fs.open(...)`.

An object's data is `bytes`, or a list of buffers it is the concatenation of
(a checkpoint shard: its header and the arrays' own memory). Local files are
written from the buffers as they are; object stores get them joined once.

Transient errors (timeouts, resets, 408/429/5xx) are retried with exponential
backoff and jitter, a bounded number of times; anything else fails at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import errno
import importlib
import inspect
import logging
import os
import posixpath
import random
import shutil
import stat
import time
import uuid
from typing import Callable, Iterable, Sequence, TypeVar, Union

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # else gcsfs waits 30-90 s on a gRPC probe

import fsspec  # noqa: E402

from cluster_trainer import confined  # noqa: E402
from cluster_trainer.errors import StorageError  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")
Data = Union[bytes, Sequence]  # a whole object, or the buffers it is the concatenation of

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EIO, errno.EAGAIN}
# A write that cannot succeed until someone frees space or makes the storage writable: one line, not a traceback.
_DISK_ERRNO = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.EDQUOT: "disk quota exceeded"}
# Options fsspec itself takes for any filesystem (its instance and listings caches).
_FSSPEC_OPTIONS = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
# Where a filesystem hands on the keyword arguments it does not name: s3fs gives them to botocore's session.
_PASSED_ON = {"s3": ("aiobotocore.session", "AioSession")}
_TRANSIENT_NAMES = {
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
    "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "ChecksumError", "TransportError",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter for transient store errors."""

    attempts: int = 6
    base_seconds: float = 0.2
    max_seconds: float = 5.0

    def delays(self) -> Iterable[float]:
        for attempt in range(self.attempts - 1):
            yield _JITTER.uniform(0, min(self.max_seconds, self.base_seconds * 2**attempt))


# Our own generator: drawing jitter from the global `random` on the upload thread would
# change the Python RNG state a training run checkpoints.
_JITTER = random.Random()


def is_transient(error: BaseException) -> bool:
    """Whether retrying `error` may succeed (network trouble, throttling, a 5xx)."""
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if type(error).__name__ in _TRANSIENT_NAMES:
        return True
    status = getattr(error, "code", None) or getattr(error, "status", None)
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", status)
    if isinstance(status, int) and status in _TRANSIENT_STATUS:
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO:
        return True
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and is_transient(cause)


def disk_error(error: BaseException) -> StorageError | None:
    """A one-line `StorageError` for a write that failed on a full or read-only disk, else None.

    Looks through the chain of causes: Keras and TensorFlow wrap the `OSError` of a callback's write.

    Example:
        >>> print(disk_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x/files/best.keras")))
        cannot write /runs/x/files/best.keras: no space left on device (ENOSPC). Free space on it (or use another --storage URI), then run the same command again
        >>> disk_error(ValueError("no")) is None
        True
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code not in _DISK_ERRNO:  # h5py and TensorFlow keep only the C library's message
            code = next((c for c in _DISK_ERRNO if os.strerror(c) in str(error)), None)
        if code is not None:
            filename = getattr(error, "filename", None)
            what = f"cannot write {filename}" if filename else "a write failed"
            fix = "Make the storage writable" if code == errno.EROFS else "Free space on it"
            return StorageError(f"{what}: {_DISK_ERRNO[code]} ({errno.errorcode[code]}). {fix} (or use another "
                                "--storage URI), then run the same command again")
        error = error.__cause__ or error.__context__
    return None


def check_uri(uri: str, options: dict | None = None) -> None:
    """Refuse, in one line and without connecting, a URI whose scheme fsspec does not know (or whose
    filesystem is not installed) and options that filesystem does not take.

    Example:
        >>> check_uri("gs://bucket/run"), check_uri("runs/mlp", {"auto_mkdir": True})
        (None, None)
        >>> check_uri("nosuchscheme://bucket/run")
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.StorageError: cannot use storage URI 'nosuchscheme://bucket/run': Protocol not known: nosuchscheme. Use a local path, file://, gs://BUCKET/PATH or s3://BUCKET/PATH
    """
    if "::" not in uri:  # a chained URL (simplecache::gs://...): url_to_fs judges it when the run opens it
        try:
            fsspec.get_filesystem_class(fsspec.core.split_protocol(uri)[0] or "file")
        except (ValueError, ImportError) as e:
            raise _uri_error(uri, e) from None
    _check_options(uri, options or {})


def _uri_error(uri: str, error: Exception) -> StorageError:
    return StorageError(f"cannot use storage URI {uri!r}: {error}. Use a local path, file://, gs://BUCKET/PATH or "
                        "s3://BUCKET/PATH")


def _check_options(uri: str, options: dict) -> None:
    """Refuse, in one line and before any request, an option the URI's filesystem does not take.

    s3fs hands unknown options to botocore, which fails only at the first request; gcsfs and the
    local filesystem ignore them, so a misspelt `endpoint_url` would quietly talk to the real cloud.
    """
    if not options:
        return
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return  # url_to_fs says what is wrong with the URI itself
    accepted = set(_FSSPEC_OPTIONS)
    classes = list(cls.__mro__)
    if protocol in _PASSED_ON:
        module, name = _PASSED_ON[protocol]
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            return  # not the library this check was written against: let it judge
    for klass in classes:
        init = vars(klass).get("__init__")
        try:
            parameters = inspect.signature(init).parameters.values() if init else ()
        except (TypeError, ValueError):
            continue
        accepted |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted.discard("self")
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise StorageError(f"unknown storage option {key!r} for {protocol}:// ({cls.__module__}.{cls.__name__}): "
                               f"{hint}Options are the keyword arguments of that filesystem (see its fsspec docs)")


class Storage:
    """The files of one run, addressed relative to its URI.

    Args:
        uri: the run's URI.
        storage_options: passed to the fsspec filesystem (e.g. `endpoint_url`).
        retry: the `RetryPolicy` for transient errors.

    Example:
        >>> s = Storage("memory://doc-example/run")
        >>> s.put("a/b.json", b"{}")
        >>> s.put_many({"a/c.bin": b"1", "a/d.bin": b"2"})
        >>> s.get("a/b.json"), s.get_many(["a/c.bin", "a/d.bin"]), s.list_files("missing")
        (b'{}', {'a/c.bin': b'1', 'a/d.bin': b'2'}, [])
    """

    def __init__(self, uri: str, storage_options: dict | None = None, retry: RetryPolicy = RetryPolicy()):
        self.uri = uri
        self.retry = retry
        _check_options(uri, storage_options or {})
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        except (ValueError, ImportError) as e:
            raise _uri_error(uri, e) from None
        except TypeError as e:
            raise StorageError(f"storage options do not fit {uri.split('://')[0]}://: {e}") from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = "file" in _protocols(self.fs)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage")

    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    # -- retries and error translation -----------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delays = iter(self.retry.delays())
        while True:
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise self._translate(e) from e
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("%s: %s: %s; retrying in %.2fs", what, type(e).__name__, e, delay)
                time.sleep(delay)

    def _translate(self, error: Exception) -> Exception:
        """Turn "no bucket" and "no credentials" into errors that say what to do."""
        name = type(error).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"):
            return StorageError(
                f"no credentials for {self.uri}: for s3:// set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or IRSA; "
                "for gs:// run `gcloud auth application-default login` or use workload identity"
            )
        if isinstance(error, FileNotFoundError) and not self.is_local and "bucket" in str(error).lower() + self._bucket_hint(error):
            return StorageError(f"bucket {self.root.split('/')[0]!r} of {self.uri} does not exist: create it or fix the URI")
        return disk_error(error) or error

    def _bucket_hint(self, error: Exception) -> str:
        bucket = self.root.split("/")[0]
        return "bucket" if f"/b/{bucket}/" in str(error) or str(error).startswith(f"b/{bucket}/") else ""

    def check(self) -> None:
        """Fail early, with one line, if the bucket is missing, there are no credentials, or a local
        URI names a file rather than a run's directory."""
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StorageError(f"{self.uri} is a file, not a run's directory: pass the --storage URI of a run")
            return
        self._call(f"list {self.uri}", lambda: self.fs.ls(self.root.split("/")[0], detail=False))

    # -- reads and writes ------------------------------------------------------

    def put(self, relative: str, data: Data, *, exclusive: bool = False) -> None:
        """Write `data` to `relative` atomically: readers see no object, or all of it.

        With `exclusive`, fail with FileExistsError if the object exists (local
        exclusive link, S3 `If-None-Match: *`; a store that ignores
        preconditions, like the GCS emulator, gives no such guarantee).
        """
        self._write(relative, data, exclusive=exclusive)

    def _write(self, relative: str, data: Data, *, exclusive: bool = False, sync_directory: bool = True) -> None:
        target = self.path(relative)
        if self.is_local:
            self._call(f"write {target}",
                       lambda: _local_atomic_write(self.root, relative, data, exclusive, sync_directory))
            return
        whole = data if isinstance(data, bytes) else b"".join(data)
        mode = "create" if exclusive else "overwrite"
        self._call(f"write {target}", lambda: self.fs.pipe_file(target, whole, mode=mode))

    def put_many(self, items: dict[str, Data]) -> None:
        """Write several objects in parallel (each atomically)."""
        self.put_stream(items.items())

    def put_stream(self, items: Iterable[tuple[str, Data]]) -> None:
        """Write objects in parallel, each one starting as soon as `items` yields it.

        Returns once all are written; raises the first error after every write
        has ended (none is left running). Each write is atomic and retried on
        its own. Locally, each directory is fsynced once, after all its renames.
        """
        futures: list[concurrent.futures.Future] = []
        directories = set()
        try:
            for relative, data in items:
                directories.add(posixpath.dirname(relative))
                futures.append(self._pool.submit(self._write, relative, data, sync_directory=False))
        finally:
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()
        if self.is_local:
            for directory in directories:
                _fsync_directory(self.root, directory)

    def get(self, relative: str, limit: int | None = None) -> bytes:
        """The object's bytes, at most `limit` of them (a ranged read: a larger object is never read whole).

        Locally only a regular file inside the run is read: a symbolic link (to `/dev/zero`, or out of
        the run) anywhere below the run's directory, a device or a FIFO is `UnsafePathError`.
        """
        target = self.path(relative)
        if self.is_local:
            return self._call(f"read {target}", lambda: confined.read_file(self.root, relative, limit))
        if limit is None:
            return self._call(f"read {target}", lambda: self.fs.cat_file(target))

        def ranged():
            try:
                return self.fs.cat_file(target, start=0, end=limit)
            except OSError:  # S3 answers 416 to a range of an empty object
                if self.fs.info(target).get("size") == 0:
                    return b""
                raise

        return self._call(f"read {target}", ranged)

    def copy_to(self, relative: str, sink) -> None:
        """Stream the object into the binary file `sink` (memory stays bounded; retried from the start)."""
        target = self.path(relative)

        def copy():
            sink.seek(0)
            sink.truncate()
            with self.fs.open(target, "rb") as source:
                shutil.copyfileobj(source, sink, 8 * 2**20)

        self._call(f"read {target}", copy)

    def get_many(self, relatives: list[str], limits: dict[str, int] | None = None) -> dict[str, bytes]:
        """Read several objects in parallel (each at most `limits[relative]` bytes, where given)."""
        limits = limits or {}
        futures = {relative: self._pool.submit(self.get, relative, limits.get(relative)) for relative in relatives}
        return {relative: future.result() for relative, future in futures.items()}

    def exists(self, relative: str) -> bool:
        target = self.path(relative)
        self.fs.invalidate_cache(target)
        return self._call(f"stat {target}", lambda: self.fs.exists(target))

    def list_files(self, relative: str, maxdepth: int | None = None) -> list[str]:
        """Paths (relative to the run) of every object below `relative`, in one listing where the store allows."""
        target = self.path(relative)
        self.fs.invalidate_cache(target)  # s3fs and gcsfs cache listings; another process may have written
        try:
            found = self._call(f"list {target}", lambda: self.fs.find(target, maxdepth=maxdepth, withdirs=False))
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        remove = (lambda: _local_remove(self.root, relative, tree=False)) if self.is_local else (
            lambda: self.fs.rm_file(target))
        try:
            self._call(f"delete {target}", remove)
        except FileNotFoundError:
            pass

    def remove_tree(self, relative: str) -> None:
        target = self.path(relative)
        remove = (lambda: _local_remove(self.root, relative, tree=True)) if self.is_local else (
            lambda: self.fs.rm(target, recursive=True))
        try:
            self._call(f"delete {target}", remove)
        except FileNotFoundError:
            pass


    def remove_everything(self) -> None:
        """Delete this store's root and all below it: for benchmarks and tools that made the store themselves.

        >>> Storage("/tmp/ct-scratch-run").remove_everything()  # doctest: +SKIP
        """
        if self.is_local:
            try:
                shutil.rmtree(self.root)  # refuses a root that is a symbolic link; never follows one below it
            except FileNotFoundError:
                pass
            return
        try:
            self._call(f"delete {self.root}", lambda: self.fs.rm(self.root, recursive=True))
        except FileNotFoundError:
            pass


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _local_atomic_write(root: str, relative: str, data: Data, exclusive: bool, sync_directory: bool = True) -> None:
    """Write beside the target, fsync, rename over it: inside `root`, never through a symbolic link."""
    try:
        _write_beside_and_rename(root, relative, data, exclusive, sync_directory)
    except OSError as e:
        if e.errno is None or isinstance(e, confined.UnsafePathError):
            raise
        # Calls relative to a directory descriptor name only the last component: name the whole path.
        raise OSError(e.errno, e.strerror, os.path.join(root, relative)) from e


def _write_beside_and_rename(root: str, relative: str, data: Data, exclusive: bool, sync_directory: bool) -> None:
    *directory, name = confined.parts(relative)
    os.makedirs(root, exist_ok=True)
    parent = confined.open_directory(root, directory, create=True)
    temporary = f"{name}.tmp-{uuid.uuid4().hex}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                     dir_fd=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines([data] if isinstance(data, bytes) else data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                # Fails with FileExistsError if the target exists: an atomic exclusive create.
                os.link(temporary, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
                os.unlink(temporary, dir_fd=parent)
            else:
                os.replace(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=parent)
            except FileNotFoundError:
                pass
            raise
        if sync_directory:
            os.fsync(parent)
    finally:
        os.close(parent)


def _local_remove(root: str, relative: str, tree: bool) -> None:
    """Delete a file (or a directory tree) inside `root`; a symbolic link is removed, never followed."""
    *directory, name = confined.parts(relative)
    parent = confined.open_directory(root, directory)
    try:
        if tree and stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=parent)  # descriptor-based: never follows a link below it
        else:
            os.unlink(name, dir_fd=parent)
    finally:
        os.close(parent)


def _fsync_directory(root: str, relative: str = "") -> None:
    """Make a rename in `root/relative` durable (a crash after rename could otherwise undo it)."""
    fd = confined.open_directory(root, confined.parts(relative) if relative else [])
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

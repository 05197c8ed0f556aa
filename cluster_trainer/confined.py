"""Paths taken from a run's storage stay inside the run: no `..`, no absolute names, no symbolic links.

What a run stores is input: whoever can write the run's directory or bucket
prefix chooses its names and, on a local disk, can plant symbolic links,
devices and FIFOs. Every local read, write, truncation and deletion of a path
that came from storage therefore goes through here:

- `parts` refuses a name that is empty, absolute, has an empty, `.` or `..`
  component, a backslash or a NUL: on an object store `files//abs/path` and
  `files/a/../../x` are legal keys, and joined to a local directory they lead
  out of it;
- `open_directory` walks from a trusted root (the run's directory, or a
  scratch directory of our own) one component at a time with `O_NOFOLLOW`, so
  a symbolic link anywhere below the root is an error, not a detour;
- `read_file` reads regular files only (a link to `/dev/zero`, a FIFO, a
  device is refused before a byte is read), at most `limit` bytes.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_file(root, "a/b.txt", b"hello")
    >>> read_file(root, "a/b.txt", limit=4)
    b'hell'
    >>> parts("a/../../etc/passwd")
    Traceback (most recent call last):
    ...
    cluster_trainer.confined.UnsafePathError: 'a/../../etc/passwd' leads outside its directory (empty, '.' or '..' component, absolute, or a backslash or NUL in it)
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Sequence

from cluster_trainer.errors import StorageError

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(StorageError):
    """A path from storage that would lead outside its directory, or through a symbolic link."""


def parts(relative: str) -> list[str]:
    """The components of `relative`, a path inside some directory; `UnsafePathError` if it is not one."""
    components = relative.split("/") if isinstance(relative, str) else [""]
    if any(c in ("", ".", "..") or "\\" in c or "\0" in c for c in components):
        raise UnsafePathError(f"{relative!r} leads outside its directory (empty, '.' or '..' component, absolute, "
                              "or a backslash or NUL in it)")
    return components


def _refusal(where: str, error: OSError) -> OSError:
    """`UnsafePathError` for what `O_NOFOLLOW` refused (a link, or a file where a directory should be)."""
    if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafePathError(f"{where} is a symbolic link or not a directory where one is expected; "
                               "cluster-trainer never follows links inside a run: remove it")
    return error


def open_directory(root: str, components: Sequence[str], create: bool = False) -> int:
    """A descriptor of `root/components...`, opened without following any link below `root`.

    With `create`, missing directories are made. The caller closes the descriptor.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = root
    try:
        for name in components:
            walked = os.path.join(walked, name)
            if create:
                try:
                    os.mkdir(name, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                next_fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as e:
                raise _refusal(walked, e) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(root: str, relative: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file `root/relative` (at most `limit`), never through a link.

    Raises FileNotFoundError if it does not exist, `UnsafePathError` if it (or a directory on
    the way) is a link, or it is not a regular file.
    """
    *directory, name = parts(relative)
    where = os.path.join(root, relative)
    parent = open_directory(root, directory)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except OSError as e:
            raise _refusal(where, e) from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{where} is not a regular file (a device, FIFO or socket); it is not read")
        return f.read() if limit is None else f.read(limit)


def write_file(root: str, relative: str, data: bytes) -> None:
    """Create or replace the regular file `root/relative`, making directories, never through a link."""
    *directory, name = parts(relative)
    parent = open_directory(root, directory, create=True)
    try:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                         dir_fd=parent)
        except OSError as e:
            raise _refusal(os.path.join(root, relative), e) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    finally:
        os.close(parent)


def links_below(directory: str) -> list[str]:
    """Paths below `directory` that are symbolic links, devices, FIFOs or sockets (none are followed)."""
    found = []
    for path, directories, files in os.walk(directory, followlinks=False):
        for name in directories + files:
            mode = os.lstat(os.path.join(path, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                found.append(os.path.join(path, name))
    return sorted(found)

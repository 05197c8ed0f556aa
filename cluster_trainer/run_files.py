"""Files that callbacks write (CSV logs, TensorBoard events, best models), kept with the run.

Callbacks write to a local directory (`RunContext.path`). On local storage it
is `<run>/files/` itself. On object stores it is a local scratch directory,
mirrored to `<run>/files/` with every checkpoint (only files that changed) and
filled from there when a run resumes, so CSVLogger can be cut back to the
checkpoint and appended to, and TensorBoard can read `<run>/files/tensorboard`.
The scratch directory is removed when the run's process is done with it.

Whatever is under `<run>/files/` is input: callbacks (Keras's own) open their
files by path and follow symbolic links, so a local run with a link (or a
device, a FIFO) there is refused before any callback runs; and a key on an
object store that would lead out of the scratch directory (`files//abs`,
`files/a/../../x`) is skipped with a warning, never written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from cluster_trainer import confined
from cluster_trainer.errors import StorageError
from cluster_trainer.storage import Storage

FILES = "files"
SCRATCH_PREFIX = "cluster-trainer-files-"
log = logging.getLogger(__name__)


class RunFiles:
    """The local directory where a run's callbacks write, and its mirror under `<run>/files/`.

    `private`: a scratch copy filled from the run and never uploaded, for a worker of a
    multi-worker run other than the chief (its callbacks write too, but only the chief's
    files are the run's). It is confined as the chief's scratch copy is.

    Example:
        >>> files = RunFiles(Storage("memory://doc-files/run"))
        >>> files.check()
        >>> with open(os.path.join(files.local_dir, "log.csv"), "w") as f:
        ...     _ = f.write("epoch,loss\\n")
        >>> files.snapshot()
        {'files/log.csv': b'epoch,loss\\n'}
        >>> files.close(); os.path.exists(files.local_dir)
        False
    """

    def __init__(self, storage: Storage, private: bool = False):
        self.storage = storage
        self.mirrored = private or not storage.is_local
        self.local_dir = tempfile.mkdtemp(prefix=SCRATCH_PREFIX) if self.mirrored else storage.path(FILES)
        self._uploaded: dict[str, tuple[int, int]] = {}

    def check(self) -> None:
        """Make the local directory; refuse, in one line, a local `files/` holding symbolic links (or
        devices, FIFOs): a callback writing `best.keras` or `history.csv` would write through them."""
        if self.mirrored:
            return  # our own fresh directory; restore() writes only regular files into it
        os.makedirs(self.local_dir, exist_ok=True)
        found = [self.local_dir] if os.path.islink(self.local_dir) else confined.links_below(self.local_dir)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise StorageError(f"{found[0]}{more} is a symbolic link or not a regular file; callbacks would write "
                               "through it, and cluster-trainer never follows links inside a run: remove it")

    def restore(self) -> None:
        """Fill the local directory from the run (object stores only), one file at a time, each key
        confined to the scratch directory."""
        if not self.mirrored:
            return
        for relative in self.storage.list_files(FILES):
            if relative.endswith("/"):
                continue  # a "directory" placeholder (cloud consoles make them): no file to write
            try:
                name = "/".join(confined.parts(relative[len(FILES) + 1 :]))
            except confined.UnsafePathError as e:
                log.warning("not restoring %s: %s", self.storage.path(relative), e)
                continue
            try:
                self._download(relative, name)
            except (StorageError, OSError) as e:  # a key that is both a file and a directory, say
                log.warning("not restoring %s: %s", self.storage.path(relative), e)
                continue
            stat = os.stat(os.path.join(self.local_dir, name))
            self._uploaded[os.path.join(self.local_dir, name)] = (stat.st_size, stat.st_mtime_ns)

    def _download(self, relative: str, name: str) -> None:
        *directory, base = name.split("/")
        parent = confined.open_directory(self.local_dir, directory, create=True)
        try:
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                         dir_fd=parent)
        finally:
            os.close(parent)
        with os.fdopen(fd, "wb") as sink:
            self.storage.copy_to(relative, sink)

    def snapshot(self) -> dict[str, bytes]:
        """The files changed since the last snapshot, as run-relative paths to upload with a checkpoint."""
        if not self.mirrored:
            return {}
        changed = {}
        for directory, _, names in os.walk(self.local_dir):
            for name in names:
                local = os.path.join(directory, name)
                stat = os.stat(local)
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(local) != signature:
                    with open(local, "rb") as f:
                        changed[f"{FILES}/{os.path.relpath(local, self.local_dir)}"] = f.read()
                    self._uploaded[local] = signature
        return changed

    def forget_uploads(self) -> None:
        """After a failed commit: upload everything again with the next one."""
        self._uploaded.clear()

    def close(self) -> None:
        """Remove the scratch directory (object stores): what it held went up with the last commit."""
        if self.mirrored:
            shutil.rmtree(self.local_dir, ignore_errors=True)

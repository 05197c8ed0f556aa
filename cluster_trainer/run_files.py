"""Files that callbacks write (CSV logs, TensorBoard events, best models), kept with the run.

Callbacks write to a local directory (`RunContext.path`). On local storage it
is `<run>/files/` itself. On object stores it is a local scratch directory,
mirrored to `<run>/files/` with every checkpoint (only files that changed) and
filled from there when a run resumes, so CSVLogger can be cut back to the
checkpoint and appended to, and TensorBoard can read `<run>/files/tensorboard`.
"""

from __future__ import annotations

import os
import tempfile

from cluster_trainer.storage import Storage

FILES = "files"


class RunFiles:
    """The run's files, in a local directory callbacks write to.

    `private`: a scratch copy filled from the run and never uploaded, for a worker of a
    multi-worker run other than the chief (its callbacks write too, but only the chief's
    files are the run's).
    """

    def __init__(self, storage: Storage, private: bool = False):
        self.storage = storage
        self.mirrored = private or not storage.is_local
        self.local_dir = tempfile.mkdtemp(prefix="cluster-trainer-files-") if self.mirrored else storage.path(FILES)
        os.makedirs(self.local_dir, exist_ok=True)
        self._uploaded: dict[str, tuple[int, int]] = {}

    def restore(self) -> None:
        """Fill the local directory from the run (object stores only)."""
        if not self.mirrored:
            return
        remote = self.storage.list_files(FILES)
        for relative, data in self.storage.get_many(remote).items():
            local = os.path.join(self.local_dir, relative[len(FILES) + 1 :])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(data)
            stat = os.stat(local)
            self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)

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

"""The baseline every storage figure is compared with: a raw parallel fsspec write of the same bytes."""

from __future__ import annotations

import os
import time

from cluster_trainer.storage import Storage


def raw_write(storage: Storage, files: dict[str, bytes], prefix: str) -> tuple[float, float | None]:
    """Seconds for one `fs.pipe` of `files` under `prefix`, and on local disk the same plus an fsync of each.

    `fs.pipe` uploads the objects concurrently (fsspec's event loop for
    object stores) and does nothing else: no checksum, no manifest. Locally it
    leaves the bytes in the page cache; a checkpoint must survive a crash, so
    the second figure adds what durability costs (fsync of each file and the
    directory). The objects are deleted afterwards.
    """
    targets = {storage.path(f"{prefix}/{name}"): data for name, data in files.items()}
    if storage.is_local:
        os.makedirs(storage.path(prefix), exist_ok=True)
    storage.fs.pipe({storage.path(f"{prefix}-warm"): b"x"})  # a connection to the store, as the measured code has one
    storage.remove(f"{prefix}-warm")
    started = time.perf_counter()
    storage.fs.pipe(targets)
    plain = time.perf_counter() - started
    synced = None
    if storage.is_local:
        for target in [*targets, storage.path(prefix)]:
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        synced = time.perf_counter() - started
    storage.remove_tree(prefix)
    return plain, synced

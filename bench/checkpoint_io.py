"""Checkpoint upload and restore against raw fsspec and Keras `save_weights`, per store and size.

For each store (local disk, moto's S3 server, the GCS emulator; all on this
machine) and each state size, in one process run:

- cluster-trainer commit: encode safetensors shards (no copy of the arrays),
  CRC-32, parallel puts each starting as its shard is encoded, fencing check,
  manifest last. Pruning old checkpoints runs after the commit and is timed
  separately (it is housekeeping, skipped by a preemption flush).
- raw parallel fsspec write of the *same bytes* to the same number of objects
  (`fs.pipe` of the shards): the ceiling for this store; on local disk also
  with an fsync of each file, as a commit does.
- Keras `model.save_weights` to a local file, then one fsspec put of that file
  to the store (what a user of `fit` does to get weights into a bucket).
- restore: cluster-trainer's verified parallel read against a raw parallel
  `fs.cat` of the same objects, and `load_weights` after a download.

Reports throughput (MB/s) and ratios. The servers run as separate processes
on 127.0.0.1; they are emulators, so absolute numbers say little about GCS or
S3 themselves, while ratios compare the code paths on the same transport. On
local disk, a commit fsyncs every file (a checkpoint must survive a crash);
the raw fsspec write does not, which is most of the gap there.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from bench.raw_io import raw_write as timed_raw_write  # noqa: E402
from bench.stores import start_stores, stop_servers  # noqa: E402
from cluster_trainer.native_logs import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402

from cluster_trainer.checkpoint import CheckpointStore, Retention  # noqa: E402
from cluster_trainer.checkpoint.format import serialize  # noqa: E402
from cluster_trainer.state import capture_model_state  # noqa: E402
from cluster_trainer.storage import Storage  # noqa: E402


def model_of_size(megabytes: int) -> keras.Model:
    """Dense layers of 1024x1024 float32 (4 MiB each) adding up to about `megabytes`."""
    layers = max(1, round(megabytes / 4.2))
    model = keras.Sequential([keras.Input((1024,))] + [keras.layers.Dense(1024) for _ in range(layers)])
    return model


def timed(fn, repeats: int, after=None) -> float:
    """Median seconds of `fn` over `repeats` calls; `after` runs untimed after each."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        if after is not None:
            after()
    return statistics.median(times)


def measure(store_name: str, base_uri: str, megabytes: int, repeats: int, work: str) -> dict:
    model = model_of_size(megabytes)
    tensors, _ = capture_model_state(model)
    nbytes = sum(a.nbytes for a in tensors.values())
    storage = Storage(f"{base_uri}/{megabytes}mb")
    store = CheckpointStore(storage, Retention(keep_last=1), shard_bytes=16 * 2**20)
    sequence = iter(range(1, 10_000))
    prune_times = []

    def ours_commit():
        store.commit(sequence=next(sequence), step=0, attempt=1, tensors=tensors, state={}, prune=False)

    def prune():
        started = time.perf_counter()
        store.prune(current_attempt=1)
        prune_times.append(time.perf_counter() - started)

    files, _ = serialize(sequence=0, step=0, attempt=1, tensors=tensors, state={}, shard_bytes=16 * 2**20)
    raw_paths = {storage.path(f"raw/{name}"): data for name, data in files.items()}
    commit_times, raw_times, raw_fsync_times = [], [], []
    for _ in range(repeats):  # interleaved: both see the same load on the machine and the store server
        commit_times.append(timed(ours_commit, 1, after=prune))
        plain, synced = timed_raw_write(storage, files, "raw")
        raw_times.append(plain)
        raw_fsync_times.append(synced)
    if storage.is_local:
        os.makedirs(storage.path("raw"), exist_ok=True)
    storage.fs.pipe(raw_paths)  # kept for the raw read

    weights_file = os.path.join(work, f"w{megabytes}.weights.h5")
    if storage.is_local:
        os.makedirs(storage.path("keras"), exist_ok=True)

    def keras_save():
        model.save_weights(weights_file)
        storage.fs.put_file(weights_file, storage.path("keras/model.weights.h5"))

    if not storage.is_local:
        storage.fs.invalidate_cache()
    results = {
        "ours_write": statistics.median(commit_times),
        "raw_write": statistics.median(raw_times),
        "raw_write_fsync": statistics.median(raw_fsync_times) if storage.is_local else None,
        "prune": statistics.median(prune_times),
        "keras_save": timed(keras_save, repeats),
    }
    name = store.committed()[0]
    results["ours_read"] = timed(lambda: store.read(name), repeats)
    results["raw_read"] = timed(lambda: storage.fs.cat(list(raw_paths)), repeats)

    def keras_load():
        storage.fs.get_file(storage.path("keras/model.weights.h5"), weights_file)
        model.load_weights(weights_file)

    results["keras_load"] = timed(keras_load, repeats)
    return {"store": store_name, "megabytes": nbytes / 1e6, **results}


def run(sizes: list[int], repeats: int, store_names: list[str]) -> str:
    rows = []
    servers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as work:
        try:
            stores = start_stores(store_names, os.path.join(work, "local"), servers, bucket="bench")
            for megabytes in sizes:
                for store_name, base in stores.items():
                    result = measure(store_name, base, megabytes, repeats, work)
                    rows.append(result)
                    print(f"{store_name} {result['megabytes']:.0f} MB: ours {result['ours_write']:.2f}s, "
                          f"raw {result['raw_write']:.2f}s, keras {result['keras_save']:.2f}s", flush=True)
        finally:
            stop_servers(servers)
    mb = lambda r, key: r["megabytes"] / r[key]  # noqa: E731
    lines = [
        "| store | state | commit MB/s | raw write MB/s | commit / raw | save_weights+upload MB/s | commit / save_weights "
        "| restore MB/s | raw read MB/s | restore / raw | load_weights / restore time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['megabytes']:.0f} MB | {mb(r, 'ours_write'):.0f} | {mb(r, 'raw_write'):.0f} | "
            f"{r['raw_write'] / r['ours_write']:.2f} | {mb(r, 'keras_save'):.0f} | {r['keras_save'] / r['ours_write']:.2f}x | "
            f"{mb(r, 'ours_read'):.0f} | {mb(r, 'raw_read'):.0f} | {r['raw_read'] / r['ours_read']:.2f} | "
            f"{r['keras_load'] / r['ours_read']:.2f}x |"
        )
    local = [r for r in rows if r["raw_write_fsync"] is not None]
    lines += [
        "",
        "Pruning the previous checkpoint after each commit (not in the commit times: the background writer does it "
        "after the commit, a preemption flush skips it): median "
        + ", ".join(f"{r['prune'] * 1000:.0f} ms ({r['store']}, {r['megabytes']:.0f} MB)" for r in rows) + ".",
    ]
    if local:
        lines += [
            "",
            "A commit fsyncs every file; `fs.pipe` to local disk leaves the bytes in the page cache. Against a raw "
            "write plus fsync of each file, local commit / raw is "
            + ", ".join(f"{r['raw_write_fsync'] / r['ours_write']:.2f} ({r['megabytes']:.0f} MB)" for r in local) + ".",
        ]
    return "\n".join(lines) + "\n"

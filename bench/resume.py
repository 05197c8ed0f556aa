"""Resume: restart-to-first-step time, and the cost of starting an epoch late.

**Restart to first step.** A real process (`cluster-trainer run --no-ray` of
`bench/bench_job.py`, a Dense model whose checkpoint is about S MB) is started
either on an empty run (a fresh start) or on a run preempted at global step
20 (a resume: it lists, reads and verifies the checkpoint, restores it and
continues at step 21). Timed from outside: process start to the run's
"starting run"/"resuming run" line (imports, strategy, model build,
checkpoint read and restore), and to the end of the first trained step (the
job's progress callback stamps it). The process is killed right after that
step, so the checkpoint it resumed from stays the newest and every resume
trial starts from the same state. Fresh and resumed trials alternate.

**Starting an epoch at batch b.** In this process, on the data sources the
loop uses (`cluster_trainer.data`): the time from asking for epoch e at batch
b (`epoch_dataset(..., start_batch=b)`, distributed over the strategy's
replicas) to holding its first batch, for b = 0 and b = 0.9 N (and points in
between for the plot), with N the batches per epoch:

- `ArraySource` (NumPy arrays): the epoch's permutation is drawn from (seed,
  epoch) and sliced at b; the skipped rows are never read.
- `DatasetSource` (a user's builder `fn(epoch, seed) -> tf.data.Dataset`):
  here the generic one, a TFRecord file of serialised examples, shuffled with
  a per-epoch seed and parsed with `map`; the loop resumes it with
  `skip(b * batch_size)`, which reads and parses every skipped example.
  Beside it, the same builder taking `skip` (`fn(epoch, seed, skip)`), which
  skips after its shuffle and before its parse.
- `PyDatasetSource` (a `keras.utils.PyDataset` whose batches are slices of
  the same arrays): the epoch's permutation of batch indices is sliced at b,
  and Keras's adapter reads from there; nothing before is read.
- `DatasetObjectSource` (the TFRecord pipeline as a `tf.data.Dataset` object,
  parsed and batched, as passed to `fit`): resumed with `skip(b)` on its
  batches, which reads and parses every skipped batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import signal
import tempfile
import time
from pathlib import Path

from bench.procs import Training, child_env, cluster_trainer_command
from cluster_trainer.storage import Storage

RESUME_AT = 20  # the step the prepared run was preempted at
RESTART_BATCH = 16
DATA_BATCH = 32
DATA_FEATURES = 64
FRACTIONS = (0.0, 0.3, 0.6, 0.9)


# -- restart to first step ------------------------------------------------------------


@dataclasses.dataclass
class RestartTrial:
    store: str
    megabytes: float  # the checkpoint resumed from (for a fresh start: the one it would write)
    kind: str  # "fresh" or "resume"
    to_line: float  # process start -> "starting run" / "resuming run" line
    to_first_step: float  # process start -> end of the first trained step


def _env(megabytes: int, **extra) -> dict[str, str]:
    return child_env(BENCH_MODEL=f"dense:{megabytes}", BENCH_SAMPLES=RESTART_BATCH * 200, BENCH_BATCH=RESTART_BATCH,
                     BENCH_EPOCHS=1000, **extra)


def prepare(uri: str, megabytes: int, work: Path, devices: int) -> float:
    """A run preempted (SIGTERM, committed) right after global step RESUME_AT; returns its checkpoint's MB."""
    run = Training(cluster_trainer_command(uri, devices), _env(megabytes, BENCH_SIGNAL_AT=f"SIGTERM:{RESUME_AT}"),
                   work, f"prepare-{megabytes}-{abs(hash(uri))}")
    try:
        code = run.wait()
    finally:
        run.stop()
    if code != 75:
        raise RuntimeError(f"preparing {uri}: exit {code}, not 75:\n{run.tail()}")
    storage = Storage(uri)
    return sum(len(storage.get(p)) for p in storage.list_files("checkpoints")) / 1e6


def restart_trial(store: str, uri: str, megabytes: int, kind: str, work: Path, devices: int, name: str,
                  checkpoint_mb: float) -> RestartTrial:
    run = Training(cluster_trainer_command(uri, devices), _env(megabytes), work, name)
    try:
        run.wait_for_step(RESUME_AT + 1 if kind == "resume" else 1)
        run.signal(signal.SIGKILL)
        run.wait()
    finally:
        run.stop()
    first, _, first_time = run.progress
    if first != (RESUME_AT if kind == "resume" else 0):
        raise RuntimeError(f"{name}: the first step trained was {first + 1}:\n{run.tail()}")
    line = run.line_time("resuming run" if kind == "resume" else "starting run")
    return RestartTrial(store, checkpoint_mb, kind, line - run.started, first_time - run.started)


def run_restarts(stores: dict[str, str], sizes: list[int], repeats: int, work: Path, devices: int) -> list[RestartTrial]:
    prepared, checkpoint_mb = {}, {}
    for megabytes in sizes:
        for store, base in stores.items():
            prepared[store, megabytes] = f"{base}/resume-{megabytes}mb"
            checkpoint_mb[megabytes] = prepare(prepared[store, megabytes], megabytes, work, devices)
    trials = []
    for repeat in range(repeats):
        for megabytes in sizes:
            for store, base in stores.items():
                fresh_uri = f"{base}/fresh-{megabytes}mb-{repeat}"
                for kind, uri in (("fresh", fresh_uri), ("resume", prepared[store, megabytes])):
                    trial = restart_trial(store, uri, megabytes, kind, work, devices,
                                          f"{kind}-{store[:5]}-{megabytes}-{repeat}", checkpoint_mb[megabytes])
                    trials.append(trial)
                    print(f"restart {repeat + 1}/{repeats} {store} {trial.megabytes:.0f} MB {kind}: line {trial.to_line:.2f}s, "
                          f"first step {trial.to_first_step:.2f}s", flush=True)
                Storage(fresh_uri).remove_everything()
    for uri in prepared.values():
        Storage(uri).remove_everything()
    return trials


def restart_table(trials: list[RestartTrial]) -> str:
    lines = ["| store | checkpoint | fresh: start → first step | resume: start → first step | resume / fresh "
             "| resume − fresh | start → run line, fresh / resume |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((t.store, t.megabytes) for t in trials))
    for store, megabytes in keys:
        med = lambda kind, key: statistics.median(  # noqa: E731
            getattr(t, key) for t in trials if (t.store, t.megabytes, t.kind) == (store, megabytes, kind))
        fresh, resume = med("fresh", "to_first_step"), med("resume", "to_first_step")
        lines.append(f"| {store} | {megabytes:.0f} MB | {fresh:.2f} s | {resume:.2f} s | {resume / fresh:.2f} | "
                     f"{resume - fresh:+.2f} s | {med('fresh', 'to_line'):.2f} s / {med('resume', 'to_line'):.2f} s |")
    return "\n".join(lines) + "\n"


# -- starting an epoch at batch b --------------------------------------------------------


@dataclasses.dataclass
class DataTrial:
    source: str
    batches: int  # per epoch
    start_batch: int
    seconds: float


def _write_tfrecord(path: Path, x, y) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for features, label in zip(x, y):
            writer.write(features.tobytes() + label.tobytes())


def _sources(batches: int, work: Path):
    import numpy as np
    import tensorflow as tf

    import keras

    from cluster_trainer.data import ArraySource, DatasetObjectSource, DatasetSource, PyDatasetSource

    samples = batches * DATA_BATCH
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, DATA_FEATURES)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, samples)]
    path = work / f"data-{batches}.tfrecord"
    _write_tfrecord(path, x, y)

    def parse(record):
        values = tf.io.decode_raw(record, tf.float32)
        return values[:DATA_FEATURES], values[DATA_FEATURES:]

    def builder(epoch, seed):  # what a user writes: per-epoch seeded shuffle, parse in parallel
        return (tf.data.TFRecordDataset(str(path)).shuffle(4096, seed=seed * 1000 + epoch)
                .map(parse, num_parallel_calls=tf.data.AUTOTUNE))

    def builder_that_skips(epoch, seed, skip):  # the same, skipping before the parse
        return (tf.data.TFRecordDataset(str(path)).shuffle(4096, seed=seed * 1000 + epoch).skip(skip)
                .map(parse, num_parallel_calls=tf.data.AUTOTUNE))

    class ArrayBatches(keras.utils.PyDataset):  # batch i: rows [i * DATA_BATCH, (i + 1) * DATA_BATCH)
        def __len__(self):
            return batches

        def __getitem__(self, index):
            rows = slice(index * DATA_BATCH, (index + 1) * DATA_BATCH)
            return x[rows], y[rows]

    parsed_batches = tf.data.TFRecordDataset(str(path)).map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(DATA_BATCH)
    return {"numpy arrays (ArraySource)": ArraySource((x, y), shuffle=True),
            "keras.utils.PyDataset (PyDatasetSource)": PyDatasetSource(ArrayBatches(), shuffle=True),
            "tf.data builder: TFRecord, shuffle, map (DatasetSource)": DatasetSource(builder),
            "the same builder taking `skip`, skipping before its map": DatasetSource(builder_that_skips),
            "tf.data.Dataset object: TFRecord, map, batch (DatasetObjectSource)": DatasetObjectSource(parsed_batches)}


def _first_batch_seconds(source, strategy, start_batch: int) -> float:
    started = time.perf_counter()
    dataset = source.epoch_dataset(1, 0, DATA_BATCH, start_batch=start_batch)
    next(iter(strategy.experimental_distribute_dataset(dataset)))
    seconds = time.perf_counter() - started
    source.stop()  # a PyDataset's reads ahead, outside the time
    return seconds


def run_data(batches_list: list[int], repeats: int, work: Path) -> list[DataTrial]:
    """Every (size, start batch, source) once per repetition, interleaved, so load changes hit all alike."""
    from cluster_trainer.devices import make_strategy

    strategy = make_strategy(2)
    sources = {batches: _sources(batches, work) for batches in batches_list}
    for by_name in sources.values():  # warm: trace and allocate once
        for source in by_name.values():
            _first_batch_seconds(source, strategy, 0)
    trials = []
    for repeat in range(repeats):
        for batches, by_name in sources.items():
            for fraction in FRACTIONS:
                for name, source in by_name.items():
                    start = int(fraction * batches)
                    trials.append(DataTrial(name, batches, start, _first_batch_seconds(source, strategy, start)))
        print(f"data {repeat + 1}/{repeats}: " + "; ".join(
            f"{name.split(' (')[0]}, {batches} batches: {data_median(trials, name, batches, 0):.3f}s -> "
            f"{data_median(trials, name, batches, int(0.9 * batches)):.3f}s"
            for batches, by_name in sources.items() for name in by_name), flush=True)
    return trials


def data_median(trials: list[DataTrial], source: str, batches: int, start: int) -> float:
    return statistics.median(t.seconds for t in trials if (t.source, t.batches, t.start_batch) == (source, batches, start))


def data_table(trials: list[DataTrial]) -> str:
    lines = ["| source | batches/epoch | first batch at batch 0 | first batch at batch 0.9·N | 0.9·N / 0 "
             "| cost per skipped batch |",
             "|---|---:|---:|---:|---:|---:|"]
    for source in dict.fromkeys(t.source for t in trials):
        for batches in dict.fromkeys(t.batches for t in trials):
            start = int(0.9 * batches)
            at0, late = data_median(trials, source, batches, 0), data_median(trials, source, batches, start)
            per_batch = f"{1e6 * (late - at0) / start:.0f} µs" if late > at0 else "none (faster)"
            lines.append(f"| {source} | {batches:,} | {1000 * at0:.1f} ms | {1000 * late:.1f} ms | **{late / at0:.2f}x** | "
                         f"{per_batch} |")
    return "\n".join(lines) + "\n"


# -- entry ----------------------------------------------------------------------------------


def run(args, machine: str) -> tuple[str, dict]:
    from bench.stores import start_stores, stop_servers

    servers = []
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        work = Path(tmp)
        try:
            stores = start_stores(args.stores, str(work / "runs"), servers, bucket="bench-resume")
            restarts = run_restarts(stores, args.state_sizes, args.repeats, work, args.devices)
        finally:
            stop_servers(servers)
        data_repeats = max(args.repeats, args.data_repeats)
        data = run_data(args.resume_batches, data_repeats, work)
    text = (
        f"**Restart to first step.** Dense 1024x1024 layers with Adam, global batch {RESTART_BATCH}, MirroredStrategy over "
        f"{args.devices} logical CPU device(s); resumed from a checkpoint committed on SIGTERM at global step "
        f"{RESUME_AT}. Median of {args.repeats} trials each, fresh and resumed alternating. {machine}\n\n"
        + restart_table(restarts)
        + f"\n**Starting an epoch at batch b.** Global batch {DATA_BATCH} of {DATA_FEATURES} float32 features, "
        f"distributed over 2 replicas; time from `epoch_dataset(start_batch=b)` to the first batch in hand; "
        f"median of {data_repeats} interleaved trials.\n\n" + data_table(data)
    )
    return text, {"restarts": restarts, "data": data}

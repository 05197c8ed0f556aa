"""Preemption: notice-to-commit time against a raw write, and steps re-run per preemption.

Two benchmarks, both on real processes (`cluster-trainer run --no-ray` of
`bench/bench_job.py`, or plain `model.fit` in `bench/keras_fit.py`) that are
signalled the way a spot machine's pod is:

**Flush.** A run of a Dense model whose checkpoint is about S MB (weights and
Adam slots) trains; after it has passed its first steps the benchmark sends it
SIGTERM and times, from outside, the signal to the run's "state committed"
line and to the process's exit; the run's own log line says how long the flush
took after the handler saw the notice. Right after, in this process, the same
bytes (the committed checkpoint's files, read back) are written to the same
store with a plain `fs.pipe`: the raw write the flush is compared with (goal
<= 1.3x). On local disk the raw write is also timed with an fsync of each file,
which a commit does and `fs.pipe` does not. Trials and raw writes alternate,
per store and size, so both see the same machine load.

**Steps re-run.** One seeded random schedule of K preemption points (global
steps) is applied to each method: the training process kills itself right
after that step (so every method is interrupted at exactly the same step),
the benchmark restarts it, and so on; the last attempt runs to the end. The
steps re-run after an interruption are the steps the killed process had
trained beyond the point where the next process started training. Methods:
cluster-trainer with a notice (SIGTERM), cluster-trainer checkpointing every N
steps with no notice (SIGKILL), and Keras `BackupAndRestore` with
save_freq="epoch" and save_freq=N (SIGKILL; `fit` has no SIGTERM handler, so
SIGTERM would end it the same way).
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.procs import Training, child_env, cluster_trainer_command, keras_fit_command
from bench.raw_io import raw_write
from bench.stores import start_stores, stop_servers
from cluster_trainer.checkpoint import CheckpointStore
from cluster_trainer.checkpoint.format import serialize
from cluster_trainer.storage import Storage

FLUSH_BATCH = 16
FLUSH_WARM_STEPS = 10  # steps trained (past tracing) before the notice
RAW_IN_PROCESS_STEP = 5  # when the training process times its own raw write, well before the notice
RERUN_BATCH = 32
RERUN_EPOCHS = 3
RERUN_EVERY = 100  # cluster-trainer's checkpoint interval and BackupAndRestore's save_freq


# -- flush ------------------------------------------------------------------------


@dataclasses.dataclass
class FlushTrial:
    store: str
    megabytes: float  # the committed checkpoint's size
    flush_logged: float  # the run's own "X.XXs after the notice"
    stages: str  # the run's own breakdown of the flush
    signal_to_commit: float  # signal sent -> the run's "state committed" line arrived
    signal_to_exit: float
    raw_write: float  # fs.pipe of the same bytes
    raw_in_process: float  # fs.pipe of the model's state, encoded the same way, from the training process at step 5
    raw_write_fsync: float | None  # local disk: fs.pipe, then fsync each file and the directory
    serialize: float  # encoding + CRC-32 of the same state, in this process: CPU work a raw write skips (overlapped with the upload)


def _checkpoint_files(storage: Storage, name: str) -> dict[str, bytes]:
    paths = storage.list_files(f"checkpoints/{name}")
    return {path.rsplit("/", 1)[1]: storage.get(path) for path in paths}


def flush_trial(store: str, base: str, megabytes: int, number: int, work: Path, devices: int,
                shard_mb: int) -> FlushTrial:
    uri = f"{base}/flush-{megabytes}mb-{number}"
    samples = FLUSH_BATCH * 200
    env = child_env(BENCH_MODEL=f"dense:{megabytes}", BENCH_SAMPLES=samples, BENCH_BATCH=FLUSH_BATCH,
                    BENCH_EPOCHS=1000, BENCH_SHARD_MB=shard_mb, BENCH_RAW_WRITE=f"{RAW_IN_PROCESS_STEP}:{uri}")
    run = Training(cluster_trainer_command(uri, devices), env, work, f"flush-{store[:5]}-{megabytes}-{number}")
    try:
        run.wait_for_step(FLUSH_WARM_STEPS)
        sent = run.signal(signal.SIGTERM)
        code = run.wait()
    finally:
        run.stop()
    line = run.line("after the notice")
    stages = (run.line("flush of ") or "").split("flush of ", 1)[-1].strip()
    if code != 75 or line is None:
        raise RuntimeError(f"the flush run exited {code}, not 75:\n{run.tail()}")
    match = re.search(r"committed as (\S+) at global step \d+, ([\d.]+)s after the notice", line)
    in_process = float(re.search(r"raw write in the training process: ([\d.]+) s", run.line("raw write in the training")).group(1))
    name, logged = match.group(1), float(match.group(2))
    storage = Storage(uri)
    files = _checkpoint_files(storage, name)
    raw, raw_fsync = raw_write(storage, files, "raw")
    checkpoint = CheckpointStore(storage).read(name)
    started = time.perf_counter()
    serialize(sequence=1, step=0, attempt=1, tensors=checkpoint.tensors, state=checkpoint.state,
              shard_bytes=shard_mb * 2**20)
    serialized = time.perf_counter() - started
    storage.remove_everything()
    return FlushTrial(store=store, megabytes=sum(map(len, files.values())) / 1e6, flush_logged=logged, stages=stages,
                      signal_to_commit=run.line_time("after the notice") - sent, signal_to_exit=run.exited - sent,
                      raw_write=raw, raw_in_process=in_process, raw_write_fsync=raw_fsync, serialize=serialized)


def run_flush(stores: dict[str, str], sizes: list[int], repeats: int, work: Path, devices: int,
              shard_mb: int) -> list[FlushTrial]:
    trials = []
    for repeat in range(repeats):
        for megabytes in sizes:
            for store, base in stores.items():
                trial = flush_trial(store, base, megabytes, repeat, work, devices, shard_mb)
                trials.append(trial)
                print(f"flush {repeat + 1}/{repeats} {store} {trial.megabytes:.0f} MB: logged {trial.flush_logged:.2f}s, "
                      f"signal->commit {trial.signal_to_commit:.2f}s, signal->exit {trial.signal_to_exit:.2f}s, "
                      f"raw {trial.raw_write:.2f}s\n  flush of {trial.stages}", flush=True)
    return trials


def flush_table(trials: list[FlushTrial]) -> str:
    groups: dict[tuple[str, int], list[FlushTrial]] = {}
    for t in trials:
        groups.setdefault((t.store, round(t.megabytes)), []).append(t)
    lines = [
        "| store | checkpoint | raw fs.pipe | flush (run's log) | flush / raw | raw fs.pipe in the training process "
        "| flush / that | signal → exit | raw + fsync | flush / (raw + fsync) | encode + CRC-32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (store, _), group in groups.items():
        med = lambda key: statistics.median(getattr(t, key) for t in group)  # noqa: E731
        raw, flush = med("raw_write"), med("flush_logged")
        synced = statistics.median(t.raw_write_fsync for t in group) if group[0].raw_write_fsync is not None else None
        lines.append(
            f"| {store} | {med('megabytes'):.0f} MB | {raw:.2f} s | {flush:.2f} s | **{flush / raw:.1f}x** | "
            f"{med('raw_in_process'):.2f} s | {flush / med('raw_in_process'):.1f}x | {med('signal_to_exit'):.2f} s | "
            + (f"{synced:.2f} s | {flush / synced:.1f}x |" if synced is not None else "- | - |")
            + f" {med('serialize'):.2f} s |"
        )
    spread, lag = [], []
    for (store, size), group in groups.items():
        ratios = sorted(t.flush_logged / t.raw_write for t in group)
        spread.append(f"{store} {size} MB {ratios[0]:.1f}-{ratios[-1]:.1f}x")
        lag.append(max(t.signal_to_commit - t.flush_logged for t in group))
    return ("\n".join(lines) + "\n\nRange of flush / raw over the trials: " + "; ".join(spread)
            + f". The run's \"state committed\" line reached the benchmark at most {max(lag) * 1000:.0f} ms after "
            "the flush time it reports (signal delivery and output).\n")


# -- steps re-run ------------------------------------------------------------------

METHODS = {  # id: (label, what trains, signal)
    "notice": ("cluster-trainer, notice (SIGTERM)", "ct", "SIGTERM"),
    "every-n": (f"cluster-trainer, checkpoint every {RERUN_EVERY} steps, no notice (SIGKILL)", "ct", "SIGKILL"),
    "keras-epoch": ('Keras BackupAndRestore(save_freq="epoch") (SIGKILL)', "epoch", "SIGKILL"),
    "keras-n": (f"Keras BackupAndRestore(save_freq={RERUN_EVERY}) (SIGKILL)", str(RERUN_EVERY), "SIGKILL"),
}


@dataclasses.dataclass
class RerunResult:
    method: str
    steps_per_epoch: int
    schedule: list[int]
    attempts: list[tuple[int, int]]  # (first step trained, last step reached), per process
    seconds: float

    @property
    def reruns(self) -> list[int]:
        return [self.attempts[i][1] - self.attempts[i + 1][0] for i in range(len(self.attempts) - 1)]

    @property
    def trained(self) -> int:
        return sum(last - first for first, last in self.attempts)


def schedule(total_steps: int, interruptions: int, seed: int) -> list[int]:
    """`interruptions` distinct global steps in [1, total_steps - 1], sorted: where each method is interrupted."""
    return sorted(random.Random(seed).sample(range(1, total_steps), interruptions))


def run_method(method_id: str, steps_per_epoch: int, points: list[int], work: Path, base: str) -> RerunResult:
    method, kind, signal_name = METHODS[method_id]
    samples = steps_per_epoch * RERUN_BATCH
    slug = f"{kind}-{signal_name}-{steps_per_epoch}"
    env = child_env(BENCH_MODEL="mlp", BENCH_SAMPLES=samples, BENCH_BATCH=RERUN_BATCH, BENCH_EPOCHS=RERUN_EPOCHS,
                    BENCH_EVERY_STEPS=RERUN_EVERY, BENCH_BACKUP_DIR=str(work / f"backup-{slug}"),
                    BENCH_SAVE_FREQ=kind)
    if kind == "ct":
        command = cluster_trainer_command(f"{base}/rerun-{slug}", devices=1)
        expected = 75 if signal_name == "SIGTERM" else -signal.SIGKILL
    else:
        command = keras_fit_command()
        expected = -signal.SIGKILL
    attempts = []
    started = time.perf_counter()
    for number, point in enumerate([*points, None]):
        signal_env = {"BENCH_SIGNAL_AT": f"{signal_name}:{point}"} if point is not None else {}
        run = Training(command, {**env, **signal_env}, work, f"rerun-{slug}-{number}")
        try:
            code = run.wait()
        finally:
            run.stop()
        progress = run.progress
        if code != (expected if point is not None else 0) or progress is None:
            raise RuntimeError(f"{method}, attempt {number + 1}: exit {code}, progress {progress}:\n{run.tail()}")
        first, last, _ = progress
        if point is not None and last != point:
            raise RuntimeError(f"{method}, attempt {number + 1}: stopped at step {last}, not {point}")
        attempts.append((first, last))
    result = RerunResult(method, steps_per_epoch, points, attempts, time.perf_counter() - started)
    total = RERUN_EPOCHS * steps_per_epoch
    if attempts[-1][1] != total or result.trained - total != sum(result.reruns):
        raise RuntimeError(f"{method}: attempts {attempts} do not add up to {total} steps")
    return result


def run_reruns(sizes: list[int], interruptions: int, seed: int, work: Path, base: str,
               methods: list[str] = list(METHODS)) -> list[RerunResult]:
    results = []
    for steps_per_epoch in sizes:
        points = schedule(RERUN_EPOCHS * steps_per_epoch, interruptions, seed)
        for method_id in methods:
            result = run_method(method_id, steps_per_epoch, points, work, base)
            results.append(result)
            print(f"re-run, {steps_per_epoch} steps/epoch, {result.method}: {result.reruns} ({result.seconds:.0f}s)",
                  flush=True)
    return results


def rerun_table(results: list[RerunResult]) -> str:
    lines = ["| steps/epoch | method | steps re-run per interruption | mean | max | total | extra work |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        total = RERUN_EPOCHS * r.steps_per_epoch
        reruns = r.reruns
        lines.append(f"| {r.steps_per_epoch} | {r.method} | {', '.join(map(str, reruns))} | "
                     f"{statistics.mean(reruns):.1f} | {max(reruns)} | **{sum(reruns)}** | {sum(reruns) / total:.0%} |")
    return "\n".join(lines) + "\n"


# -- entry --------------------------------------------------------------------------


def run(args, machine: str) -> tuple[str, dict]:
    """Both benchmarks; returns (the tables, raw results for the plots)."""
    servers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as tmp:
        work = Path(tmp)
        try:
            stores = start_stores(args.stores, str(work / "runs"), servers, bucket="bench-preemption")
            flush = run_flush(stores, args.state_sizes, args.repeats, work, args.devices, args.shard_mb)
            reruns = run_reruns(args.rerun_steps, args.interruptions, args.seed, work, str(work / "runs"), args.methods)
        finally:
            stop_servers(servers)
    layers = ", ".join(f"{s} MB: {dense_layers_note(s)}" for s in args.state_sizes)
    flush_text = (
        f"**Flush.** Dense 1024x1024 layers trained with Adam, global batch {FLUSH_BATCH}, MirroredStrategy over {args.devices} "
        f"logical CPU device(s) ({layers}); SIGTERM after step {FLUSH_WARM_STEPS}, no other checkpoint in flight. "
        f"Median of {args.repeats} trials per row, each trial followed by its raw write. {machine}\n\n"
        + flush_table(flush)
    )
    rerun_text = (
        f"**Steps re-run.** MLP 64-64-10 (Adam), global batch {RERUN_BATCH}, {RERUN_EPOCHS} epochs, one CPU replica; "
        f"{args.interruptions} interruptions at the same seeded random global steps for every method "
        f"(seed {args.seed}; schedules: "
        + "; ".join(f"{r.steps_per_epoch} steps/epoch: {', '.join(map(str, r.schedule))}"
                    for r in reruns if r.method == reruns[0].method)
        + "). \"Extra work\" is the steps re-run as a share of the run's steps.\n\n" + rerun_table(reruns)
    )
    return flush_text + "\n" + rerun_text, {"flush": flush, "reruns": reruns}


def dense_layers_note(megabytes: int) -> str:
    from bench.bench_job import dense_layers

    layers = dense_layers(megabytes)
    return f"{layers} layer{'s' if layers > 1 else ''}"

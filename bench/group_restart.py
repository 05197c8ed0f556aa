"""Group restart: the time from a lost worker to the restarted group's first step, on Ray.

A local Ray cluster on 127.0.0.1 (`tests/ray_cluster.py`): a head without
CPUs and two raylets with 1 CPU each, every raylet a node (or the cluster at
`--ray-address`, whose nodes should have 1 CPU each, at least two). The driver
(`cluster-trainer run bench/bench_job.py --workers W --devices 1`, the MLP,
a commit every 8 steps) trains on W = 2 workers, one per raylet, and, as the
baseline measured in the same run, on W = 1 (one actor). Once the run has
committed, one worker's actor process gets SIGKILL: worker 1 of the group
(not the chief: the chief is then blocked in an all-reduce that will never
complete), the only actor for W = 1. Timed from the kill, from the driver's
lines (stamped as they arrive) and the training processes' progress files
(`BENCH_PROGRESS_DIR`, see bench/bench_job.py):

- torn down: the driver says the attempt failed (Ray reported the actor dead;
  for W = 2 the group's other worker is killed right then);
- placed: the next attempt's actors run on their nodes, after the failure
  backoff (2 s for a first failure) and the actors' process start;
- resumed: the chief says where it resumes (TensorFlow, the strategy, for W = 2
  the collective's rendezvous, the model build, the checkpoint read and
  restore; the line reaches the driver through Ray's log forwarding);
- first step: the end of the restarted chief's first step (its progress file).

Each repetition is a fresh run on the same cluster; W = 1 and W = 2 alternate.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import BENCH_JOB, Training, child_env
from cluster_trainer.checkpoint import CheckpointStore
from cluster_trainer.storage import Storage

EVERY_STEPS = 8
KILL_AFTER_STEP = 12  # past the first commit (step 8), once it is committed: the next attempt resumes from it
STEP_TIMEOUT = 300.0


@dataclasses.dataclass
class Trial:
    workers: int
    torn_down: float
    placed: float
    resumed: float
    first_step: float


def _progress(directory: Path) -> list[tuple[int, int, float]]:
    """(first step, last step, first step's wall time) of every training process that reported."""
    found = []
    for path in directory.glob("*.progress"):
        try:
            first, last, first_time = path.read_text().split()
        except (FileNotFoundError, ValueError):  # being replaced right now
            continue
        found.append((int(first), int(last), float(first_time)))
    return found


def _wait(condition, what: str, training: Training, timeout: float = STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if training.process.poll() is not None:
            raise RuntimeError(f"the driver exited ({training.process.returncode}) before {what}:\n{training.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} in {timeout:.0f}s:\n{training.tail()}")
        time.sleep(0.01)


def trial(address: str, workers: int, work: Path, env: dict) -> Trial:
    """One run of `workers` workers: SIGKILL worker 1 (or the only actor) after a commit, time the restart."""
    name = f"run-{workers}-{time.monotonic_ns()}"
    progress = work / f"{name}.progress"
    progress.mkdir()
    command = [sys.executable, "-m", "cluster_trainer", "run", BENCH_JOB, "--storage", str(work / name), "--devices",
               "1", "--workers", str(workers), "--ray-address", address, "--verbose", "0"]
    training = Training(command, {**env, "BENCH_PROGRESS_DIR": str(progress)}, work, f"driver-{workers}")
    try:
        noun, victim = ("actor", r"actor 1 running") if workers == 1 else ("group", r"group 1 worker 1 running")
        pid = int(_wait(lambda: re.search(rf"{victim} on node \w+ \([^)]*pid (\d+)\)", _text(training)),
                        "the first attempt's actors", training)[1])
        store = CheckpointStore(Storage(str(work / name)))
        # The commit is uploaded in the background: on a loaded machine step 12 can come before it is in storage.
        _wait(lambda: any(p[1] >= KILL_AFTER_STEP for p in _progress(progress)) and store.committed(),
              f"step {KILL_AFTER_STEP} and a committed checkpoint", training)
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        failed = _wait(lambda: training.line_time(f"{noun} 1 failed:"), "the failure line", training)
        placed_line = f"{noun} 2 running" if workers == 1 else f"group 2 worker {workers - 1} running"
        placed = _wait(lambda: training.line_time(placed_line), "the next attempt's placement", training)
        resumed = _wait(lambda: training.line_time("resuming run"), "the resume line", training)
        first = _wait(lambda: min((p[2] for p in _progress(progress) if p[2] > killed), default=None),
                      "the restarted first step", training)
    finally:
        training.stop()
    return Trial(workers, failed - killed, placed - killed, resumed - killed, first - killed)


def _text(training: Training) -> str:
    return "\n".join(line for _, line in training.lines)


def run(args, machine: str) -> tuple[str, dict]:
    import contextlib

    from tests.ray_cluster import RayCluster

    work = Path(tempfile.mkdtemp(prefix="bench-group-"))
    env = child_env(BENCH_EVERY_STEPS=EVERY_STEPS, BENCH_EPOCHS=50, BENCH_BATCH=32, **_cluster_env(args))
    trials: list[Trial] = []
    with contextlib.ExitStack() as stack:
        address = args.ray_address
        if address is None:
            cluster = stack.enter_context(RayCluster())
            cluster.start_head(num_cpus=0)
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            address = cluster.address
        for _ in range(args.repeats):
            for workers in (1, 2):
                trials.append(trial(address, workers, work, env))
    return _table(trials, args.repeats, machine), {"trials": trials}


def _cluster_env(args) -> dict:
    """What the drivers need to reach a local test cluster (its token auth off, as `RayCluster` starts it)."""
    from tests.ray_cluster import cluster_env

    return {k: v for k, v in cluster_env().items() if k.startswith("RAY_")}


def _table(trials: list[Trial], repeats: int, machine: str) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    rows = []
    medians = {}
    for workers in (1, 2):
        mine = [t for t in trials if t.workers == workers]
        medians[workers] = statistics.median(t.first_step for t in mine)
        what = "1 worker (one actor, the baseline)" if workers == 1 else f"{workers} workers (a group on 2 nodes)"
        rows.append(f"| {what} | {cell([t.torn_down for t in mine])} | {cell([t.placed for t in mine])} | "
                    f"{cell([t.resumed for t in mine])} | {cell([t.first_step for t in mine])} |")
    return (
        "Seconds from the SIGKILL of a worker's actor process (worker 1 of the group; the only actor for 1 worker) "
        "to each event; median (range) over "
        f"{repeats} repetition(s), 1 and 2 workers alternating, each a fresh run of the MLP (1 logical CPU device "
        "per worker, a commit every 8 steps) on a local Ray cluster: a head without CPUs and two raylets on "
        f"127.0.0.1. {machine}\n\n"
        "| workers | failure seen, group torn down | next attempt placed (after the 2 s backoff) | "
        "chief says it resumes | restarted first step ends |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Lost worker to first step, 2 workers / 1 worker: {medians[2] / medians[1]:.2f}×.\n"
    )

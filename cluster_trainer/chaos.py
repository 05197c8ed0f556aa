"""The chaos harness: interrupt a run many times, resume it each time, prove nothing changed.

It trains a job uninterrupted once (the reference), then trains it again as a
subprocess that it interrupts K times at seeded random moments, resuming after
each: SIGTERM at a random batch (a preemption notice: the run must commit at
that batch boundary and re-run no step) and SIGKILL at a random time (no
notice: the run resumes from its last commit; some kills are aimed right after
a checkpoint is queued, to land mid-upload). At the end it compares the two
runs: every tensor bitwise (weights, optimizer, per-replica metrics, callback
arrays, RNGs), callback state (EarlyStopping patience, ModelCheckpoint best,
ReduceLROnPlateau), position, and the Parquet history, each row exactly once.

Usage:
    python -m cluster_trainer.chaos jobs/mlp.py --storage /tmp/chaos/mlp \\
        --interruptions 10 --seed 1 --devices 2

Any option it does not know is passed to `cluster-trainer run` (`--devices 2`,
`--set lr=1e-3`). Exit status 0 means the runs are equal; 1 that they differ
(the differences are listed).

With `--workers N`, every attempt (and the reference) is N processes on
127.0.0.1 training one run under MultiWorkerMirroredStrategy, each with its
own `TF_CONFIG` (no Ray), and each signal goes to one worker drawn from the
seed: a SIGTERM to any worker must stop them all with exit 75, a SIGKILL must
make the others fail on their own, and the next attempt resumes with N again.

From Python:
    >>> report = run_chaos("jobs/mlp.py", "/tmp/chaos/mlp", interruptions=10)  # doctest: +SKIP
    >>> report.ok, [i.steps_rerun for i in report.interruptions]               # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cluster_trainer.checkpoint import Checkpoint, CheckpointStore
from cluster_trainer.errors import EXIT_PREEMPTED
from cluster_trainer.storage import Storage
from cluster_trainer.workers import Workers, loopback_addresses

WRAPPER_JOB = str(Path(__file__).with_name("chaos_job.py"))
# Training runs in the subprocess itself, not in a Ray actor: the harness signals that process.
RUN_IN_PROCESS = ("--no-ray",)
START_TIMEOUT = 300.0


@dataclasses.dataclass
class Interruption:
    number: int
    signal: str  # "SIGTERM" or "SIGKILL"
    aimed_at: int  # the global step after which the signal was due
    worker: int  # the worker that got the signal (0 when there is one)
    reached: int  # the last step the process finished before it died
    committed: int  # the global step of the newest committed checkpoint afterwards
    exit_code: int | None
    torn: bool  # a checkpoint was left half-written: the kill landed mid-upload

    @property
    def steps_rerun(self) -> int:
        """Steps the resumed run trains again: done by the dead process but not committed."""
        return max(self.reached - self.committed, 0)


@dataclasses.dataclass
class ChaosReport:
    job: str
    uri: str
    reference_uri: str
    seed: int
    total_steps: int
    interruptions: list[Interruption]
    differences: list[str]
    epoch_rows: int
    step_rows: int
    workers: int = 1

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        several = self.workers > 1
        lines = [f"chaos: {len(self.interruptions)} interruptions of {self.job} (seed {self.seed}), "
                 f"{self.total_steps} steps" + (f" on {self.workers} workers" if several else "")
                 + f"; run {self.uri}, reference {self.reference_uri}",
                 "   #  signal  " + (" worker  " if several else "") + " aimed at  reached  committed  re-run  exit  mid-upload"]
        for i in self.interruptions:
            lines.append(f"  {i.number:2d}  {i.signal:7s}  " + (f"{i.worker:6d}  " if several else "")
                         + f"{i.aimed_at:8d}  {i.reached:7d}  {i.committed:9d}  "
                         f"{i.steps_rerun:6d}  {i.exit_code if i.exit_code is not None else '-':>4}  "
                         f"{'yes' if i.torn else ''}")
        for kind in ("SIGTERM", "SIGKILL"):
            rerun = [i.steps_rerun for i in self.interruptions if i.signal == kind]
            if rerun:
                lines.append(f"steps re-run after {kind}: total {sum(rerun)}, mean {np.mean(rerun):.1f}, max {max(rerun)}")
        if self.ok:
            lines.append(f"EQUAL: every tensor bitwise, callback state, position, RNGs; history {self.epoch_rows} epoch "
                         f"rows and {self.step_rows} step rows, each exactly once and equal to the reference")
        else:
            lines.append("DIFFERENT from the uninterrupted run:")
            lines += [f"  - {d}" for d in self.differences]
        return "\n".join(lines)


def run_chaos(
    job_path: str,
    uri: str,
    *,
    interruptions: int = 10,
    seed: int = 0,
    sigkill_share: float = 0.5,
    reference_uri: str | None = None,
    every_steps: int | str | None = None,
    history_every_steps: int | None = 4,
    run_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] = lambda message: print(f"chaos: {message}", file=sys.stderr, flush=True),
    workers: int = 1,
) -> ChaosReport:
    """Train `job_path` at `uri` with `interruptions` seeded SIGTERMs/SIGKILLs; compare with a clean run.

    Args:
        job_path: the job file.
        uri: where the interrupted run lives (must not hold another run).
        interruptions: how many times to interrupt it.
        seed: seeds the schedule: which signal, after which step, how long after.
        sigkill_share: the fraction of interruptions that are SIGKILL (no notice).
        reference_uri: the uninterrupted run (default `<uri>-reference`); trained here unless
            it already holds a finished run of the same job.
        every_steps: override the job's checkpoint interval in both runs (a number, or "auto").
        history_every_steps: log history rows every N steps in both runs, to check them too.
        run_args: more `cluster-trainer run` options (`--devices 2`, `--set lr=1e-3`).
        env: environment for the training processes (default: this one).
        workers: processes per attempt, training together under MultiWorkerMirroredStrategy on
            127.0.0.1; each signal goes to one of them, drawn from `seed`.
    """
    reference_uri = reference_uri or f"{uri.rstrip('/')}-reference"
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="cluster-trainer-chaos-"))
    base_env = {**(env if env is not None else os.environ), "CLUSTER_TRAINER_CHAOS_JOB": os.path.abspath(job_path)}
    if every_steps:
        base_env["CLUSTER_TRAINER_CHAOS_EVERY_STEPS"] = str(every_steps)
    if history_every_steps:
        base_env["CLUSTER_TRAINER_CHAOS_HISTORY_STEPS"] = str(history_every_steps)
    runner = _Runner(work, base_env, list(run_args), echo, workers)

    reference = _newest(reference_uri)
    if reference is None or not reference.state["position"]["finished"]:
        echo(f"training the uninterrupted reference at {reference_uri}")
        runner.run_to_end(reference_uri, "reference")
        reference = _newest(reference_uri)
    else:
        echo(f"using the finished reference run at {reference_uri}")
    total = reference.state["position"]["global_step"]
    interval = every_steps if isinstance(every_steps, int) else _checkpoint_interval(reference)
    if _newest(uri) is not None:
        raise RuntimeError(f"{uri} already holds a run; give a fresh --storage URI")

    done: list[Interruption] = []
    committed = 0
    for number in range(1, interruptions + 1):
        if committed >= total - 1:
            echo(f"the run is at its last step after {len(done)} interruptions; not interrupting further")
            break
        kind = "SIGKILL" if rng.random() < sigkill_share else "SIGTERM"
        # Spread the interruptions over the steps left; half the kills land right after a checkpoint is queued.
        span = max((total - committed - 1) // (interruptions - number + 1), 1)
        target = committed + 1 + rng.randrange(span)
        delay = 0.0
        if kind == "SIGKILL":
            if interval and rng.random() < 0.5:
                target = min(max(interval, (target // interval) * interval), total - 1)
                delay = rng.uniform(0.0, 0.05)
            else:
                delay = rng.uniform(0.0, 0.3)
        victim = rng.randrange(workers)
        result = runner.interrupt(uri, number, kind, max(target, committed + 1), delay, victim)
        if result is None:  # it finished before the signal was due
            echo(f"attempt {number} finished before step {target}")
            break
        newest = _newest(uri)
        committed = newest.state["position"]["global_step"] if newest else 0
        result.committed = committed
        done.append(result)
        to = f" to worker {victim}" if workers > 1 else ""
        echo(f"#{number}: {kind}{to} after step {result.reached} (aimed at {target}), exit {result.exit_code}; "
             f"committed at step {committed}, {result.steps_rerun} step(s) to re-run"
             + ("; a checkpoint was left half-written" if result.torn else ""))
    final = _newest(uri)
    if final is None or not final.state["position"]["finished"]:
        echo("resuming to the end")
        runner.run_to_end(uri, "final")
        final = _newest(uri)
    differences = compare_runs(reference, final, python_rng=_compares_python_rng(uri))
    history_differences, epoch_rows, step_rows = compare_histories(reference_uri, uri)
    return ChaosReport(
        job=job_path, uri=uri, reference_uri=reference_uri, seed=seed, total_steps=total, interruptions=done,
        differences=differences + history_differences, epoch_rows=epoch_rows, step_rows=step_rows, workers=workers,
    )


class _Runner:
    """Starts `cluster-trainer run` subprocesses of the wrapper job (one per worker) and interrupts them."""

    def __init__(self, work: Path, env: dict[str, str], run_args: list[str], echo, workers: int = 1):
        self.work = work
        self.env = env
        self.run_args = run_args
        self.echo = echo
        self.workers = workers

    def _start(self, uri: str, name: str) -> tuple[list[subprocess.Popen], Path, Path]:
        """The attempt's processes, worker 0's progress file (the workers step together) and its log."""
        command = [sys.executable, "-m", "cluster_trainer", "run", WRAPPER_JOB, "--storage", uri, "--verbose", "0",
                   *RUN_IN_PROCESS, *self.run_args]
        addresses = loopback_addresses(self.workers)
        processes, progresses, logs = [], [], []
        for index in range(self.workers):
            suffix = f"-w{index}" if self.workers > 1 else ""
            progress, log = self.work / f"{name}{suffix}.progress", self.work / f"{name}{suffix}.log"
            progress.unlink(missing_ok=True)
            env = {**self.env, "CLUSTER_TRAINER_CHAOS_PROGRESS": str(progress)}
            if self.workers > 1:
                env["TF_CONFIG"] = Workers(addresses, index).tf_config()
            with open(log, "w") as sink:  # a file, not a pipe: a full pipe would block the child
                processes.append(subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT))
            progresses.append(progress)
            logs.append(log)
        return processes, progresses[0], logs[0]

    def run_to_end(self, uri: str, name: str) -> None:
        processes, _, log = self._start(uri, name)
        try:
            codes = [process.wait() for process in processes]
        finally:
            for process in processes:
                _stop(process)
        if any(codes):
            raise RuntimeError(f"the {name} run failed (exit {codes if self.workers > 1 else codes[0]}); "
                               f"its output ends:\n{_tail(log)}")

    def interrupt(self, uri: str, number: int, kind: str, target: int, delay: float,
                  victim: int = 0) -> Interruption | None:
        before = set(_uncommitted(uri))
        processes, progress, log = self._start(uri, f"attempt-{number}")
        grace = float(self.env.get("CLUSTER_TRAINER_GRACE_SECONDS", 30))
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while _read_step(progress) < target:
                ended = [p.returncode for p in processes if p.poll() is not None]
                if ended:
                    if not any(ended) and len(ended) == len(processes):
                        return None
                    if any(ended):
                        raise RuntimeError(f"attempt {number} exited ({ended}) before step {target}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"attempt {number} did not reach step {target} in {START_TIMEOUT:.0f}s:\n{_tail(log)}")
                time.sleep(0.005)
            time.sleep(delay)
            processes[victim].send_signal(signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL)
            try:
                # The others stop too: on the same notice, or failing once their peer is gone.
                codes = [process.wait(timeout=grace + 60) for process in processes]
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"attempt {number} did not exit after {kind}:\n{_tail(log)}") from None
        finally:
            for process in processes:
                _stop(process)
        if kind == "SIGTERM" and any(code != EXIT_PREEMPTED for code in codes):
            raise RuntimeError(f"attempt {number} exited {codes} after SIGTERM, not {EXIT_PREEMPTED}:\n{_tail(log)}")
        return Interruption(number=number, signal=kind, aimed_at=target, worker=victim, reached=_read_step(progress),
                            committed=0, exit_code=codes[victim], torn=bool(set(_uncommitted(uri)) - before))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _read_step(progress: Path) -> int:
    try:
        return int(progress.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _newest(uri: str) -> Checkpoint | None:
    return CheckpointStore(Storage(uri)).load_latest()


def _uncommitted(uri: str) -> list[str]:
    return CheckpointStore(Storage(uri))._listing()[1]


def _checkpoint_interval(reference: Checkpoint) -> int | None:
    """The reference's interval in steps: its fixed one, or with "auto" the one its cadence chose last
    (the interrupted run measures its own, so kills aimed at its commits land near them, not on them)."""
    every = reference.state["job"].get("checkpoint_every_steps")
    if every == "auto":
        interval = (reference.state.get("cadence") or {}).get("interval") or {}
        return interval.get("steps") or None
    return every


def _compares_python_rng(uri: str) -> bool:
    # botocore and gcsfs draw retry jitter from Python's global `random` on the upload thread,
    # so on object stores that one piece of process state follows the network, not the model.
    protocol = Storage(uri).fs.protocol
    return bool({"file", "local", "memory"} & set(protocol if isinstance(protocol, tuple) else (protocol,)))


def compare_runs(reference: Checkpoint, other: Checkpoint, python_rng: bool = True) -> list[str]:
    """What differs between two runs' final checkpoints (empty if they are equal, tensors bitwise).

    `python_rng=False` leaves out the state of Python's global `random`, for runs
    where a library drew from it at moments of its own (botocore's retry jitter).
    """
    differences = []
    if sorted(reference.tensors) != sorted(other.tensors):
        missing = sorted(set(reference.tensors) ^ set(other.tensors))
        differences.append(f"different tensors stored: {missing[:5]}")
    for key, expected in reference.tensors.items():
        actual = other.tensors.get(key)
        if actual is None:
            continue
        if not (expected.dtype == actual.dtype and expected.shape == actual.shape
                and expected.tobytes() == actual.tobytes()):
            differences.append(f"tensor {key} differs")
    for part in ("callbacks", "position", "variables"):
        if _comparable(part, reference.state[part]) != _comparable(part, other.state[part]):
            differences.append(f"{part} state differs")
    rng_parts = ("python", "numpy") if python_rng else ("numpy",)
    for part in rng_parts:
        if reference.state["rng"].get(part) != other.state["rng"].get(part):
            differences.append(f"{part} RNG state differs")
    return differences


def _comparable(part: str, state):
    """`state` without what differs by design between an interrupted and an uninterrupted run."""
    if part == "variables":
        # A model built twice in one process gets other auto-generated layer names (`dense_1`); the
        # stable path beside each name is what must match.
        return [{k: v for k, v in entry.items() if k != "path"} for entry in state]
    if part != "callbacks":
        return state
    # TensorBoard's event file lengths: every process writes files of its own, so an interrupted run
    # has more of them; the events in them are what must match (tests read and compare those).
    return {
        key: {**entry, "__extra__": {k: v for k, v in entry["__extra__"].items() if k != "event_bytes"}}
        if isinstance(entry, dict) and isinstance(entry.get("__extra__"), dict) else entry
        for key, entry in state.items()
    }


def compare_histories(reference_uri: str, uri: str) -> tuple[list[str], int, int]:
    """Differences between the two runs' Parquet histories (run columns aside), and the row counts."""
    from cluster_trainer.errors import ConfigError
    from cluster_trainer.history import RUN_COLUMNS, read_history

    differences, counts = [], []
    for steps, key in ((False, "epoch"), (True, "global_step")):
        try:
            expected = read_history(reference_uri, steps=steps)
            actual = read_history(uri, steps=steps)
        except ConfigError:  # the runs log no step rows
            if steps:
                counts.append(0)
                continue
            raise
        what = "step" if steps else "epoch"
        if actual[key].duplicated().any():
            differences.append(f"{what} rows repeated: {sorted(actual[key][actual[key].duplicated()].unique())[:10]}")
        drop = [c for c in RUN_COLUMNS if c in expected]
        left, right = expected.drop(columns=drop), actual.drop(columns=[c for c in RUN_COLUMNS if c in actual])
        if not left.equals(right):
            differences.append(f"{what} history differs: {len(actual)} rows vs {len(expected)} in the reference")
        counts.append(len(actual))
    return differences, counts[0], counts[1]


def _interval(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number of steps or "auto", got {text!r}') from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster_trainer.chaos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\nFrom Python")[0],
    )
    parser.add_argument("job", metavar="JOB.py")
    parser.add_argument("--storage", required=True, metavar="URI", help="a fresh URI for the interrupted run")
    parser.add_argument("--reference", metavar="URI", help="the uninterrupted run (default: <URI>-reference; reused if finished)")
    parser.add_argument("--interruptions", type=int, default=10, metavar="K")
    parser.add_argument("--seed", type=int, default=0, help="seeds the schedule of signals (default 0)")
    parser.add_argument("--sigkill-share", type=float, default=0.5, metavar="P",
                        help="fraction of interruptions that are SIGKILL, without notice (default 0.5)")
    parser.add_argument("--every-steps", type=_interval, metavar="N",
                        help='override the job\'s checkpoint interval: a number of steps, or "auto"')
    parser.add_argument("--history-every-steps", type=int, default=4, metavar="N",
                        help="log history rows every N steps in both runs, to check them too (default 4; 0: off)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="train every attempt as N worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy "
                             "(no Ray); each signal goes to one worker (default 1)")
    args, run_args = parser.parse_known_args(argv)
    if args.interruptions < 1 or not 0 <= args.sigkill_share <= 1 or args.workers < 1:
        parser.error("--interruptions and --workers must be >= 1 and --sigkill-share within [0, 1]")
    try:
        report = run_chaos(
            args.job, args.storage, interruptions=args.interruptions, seed=args.seed, sigkill_share=args.sigkill_share,
            reference_uri=args.reference, every_steps=args.every_steps,
            history_every_steps=args.history_every_steps or None, run_args=run_args, workers=args.workers,
        )
    except RuntimeError as e:
        print(f"chaos: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

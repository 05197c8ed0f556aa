"""Run the CLI in real subprocesses, park them at exact points, kill them with real signals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from cluster_trainer.chaos import compare_runs
from cluster_trainer.checkpoint import Checkpoint, CheckpointStore
from cluster_trainer.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
TEST_JOB = str(ROOT / "tests" / "jobs" / "interruptible.py")
STARTUP_TIMEOUT = 180
COMMIT_TIMEOUT = 120
TIMEOUT = 240  # seconds any one wait on a driver may take on a loaded 2-core machine


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_TEST_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m cluster_trainer ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "cluster_trainer", *args],
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def train_cmd(storage: Path | str, *extra: str, job: str = TEST_JOB) -> list[str]:
    # In this process, not in a Ray actor: these tests signal and kill the training process itself.
    return ["run", job, "--storage", str(storage), "--devices", "2", "--verbose", "0", "--no-ray", *extra]


def run_and_kill_at(storage: Path | str, pause_at: str, tmp: Path, *extra: str, expect: dict | None = None, **env: str) -> str:
    """Start a run that parks itself at `pause_at` (`hook:global_step`), then SIGKILL it there; its output.

    With `expect` (a partial position), wait until the background writer has
    committed a checkpoint at that position before killing.
    """
    marker = tmp / f"paused-{pause_at.replace(':', '-')}-{time.monotonic_ns()}"
    output = tmp / f"{marker.name}.log"  # a file, not a pipe: a full pipe would block the child
    with open(output, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster_trainer", *train_cmd(storage, *extra)],
            env=cli_env(CT_TEST_PAUSE_AT=pause_at, CT_TEST_PAUSE_MARKER=str(marker), **env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    tail = lambda: output.read_text()[-3000:]  # noqa: E731
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(f"run exited ({process.returncode}) before pausing at {pause_at}:\n{tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"run did not reach {pause_at} in {STARTUP_TIMEOUT}s")
            time.sleep(0.05)
        deadline = time.monotonic() + COMMIT_TIMEOUT  # the upload runs on: a loaded machine slows it
        while expect is not None and not _committed_at(storage, expect):
            if time.monotonic() > deadline:
                process.send_signal(signal.SIGUSR1)  # the CLI prints every thread's stack: where the writer waits
                time.sleep(2)
                raise AssertionError(f"no checkpoint at {expect} was committed in {COMMIT_TIMEOUT}s while paused at "
                                     f"{pause_at}:\n{output.read_text()[-12000:]}")
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return output.read_text()


def _committed_at(storage: Path | str, expect: dict) -> bool:
    """Whether the newest committed checkpoint is at `expect`: one listing and one manifest read, not
    a whole checkpoint (polled while the paused process's writer may still be uploading)."""
    storage = Storage(str(storage))
    names = CheckpointStore(storage).committed()
    if not names:
        return False
    manifest = json.loads(storage.get(f"checkpoints/{names[0]}/MANIFEST.json"))
    return all(manifest["position"][k] == v for k, v in expect.items() if k in manifest["position"])


def latest(storage: Path | str) -> Checkpoint:
    checkpoint = CheckpointStore(Storage(str(storage))).load_latest()
    assert checkpoint is not None, f"no committed checkpoint under {storage}"
    return checkpoint


def assert_bitwise_equal_runs(reference: Checkpoint, resumed: Checkpoint, python_rng: bool = True) -> None:
    """Every tensor (variables, optimizer, metrics, callback arrays, RNG) and all run state equal.

    `python_rng=False` leaves out the state of Python's global `random`, for runs
    where a library drew from it at moments of its own (botocore's retry jitter).
    History, EarlyStopping/ReduceLROnPlateau/ModelCheckpoint decisions, counters
    and CSV length are in the callback state compared here.
    """
    differences = compare_runs(reference, resumed, python_rng=python_rng)
    assert not differences, f"the resumed run differs from the uninterrupted run: {differences}"


def start_training(storage: Path, *extra: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start a run in the background and return once it has committed a checkpoint past step 0.

    The caller stops the process (in a `finally`); its output is in the returned log file.
    """
    log = storage.parent / f"{storage.name}.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would block the child
        process = subprocess.Popen([sys.executable, "-m", "cluster_trainer", *train_cmd(storage, *extra)],
                                   env=cli_env(**env), stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if latest(storage).step > 0:
                break
        except AssertionError:
            pass
        time.sleep(0.05)
    return process, log


def tree_digest(path: Path) -> dict[str, str]:
    """Content hash of every file below `path`, to prove nothing was changed."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


class Driver:
    """`cluster-trainer run` in a subprocess, output to a file (a full pipe would block it)."""

    def __init__(self, command: list[str], log: Path, env: dict, new_session: bool = False, cwd: Path = ROOT):
        self.log = log
        with open(log, "w") as sink:
            self.process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                                            start_new_session=new_session)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.process.poll() is not None:
                match = re.search(pattern, self.output())  # the last lines, written as it exited
                if match:
                    return match
                raise AssertionError(f"driver exited ({self.process.returncode}) before {pattern!r}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver still running after {timeout}s:\n{self.output()[-4000:]}") from None

    def stop(self) -> None:
        """Never leave a driver behind, whatever failed (its actors end with it)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def once_per_session(tmp_path_factory, worker_id: str, name: str, compute: Callable[[Path], dict]) -> dict:
    """`compute(directory)` run once for the whole test session, even with pytest-xdist's workers
    (each would otherwise run a module's fixture itself): the first to get here computes, the
    others wait for its JSON-able result. xdist's recipe for a session-wide fixture."""
    if worker_id == "master":  # no xdist
        return compute(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent
    with FileLock(str(root / f"{name}.lock")):
        done = root / f"{name}.json"
        if done.exists():
            return json.loads(done.read_text())
        directory = root / name
        directory.mkdir()
        result = compute(directory)
        done.write_text(json.dumps(result))
        return result

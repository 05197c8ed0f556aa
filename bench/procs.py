"""Training processes for the preemption and resume benchmarks: start, watch, signal, time.

The ideas of `cluster_trainer.chaos`'s runner: a real subprocess (`cluster-trainer
run --no-ray`, so training runs in the process we signal), a progress file it
rewrites after every batch, output kept out of a pipe that could fill up. Here
the output is read by a thread that stamps each line with the wall time it
arrived, so a benchmark can tell when the run said it committed, and the
process's exit is timed by `wait()`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_JOB = str(ROOT / "bench" / "bench_job.py")
KERAS_FIT = str(ROOT / "bench" / "keras_fit.py")
START_TIMEOUT = 300.0


def child_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cluster_trainer_command(storage: str, devices: int) -> list[str]:
    # --no-ray: train in the process we start and signal, not in a Ray actor.
    return [sys.executable, "-m", "cluster_trainer", "run", BENCH_JOB, "--storage", storage, "--no-ray",
            "--verbose", "0", "--devices", str(devices)]


def keras_fit_command() -> list[str]:
    return [sys.executable, KERAS_FIT]


class Training:
    """One training subprocess; `progress` holds (first step, last step, wall time of the first step's end)."""

    def __init__(self, command: list[str], env: dict[str, str], work: Path, name: str):
        self.progress_path = work / f"{name}.progress"
        self.progress_path.unlink(missing_ok=True)
        self.log_path = work / f"{name}.log"
        self.lines: list[tuple[float, str]] = []  # (wall time it arrived, line)
        self.started = time.time()
        self.process = subprocess.Popen(command, env={**env, "BENCH_PROGRESS": str(self.progress_path)}, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.exited: float | None = None

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))
                log.write(line)

    @property
    def progress(self) -> tuple[int, int, float] | None:
        try:
            first, last, first_time = self.progress_path.read_text().split()
            return int(first), int(last), float(first_time)
        except (FileNotFoundError, ValueError):
            return None

    def wait_for_step(self, step: int, timeout: float = START_TIMEOUT) -> None:
        """Block until the process has finished global step `step` (raises if it exits first)."""
        deadline = time.monotonic() + timeout
        while True:
            progress = self.progress
            if progress is not None and progress[1] >= step:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"training exited ({self.process.returncode}) before step {step}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"training did not reach step {step} in {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.002)

    def signal(self, number: int) -> float:
        sent = time.time()
        self.process.send_signal(number)
        return sent

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"training did not exit within {timeout:.0f}s:\n{self.tail()}") from None
        self.exited = time.time()
        self._reader.join(timeout=10)
        return code

    def line_time(self, contains: str) -> float | None:
        """Wall time at which the first output line containing `contains` arrived."""
        return next((t for t, line in self.lines if contains in line), None)

    def line(self, contains: str) -> str | None:
        return next((line for _, line in self.lines if contains in line), None)

    def tail(self) -> str:
        return "\n".join(line for _, line in self.lines[-30:])

    def stop(self) -> None:
        """Kill the process if it still runs (by its own pid)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

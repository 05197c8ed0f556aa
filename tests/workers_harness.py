"""Multi-worker runs without Ray: N `cluster-trainer run --no-ray` processes on 127.0.0.1, each with
its own `TF_CONFIG` and port, signalled and killed one at a time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster_trainer.workers import Workers, loopback_addresses
from harness import ROOT, TEST_JOB, TIMEOUT, cli_env

# The multi-worker tests' runs: the test job for 2 epochs (32 steps, commits mid-epoch and at epoch ends).
WORKERS_EPOCHS = ("--epochs", "2")


def run_command(storage: Path | str, devices: int, *extra: str, job: str = TEST_JOB) -> list[str]:
    return [sys.executable, "-m", "cluster_trainer", "run", job, "--storage", str(storage), "--devices", str(devices),
            "--verbose", "0", "--no-ray", *extra]


class WorkerGroup:
    """`workers` processes training one run together; output of worker i in `<log_dir>/<name>-i.log`.

    Args:
        storage: the run's URI.
        log_dir: where the workers' output goes (a file, not a pipe: a full pipe would block a worker).
        workers: how many.
        devices: logical CPU devices per worker.
        extra: more `cluster-trainer run` options.
        worker_env: environment for one worker only, by index (e.g. a notice on worker 1).
        env: environment for every worker.
    """

    def __init__(self, storage: Path | str, log_dir: Path, *extra: str, workers: int = 2, devices: int = 1,
                 worker_env: dict[int, dict] | None = None, name: str = "worker", **env: str):
        addresses = loopback_addresses(workers)
        self.logs = [log_dir / f"{name}-{i}.log" for i in range(workers)]
        self.processes = []
        for i, log in enumerate(self.logs):
            config = Workers(addresses, i).tf_config()
            with open(log, "w") as sink:
                self.processes.append(subprocess.Popen(
                    run_command(storage, devices, *extra), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                    env=cli_env(TF_CONFIG=config, **env, **(worker_env or {}).get(i, {}))))
        self.exited_at: list[float | None] = [None] * workers

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def output(self, index: int) -> str:
        return self.logs[index].read_text()

    def outputs(self) -> str:
        return "\n".join(f"--- worker {i}:\n{self.output(i)[-3000:]}" for i in range(len(self.logs)))

    def wait(self, timeout: float = 2 * TIMEOUT) -> list[int]:
        """Every worker's exit code, once all have exited (raises after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.processes):
            for i, p in enumerate(self.processes):
                if p.poll() is not None and self.exited_at[i] is None:
                    self.exited_at[i] = time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"workers still running after {timeout}s:\n{self.outputs()}")
            time.sleep(0.05)
        for i in range(len(self.processes)):
            self.exited_at[i] = self.exited_at[i] or time.monotonic()
        return [p.returncode for p in self.processes]

    def signal(self, index: int, number: int) -> float:
        self.processes[index].send_signal(number)
        return time.monotonic()

    def stop(self) -> None:
        """Never leave a worker behind, whatever failed (by each one's own pid)."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

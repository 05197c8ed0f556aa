"""Smoke test: the benchmarks run end to end at their smallest size.

Not a measurement: each runs `python -m bench --only ...` with one repetition,
the smallest model, local disk only and the fewest training processes, and
checks that the tables and plots come out and that the numbers that do not
depend on the machine hold (a notice re-runs no step; every method of the
shared schedule finishes the run).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each trains in several subprocesses (about 20-30 s apiece on 2 cores)


def bench(*args: str, tmp_path: Path, stores: tuple[str, ...] = ("local",), timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--repeats", "1", "--stores", *stores, "--plot-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_preemption_benchmark_runs_at_smallest_size(tmp_path):
    out = bench("--only", "preemption", "--state-sizes", "1", "--rerun-steps", "20", "--interruptions", "1",
                "--methods", "notice", "keras-epoch", tmp_path=tmp_path)
    assert "| local disk | 13 MB |" in out  # one Dense 1024x1024 layer with Adam slots
    rows = [line for line in out.splitlines() if line.startswith("| 20 |")]
    assert len(rows) == 2, out
    assert rows[0].startswith("| 20 | cluster-trainer, notice (SIGTERM) | 0 | 0.0 | 0 | **0** |")
    assert "BackupAndRestore" in rows[1]
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench_preemption_flush.png", "bench_preemption_reruns.png"}


def test_resume_benchmark_runs_at_smallest_size(tmp_path):
    out = bench("--only", "resume", "--state-sizes", "1", "--resume-batches", "20", "--data-repeats", "1",
                tmp_path=tmp_path)
    assert "| local disk | 13 MB |" in out
    assert "| numpy arrays (ArraySource) | 20 |" in out
    assert "| tf.data builder: TFRecord, shuffle, map (DatasetSource) | 20 |" in out
    assert "| keras.utils.PyDataset (PyDatasetSource) | 20 |" in out
    assert "| tf.data.Dataset object: TFRecord, map, batch (DatasetObjectSource) | 20 |" in out
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench_resume_restart.png", "bench_resume_data.png"}


def test_io_benchmark_runs_on_every_store_at_smallest_size(tmp_path):
    out = bench("--only", "io", "--sizes", "1", tmp_path=tmp_path, stores=("local", "s3", "gcs"))
    for store in ("local disk", "S3 (moto server)", "GCS (emulator)"):
        assert f"| {store} | 4 MB |" in out, out  # one Dense 1024x1024 layer, no optimizer
    assert "Against a raw write plus fsync of each file, local commit / raw is" in out


def test_loop_benchmark_runs_at_smallest_size(tmp_path):
    out = bench("--only", "loop", "--epochs", "1", "--widths", "8", tmp_path=tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "steps/s" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| model.fit, same tf.data pipeline (baseline)", "| model.fit(x, y) on numpy arrays",
        "| cluster-trainer loop, no saves", "| cluster-trainer loop, save every 16 steps (background writer)",
        "| cluster-trainer loop, save every 128 steps (background writer)"], out
    assert rows[0].split(" | ")[2] == "1.00 (1.00–1.00), best 1.00"  # the baseline against itself
    assert "Per save (" in out  # the saving variants saved
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench_loop.png"}


def test_multi_worker_benchmark_runs_at_smallest_size(tmp_path):
    out = bench("--only", "multiworker", "--epochs", "1", "--widths", "8", "--state-sizes", "1", "--flush-phases", "0.5",
                tmp_path=tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| variant", "| checkpoint"))]
    assert [row.split(" | ")[0] for row in rows[:5]] == [
        "| `tf_keras` `fit`, 2 workers (baseline)", "| cluster-trainer loop, 2 workers",
        "| Keras 3 `fit` with our reduction fix, 2 workers (global per-step logs)",
        "| Keras 3 `fit`, each step's logs the first local replica's (as `tf_keras`)",
        "| cluster-trainer loop, 1 worker (same global batch)"], out
    assert rows[0].endswith("| 1.00 |")  # the baseline against itself
    assert "2 workers / 1 worker: **" in rows[4], out
    assert rows[5].startswith("| 13 MB | 0.5 of a step in |") and rows[5].count(" s |") >= 4, out  # Dense 1024x1024, Adam


def test_cadence_benchmark_runs_at_smallest_size(tmp_path):
    out = bench("--only", "cadence", "--epochs", "1", "--cadence-width", "8", "--cadence-steps", "20",
                "--cadence-mb", "1", "--cadence-kills", "1", "--cadence-methods", "auto", "oracle", tmp_path=tmp_path)
    assert '| loop, every_steps="auto" |' in out, out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| every_steps=", "| fixed every_steps"))]
    assert [row[0] for row in rows] == ['| every_steps="auto"', "| fixed every_steps, the best in hindsight within the "
                                        "budget"], out
    assert all(row[2].isdigit() for row in rows), out  # one kill each, and each policy finished the run after it
    assert rows[1][4] == "1.00x", out  # the oracle against itself


def test_sweep_benchmark_runs_at_smallest_size(tmp_path):
    # A local Ray cluster, a sweep of one trial and two Tune runs of one trivial trial: minutes on a busy machine.
    # The ASHA sweep is left out (tests/test_sweep.py runs one).
    out = bench("--only", "sweep", "--sweep-trials", "1", "--asha-trials", "0", "--trivial-trials", "1",
                "--sweep-variants", tmp_path=tmp_path, timeout=900)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "sweep wall" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| warm workers (default), 1 epoch"], out
    assert rows[0].split(" | ")[1:3] == ["1", "1"]  # one trial of one epoch
    assert out.count("Tune driver, 1 trials that only report") == 2, out
    assert "of which the driver process's CPU" in out

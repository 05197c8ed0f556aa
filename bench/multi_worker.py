"""Multi-worker runs on 127.0.0.1: steps/s against `tf_keras` `fit`, and notice-to-commit.

Two benchmarks on real worker processes, each with its own `TF_CONFIG` (loopback
gRPC between them, no Ray), MultiWorkerMirroredStrategy over one logical CPU
device per worker:

**Steps/s.** Every worker of a 2-worker group runs `bench/multi_worker_steps.py`,
which trains the same MLP on the same global batches with our loop (Keras 3)
and with `tf_keras` `fit` (Keras 2: the only multi-worker Keras path users have,
through `TF_USE_LEGACY_KERAS=1`), in turns, under one strategy, in the same
processes: a ratio is taken within a repetition. Keras 3's own `fit` runs in the
same turns (with global and with per-worker step logs), to tell our loop's cost
from Keras 3's. Then one process trains the same job alone (1 worker, 1 device)
with the same global batch: the 2-worker against 1-worker figure, taken from
consecutive runs, not interleaved ones. Each worker is pinned to a core of its
own, as if it had a machine (`BENCH_PIN=0`: they share every core).

**Notice to commit.** A 2-worker run of `bench/bench_job.py` (a Dense model
whose checkpoint is about S MB) trains; the benchmark sends SIGTERM to worker 1
alone and times, from outside, the signal to the chief's "state committed" line.
The baseline is the same run on 1 worker (1 device), signalled the same way. Trials
alternate. The chief's own log splits its flush into waiting for the step in flight,
the host copy and the write. A notice comes at any moment of a step, so each trial
signals at a chosen phase (`--flush-phases`): right after a step ends (0), or half a
step later (0.5), timed from the two steps before it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ROOT, Training, child_env, cluster_trainer_command
from cluster_trainer.workers import Workers, loopback_addresses

STEPS_WORKER = str(ROOT / "bench" / "multi_worker_steps.py")
SAMPLES, BATCH = 8192, 128  # the steps/s benchmark's data: 64 global batches per epoch
FLUSH_BATCH = 16
FLUSH_WARM_STEPS = 10
GROUP_TIMEOUT = 1800
PIN_WORKERS = os.environ.get("BENCH_PIN", "1") == "1"


def _steps_processes(workers: int, variants: str, work: Path, args) -> list[dict]:
    """Run `multi_worker_steps.py` as `workers` processes; each one's JSON result."""
    addresses = loopback_addresses(workers)
    run_dir = work / f"runs-{workers}"
    env = child_env(BENCH_VARIANTS=variants, BENCH_REPEATS=args.repeats, BENCH_EPOCHS=args.epochs,
                    BENCH_WIDTH=args.widths[0], BENCH_SAMPLES=SAMPLES, BENCH_BATCH=BATCH, BENCH_RUN_DIR=run_dir)
    processes, outputs = [], []
    for index in range(workers):
        output = work / f"steps-{workers}-{index}.out"
        extra = {"TF_CONFIG": Workers(addresses, index).tf_config()} if workers > 1 else {}
        with open(output, "w") as sink:
            processes.append(subprocess.Popen([sys.executable, STEPS_WORKER], env={**env, **extra}, cwd=ROOT,
                                              stdout=sink, stderr=subprocess.STDOUT,
                                              preexec_fn=_pin_to_core(index)))
        outputs.append(output)
    try:
        codes = [p.wait(timeout=GROUP_TIMEOUT) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise RuntimeError(f"steps/s workers exited {codes}:\n{outputs[0].read_text()[-3000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return [json.loads(o.read_text().strip().splitlines()[-1]) for o in outputs]


def _pin_to_core(index: int):
    """A preexec_fn that keeps worker `index` on a core of its own, as if each worker had a machine of
    its own (when the machine has a core per worker; otherwise workers share them all)."""
    cores = sorted(os.sched_getaffinity(0))

    def pin() -> None:
        if PIN_WORKERS and len(cores) >= 2:
            os.sched_setaffinity(0, {cores[index % len(cores)]})

    return pin


def measure_steps(args, work: Path) -> dict:
    group = _steps_processes(2, "ours,keras2,keras3,keras3-local", work, args)
    alone = _steps_processes(1, "ours", work, args)[0]
    return {"group": group[0], "alone": alone}


def steps_table(result: dict, repeats: int, epochs: int, width: int) -> str:
    group, alone = result["group"], result["alone"]
    rates, best = group["rates"], group["best"]
    keras2 = rates["keras2"]

    def row(label: str, name: str) -> str:
        paired = sorted(a / b for a, b in zip(rates[name], keras2))
        ratio = ("1.00" if name == "keras2" else f"**{statistics.median(paired):.2f}** ({paired[0]:.2f}–{paired[-1]:.2f}), "
                 f"best {best[name] / best['keras2']:.2f}")
        return f"| {label} | {statistics.median(rates[name]):.1f} ({best[name]:.1f}) | {ratio} |"

    to_alone = statistics.median(rates["ours"]) / statistics.median(alone["rates"]["ours"])
    rows = [
        "| variant | steps/s: median (best epoch) | ratio to `tf_keras` `fit` |",
        "|---|---:|---:|",
        row("`tf_keras` `fit`, 2 workers (baseline)", "keras2"),
        row("cluster-trainer loop, 2 workers", "ours"),
        row("Keras 3 `fit` with our reduction fix, 2 workers (global per-step logs)", "keras3"),
        row("Keras 3 `fit`, each step's logs the first local replica's (as `tf_keras`)", "keras3-local"),
        f"| cluster-trainer loop, 1 worker (same global batch) | {statistics.median(alone['rates']['ours']):.1f} "
        f"({alone['best']['ours']:.1f}) | 2 workers / 1 worker: **{to_alone:.2f}** |",
    ]
    pinned = "each worker pinned to a core of its own" if PIN_WORKERS else "the workers sharing every core"
    return (f"MLP 64-{width}-{width}-10, {SAMPLES} examples, global batch {BATCH} ({group['steps']} "
            f"steps/epoch); {repeats} repetitions of {epochs} timed epochs (the median epoch of each); 1 logical CPU "
            f"device per worker, {pinned} (the 1-worker run too). Ratio: the median (range) of the ratios within "
            "each repetition, and of the fastest epochs.\n\n" + "\n".join(rows) + "\n")


def flush_trial(workers: int, megabytes: int, number: int, work: Path, phase: float = 0.0) -> dict:
    """One run signalled `phase` of a step after a step ends (the step timed from the two before it)."""
    name = f"flush-{workers}w-{megabytes}mb-{phase:g}-{number}"  # one run per trial: none resumes another's
    uri = str(work / name)
    env = child_env(BENCH_MODEL=f"dense:{megabytes}", BENCH_SAMPLES=FLUSH_BATCH * 200, BENCH_BATCH=FLUSH_BATCH,
                    BENCH_EPOCHS=1000)
    addresses = loopback_addresses(workers)
    runs = []
    try:
        for index in range(workers):
            extra = {"TF_CONFIG": Workers(addresses, index).tf_config()} if workers > 1 else {}
            runs.append(Training(cluster_trainer_command(uri, 1), {**env, **extra}, work, f"{name}-{index}"))
        runs[0].wait_for_step(FLUSH_WARM_STEPS)
        began = time.monotonic()
        runs[0].wait_for_step(FLUSH_WARM_STEPS + 2)
        step = (time.monotonic() - began) / 2
        runs[0].wait_for_step(FLUSH_WARM_STEPS + 3)
        time.sleep(phase * step)
        sent = runs[-1].signal(signal.SIGTERM)  # worker 1 of 2, or the only one
        codes = [run.wait() for run in runs]
    finally:
        for run in runs:
            run.stop()
    chief = runs[0]
    if codes != [75] * workers or chief.line_time("after the notice") is None:
        raise RuntimeError(f"the {workers}-worker flush run exited {codes}:\n{chief.tail()}")
    stages = (chief.line("flush of ") or "").split("flush of ", 1)[-1].strip()
    size = float(re.match(r"([\d.]+) MB", stages).group(1)) if re.match(r"([\d.]+) MB", stages) else float("nan")
    shutil.rmtree(uri, ignore_errors=True)
    return {"workers": workers, "megabytes": size, "phase": phase, "step": step,
            "signal_to_commit": chief.line_time("after the notice") - sent,
            "signal_to_flush": chief.line_time("committing at epoch") - sent,
            "signal_to_exit": max(run.exited for run in runs) - sent, "stages": stages}


def measure_flush(sizes: list[int], repeats: int, work: Path, phases: list[float]) -> list[dict]:
    trials = []
    for repeat in range(repeats):
        for megabytes in sizes:
            for phase in phases:
                for workers in (1, 2):
                    trial = flush_trial(workers, megabytes, repeat, work, phase)
                    trials.append(trial)
                    print(f"flush {repeat + 1}/{repeats} {workers} worker(s) {trial['megabytes']:.0f} MB, signal {phase:g} "
                          f"of a {trial['step']:.2f}s step in: signal->commit {trial['signal_to_commit']:.2f}s (the chief "
                          f"began its flush at {trial['signal_to_flush']:.2f}s); flush of {trial['stages']}", flush=True)
    return trials


def flush_table(trials: list[dict]) -> str:
    rows = ["| checkpoint | signal | step (1 / 2 workers) | 1 worker: signal → commit | "
            "2 workers: signal to worker 1 → chief's commit | 2 workers / 1 worker | "
            "signal → the chief begins its flush (1 / 2 workers) | signal → every worker exited (2 workers) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for size in sorted({round(t["megabytes"]) for t in trials}):
        for phase in sorted({t["phase"] for t in trials}):
            group = [t for t in trials if round(t["megabytes"]) == size and t["phase"] == phase]
            med = lambda workers, key: statistics.median(t[key] for t in group if t["workers"] == workers)  # noqa: E731
            one, two = med(1, "signal_to_commit"), med(2, "signal_to_commit")
            when = "right after a step" if phase == 0 else f"{phase:g} of a step in"
            rows.append(f"| {size} MB | {when} | {med(1, 'step'):.2f} s / {med(2, 'step'):.2f} s | {one:.2f} s | "
                        f"{two:.2f} s | **{two / one:.2f}x** | {med(1, 'signal_to_flush'):.2f} s / "
                        f"{med(2, 'signal_to_flush'):.2f} s | {med(2, 'signal_to_exit'):.2f} s |")
    return ("Median of the trials per row; 1 and 2 workers alternate. Each worker stops after the step in flight "
            "when the notice came (its votes are read once its update is applied), so the chief's flush begins "
            "when that step ends: the longer a step, the later.\n\n" + "\n".join(rows) + "\n")


def run(args, machine: str) -> tuple[str, dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-multi-worker-"))
    try:
        steps = measure_steps(args, work)
        flush = measure_flush(args.state_sizes, args.repeats, work, args.flush_phases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = ("2 worker processes on 127.0.0.1 (loopback gRPC), 1 logical CPU device each. " + machine + "\n\n"
            + steps_table(steps, args.repeats, args.epochs, args.widths[0]) + "\n" + flush_table(flush))
    return text, {"steps": steps, "flush": flush}

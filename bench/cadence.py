"""Checkpoint cadence: what `every_steps="auto"` costs, and the steps it saves re-running.

**Steps/s against no saves.** In this process, the loop benchmark's MLP (one
width) trained with checkpoints off and with `every_steps="auto"` (3% budget),
interleaved, a few repetitions; the ratio of steps/s within each repetition
(goal >= 0.97, the anchor CheckFreq set: per-iteration checkpointing under
3.5% overhead).

**Steps re-run per preemption without notice.** `bench/bench_job.py`'s Dense
model trained as real processes (`cluster-trainer run --no-ray`) that kill
themselves with SIGKILL right after the global steps of one seeded schedule,
restarted until the run ends, once per policy:

- `every_steps="auto"`;
- the fixed `every_steps` chosen in hindsight for this schedule: the one with
  the fewest steps re-run among those whose saves stay within the same 3%
  budget, from what a save costs and the step time as the auto run measured
  them (the oracle; chosen as if each commit were durable at once, and allowed
  the whole budget where "auto" aims at 80% of it);
- the default `CheckpointPolicy()` (epoch ends only);
- `"auto"` and the default again, with an EC2 rebalance recommendation raised
  on a local IMDSv2 server `WARNING_LEAD_SECONDS` before each kill (`--notice
  aws`): each warning makes the run save once and train on.

Every policy also commits at each epoch's end (the default `every_epoch`). The
steps re-run after a kill are the steps the killed process trained beyond the
point where the next one started.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.imds import MetadataServer
from bench.preemption import RerunResult, schedule
from bench.procs import Training, child_env, cluster_trainer_command
from cluster_trainer.checkpoint import CheckpointStore
from cluster_trainer.job import CheckpointPolicy
from cluster_trainer.storage import Storage

BATCH = 16
EPOCHS = 3
BUDGET = CheckpointPolicy.max_overhead
WARNING_LEAD_SECONDS = 2.0  # the recommendation comes this long before the kill (the run polls every second)
METHODS = {  # id: (label, BENCH_EVERY_STEPS, early warnings)
    "auto": ('every_steps="auto"', "auto", False),
    "oracle": ("fixed every_steps, the best in hindsight within the budget", None, False),
    "default": ("CheckpointPolicy() default: epoch ends only", "0", False),
    "auto-warned": ('every_steps="auto", rebalance warnings', "auto", True),
    "default-warned": ("default, rebalance warnings", "0", True),
}


# -- steps/s -----------------------------------------------------------------------------------


def measure_speed(width: int, epochs: int, repeats: int) -> dict:
    """Steps/s of the loop without saves and with "auto", interleaved; the auto runs' checkpoint stats."""
    from bench import loop_overhead

    variants = {
        "no saves": CheckpointPolicy(every_steps=None, every_epoch=False),
        'every_steps="auto"': CheckpointPolicy(every_steps="auto", every_epoch=False, keep_last=2),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    stats = []
    for repeat in range(repeats):
        for name, policy in variants.items():
            before = len(loop_overhead.SAVE_STATS)
            times = loop_overhead.run_loop(width, epochs + 1, policy)
            stats += loop_overhead.SAVE_STATS[before:]
            rates[name].append(loop_overhead.STEPS / statistics.median(times))
            print(f"cadence speed, repeat {repeat + 1}/{repeats}: {name}: {rates[name][-1]:.1f} steps/s", flush=True)
    return {"width": width, "epochs": epochs, "rates": rates, "stats": stats}


def speed_table(result: dict) -> str:
    from bench import loop_overhead

    rates = result["rates"]
    (base, base_rates), (auto, auto_rates) = rates.items()
    ratios = sorted(a / b for a, b in zip(auto_rates, base_rates))
    stats = result["stats"]
    lines = ["| variant | steps/s (median of repetitions) | ratio to no saves: median (range) |", "|---|---:|---:|",
             f"| loop, {base} | {statistics.median(base_rates):.1f} | |",
             f"| loop, {auto} | {statistics.median(auto_rates):.1f} | **{statistics.median(ratios):.3f}** "
             f"({ratios[0]:.2f}–{ratios[-1]:.2f}) |"]
    text = (f"**Steps/s.** MLP {loop_overhead.FEATURES}-{result['width']}-{result['width']}-{loop_overhead.CLASSES}, "
            f"global batch {loop_overhead.BATCH} ({loop_overhead.STEPS} steps/epoch), MirroredStrategy over 2 logical "
            f"CPU devices, {len(base_rates)} interleaved repetitions of {result['epochs']} timed epochs, no epoch-end "
            "saves.\n\n" + "\n".join(lines) + "\n")
    if stats:
        text += (f"\nThe auto runs saved {sum(s['saves'] for s in stats)} times, every "
                 f"{statistics.median(s['interval'] for s in stats):.0f} steps at the end (median); what saving cost "
                 "training (its thread, and the steps slowed while commits uploaded), by the run's own account: "
                 f"{statistics.median(s['overhead'] for s in stats):.1%} of training time (median of runs).\n")
    return text


# -- steps re-run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class PolicyRun(RerunResult):
    every: str  # what the run was given
    cadence: dict  # the final checkpoint's cadence state

    @property
    def step_seconds(self) -> float:
        return statistics.median(a["step_seconds"] for a in self.cadence["attempts"] if a.get("step_seconds"))

    @property
    def save_seconds(self) -> float:
        """What a save costs training, as the last attempt measured it: its thread, and the steps it slowed."""
        return (self.cadence["save_seconds"] or 0.0) + (self.cadence["slowdown_seconds"] or 0.0)

    @property
    def save_cost_steps(self) -> float:
        """What its saves cost training, in steps (the attempts that committed, as they recorded it)."""
        seconds = sum((a.get("overhead") or 0.0) * (a.get("training_seconds") or 0.0) for a in self.cadence["attempts"])
        return seconds / self.step_seconds


def simulated_reruns(points: list[int], every: int, steps_per_epoch: int) -> int:
    """Steps re-run on `points` by a fixed `every` (plus epoch-end commits), each commit durable at once.

    A kill right after step p lands before that step's commit: the run resumes
    from the last commit at a step <= p - 1.
    """
    return sum(p - max((p - 1) // every * every, (p - 1) // steps_per_epoch * steps_per_epoch) for p in points)


def oracle_interval(points: list[int], steps_per_epoch: int, total: int, save_seconds: float,
                    step_seconds: float) -> int:
    """The fixed interval with the fewest steps re-run on `points` among those whose saves cost at most the budget.

    Where even one save in the whole run costs more (a small run with a large state, or a loaded machine),
    that is an interval of the whole run: epoch-end commits only.
    """
    smallest = min(total, max(1, math.ceil(save_seconds / (BUDGET * step_seconds))))
    return min(range(smallest, total + 1), key=lambda every: (simulated_reruns(points, every, steps_per_epoch), every))


def run_policy(method: str, every: str, points: list[int], steps_per_epoch: int, megabytes: int, work: Path,
               imds: MetadataServer | None, lead_steps: int = 0) -> PolicyRun:
    uri = str(work / "runs" / method)
    env = child_env(BENCH_MODEL=f"dense:{megabytes}", BENCH_SAMPLES=steps_per_epoch * BATCH, BENCH_BATCH=BATCH,
                    BENCH_EPOCHS=EPOCHS, BENCH_EVERY_STEPS=every, BENCH_EVERY_EPOCH=1)
    command = cluster_trainer_command(uri, devices=1)
    if imds is not None:
        command += ["--notice", "aws"]
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
    attempts = []
    started = time.perf_counter()
    for number, point in enumerate([*points, None]):
        signal_env = {"BENCH_SIGNAL_AT": f"SIGKILL:{point}"} if point is not None else {}
        if imds is not None:
            imds.clear()  # a new instance
        run = Training(command, {**env, **signal_env}, work, f"cadence-{method}-{number}")
        try:
            while imds is not None and point is not None and run.process.poll() is None:
                progress = run.progress
                if progress is not None and progress[1] >= point - lead_steps:
                    imds.recommend()
                    break
                time.sleep(0.002)
            code = run.wait()
        finally:
            run.stop()
        progress = run.progress
        if progress is None or code != (0 if point is None else -signal.SIGKILL) or (point is not None and progress[1] != point):
            raise RuntimeError(f"{method}, attempt {number + 1}: exit {code}, progress {progress}:\n{run.tail()}")
        attempts.append(progress[:2])
    cadence = CheckpointStore(Storage(uri)).load_latest().state["cadence"]
    return PolicyRun(method, steps_per_epoch, points, attempts, time.perf_counter() - started, every, cadence)


def run_reruns(steps_per_epoch: int, megabytes: int, kills: int, seed: int, methods: list[str],
               work: Path) -> dict:
    total = EPOCHS * steps_per_epoch
    points = schedule(total, kills, seed)
    results: dict[str, PolicyRun] = {}
    imds = MetadataServer()
    try:
        for method in methods:
            label, every, warned = METHODS[method]
            lead_steps = 0
            if method == "oracle":
                auto = results["auto"]
                every = str(oracle_interval(points, steps_per_epoch, total, auto.save_seconds, auto.step_seconds))
            if warned:
                measured = results.get("auto")
                step = measured.step_seconds if measured else 0.01
                lead_steps = math.ceil(WARNING_LEAD_SECONDS / step)
            result = run_policy(method, every, points, steps_per_epoch, megabytes, work, imds if warned else None,
                                lead_steps)
            results[method] = result
            print(f"cadence re-run: {label} (every_steps {every}): {result.reruns}", flush=True)
    finally:
        imds.stop()
    return {"points": points, "steps_per_epoch": steps_per_epoch, "megabytes": megabytes, "runs": results}


def rerun_table(result: dict) -> str:
    runs: dict[str, PolicyRun] = result["runs"]
    oracle = runs.get("oracle")
    lines = ["| policy | every_steps | steps re-run per kill | total | vs the oracle | what saves cost training, "
             "in steps | early saves |", "|---|---|---|---:|---:|---:|---:|"]
    for method, run in runs.items():
        label = METHODS[method][0]
        every = run.every if run.every != "auto" else f'"auto" (ended at {run.cadence["interval"]["steps"]})'
        every = "None" if every == "0" else every
        versus = f"{sum(run.reruns) / max(sum(oracle.reruns), 1):.2f}x" if oracle is not None else "-"
        lines.append(f"| {label} | {every} | {', '.join(map(str, run.reruns))} | **{sum(run.reruns)}** | {versus} | "
                     f"{run.save_cost_steps:.1f} | {run.cadence.get('early_saves', 0)} |")
    first = next(iter(runs.values()))
    return (f"**Steps re-run.** Dense 1024x1024 layers adding up to {result['megabytes']} MB of state with Adam, "
            f"global batch {BATCH}, {result['steps_per_epoch']} steps/epoch, {EPOCHS} epochs, one CPU replica, local "
            f"disk; SIGKILL right after global steps {', '.join(map(str, result['points']))} (seeded), the same for "
            f"every policy. The auto run measured steps of {first.step_seconds * 1000:.1f} ms (median over its "
            f"attempts) and saves costing training {first.save_seconds * 1000:.1f} ms each (its thread, and the steps "
            f"slowed while the commit uploads; its last attempt). Warnings come {WARNING_LEAD_SECONDS:g} s before "
            "each kill.\n\n" + "\n".join(lines) + "\n")


# -- entry --------------------------------------------------------------------------------------------


def run(args, machine: str) -> tuple[str, dict]:
    methods = args.cadence_methods
    if "oracle" in methods and "auto" not in methods:
        raise SystemExit("--cadence-methods: the oracle is chosen from what the auto run measures; add auto")
    methods = sorted(methods, key=list(METHODS).index)  # auto first: the others use what it measured
    speed = measure_speed(args.cadence_width, args.epochs, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-cadence-") as tmp:
        reruns = run_reruns(args.cadence_steps, args.cadence_mb, args.cadence_kills, args.seed, methods, Path(tmp))
    text = speed_table(speed) + "\n" + rerun_table(reruns) + f"\n{machine}\n"
    return text, {"speed": speed, "reruns": reruns}

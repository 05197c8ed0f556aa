"""Sweeps: the overhead each trial pays beyond its own training, warm workers against a fresh process per trial.

All sweeps run `cluster-trainer sweep jobs/mlp.py` (the seed MLP, 16 steps per
epoch) as a subprocess against one local Ray cluster of 2 CPUs started for the
benchmark (so Ray's own start-up is not counted), one training actor per
trial (1 CPU each, so 2 trials at once), storage on local disk. The baseline
is the same trainings (each trial's config, for the epochs it ran) with plain
`model.fit` in one process that imported TensorFlow once (`bench/sweep_plain.py`).

- **Overhead per trial**: (sweep wall time - the trials' own training time in
  the plain process) / trials, for N trials of 1 epoch with warm workers (the
  default) and with `--fresh-workers` (a new training process per trial, what
  every sweep did before). Also the marginal cost of a trial, from a sweep of
  2N trials: (wall(2N) - wall(N) - plain(N more trials)) / N, which leaves out
  the fixed cost of starting Tune and the first workers.
- **An ASHA sweep of many trials** (2 epochs, grace period 1, reduction factor
  2): its wall time against the same trainings in the plain process.
- **The Tune driver's bookkeeping per trial**: trials that do nothing but report
  once (with a one-file checkpoint, as the sweep's trials do) through a Tuner
  set up as the sweep's (`bench/tune_trivial.py`): the driver's own cost per
  trial, which bounds how fast one driver can start trials whatever the cluster.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ROOT, child_env

JOB = str(ROOT / "jobs" / "mlp.py")
CPUS = 2


@dataclasses.dataclass
class SweepRun:
    name: str
    trials: int
    wall: float  # the sweep command, start to exit
    plain: float  # the same trainings with model.fit in one process (their sum)
    epochs: int  # epochs trained in all
    stopped_early: int = 0

    @property
    def overhead_per_trial(self) -> float:
        return (self.wall - self.plain) / self.trials


def _start_cluster():
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' local cluster: free ports, every process stopped by PID
    from ray_cluster import RayCluster

    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=CPUS, dashboard=False)  # the sweep needs none; it would idle on the CPUs timed
    except BaseException:
        cluster.stop()
        raise
    return cluster


def sweep(cluster, work: Path, name: str, *args: str) -> tuple[float, list[dict]]:
    """Run one sweep command; its wall time and, per trial, its config and the epochs it ran."""
    storage = work / name
    log = work / f"{name}.log"
    env = child_env(**cluster.env, CLUSTER_TRAINER_SWEEP_KEY_FILE=str(work / "sweep.key"))
    command = [sys.executable, "-m", "cluster_trainer", "sweep", JOB, "--storage", str(storage),
               "--ray-address", cluster.address, "--seed", "0", *args]
    started = time.perf_counter()
    with open(log, "w") as sink:
        code = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"sweep {name} exited {code}:\n{log.read_text()[-3000:]}")
    from cluster_trainer.sweep import read_trials

    table = read_trials(str(storage))
    trainings = [{"config": {k[len("config/"):]: v for k, v in row.items() if k.startswith("config/")},
                  "epochs": int(row["epochs"]), "status": row["status"]} for _, row in table.iterrows()]
    return wall, trainings


def plain(trainings: list[dict], work: Path) -> float:
    """Seconds the same trainings take with plain model.fit in one process (TensorFlow imported once)."""
    spec = work / f"plain-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps([{"config": t["config"], "epochs": max(t["epochs"], 1)} for t in trainings]))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_plain.py"), str(spec)], env=child_env(),
                            capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"plain fit failed:\n{result.stderr[-3000:]}")
    return sum(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def measured(cluster, work: Path, name: str, trials: int, *args: str) -> SweepRun:
    wall, trainings = sweep(cluster, work, name, "--loguniform", "lr=1e-4:1e-1", "--num-samples", str(trials), *args)
    run = SweepRun(name, len(trainings), wall, plain(trainings, work), sum(t["epochs"] for t in trainings),
                   sum(t["status"] == "stopped early" for t in trainings))
    print(f"sweep {name}: {run.trials} trials, {run.epochs} epochs, {run.wall:.1f}s; plain fit {run.plain:.1f}s; "
          f"overhead {run.overhead_per_trial:.2f}s per trial", flush=True)
    return run


def trivial(cluster, work: Path, trials: int, reports: int) -> dict:
    storage = work / f"trivial-{trials}-{reports}"
    env = child_env(**cluster.env, CLUSTER_TRAINER_SWEEP_KEY_FILE=str(work / "sweep.key"))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tune_trivial.py"), cluster.address, str(storage),
                             str(trials), str(reports), str(CPUS)], env=env, capture_output=True, text=True,
                            cwd=ROOT, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"trivial trials failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured.update(trials=trials, reports=reports, per_trial=measured["seconds"] / trials,
                    cpu_per_trial=measured["driver_cpu_seconds"] / trials)
    print(f"trivial: {trials} trials x {reports} report(s): {measured['seconds']:.1f}s, "
          f"{measured['per_trial']:.3f}s per trial, driver CPU {measured['cpu_per_trial']:.3f}s per trial", flush=True)
    return measured


def run(args, machine: str) -> tuple[str, dict]:
    n = args.sweep_trials
    results: dict = {"runs": [], "trivial": []}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        cluster = _start_cluster()
        try:
            common = ("--epochs", "1", "--max-concurrent", str(CPUS))
            runs = {"warm": measured(cluster, work, "warm", n, *common)}
            if "double" in args.sweep_variants:
                runs["warm-2n"] = measured(cluster, work, "warm-2n", 2 * n, *common)
            if "fresh" in args.sweep_variants:
                runs["fresh"] = measured(cluster, work, "fresh", n, *common, "--fresh-workers")
            if args.asha_trials:
                runs["asha"] = measured(cluster, work, "asha", args.asha_trials, "--epochs", "2", "--scheduler",
                                        "asha", "--grace-period", "1", "--max-concurrent", str(CPUS))
            for reports in (1, 10):
                results["trivial"].append(trivial(cluster, work, args.trivial_trials, reports))
        finally:
            cluster.stop()
    results["runs"] = list(runs.values())
    return report(runs, results["trivial"], machine), results


def report(runs: dict, trivial_runs: list[dict], machine: str) -> str:
    lines = [f"One local Ray node of {CPUS} CPUs, 1 CPU per training actor ({CPUS} trials at once), local disk. "
             f"{machine} The machine is shared with other engineers' test runs: the load changes from minute to "
             "minute, so single figures are noisy (a sweep's wall time by up to 2x).\n",
             "| sweep | trials | epochs | sweep wall | plain `fit`, one process | overhead per trial |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = {"warm": "warm workers (default), 1 epoch", "warm-2n": "warm workers, twice the trials",
              "fresh": "`--fresh-workers`: a new process per trial, 1 epoch", "asha": "ASHA, 2 epochs, warm workers"}
    for key, run in runs.items():
        stopped = f" ({run.stopped_early} stopped early)" if run.stopped_early else ""
        lines.append(f"| {labels[key]} | {run.trials}{stopped} | {run.epochs} | {run.wall:.1f} s | {run.plain:.1f} s "
                     f"| {run.overhead_per_trial:.2f} s |")
    lines.append("")
    if "warm-2n" in runs:
        one, two = runs["warm"], runs["warm-2n"]
        marginal = (two.wall - one.wall - (two.plain - one.plain)) / max(two.trials - one.trials, 1)
        lines.append(f"Marginal overhead of a trial with warm workers (from the {one.trials}- and {two.trials}-trial "
                     f"sweeps, leaving out the fixed start of Tune and the first workers): **{marginal:.2f} s**.")
    if "fresh" in runs:
        lines.append(f"Warm against fresh workers, overhead per trial: {runs['warm'].overhead_per_trial:.2f} s against "
                     f"{runs['fresh'].overhead_per_trial:.2f} s.")
    if "asha" in runs:
        asha = runs["asha"]
        lines.append(f"The {asha.trials}-trial ASHA sweep took {asha.wall:.0f} s, {asha.wall / asha.plain:.1f}x the "
                     f"{asha.plain:.0f} s of the same trainings in one plain process.")
    for measured in trivial_runs:
        lines.append(f"Tune driver, {measured['trials']} trials that only report {measured['reports']} time(s) "
                     f"each: {measured['seconds']:.1f} s, **{measured['per_trial']:.3f} s per trial**, of which the "
                     f"driver process's CPU **{measured['cpu_per_trial']:.3f} s**; experiment state "
                     f"{measured['experiment_state_bytes'] / 1e3:.0f} kB at the end.")
    return "\n".join(lines) + "\n"

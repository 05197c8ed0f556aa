"""Hyperparameter sweeps on Ray Tune, where every trial is a run that survives preemption.

Ray Tune searches and schedules (grid, random sampling, ASHA, restore after the
driver dies); each trial is a cluster-trainer run at `<sweep URI>/<trial id>/`,
trained by the same driver as `cluster_trainer.run`: its actor is preempted or
lost, a new actor resumes it mid-epoch from the trial's own checkpoints, and
Tune never sees it (so Tune's failure budget counts real failures only). The
trial reports each finished epoch to Tune from the run's Parquet history, once,
so ASHA judges trials by the same rows `read_history` shows.

Layout of a sweep:

    <sweep>/tune/                Tune's experiment state (what restore reads)
    <sweep>/<trial id>/          each trial's run: checkpoints, history, files
    <sweep>/trials.parquet       one row per trial (written at the end)

Example:
    >>> from ray import tune
    >>> import cluster_trainer as ct
    >>> job = ct.load_job("jobs/mlp.py")                                   # doctest: +SKIP
    >>> table = ct.sweep(job, {"lr": tune.grid_search([1e-2, 1e-3])},      # doctest: +SKIP
    ...                  storage="gs://bucket/sweeps/lr", scheduler="asha")
    >>> table[["trial_id", "config/lr", "best_val_loss", "status"]]        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from cluster_trainer.errors import ConfigError
from cluster_trainer.job import Job, Resources, parse_value

TRIALS_FILE = "trials.parquet"
TUNE_DIR = "tune"


# -- the search space ------------------------------------------------------------------------


def check_space(job: Job, space: Mapping[str, Any]) -> None:
    """One-line errors for a space that cannot run, before anything starts.

    Keys must be keys of the job's `config` (a typo would otherwise sweep nothing);
    grids and choices must not be empty; ranges must have low < high (and low > 0
    for log-uniform).
    """
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    if not space:
        raise ConfigError("the search space is empty: give at least one of --grid/--choice/--uniform/--loguniform")
    unknown = sorted(set(space) - set(job.config))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not in the job's config "
                          f"(keys: {', '.join(sorted(job.config)) or 'none'}); a sweep can only vary config values")
    for key, value in space.items():
        if isinstance(value, dict) and "grid_search" in value:
            if not list(value["grid_search"]):
                raise ConfigError(f"the grid for {key} is empty")
        elif isinstance(value, Categorical):
            if not value.categories:
                raise ConfigError(f"the choice for {key} is empty")
        elif isinstance(value, (Float, Integer)):
            if not value.lower < value.upper:
                raise ConfigError(f"the range for {key} is empty: low {value.lower} must be below high {value.upper}")
            if isinstance(value.get_sampler(), LogUniform) and value.lower <= 0:
                raise ConfigError(f"a log-uniform range for {key} must be positive, got low {value.lower}")


def parse_space(grid: Sequence[str] = (), choice: Sequence[str] = (), uniform: Sequence[str] = (),
                loguniform: Sequence[str] = ()) -> dict:
    """The space of `cluster-trainer sweep --grid/--choice/--uniform/--loguniform` arguments.

    Example:
        >>> space = parse_space(grid=["lr=1e-3,1e-4"], uniform=["dropout=0.1:0.5"])
        >>> space["lr"], (space["dropout"].lower, space["dropout"].upper)
        ({'grid_search': [0.001, 0.0001]}, (0.1, 0.5))
    """
    from ray import tune

    space: dict = {}

    def add(flag: str, item: str, make: Callable[[str, str], Any]) -> None:
        key, sep, values = item.partition("=")
        if not sep or not key or not values.strip():
            raise ConfigError(f"{flag} expects KEY=VALUES, got {item!r}")
        if key in space:
            raise ConfigError(f"{key} is given twice in the search space")
        space[key] = make(key, values)

    def values_of(key: str, text: str) -> list:
        return [parse_value(v) for v in text.split(",") if v.strip()]

    def bounds(flag: str, key: str, text: str) -> tuple[float, float]:
        low, sep, high = text.partition(":")
        try:
            return float(low), float(high)
        except ValueError:
            raise ConfigError(f"{flag} {key} expects LOW:HIGH numbers, got {text!r}") from None

    for item in grid:
        add("--grid", item, lambda key, text: tune.grid_search(values_of(key, text)))
    for item in choice:
        add("--choice", item, lambda key, text: tune.choice(values_of(key, text)))
    for item in uniform:
        add("--uniform", item, lambda key, text: tune.uniform(*bounds("--uniform", key, text)))
    for item in loguniform:
        add("--loguniform", item, lambda key, text: tune.loguniform(*_positive(bounds("--loguniform", key, text), key)))
    return space


def _positive(pair: tuple[float, float], key: str) -> tuple[float, float]:
    if pair[0] <= 0:
        raise ConfigError(f"a log-uniform range for {key} must be positive, got low {pair[0]}")
    return pair


# -- one trial -------------------------------------------------------------------------------


class _EpochReporter:
    """Reports each new row of the trial run's epoch history to Tune, exactly once.

    The number of rows already reported travels in a tiny Tune checkpoint, so a
    trial that Tune restarts (after a real failure, or a sweep restore) goes on
    from the next row instead of reporting epochs twice.
    """

    def __init__(self, uri: str, storage_options: dict):
        from ray import tune

        self.uri = uri
        self.storage_options = storage_options
        self.reported = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                with open(os.path.join(directory, "reported")) as f:
                    self.reported = int(f.read())

    def poll(self) -> None:
        import tempfile

        from ray import tune

        from cluster_trainer.errors import CheckpointError
        from cluster_trainer.history import read_history

        try:
            rows = read_history(self.uri, self.storage_options)
        except CheckpointError:  # nothing committed yet
            return
        for _, row in rows.iloc[self.reported:].iterrows():
            self.reported += 1
            metrics = {k: _plain(v) for k, v in row.items() if k not in ("host", "ended_at")}
            metrics["epoch"] = int(row["epoch"]) + 1  # epochs finished: ASHA's time axis
            with tempfile.TemporaryDirectory() as directory:
                with open(os.path.join(directory, "reported"), "w") as f:
                    f.write(str(self.reported))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _trial(config: dict, settings: dict) -> None:
    """Tune's function trainable: train this trial's run with the driver of `cluster_trainer.run`."""
    from ray import tune

    from cluster_trainer.on_ray.actor import job_from_spec
    from cluster_trainer.on_ray.driver import run

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() not in ("0", "1"):
        from cluster_trainer.native_logs import import_tensorflow_quietly

        import_tensorflow_quietly()  # the job file imports Keras; keep TensorFlow's start-up lines out of the log
    trial_id = tune.get_context().get_trial_id()
    uri = f"{settings['sweep_uri'].rstrip('/')}/{trial_id}"
    job = job_from_spec(settings["job_spec"])
    job = dataclasses.replace(job, config={**job.config, **config})
    reporter = _EpochReporter(uri, settings["storage_options"])
    run(job, uri, devices=settings["devices"], epochs=settings["epochs"], resources=settings["resources"],
        max_failures=settings["max_failures"], storage_options=settings["storage_options"], verbose=2,
        workers=settings["workers"],
        on_progress=reporter.poll, echo=lambda message: print(f"cluster-trainer [{trial_id}]: {message}",
                                                                file=sys.stderr, flush=True))
    reporter.poll()  # the last epochs, committed just before the run returned


# -- the sweep -------------------------------------------------------------------------------


def sweep(
    job: Job,
    space: Mapping[str, Any],
    *,
    storage: str,
    metric: str = "val_loss",
    mode: str = "min",
    num_samples: int = 1,
    scheduler: str | None = None,
    grace_period: int = 1,
    max_concurrent: int | None = None,
    resources: Resources | None = None,
    devices: int | None = None,
    epochs: int | None = None,
    max_failures: int = 3,
    address: str | None = None,
    storage_options: dict | None = None,
    echo: Callable[[str], None] | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Run a sweep on Ray Tune (or continue the one at `storage`); returns the trials table.

    Args:
        job: the `Job` (from `load_job`, so trial actors load the same file).
        space: config key -> value or Ray Tune domain (`tune.grid_search([...])`,
            `tune.choice`, `tune.uniform`, `tune.loguniform`); overrides `job.config`.
        storage: the sweep's URI; each trial runs at `<storage>/<trial id>`.
        metric, mode: what "best" means (a key of the epoch history, "min" or "max").
        num_samples: samples of the space (each grid point `num_samples` times).
        scheduler: None (every trial runs to its end) or "asha" (stops poor trials
            early, judged at `grace_period` epochs and beyond).
        max_concurrent: trials at once (default: as many as resources allow).
        resources: what each trial's training actor asks for (default `job.resources`).
        devices, epochs: as for `cluster_trainer.run`.
        max_failures: real failures each trial survives (preemptions are unlimited and
            handled inside the trial: Tune never sees them).
        address: the Ray cluster (default: RAY_ADDRESS, else a local Ray started here).
        workers: nodes each trial trains on at once (as for `cluster_trainer.run`).

    Running the same call again after the driver died continues the sweep: finished
    trials are kept, unfinished ones resume from their own checkpoints.
    """
    from ray import tune

    from cluster_trainer.on_ray.actor import job_spec
    from cluster_trainer.on_ray.connection import connect, disconnect
    from cluster_trainer.storage import Storage

    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    check_space(job, space)
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got {mode!r}")
    if scheduler not in (None, "asha"):
        raise ConfigError(f"--scheduler must be asha (or left out), got {scheduler!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"--num-samples must be an integer >= 1, got {num_samples!r}")
    options = {**job.storage_options, **(storage_options or {})}
    store = Storage(storage, options)
    store.check()
    sweep_uri = os.path.abspath(storage) if store.is_local and "://" not in storage else storage.rstrip("/")
    experiment = f"{sweep_uri}/{TUNE_DIR}"

    connected = connect(address, echo)
    try:
        settings = {
            "sweep_uri": sweep_uri, "job_spec": job_spec(job, _working_dir()), "devices": devices, "epochs": epochs,
            "resources": resources or job.resources, "max_failures": max_failures, "storage_options": options,
            "workers": workers,
        }
        # The trial function only drives: its actor needs next to nothing; the training actor asks for the job's resources.
        trainable = tune.with_resources(tune.with_parameters(_trial, settings=settings), {"cpu": 0.01})
        if tune.Tuner.can_restore(experiment):
            echo(f"continuing the sweep at {sweep_uri}: finished trials are kept, unfinished ones resume")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=dict(space))
        else:
            echo(f"starting a sweep at {sweep_uri}")
            asha = None
            if scheduler == "asha":
                asha = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs or job.epochs,
                                                     grace_period=grace_period, reduction_factor=2)
            tuner = tune.Tuner(
                trainable,
                param_space=dict(space),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=asha,
                                            max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_uri, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=max_failures)),
            )
        results = tuner.fit()
        table = trials_table(results, sweep_uri, metric, mode, options)
        store.put(TRIALS_FILE, _parquet_bytes(table))
        echo(f"sweep done: {len(table)} trial(s), table at {sweep_uri}/{TRIALS_FILE}")
        return table
    finally:
        if connected:
            disconnect()


def _working_dir() -> str | None:
    import ray

    return os.getcwd() if (ray.get_runtime_context().runtime_env or {}).get("working_dir") else None


def trials_table(results, sweep_uri: str, metric: str, mode: str, storage_options: dict) -> pd.DataFrame:
    """One row per trial: its config, best metric and epoch, epochs run, status, interruptions, run URI."""
    from cluster_trainer.checkpoint import CheckpointStore
    from cluster_trainer.checkpoint.fencing import latest_attempt
    from cluster_trainer.errors import CheckpointError
    from cluster_trainer.history import read_history
    from cluster_trainer.storage import Storage

    rows = []
    for result in results:
        # A trial that never reported has no metrics; its directory name holds the id too (`_trial_495fe_00003_...`).
        trial_id = ((result.metrics or {}).get("trial_id")
                    or re.search(r"_([0-9a-f]+_\d{5})", os.path.basename(result.path))[1])
        uri = f"{sweep_uri}/{trial_id}"
        run_storage = Storage(uri, storage_options)
        try:
            history = read_history(uri, storage_options)
        except CheckpointError:
            history = pd.DataFrame({"epoch": []})
        newest = CheckpointStore(run_storage).load_latest() if history.shape[0] else None
        finished = bool(newest and newest.state["position"]["finished"])
        row = {"trial_id": trial_id, **{f"config/{k}": v for k, v in (result.config or {}).items()}}
        if metric in history and history[metric].notna().any():
            best = history[metric].idxmin() if mode == "min" else history[metric].idxmax()
            row[f"best_{metric}"] = float(history[metric][best])
            row["best_epoch"] = int(history["epoch"][best])
        else:
            row[f"best_{metric}"], row["best_epoch"] = math.nan, -1
        row["epochs"] = int(history.shape[0])
        row["status"] = ("error" if result.error is not None else "completed" if finished else "stopped early")
        attempts = latest_attempt(run_storage)
        row["attempts"] = attempts
        row["interruptions"] = max(attempts - 1, 0)  # preemptions, lost nodes, restarts of the sweep
        row["run_uri"] = uri
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import io

    sink = io.BytesIO()
    frame.to_parquet(sink, index=False)
    return sink.getvalue()


def read_trials(uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The trials table of the sweep at `uri`."""
    from cluster_trainer.history import parquet_frame
    from cluster_trainer.storage import Storage

    store = Storage(uri, storage_options)
    store.check()
    try:
        return parquet_frame(store.get(TRIALS_FILE))
    except FileNotFoundError:
        raise ConfigError(f"no finished sweep at {uri} ({TRIALS_FILE} is missing): run `cluster-trainer sweep` with "
                          "--storage set to it (the same command continues an interrupted sweep)") from None


def plot_trials(uri: str, output: str, metric: str = "val_loss", storage_options: dict | None = None) -> None:
    """Each trial's `metric` against epoch, one line per trial, into a PNG."""
    from cluster_trainer.history import read_history

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = read_trials(uri, storage_options)
    figure, axis = plt.subplots(figsize=(8, 5))
    for _, trial in table.iterrows():
        history = read_history(trial["run_uri"], storage_options)
        if metric in history:
            config = ", ".join(f"{k[7:]}={v:.3g}" if isinstance(v, float) else f"{k[7:]}={v}"
                               for k, v in trial.items() if k.startswith("config/"))
            axis.plot(history["epoch"] + 1, history[metric], "-o", markersize=3,
                      label=f"{trial['trial_id']} ({config}) {trial['status']}")
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title(f"{uri}: {metric} per trial")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)

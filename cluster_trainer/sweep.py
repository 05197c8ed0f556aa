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
# What Tune's trial process asks for: it only drives its trial, and the training actor asks for the job's
# resources. No CPU at all: a fraction would keep a 1-CPU training actor off a node whose other CPUs are taken
# (on 2 CPUs, two trial processes of 0.01 leave 1.98, so only one trial trains). Some memory, since Tune
# needs a resource to place it by: about what the process uses.
TRIAL_PROCESS_RESOURCES = {"cpu": 0, "memory": 200 * 2**20}


# -- the search space ------------------------------------------------------------------------


def check_space(job: Job | None, space: Mapping[str, Any]) -> None:
    """One-line errors for a space that cannot run, before anything starts.

    Keys must be keys of the job's `config` (a typo would otherwise sweep nothing);
    grids and choices must not be empty; ranges must have low < high (and low > 0
    for log-uniform). Without a job (the CLI, before it loads the job file and so
    TensorFlow), everything but the keys is checked.
    """
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    if not space:
        raise ConfigError("the search space is empty: give at least one of --grid/--choice/--uniform/--loguniform")
    unknown = sorted(set(space) - set(job.config)) if job is not None else []
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
    from the next row instead of reporting epochs twice. When Tune stops the
    trial (ASHA, the end of the sweep), `tune.report` raises SystemExit: the
    trial's training actor is asked to commit and stop (`on_stop`), so a warm
    worker goes back to its pool instead of being killed mid-step.
    """

    def __init__(self, uri: str, storage_options: dict, on_stop: Callable[[str], None] | None = None):
        from ray import tune

        self.uri = uri
        self.storage_options = storage_options
        self.on_stop = on_stop
        self.reported = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                try:
                    with open(os.path.join(directory, "reported")) as f:
                        self.reported = max(int(f.read(32)), 0)
                except (OSError, ValueError):  # not ours, or damaged: report the history from its start
                    self.reported = 0

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
                try:
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
                except SystemExit:  # Tune stopped this trial
                    if self.on_stop is not None:
                        self.on_stop("Tune stopping the trial")
                    raise


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _built_where_it_trains(config):
    raise RuntimeError("this job is loaded from its file by the training actor, not in the Tune trial")


def trial_job(spec: dict, config: Mapping[str, Any]) -> Job:
    """The job of one trial, without loading its file: Tune's trial process only drives the run.

    The job file is loaded (importing Keras and TensorFlow) only where the trial
    trains, in its training actor; here a `Job` carries the file's path and the plain
    fields (`config` with the trial's values, epochs, seed, resources, ...). A `Job`
    without a file travels whole, as `job_spec` made it.

    Example:
        >>> job = trial_job({"job_path": "jobs/mlp.py", "job_fields": {"name": "mlp", "config": {"lr": 0.01}}},
        ...                 {"lr": 0.001})
        >>> job.config, job.source_path.endswith("jobs/mlp.py")
        ({'lr': 0.001}, True)
    """
    if "job" in spec:
        job = spec["job"]
    else:
        job = Job(build_model=_built_where_it_trains, train_data=None, source_path=os.path.abspath(spec["job_path"]),
                  **spec["job_fields"])
    return dataclasses.replace(job, config={**job.config, **config})


def _trial(config: dict, settings: dict) -> None:
    """Tune's function trainable: train this trial's run with the driver of `cluster_trainer.run`.

    Imports no TensorFlow: the training actor loads the job file. Warm workers
    (`cluster_trainer.on_ray.pool`) are kept by this process, which Tune reuses
    from trial to trial.
    """
    from ray import tune

    from cluster_trainer.on_ray.driver import run
    from cluster_trainer.on_ray.pool import FreshActors, process_pool

    # Tune moved this process into the trial's directory; a job path relative to Ray's working_dir is not.
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    trial_id = tune.get_context().get_trial_id()
    uri = f"{settings['sweep_uri'].rstrip('/')}/{trial_id}"
    job = trial_job(settings["job_spec"], config)
    # Warm workers serve single-worker trials; a trial on several workers gets a fresh group each attempt.
    actors = FreshActors() if settings["fresh_workers"] or settings["workers"] > 1 else process_pool()
    reporter = _EpochReporter(uri, settings["storage_options"], on_stop=getattr(actors, "interrupt", None))
    run(job, uri, devices=settings["devices"], epochs=settings["epochs"], resources=settings["resources"],
        max_failures=settings["max_failures"], storage_options=settings["storage_options"], verbose=2,
        workers=settings["workers"], on_progress=reporter.poll, actors=actors,
        echo=lambda message: print(f"cluster-trainer [{trial_id}]: {message}", file=sys.stderr, flush=True))
    reporter.poll()  # the last epochs, committed just before the run returned


# -- searching --------------------------------------------------------------------------------

SEARCHES = ("random", "optuna")


def check_search(search: str | None, space: Mapping[str, Any]) -> None:
    """One-line errors for a search algorithm that cannot search `space`: an unknown one, or TPE
    over a grid (a sampler cannot enumerate one).

    Example:
        >>> check_search("optuna", {"lr": {"grid_search": [0.1, 0.01]}})
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.ConfigError: --search optuna samples the space and cannot enumerate a grid (lr): give those values with --choice
    """
    if search in (None, "random"):
        return
    if search != "optuna":
        raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {search!r}")
    grids = sorted(k for k, v in space.items() if isinstance(v, dict) and "grid_search" in v)
    if grids:
        raise ConfigError(f"--search optuna samples the space and cannot enumerate a grid ({', '.join(grids)}): "
                          "give those values with --choice")


def make_searcher(search: str | None, space: Mapping[str, Any], metric: str, mode: str, seed: int,
                  max_concurrent: int | None):
    """The Tune search algorithm: grid and random sampling (`None`/"random"), or Optuna's TPE ("optuna").

    Both are seeded from `seed`, so the same sweep proposes the same configs (with
    TPE, the same first ones: later proposals depend on results, whose order
    depends on timing when trials run concurrently). `max_concurrent` limits the
    trials running at once (for TPE through Tune's ConcurrencyLimiter: each
    proposal then learns from more finished trials).

    Example:
        >>> from ray import tune
        >>> space = {"lr": tune.loguniform(1e-4, 1e-1), "units": tune.choice([16, 32, 64])}
        >>> first = make_searcher("optuna", space, "val_loss", "min", seed=7, max_concurrent=2)
        >>> again = make_searcher("optuna", space, "val_loss", "min", seed=7, max_concurrent=2)
        >>> [first.suggest(f"t{i}") for i in range(2)] == [again.suggest(f"t{i}") for i in range(2)]
        True
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if search in (None, "random"):
        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)
    check_search(search, space)
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs the optuna package: pip install 'optuna>=4.2,<5'") from None
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise
    searcher = OptunaSearch(space=OptunaSearch.convert_search_space(dict(space)), metric=metric, mode=mode,
                            sampler=optuna.samplers.TPESampler(seed=seed))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher


# -- the sweep -------------------------------------------------------------------------------


def sweep(
    job: Job,
    space: Mapping[str, Any],
    *,
    storage: str,
    metric: str = "val_loss",
    mode: str = "min",
    num_samples: int = 1,
    search: str | None = None,
    seed: int | None = None,
    scheduler: str | None = None,
    grace_period: int = 1,
    max_concurrent: int | None = None,
    resources: Resources | None = None,
    devices: int | None = None,
    epochs: int | None = None,
    max_failures: int = 3,
    fresh_workers: bool = False,
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
        search: None or "random" (grids and random sampling), or "optuna" (Optuna's TPE,
            which proposes configs from the results so far; no grids).
        seed: seeds the search, so a sweep is reproducible (default: the job's seed).
        scheduler: None (every trial runs to its end) or "asha" (stops poor trials
            early, judged at `grace_period` epochs and beyond).
        max_concurrent: trials at once (default: as many training actors as the
            cluster holds when the sweep starts).
        resources: what each trial's training actor asks for (default `job.resources`).
        devices, epochs: as for `cluster_trainer.run`.
        max_failures: real failures each trial survives (preemptions are unlimited and
            handled inside the trial: Tune never sees them).
        fresh_workers: a new training process for every trial, instead of warm workers
            that train trial after trial (for a job file whose module-level objects
            change as it trains).
        address: the Ray cluster (default: RAY_ADDRESS, else a local Ray started here).
        workers: nodes each trial trains on at once (as for `cluster_trainer.run`).

    Running the same call again after the driver died continues the sweep: finished
    trials are kept, unfinished ones resume from their own checkpoints, and the
    searcher continues from its saved state. Ray Tune's state is checked against the
    seal this sweep's driver wrote (`cluster_trainer.sweep_seal`) before any of it is
    unpickled.
    """
    from ray import tune

    from cluster_trainer import sweep_seal
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
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ConfigError(f"--max-concurrent must be an integer >= 1, got {max_concurrent!r}")
    seed = job.seed if seed is None else seed
    make_searcher(search, space, metric, mode, seed, max_concurrent)  # bad options fail before Ray starts
    options = {**job.storage_options, **(storage_options or {})}
    store = Storage(storage, options)
    store.check()
    sweep_uri = os.path.abspath(storage) if store.is_local and "://" not in storage else storage.rstrip("/")
    store = Storage(sweep_uri, options)
    experiment = f"{sweep_uri}/{TUNE_DIR}"
    restoring = store.exists(f"{TUNE_DIR}/tuner.pkl")
    seal = sweep_seal.TuneStateSeal(store, sweep_seal.load_key(create=not restoring))
    seal.verify()  # before anything of Tune's state is unpickled (nothing to check in a new sweep's empty prefix)

    connected = connect(address, echo, offer_no_ray=False)  # a sweep has no --no-ray
    try:
        resources = resources or job.resources
        settings = {
            "sweep_uri": sweep_uri, "job_spec": job_spec(job, _working_dir()), "devices": devices, "epochs": epochs,
            "resources": resources, "max_failures": max_failures, "storage_options": options,
            "fresh_workers": fresh_workers, "workers": workers,
        }
        trainable = tune.with_resources(tune.with_parameters(_trial, settings=settings), TRIAL_PROCESS_RESOURCES)
        if restoring:
            echo(f"continuing the sweep at {sweep_uri}: finished trials are kept, unfinished ones resume (with the "
                 "search, scheduler, metric and concurrency it was started with)")
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            if max_concurrent is None:
                max_concurrent = max(_cluster_capacity(resources) // workers, 1)  # a trial takes `workers` actors
                echo(f"running up to {max_concurrent} trial(s) at once, what the cluster holds now "
                     f"({resources.describe()} each{f' per worker, {workers} workers' if workers > 1 else ''}); "
                     "--max-concurrent sets it")
            echo(f"starting a sweep at {sweep_uri}")
            asha = None
            if scheduler == "asha":
                asha = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs or job.epochs,
                                                     grace_period=grace_period, reduction_factor=2)
            searcher = make_searcher(search, space, metric, mode, seed, max_concurrent)
            tuner = tune.Tuner(
                trainable,
                # Optuna's searcher holds the space itself (Tune refuses it in both places).
                param_space={} if search == "optuna" else dict(space),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=asha,
                                            search_alg=searcher,
                                            # Tune's trial processes drive the warm workers: keep them between trials.
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_uri, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=max_failures),
                                          callbacks=[sweep_seal.SealCallback()]),
            )
        seal.record_stored(f"{TUNE_DIR}/tuner.pkl")
        with sweep_seal.active(seal):
            results = tuner.fit()
        table = trials_table(results, sweep_uri, metric, mode, options)
        store.put(TRIALS_FILE, _parquet_bytes(table))
        echo(f"sweep done: {len(table)} trial(s), table at {sweep_uri}/{TRIALS_FILE}")
        return table
    finally:
        if connected:
            disconnect()


def _cluster_capacity(resources: Resources) -> int:
    """How many training actors with `resources` the cluster's nodes hold in all (at least 1)."""
    import ray

    total = ray.cluster_resources()
    asked = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}
    counts = [int(total.get(name, 0) // amount) for name, amount in asked.items() if amount]
    return max(min(counts), 1) if counts else 1


def _working_dir() -> str | None:
    import ray

    return os.getcwd() if (ray.get_runtime_context().runtime_env or {}).get("working_dir") else None


def trials_table(results, sweep_uri: str, metric: str, mode: str, storage_options: dict) -> pd.DataFrame:
    """One row per trial: its config, best metric and epoch, epochs run, status, interruptions, run URI.

    Each row reads its run's history, newest checkpoint and attempts (about eight requests): the
    rows are read 16 at a time, so a 1000-trial sweep on an object store takes seconds, not minutes.
    """
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(lambda result: _trial_row(result, sweep_uri, metric, mode, storage_options), results))
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def _trial_row(result, sweep_uri: str, metric: str, mode: str, storage_options: dict) -> dict:
    from cluster_trainer.checkpoint import CheckpointStore
    from cluster_trainer.checkpoint.fencing import latest_attempt
    from cluster_trainer.errors import CheckpointError
    from cluster_trainer.history import read_history
    from cluster_trainer.storage import Storage

    # A trial that never reported has no metrics; its directory name holds the id too: `_trial_495fe_00003_3_...`
    # (grid and random search), `_trial_4ee9078e_1_...` (a searcher's).
    trial_id = ((result.metrics or {}).get("trial_id")
                or re.match(r"_trial_([0-9a-f]+(?:_\d{5})?)_\d+_", os.path.basename(result.path))[1])
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
    return row


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


_STATUS_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}


def plot_trials(uri: str, output: str, metric: str = "val_loss", mode: str = "min",
                storage_options: dict | None = None) -> None:
    """The sweep as a picture (PNG): every trial's curve, and each config value against the best metric.

    Top panel: each trial's `metric` against epoch. A trial ASHA stopped early ends in
    an x where it stopped; the best trial (by `mode` of `metric`) is drawn bold and
    named in the legend. Below, one panel per swept config key: each trial's value of
    that key against the trial's best `metric`, coloured by status, the best trial a
    star (a log axis for positive values spanning 20x or more, as learning rates do).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from cluster_trainer.history import read_history

    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got {mode!r}")
    table = read_trials(uri, storage_options)
    histories = {trial["trial_id"]: read_history(trial["run_uri"], storage_options) for _, trial in table.iterrows()}
    best_of = {tid: (h[metric].min() if mode == "min" else h[metric].max())
               for tid, h in histories.items() if metric in h and h[metric].notna().any()}
    if not best_of:
        raise ConfigError(f"no trial of the sweep at {uri} has {metric!r} in its history: pass --metric with one of "
                          f"its columns")
    best_id = (min if mode == "min" else max)(best_of, key=best_of.get)
    keys = [column for column in table.columns if column.startswith("config/")]
    columns = max(len(keys), 1)
    figure = plt.figure(figsize=(max(9, 3.6 * columns), 8 if keys else 5))
    grid = figure.add_gridspec(2 if keys else 1, columns, height_ratios=[1.6, 1] if keys else [1])
    curves = figure.add_subplot(grid[0, :])
    alpha = max(0.15, min(0.7, 8 / max(len(table), 1)))
    for _, trial in table.iterrows():
        history = histories[trial["trial_id"]]
        if trial["trial_id"] == best_id or metric not in history or history.empty:
            continue
        color = _STATUS_COLORS.get(trial["status"], "tab:gray")
        curves.plot(history["epoch"] + 1, history[metric], "-o", color=color, alpha=alpha, linewidth=1, markersize=2)
        if trial["status"] != "completed":  # where ASHA (or a failure) stopped it
            curves.plot(history["epoch"].iloc[-1] + 1, history[metric].iloc[-1], "x", color=color,
                        alpha=min(1, 2 * alpha))
    best = table[table["trial_id"] == best_id].iloc[0]
    history = histories[best_id]
    curves.plot(history["epoch"] + 1, history[metric], "-o", color="tab:green", linewidth=2.5, markersize=4, zorder=5,
                label=f"best: {best_id} ({_config_text(best)}), {metric}={best_of[best_id]:.4g}")
    for status, color in _STATUS_COLORS.items():
        count = int((table["status"] == status).sum())
        if count:
            marker = "-x" if status != "completed" else "-"
            curves.plot([], [], marker, color=color, label=f"{status} ({count})")
    curves.set_xlabel("epoch")
    curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    curves.set_ylabel(metric)
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    curves.set_title(f"{uri}: {metric} of {len(table)} trial(s) per epoch")
    for index, key in enumerate(keys):
        axis = figure.add_subplot(grid[1, index])
        _plot_config_panel(axis, table, key, best_of, best_id)
        axis.set_ylabel(f"best {metric}" if index == 0 else "")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def _config_text(trial) -> str:
    return ", ".join(f"{k[7:]}={v:.3g}" if isinstance(v, float) else f"{k[7:]}={v}"
                     for k, v in trial.items() if k.startswith("config/"))


def _plot_config_panel(axis, table: pd.DataFrame, key: str, best_of: dict, best_id: str) -> None:
    """One config key against each trial's best metric: a scatter (numbers) or a strip per value (others)."""
    rows = table[table["trial_id"].isin(list(best_of))]
    values = rows[key]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric:
        x = values.astype(float)
        if (x > 0).all() and x.max() >= 20 * x.min():
            axis.set_xscale("log")
    else:
        categories = sorted({str(v) for v in values})
        position = {c: i for i, c in enumerate(categories)}
        x = values.map(lambda v: position[str(v)]).astype(float)
        x = x + (pd.Series(range(len(x)), index=x.index) % 7 - 3) * 0.04  # a small spread, to see each point
        axis.set_xticks(range(len(categories)), categories)
    y = rows["trial_id"].map(best_of)
    colors = rows["status"].map(lambda status: _STATUS_COLORS.get(status, "tab:gray"))
    axis.scatter(x, y, c=list(colors), s=18, alpha=0.8)
    is_best = rows["trial_id"] == best_id
    axis.scatter(x[is_best], y[is_best], marker="*", s=180, c="tab:green", edgecolors="black", zorder=5)
    axis.set_xlabel(key[len("config/"):])
    axis.grid(alpha=0.3)

"""`cluster-trainer`: run, inspect and export resumable Keras training runs."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import textwrap

from cluster_trainer.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_SUPERSEDED,
    ClusterTrainerError,
)

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}   the run completed (or was already complete)
  {EXIT_FAILURE}   training failed (an exception in the model, data or a callback)
  {EXIT_BAD_INPUT}   bad input: usage, job file, --set, storage URI, or a checkpoint that
      does not fit the job; nothing stored was changed
  {EXIT_SUPERSEDED}   superseded: another process resumed this run; this one stopped without writing
  {EXIT_PREEMPTED}  preempted (SIGTERM, SIGINT or a --notice source): state was committed at the batch boundary;
      run the same command again to resume, with no step lost
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster-trainer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Train Keras models that survive preemption: a run stopped anywhere resumes at
            the exact next batch with the same weights, optimizer, metrics, callbacks and
            history, and ends bit for bit where an uninterrupted run ends.

            examples:
              cluster-trainer run jobs/mlp.py --storage runs/mlp
              cluster-trainer run jobs/mlp.py --storage runs/mlp --set lr=3e-4 --devices 2
              cluster-trainer status runs/mlp
              cluster-trainer history runs/mlp --format csv
              cluster-trainer export runs/mlp mlp.keras --job jobs/mlp.py
            """
        ),
        epilog=EXIT_CODES,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
        help="an fsspec option for the store, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable). Prefer the "
             "clouds' own credentials (ADC, workload identity, AWS profile/IRSA) and AWS_ENDPOINT_URL_S3 / "
             "STORAGE_EMULATOR_HOST for endpoints; values are never logged",
    )

    run = commands.add_parser(
        "run",
        parents=[store],
        help="train a job; resumes automatically if --storage holds a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Train the job defined in JOB.py (a module-level `job = cluster_trainer.Job(...)`).
            If the storage URI already holds a committed checkpoint of the run, training
            resumes from it, at the next batch, and says where.
            """
        ),
        epilog=EXIT_CODES,
    )
    run.add_argument("job", metavar="JOB.py", help="the job file")
    run.add_argument("--storage", required=True, metavar="URI", help="where the run lives: a path, file://, gs://, s3://")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the job's config (typed: 1e-3, 64, true, 'adam'); repeatable")
    run.add_argument("--epochs", type=int, help="override the job's epochs (e.g. to extend a finished run)")
    run.add_argument("--devices", type=int,
                     help="replicas for MirroredStrategy: the first N GPUs, or N logical CPU devices "
                          "without GPUs (default: all GPUs, else 1)")
    run.add_argument("--notice", dest="notices", action="append", default=[], metavar="SOURCE",
                     help="also watch SOURCE for preemption notices: gce (GCE metadata), aws (EC2 spot "
                          "instance-action), file:PATH (a file appearing); repeatable. SIGTERM/SIGINT always count. "
                          "Default: the comma-separated list in CLUSTER_TRAINER_NOTICE")
    run.add_argument("--verbose", choices=["0", "1", "2", "auto"], default="auto",
                     help="0 silent, 1 progress bar, 2 one line per epoch (default: 1 on a terminal, else 2)")
    ray_options = run.add_argument_group(
        "Ray", "By default the run trains in a Ray actor, and a new actor resumes it when a node is\n"
               "preempted or lost: on the cluster at RAY_ADDRESS (set by `ray job submit`), else on a\n"
               "local Ray started for this command. See docs/RAY.md.")
    _add_ray_options(ray_options, single_run=True)

    sweep = commands.add_parser(
        "sweep",
        parents=[store],
        help="a hyperparameter sweep on Ray Tune; every trial resumes mid-epoch after preemption",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Sweep config values of JOB.py with Ray Tune. Each trial is a run at <URI>/<trial id>
            that survives preemption like `cluster-trainer run` (Tune's failure budget counts real
            failures only); ASHA stops poor trials early. The same command again continues an
            interrupted sweep: finished trials are kept, unfinished ones resume from their state.
            The trials table is <URI>/trials.parquet (`cluster-trainer sweep-status URI`).
            Trials run in warm training processes (TensorFlow imported and the job file loaded
            once), Keras's global state reset between trials. Ray Tune's state is sealed with the
            key file $CLUSTER_TRAINER_SWEEP_KEY_FILE (default ~/.config/cluster-trainer/sweep.key,
            created on first use): continuing the sweep on another machine needs the same key.

            examples:
              cluster-trainer sweep jobs/mlp.py --storage runs/sweep --grid lr=1e-2,1e-3 --grid units=32,64
              cluster-trainer sweep jobs/mlp.py --storage gs://b/sweeps/lr --loguniform lr=1e-4:1e-1 \\
                  --num-samples 16 --scheduler asha --max-concurrent 4 --num-gpus 1
              cluster-trainer sweep jobs/mlp.py --storage runs/tpe --search optuna --seed 7 \\
                  --loguniform lr=1e-4:1e-1 --choice units=32,64,128 --num-samples 50 --max-concurrent 4
            """
        ),
        epilog=EXIT_CODES,
    )
    sweep.add_argument("job", metavar="JOB.py", help="the job file")
    sweep.add_argument("--storage", required=True, metavar="URI", help="where the sweep lives: a path, gs://, s3://")
    space = sweep.add_argument_group("search space (keys of the job's config)")
    space.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="every value, in every combination with the other grids (repeatable)")
    space.add_argument("--choice", action="append", default=[], metavar="KEY=V1,V2", help="one value drawn per sample")
    space.add_argument("--uniform", action="append", default=[], metavar="KEY=LOW:HIGH", help="drawn uniformly")
    space.add_argument("--loguniform", action="append", default=[], metavar="KEY=LOW:HIGH",
                       help="drawn uniformly in log space (learning rates)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key for every trial (typed); repeatable")
    sweep.add_argument("--num-samples", type=int, default=1, metavar="N",
                       help="samples of the space; each grid point is run N times (default 1)")
    sweep.add_argument("--metric", default="val_loss", help="the history column that ranks trials (default val_loss)")
    sweep.add_argument("--mode", choices=["min", "max"], default="min")
    sweep.add_argument("--search", choices=["random", "optuna"],
                       help="random: every grid point, values drawn at random (the default); optuna: Optuna's TPE "
                            "proposes each config from the results so far (no --grid: use --choice)")
    sweep.add_argument("--seed", type=int, metavar="N",
                       help="seeds the search, so the same sweep proposes the same configs (default: the job's seed)")
    sweep.add_argument("--fresh-workers", action="store_true",
                       help="start a new training process for every trial instead of reusing warm ones (for job "
                            "files whose module-level objects change while they train)")
    sweep.add_argument("--scheduler", choices=["asha"], help="asha: stop poor trials early (default: run all to the end)")
    sweep.add_argument("--grace-period", type=int, default=1, metavar="EPOCHS",
                       help="ASHA judges a trial only after this many epochs (default 1)")
    sweep.add_argument("--max-concurrent", type=int, metavar="N",
                       help="trials at once (default: as many training actors as the cluster holds at the start)")
    sweep.add_argument("--epochs", type=int, help="override the job's epochs")
    sweep.add_argument("--devices", type=int, help="replicas for MirroredStrategy in each trial's actor")
    sweep_ray = sweep.add_argument_group("Ray", "Where trials run, and what each trial's training actor asks for.")
    _add_ray_options(sweep_ray, single_run=False)

    sweep_status = commands.add_parser("sweep-status", parents=[store],
                                       help="the trials of a sweep: config, best metric, epochs, status")
    sweep_status.add_argument("uri", metavar="URI")
    sweep_status.add_argument("--format", choices=["text", "csv", "json"], default="text")
    sweep_status.add_argument("--plot", metavar="OUT.png",
                              help="draw into OUT.png each trial's metric against epoch (a trial stopped early ends "
                                   "in an x, the best trial drawn bold), and below it each config value against the "
                                   "trial's best metric, one panel per swept key")
    sweep_status.add_argument("--metric", default="val_loss", help="the metric to plot (default val_loss)")
    sweep_status.add_argument("--mode", choices=["min", "max"], default="min",
                              help="whether the best trial has the lowest (default) or highest --metric")

    status = commands.add_parser("status", parents=[store], help="where a run is: position, attempt, last metrics")
    status.add_argument("uri", metavar="URI")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")

    history = commands.add_parser(
        "history", parents=[store], help="the run's history: one row per epoch, exactly once, as CSV, JSON, Parquet or a plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Print the run's history: one row per finished epoch (metrics, learning rate,
            epoch time, the attempt and host that finished it, whether it was resumed), as
            committed with the run's checkpoints, so an interrupted run lists each epoch once.
            The same table is <URI>/history/epochs.parquet, for pandas.read_parquet.

            examples:
              cluster-trainer history runs/mlp
              cluster-trainer history gs://bucket/runs/mlp --format parquet -o mlp.parquet
              cluster-trainer history runs/mlp --plot mlp.png     # metrics and LR, resumes marked
              cluster-trainer history runs/mlp --steps            # rows every Job.history_every_steps
            """
        ),
    )
    history.add_argument("uri", metavar="URI")
    history.add_argument("--format", choices=["csv", "json", "parquet"], default="csv")
    history.add_argument("--output", "-o", metavar="PATH", help="write to PATH instead of stdout (required for parquet)")
    history.add_argument("--steps", action="store_true", help="the rows logged every N steps instead of per epoch")
    history.add_argument("--plot", metavar="OUT.png",
                         help="draw metrics and learning rate against epoch into OUT.png, resumed epochs marked")

    export = commands.add_parser("export", parents=[store], help="write the run's model as a standard .keras file")
    export.add_argument("uri", metavar="URI")
    export.add_argument("output", metavar="OUT.keras")
    export.add_argument("--job", metavar="JOB.py",
                        help="the job file that trained the run (needed: the architecture is code, and export never "
                             "imports a file named by what the run stores)")
    return parser


def _add_ray_options(group, single_run: bool) -> None:
    group.add_argument("--ray-address", metavar="ADDR",
                       help="the Ray cluster: HOST:PORT of its GCS, or auto (the one `ray start` ran on this "
                            "machine). Default: RAY_ADDRESS, else a new local Ray on 127.0.0.1")
    if single_run:
        group.add_argument("--no-ray", action="store_true",
                           help="train in this process, without Ray (debugging; plain pods where Kubernetes restarts)")
    group.add_argument("--max-failures", type=int, default=3, metavar="N",
                       help="failures (an exception, a killed actor, a node lost without notice) retried before "
                            "giving up, with backoff (default 3); preemptions do not count")
    if single_run:
        group.add_argument("--max-preemptions", type=int, metavar="N",
                           help="preemptions (a drained node, a preempted actor) retried before stopping with exit "
                                "code 75 (default: no limit)")
    group.add_argument("--workers", type=int, metavar="N",
                       help="train on N nodes at once: N actors on distinct nodes (a placement group) under "
                            "MultiWorkerMirroredStrategy, the global batch split over all their replicas, worker 0 "
                            "alone writing to storage; the resources below are per worker (default 1: one actor)")
    if single_run:
        group.add_argument("--min-workers", type=int, metavar="M",
                           help="when N nodes are not free for --shrink-after seconds, start with fewer workers, "
                                "down to M, keeping the global batch (default: N, always wait for all)")
        group.add_argument("--shrink-after", type=float, default=300.0, metavar="SECONDS",
                           help="how long a group waits for its N nodes before trying fewer (default 300)")
    group.add_argument("--num-cpus", type=float, metavar="N", help="CPUs each actor asks for (default: the job's, 1)")
    group.add_argument("--num-gpus", type=float, metavar="N",
                       help="GPUs each actor asks for; MirroredStrategy runs over them (default: the job's, 0)")
    group.add_argument("--resource", dest="ray_resources", action="append", default=[], metavar="KEY=N",
                       help="a custom resource each actor asks for, e.g. spot_a100=1 (repeatable)")
    group.add_argument("--label-selector", dest="label_selectors", action="append", default=[],
                       metavar="KEY=VALUE", help="a node label the actor must run on, e.g. pool=spot or "
                                                 "pool=!on-demand (repeatable)")


_PREEMPTED: list[BaseException] = []


def main(argv: list[str] | None = None) -> int:
    from cluster_trainer.preemption import early_signals

    # From the first moment: a SIGTERM while TensorFlow imports stops a run with exit code 75, not -15.
    with early_signals() if (argv if argv is not None else sys.argv[1:])[:1] == ["run"] else contextlib.nullcontext():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cluster-trainer: %(levelname)s: %(message)s"))
    package_log = logging.getLogger("cluster_trainer")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 <pid>` prints every thread's stack to stderr: where a stuck upload or step waits.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        _check_before_tensorflow(args)
        if args.command in ("run", "export", "sweep") and os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() not in ("0", "1"):
            from cluster_trainer.native_logs import import_tensorflow_quietly

            native = import_tensorflow_quietly()
            if "cuInit" in native or "Could not find cuda drivers" in native:
                package_log.debug("TensorFlow found no usable CUDA driver; running on CPU")
        _stop_if_signalled_while_starting()  # before Keras and the job file import, which take seconds more
        if args.command in ("run", "export", "sweep"):
            from cluster_trainer.keras_compat import check_versions

            check_versions()  # before the job file imports Keras
        commands = {"run": _run, "status": _status, "history": _history, "export": _export, "sweep": _sweep,
                    "sweep-status": _sweep_status}
        return commands[args.command](args)
    except ClusterTrainerError as e:
        kind = "" if e.exit_code == EXIT_PREEMPTED else "error: "  # preemption is not an error
        print(f"cluster-trainer: {kind}{e}", file=sys.stderr)
        if e.exit_code == EXIT_PREEMPTED:
            # The traceback holds the training loop's frames, and with them the tf.data iterators, whose
            # destructors wait for their prefetch threads (1-3 s): kept alive until entry_point's os._exit.
            _PREEMPTED[:] = [e]  # the latest only: main may run again in this process
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C during the flush
        print("cluster-trainer: interrupted before the state was committed", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a full or read-only disk where this command wrote (an output file, say): one line
        from cluster_trainer.storage import disk_error

        translated = disk_error(e)
        if translated is None:
            raise
        print(f"cluster-trainer: error: {translated}", file=sys.stderr)
        return translated.exit_code


def _check_before_tensorflow(args) -> None:
    """Refuse, in one line, whatever is wrong with the command line that neither TensorFlow nor the job
    file is needed to see (a missing job file, an unknown URI scheme, a malformed Ray flag, a closed
    --ray-address): before TensorFlow's import, which takes seconds (20 on a loaded machine)."""
    if args.command == "export":
        from cluster_trainer.export import check_arguments

        check_arguments(args.output, args.job)
    if args.command not in ("run", "sweep"):
        return
    from cluster_trainer.job import Resources, check_job_path
    from cluster_trainer.storage import check_uri

    check_job_path(args.job)
    check_uri(args.storage, _storage_options(args))
    if args.command == "sweep":
        _sweep_space(args)  # all but the keys, which need the job file
    else:
        _check_run_flags(args)
    if getattr(args, "no_ray", False):
        return
    from cluster_trainer.on_ray.connection import check_address
    from cluster_trainer.on_ray.retry import RetryPolicy

    _resources(args, Resources())  # the flags' syntax and values; the job's own resources come later
    RetryPolicy(args.max_failures, getattr(args, "max_preemptions", None))
    check_address(args.ray_address, offer_no_ray=args.command == "run")


def _check_run_flags(args) -> None:
    """Refuse `run` flags that contradict each other or name no notice source."""
    from cluster_trainer.preemption import notice_sources

    if args.no_ray:
        ray_only = [flag for flag, value in (
            ("--ray-address", args.ray_address), ("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus),
            ("--resource", args.ray_resources), ("--label-selector", args.label_selectors),
            ("--max-preemptions", args.max_preemptions), ("--workers", args.workers),
            ("--min-workers", args.min_workers)) if value]
        if ray_only:
            raise ClusterTrainerError(f"{ray_only[0]} applies to runs on Ray: leave out --no-ray, or drop {ray_only[0]}")
    if args.notices:
        notice_sources(args.notices)


def _run(args) -> int:
    from cluster_trainer.job import load_job
    from cluster_trainer.preemption import notice_sources, sources_from_environment

    job = load_job(args.job).with_overrides(args.overrides)
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    _stop_if_signalled_while_starting()
    if args.no_ray:
        from cluster_trainer.loop import train

        sources = notice_sources(args.notices) if args.notices else sources_from_environment()
        result = train(
            job, args.storage, devices=args.devices, epochs=args.epochs, verbose=verbose,
            storage_options=_storage_options(args), notice_sources=sources,
        )
        last = {k: v[-1] for k, v in result.history.items() if v}
        metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(last.items()) if isinstance(v, float))
        print(f"cluster-trainer: run {result.status}: {result.uri} (epoch {result.position.epoch}, "
              f"global step {result.position.global_step}, attempt {result.attempt}) {metrics}", file=sys.stderr)
        return EXIT_OK
    from cluster_trainer.on_ray.driver import run

    outcome = run(
        job, args.storage, address=args.ray_address, devices=args.devices, epochs=args.epochs,
        resources=_resources(args, job.resources), max_failures=args.max_failures,
        max_preemptions=args.max_preemptions, workers=args.workers or 1, min_workers=args.min_workers,
        shrink_after=args.shrink_after, storage_options=_storage_options(args), verbose=verbose,
        notices=args.notices or None,
    )
    print(f"cluster-trainer: {outcome.summary()}", file=sys.stderr)
    return EXIT_OK


def _stop_if_signalled_while_starting() -> None:
    """Exit 75 at once if a SIGTERM came while the command started (see `preemption.early_signals`)."""
    from cluster_trainer.preemption import early_notice, started_too_late

    if early_notice():
        raise started_too_late(early_notice())


def _sweep(args) -> int:
    from cluster_trainer.job import load_job
    from cluster_trainer.sweep import sweep

    space = _sweep_space(args)
    job = load_job(args.job).with_overrides(args.overrides)
    table = sweep(
        job, space, storage=args.storage, metric=args.metric, mode=args.mode, num_samples=args.num_samples,
        search=args.search, seed=args.seed, fresh_workers=args.fresh_workers,
        scheduler=args.scheduler, grace_period=args.grace_period, max_concurrent=args.max_concurrent,
        resources=_resources(args, job.resources), devices=args.devices, epochs=args.epochs,
        max_failures=args.max_failures, address=args.ray_address, storage_options=_storage_options(args),
        workers=args.workers or 1,
    )
    print(table.to_string(index=False))
    return EXIT_OK


def _sweep_space(args) -> dict:
    """The space of `sweep`'s flags, checked against everything but the job's keys (a job-less check
    costs no TensorFlow import)."""
    from cluster_trainer.sweep import check_search, check_space, parse_space

    space = parse_space(args.grid, args.choice, args.uniform, args.loguniform)
    check_space(None, space)
    check_search(args.search, space)
    return space


def _sweep_status(args) -> int:
    from cluster_trainer.sweep import plot_trials, read_trials

    options = _storage_options(args)
    if args.plot:
        plot_trials(args.uri, args.plot, metric=args.metric, mode=args.mode, storage_options=options)
        print(f"cluster-trainer: wrote {args.plot}", file=sys.stderr)
        return EXIT_OK
    table = read_trials(args.uri, options)
    if args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    elif args.format == "json":
        sys.stdout.write(_json_lines(table))
    else:
        print(table.to_string(index=False))
    return EXIT_OK


def _resources(args, default):
    """The job's Resources with --num-cpus/--num-gpus/--resource/--label-selector applied."""
    import dataclasses

    from cluster_trainer.job import parse_value

    custom = dict(default.custom)
    for item in args.ray_resources:
        key, sep, value = item.partition("=")
        amount = parse_value(value) if sep else None
        if not key or not isinstance(amount, (int, float)) or isinstance(amount, bool):
            raise ClusterTrainerError(f"--resource expects KEY=NUMBER, e.g. spot_a100=1; got {item!r}")
        custom[key] = amount
    labels = dict(default.label_selector)
    for item in args.label_selectors:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ClusterTrainerError(f"--label-selector expects KEY=VALUE, e.g. pool=spot; got {item!r}")
        labels[key] = value
    changes = {"custom": custom, "label_selector": labels}
    if args.num_cpus is not None:
        changes["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        changes["num_gpus"] = args.num_gpus
    return dataclasses.replace(default, **changes)


def _status(args) -> int:
    from cluster_trainer.cadence import describe_state
    from cluster_trainer.checkpoint import CheckpointStore
    from cluster_trainer.history import RUN_COLUMNS, latest_checkpoint
    from cluster_trainer.storage import Storage

    options = _storage_options(args)
    checkpoint = latest_checkpoint(args.uri, options)
    state = checkpoint.state
    position = state["position"]
    epochs = state["history"]["epochs"]
    info = {
        "uri": args.uri,
        "job": state["job"]["name"],
        "state": "complete" if position["finished"] else "in progress",
        "epoch": position["epoch"],
        "epochs": state["job"]["epochs"],
        "batch": position["batch"],
        "steps_per_epoch": state["job"]["steps_per_epoch"],
        "global_step": position["global_step"],
        "attempt": checkpoint.attempt,
        "checkpoint": checkpoint.name,
        "committed_checkpoints": CheckpointStore(Storage(args.uri, options)).committed(),
        "last_epoch": epochs[-1] if epochs else None,
        "resumed_epochs": sum(1 for row in epochs if row["resumed"]),
        "cadence": state.get("cadence") if isinstance(state.get("cadence"), dict) else None,
    }
    if args.json:
        print(json.dumps(info, indent=2, default=float))
        return EXIT_OK
    print(f"run        {info['uri']}  ({info['job']})")
    print(f"state      {info['state']}" + ("  (stopped early)" if position["stop_training"] else ""))
    print(f"position   epoch {info['epoch']}/{info['epochs']}, batch {info['batch']}/{info['steps_per_epoch']}, "
          f"global step {info['global_step']}")
    print(f"attempt    {info['attempt']}  (checkpoint {info['checkpoint']}, {len(info['committed_checkpoints'])} kept)")
    if info["last_epoch"]:
        last = info["last_epoch"]
        metrics = "  ".join(f"{k}={v:.6g}" for k, v in last.items()
                            if k not in ("epoch", "global_step", *RUN_COLUMNS) and v is not None)
        print(f"last epoch {last['epoch']}: {metrics}  ({last['epoch_seconds']:.1f}s)")
    for line in describe_state(info["cadence"] or {}):
        print(line)
    return EXIT_OK


def _history(args) -> int:
    from cluster_trainer.history import plot_history, read_history

    frame = read_history(args.uri, _storage_options(args), steps=args.steps)
    if args.plot:
        if args.steps:
            raise ClusterTrainerError("--plot draws the epoch history; leave out --steps")
        plot_history(frame, args.plot, title=args.uri)
        print(f"cluster-trainer: wrote {args.plot}", file=sys.stderr)
        return EXIT_OK
    if args.format == "parquet":
        if not args.output:
            raise ClusterTrainerError("--format parquet needs --output PATH (Parquet is binary)")
        frame.to_parquet(args.output, index=False)
    else:
        text = frame.to_csv(index=False) if args.format == "csv" else _json_lines(frame)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
    return EXIT_OK


def _json_lines(frame) -> str:
    """One JSON object per row, floats in full precision (pandas' to_json rounds to 10 digits)."""
    def plain(value):
        if hasattr(value, "isoformat"):
            return value.isoformat()
        return value.item() if hasattr(value, "item") else str(value)

    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return "".join(json.dumps(row, default=plain) + "\n" for row in rows)


def _export(args) -> int:
    from cluster_trainer.export import export_model

    export_model(args.uri, args.output, job_path=args.job, storage_options=_storage_options(args))
    print(f"cluster-trainer: wrote {args.output}", file=sys.stderr)
    return EXIT_OK


def _storage_options(args) -> dict:
    """`--storage-option key=value` pairs; values are typed like `--set` (true, 3, 1.5), else strings."""
    from cluster_trainer.job import parse_value

    options = {}
    for item in args.storage_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterTrainerError(f"--storage-option expects KEY=VALUE, got {key!r}")
        options[key] = parse_value(value)
    return options


def entry_point() -> None:
    """The `cluster-trainer` command (and `python -m cluster_trainer`).

    A preempted run leaves at once, skipping interpreter shutdown: its state is
    committed and its writer stopped, and tearing down tf.data's prefetch threads
    and Python's final garbage collection took about 1 s of the grace period
    after the commit (16 s once, on a loaded machine). `main` keeps the
    preemption's traceback, so those threads are not torn down on the way here
    either (that alone took 1-3 s for a 100 MB model).

    A worker of a multi-worker run (TF_CONFIG naming several) leaves at once too,
    whatever its exit code: otherwise TensorFlow's coordination service holds the
    exit at a shutdown barrier until every worker reaches it, or until its timeout
    when one is gone.
    """
    code = main()
    if code == EXIT_PREEMPTED or _several_workers():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _several_workers() -> bool:
    from cluster_trainer.workers import Workers

    try:
        return Workers.from_tf_config() is not None
    except ClusterTrainerError:
        return False


if __name__ == "__main__":
    entry_point()

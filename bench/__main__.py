"""`python -m bench`: run the benchmarks side by side and write docs/BENCHMARKS.md.

    python -m bench                    # everything at the default sizes, print tables
    python -m bench --write            # ... and update docs/BENCHMARKS.md
    python -m bench --only io --sizes 10 100 1000
    python -m bench --only preemption --state-sizes 10 100 1000 --rerun-steps 1000 5000
    python -m bench --only resume --resume-batches 1000 10000
    python -m bench --only group-restart --repeats 5
    python -m bench --only multiworker --widths 256 --state-sizes 10 100 --flush-phases 0.5
    python -m bench --only cadence --cadence-kills 8 --cadence-steps 200
    python -m bench --only sweep --sweep-trials 16 --asha-trials 200
"""

import argparse
import os
import platform

from bench import cadence, checkpoint_io, group_restart, loop_overhead, multi_worker, preemption, resume, sweep_overhead
from cluster_trainer.job import CheckpointPolicy


def replace_section(name: str, table: str) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "BENCHMARKS.md")
    text = open(path).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    before, rest = text.split(start)
    _, after = rest.split(end)
    open(path, "w").write(f"{before}{start}\n{table}{end}{after}")


def run_process_benchmark(name: str, run, args, machine: str) -> dict:
    """Run a benchmark of training processes, print its tables with the load average around it, and
    with --write record them; returns its raw results for the plots."""
    before = os.getloadavg()[0]
    text, results = run(args, machine)
    text += f"\nLoad average (1 min) {before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
    print(text)
    if args.write:
        replace_section(name, text)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loop", "io", "preemption", "resume", "multiworker", "group-restart",
                                           "cadence", "sweep"],
                        help="run one benchmark")
    parser.add_argument("--epochs", type=int, default=3, help="loop: timed epochs per repetition (default 3)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 8 for loop, at its first width, 3 for the others)")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024],
                        help="loop: hidden units of the MLP, one table each (default 256 1024); multiworker: the first")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="io: state sizes in MB (default 10 100)")
    parser.add_argument("--state-sizes", type=int, nargs="+", default=[10, 100],
                        help="preemption, resume, multiworker: checkpoint sizes in MB (default 10 100)")
    parser.add_argument("--flush-phases", type=float, nargs="+", default=[0.0, 0.5],
                        help="multiworker: when in a step the notice comes, as a fraction of a step after one ends "
                             "(default 0 0.5)")
    parser.add_argument("--rerun-steps", type=int, nargs="+", default=[200, 800],
                        help="preemption: steps per epoch of the steps-re-run runs (default 200 800)")
    parser.add_argument("--interruptions", type=int, default=5, help="preemption: interruptions per schedule (default 5)")
    parser.add_argument("--methods", nargs="+", choices=list(preemption.METHODS), default=list(preemption.METHODS),
                        help="preemption: methods of the steps-re-run comparison (default all)")
    parser.add_argument("--seed", type=int, default=0, help="preemption: seed of the interruption schedule (default 0)")
    parser.add_argument("--data-repeats", type=int, default=5,
                        help="resume: repetitions of the in-process epoch-start timings, at least --repeats (default "
                             "5: cheap, and skip times vary 2x from trial to trial on a shared machine)")
    parser.add_argument("--resume-batches", type=int, nargs="+", default=[1000, 4000],
                        help="resume: batches per epoch of the late-start data benchmark (default 1000 4000)")
    parser.add_argument("--stores", nargs="+", choices=["local", "s3", "gcs"], default=["local", "s3", "gcs"],
                        help="io, preemption flush, resume restart: stores to run on, local disk, moto's S3 server, "
                             "the GCS emulator (default all three)")
    parser.add_argument("--devices", type=int, default=2,
                        help="preemption flush, resume restart: replicas of the training processes (default 2)")
    parser.add_argument("--shard-mb", type=int, default=CheckpointPolicy.shard_mb,
                        help=f"preemption flush: the run's checkpoint shard size in MiB (default {CheckpointPolicy.shard_mb}, "
                             "the CheckpointPolicy default)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="group-restart: a running Ray cluster whose nodes have 1 CPU each, at least two "
                             "(default: start a head without CPUs and two such nodes on 127.0.0.1)")
    parser.add_argument("--cadence-width", type=int, default=1024,
                        help="cadence: hidden units of the MLP of the steps/s comparison (default 1024)")
    parser.add_argument("--cadence-steps", type=int, default=200,
                        help="cadence: steps per epoch of the steps-re-run runs (default 200)")
    parser.add_argument("--cadence-mb", type=int, default=10,
                        help="cadence: state size in MB of the steps-re-run runs' Dense model (default 10)")
    parser.add_argument("--cadence-kills", type=int, default=8,
                        help="cadence: SIGKILLs in the seeded schedule of the steps-re-run runs (default 8)")
    parser.add_argument("--cadence-methods", nargs="+", choices=list(cadence.METHODS), default=list(cadence.METHODS),
                        help="cadence: policies of the steps-re-run comparison (default all)")
    parser.add_argument("--sweep-trials", type=int, default=8,
                        help="sweep: trials of the overhead sweeps (default 8; the double variant runs twice as many)")
    parser.add_argument("--asha-trials", type=int, default=200,
                        help="sweep: trials of the ASHA sweep (default 200; 0 leaves it out)")
    parser.add_argument("--trivial-trials", type=int, default=200,
                        help="sweep: trials that only report, for the Tune driver's cost per trial (default 200)")
    parser.add_argument("--sweep-variants", nargs="*", choices=["double", "fresh"], default=["double", "fresh"],
                        help="sweep: besides the warm-worker sweep, one of twice the trials and one with a fresh "
                             "process per trial (default both)")
    parser.add_argument("--write", action="store_true",
                        help="write the tables into docs/BENCHMARKS.md (and the plots into docs/*.png)")
    parser.add_argument("--plot-dir", metavar="DIR", help="write the plots into DIR (with --write, default docs/)")
    args = parser.parse_args()
    loop_repeats = args.repeats or 8
    args.repeats = args.repeats or 3
    machine = f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}."
    if args.only in (None, "loop"):
        table, results = loop_overhead.run(args, loop_repeats)
        print(table)
        if args.write:
            replace_section("loop_overhead", table)
        if args.write or args.plot_dir:
            from bench import plots

            plots.loop(results, args.plot_dir)
    if args.only in (None, "io"):
        table = checkpoint_io.run(args.sizes, args.repeats, args.stores) + f"\nMedian of {args.repeats} runs each. {machine}\n"
        print(table)
        if args.write:
            replace_section("checkpoint_io", table)
    if args.only in (None, "preemption"):
        results = run_process_benchmark("preemption", preemption.run, args, machine)
        if args.write or args.plot_dir:
            from bench import plots

            plots.flush(results["flush"], args.plot_dir)
            plots.reruns(results["reruns"], args.plot_dir)
    if args.only in (None, "resume"):
        results = run_process_benchmark("resume", resume.run, args, machine)
        if args.write or args.plot_dir:
            from bench import plots

            plots.restarts(results["restarts"], args.plot_dir)
            plots.data(results["data"], args.plot_dir)
    if args.only in (None, "multiworker"):
        run_process_benchmark("multi_worker", multi_worker.run, args, machine)
    if args.only in (None, "group-restart"):
        run_process_benchmark("group_restart", group_restart.run, args, machine)
    if args.only in (None, "cadence"):
        run_process_benchmark("cadence", cadence.run, args, machine)
    if args.only in (None, "sweep"):
        run_process_benchmark("sweep", sweep_overhead.run, args, machine)

"""`python -m bench`: run the benchmarks side by side and write docs/BENCHMARKS.md.

    python -m bench                    # everything at the default sizes, print tables
    python -m bench --write            # ... and update docs/BENCHMARKS.md
    python -m bench --only io --sizes 10 100 1000
"""

import argparse
import os
import platform

from bench import checkpoint_io, loop_overhead


def replace_section(name: str, table: str) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "BENCHMARKS.md")
    text = open(path).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    before, rest = text.split(start)
    _, after = rest.split(end)
    open(path, "w").write(f"{before}{start}\n{table}{end}{after}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loop", "io"], help="run one benchmark")
    parser.add_argument("--epochs", type=int, default=6, help="loop: timed epochs per repetition (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--width", type=int, default=256, help="loop: hidden units of the MLP")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="io: state sizes in MB (default 10 100)")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    args = parser.parse_args()
    machine = f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}."
    if args.only in (None, "loop"):
        table = loop_overhead.run(args)
        print(table)
        if args.write:
            replace_section("loop_overhead", table)
    if args.only in (None, "io"):
        table = checkpoint_io.run(args.sizes, args.repeats) + f"\nMedian of {args.repeats} runs each. {machine}\n"
        print(table)
        if args.write:
            replace_section("checkpoint_io", table)

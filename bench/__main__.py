"""`python -m bench`: run the benchmarks side by side and write docs/BENCHMARKS.md."""

import argparse

from bench.loop_overhead import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs per repetition (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each variant (default 3)")
    parser.add_argument("--width", type=int, default=256, help="hidden units of the MLP (state size grows with it)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    main(parser.parse_args())

"""The Tune driver's own cost per trial: a sweep of trials that do nothing, as a sweep's driver runs them.

`python bench/tune_trivial.py RAY_ADDRESS STORAGE TRIALS REPORTS CONCURRENCY` runs a Tuner like
`cluster_trainer.sweep`'s (function trainable asking no CPU, actors reused between trials, the
seal callback, a seeded BasicVariantGenerator) whose trials each report REPORTS results, each with
a one-file checkpoint as the sweep's trials do, and return. Prints one JSON object: the wall time of
`fit`, the CPU time the driver process spent in it (its own work, which the machine's load barely
changes), and the experiment state's size at the end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def trivial(config):
    from ray import tune

    for index in range(config["reports"]):
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "reported"), "w") as f:
                f.write(str(index + 1))
            tune.report({"epoch": index + 1, "val_loss": config["x"] / (index + 1)},
                        checkpoint=tune.Checkpoint.from_directory(directory))


def _cpu_seconds() -> float:
    """CPU time of this process (Tune's controller and every thread of it): work done, whatever the machine's load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    address, storage, trials, reports, concurrency = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    import logging

    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from cluster_trainer import sweep_seal
    from cluster_trainer.storage import Storage
    from cluster_trainer.sweep import TRIAL_PROCESS_RESOURCES

    ray.init(address=address, logging_level=logging.WARNING)
    seal = sweep_seal.TuneStateSeal(Storage(storage), sweep_seal.load_key(create=True))
    tuner = tune.Tuner(
        tune.with_resources(trivial, TRIAL_PROCESS_RESOURCES),
        param_space={"x": tune.uniform(0, 1), "reports": reports},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=trials, reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=0, max_concurrent=concurrency)),
        run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0,
                                  callbacks=[sweep_seal.SealCallback()]),
    )
    seal.record_stored("tune/tuner.pkl")
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with sweep_seal.active(seal):
        tuner.fit()
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    state = max((os.path.join(storage, "tune", name) for name in os.listdir(os.path.join(storage, "tune"))
                 if name.startswith("experiment_state")), key=os.path.getmtime)
    print(json.dumps({"seconds": seconds, "driver_cpu_seconds": cpu_seconds,
                      "experiment_state_bytes": os.path.getsize(state)}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

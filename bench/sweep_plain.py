"""The sweep benchmark's baseline: the same trainings as a sweep's trials, with plain `model.fit`, in one process.

Reads a JSON list of `{"config": {...}, "epochs": N}` from the file named by its
first argument; imports TensorFlow once, loads `jobs/mlp.py` once, and for
each entry builds the model from nothing (`keras.backend.clear_session()`,
the job's seed, `build_model(config)`) and fits it for that many epochs on the
job's data, as a user sweeping by hand in a notebook would. Prints one JSON
object: the import time and each training's seconds (build + compile + fit).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STARTED = time.perf_counter()
import keras  # noqa: E402

from cluster_trainer.job import load_job  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "mlp.py")


def main() -> int:
    trainings = json.load(open(sys.argv[1]))
    job = load_job(JOB)
    imported = time.perf_counter() - STARTED
    seconds = []
    for training in trainings:
        begin = time.perf_counter()
        keras.backend.clear_session()
        keras.utils.set_random_seed(job.seed)
        model = job.build_model({**job.config, **training["config"]})
        model.fit(*job.train_data, batch_size=job.batch_size, epochs=training["epochs"],
                  validation_data=job.validation_data, shuffle=True, verbose=0)
        seconds.append(time.perf_counter() - begin)
    print(json.dumps({"import_seconds": imported, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

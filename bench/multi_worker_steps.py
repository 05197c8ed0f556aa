"""One worker of the multi-worker steps/s benchmark: our loop and `tf_keras` `fit`, in turns, in this process.

Started by `bench.multi_worker` as every worker of a group (each with its own
`TF_CONFIG`), or alone for the 1-worker figure. The strategy is made once
(a process joins one multi-worker run), then for each repetition every
variant trains the same model on the same data under it, and the process
prints one JSON line: each variant's steps/s per repetition (its median epoch
after the first, which includes tracing).

Variants:
    ours          cluster-trainer's loop (`cluster_trainer.train`) on Keras 3, no checkpoints
    keras2        `tf_keras` (Keras 2, what `TF_USE_LEGACY_KERAS=1` gives `tf.keras`) `model.fit`
                  on a tf.data pipeline of the same global batches, auto-sharded by TensorFlow
    keras3        Keras 3 `model.fit` on that pipeline, made to run on several workers by the
                  reduction fix our loop uses (`keras_compat.fix_multi_worker_step_reduction`):
                  each step's logs are the mean over every worker's replicas, in one all-reduce
    keras3-local  the same, but each step's logs are the first local replica's, as `tf_keras`
                  returns them: no all-reduce beyond the gradients'. Against `keras3`, the
                  price of global per-step logs; against `ours`, of everything else our loop does

Environment: BENCH_VARIANTS (comma-separated), BENCH_REPEATS, BENCH_EPOCHS (timed epochs),
BENCH_WIDTH, BENCH_SAMPLES, BENCH_BATCH, BENCH_RUN_DIR (the runs of our loop; the same path on
every worker, since the chief writes it), BENCH_DEVICES (replicas per worker).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from cluster_trainer.native_logs import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

from cluster_trainer.devices import make_strategy  # noqa: E402
from cluster_trainer.workers import Workers  # noqa: E402

STRATEGY = make_strategy(int(os.environ.get("BENCH_DEVICES", "1")), Workers.from_tf_config())

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cluster_trainer as ct  # noqa: E402
from cluster_trainer.data import ArraySource  # noqa: E402

FEATURES, CLASSES = 64, 10
WIDTH = int(os.environ.get("BENCH_WIDTH", 256))
SAMPLES = int(os.environ.get("BENCH_SAMPLES", 8192))
BATCH = int(os.environ.get("BENCH_BATCH", 128))
EPOCHS = int(os.environ.get("BENCH_EPOCHS", 3))
STEPS = -(-SAMPLES // BATCH)


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, SAMPLES)]
    return x, y


class EpochTimer:
    """An epoch timer for either Keras (a plain object with the two hooks, wrapped for each)."""

    def __init__(self):
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def layers(api):
    return [api.Input((FEATURES,)), api.layers.Dense(WIDTH, activation="relu"),
            api.layers.Dense(WIDTH, activation="relu"), api.layers.Dense(CLASSES, activation="softmax")]


def run_ours(repeat: int) -> list[float]:
    timer = EpochTimer()
    callback = type("Timer", (keras.callbacks.Callback,), {
        "on_epoch_begin": lambda self, e, logs=None: timer.on_epoch_begin(e),
        "on_epoch_end": lambda self, e, logs=None: timer.on_epoch_end(e),
        "get_state": lambda self: {}, "set_state": lambda self, state: None})

    def build(config):
        model = keras.Sequential(layers(keras))
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        return model

    job = ct.Job(name="bench", build_model=build, train_data=make_data(), callbacks=lambda config: [callback()],
                 epochs=EPOCHS + 1, batch_size=BATCH, seed=0,
                 checkpoint=ct.CheckpointPolicy(every_steps=None, every_epoch=False))
    ct.train(job, os.path.join(os.environ["BENCH_RUN_DIR"], f"ours-{repeat}"), strategy=STRATEGY, verbose=0,
             echo=lambda message: None)
    return timer.times[1:]


def run_keras2(repeat: int) -> list[float]:
    import tf_keras

    timer = EpochTimer()
    callback = type("Timer", (tf_keras.callbacks.Callback,), {
        "on_epoch_begin": lambda self, e, logs=None: timer.on_epoch_begin(e),
        "on_epoch_end": lambda self, e, logs=None: timer.on_epoch_end(e)})
    tf_keras.utils.set_random_seed(0)
    with STRATEGY.scope():
        model = tf_keras.Sequential(layers(tf_keras))
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(_fit_dataset(), epochs=EPOCHS + 1, callbacks=[callback()], verbose=0)
    return timer.times[1:]


def _fit_dataset() -> tf.data.Dataset:
    """The global batches our loop feeds (epoch 0's order), as a user of fit would build them."""
    dataset = ArraySource(make_data(), shuffle=True).epoch_dataset(0, 0, BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def run_keras3(repeat: int, local_logs: bool = False) -> list[float]:
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    from cluster_trainer import keras_compat

    keras_compat.fix_multi_worker_step_reduction()
    fixed, votes = trainer.reduce_per_replica, dict(keras_compat._step_votes)
    keras_compat._step_votes.clear()  # our loop's votes ride its steps only
    if local_logs:
        trainer.reduce_per_replica = lambda values, strategy, reduction: tree.map_structure(
            lambda value: strategy.experimental_local_results(value)[0], values)
    timer = EpochTimer()
    callback = type("Timer", (keras.callbacks.Callback,), {
        "on_epoch_begin": lambda self, e, logs=None: timer.on_epoch_begin(e),
        "on_epoch_end": lambda self, e, logs=None: timer.on_epoch_end(e)})
    try:
        keras.utils.set_random_seed(0)
        with STRATEGY.scope():
            model = keras.Sequential(layers(keras))
            model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
            x, y = make_data()
            keras_compat.symbolic_build(model, (tf.constant(x[:BATCH]), tf.constant(y[:BATCH])))
        # Keras 3.15's fit builds the model from its first batch by `strategy.reduce("MEAN", batch)`, which
        # fails under a multi-worker strategy (a PerReplica it cannot convert); built above, as our loop does.
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
        model.fit(_fit_dataset(), epochs=EPOCHS + 1, callbacks=[callback()], verbose=0)
    finally:
        trainer.reduce_per_replica = fixed
        keras_compat._step_votes.update(votes)
    return timer.times[1:]


VARIANTS = {"ours": run_ours, "keras2": run_keras2, "keras3": run_keras3,
            "keras3-local": lambda repeat: run_keras3(repeat, local_logs=True)}


def main() -> int:
    names = os.environ.get("BENCH_VARIANTS", "ours,keras2").split(",")
    rates: dict[str, list[float]] = {name: [] for name in names}
    best: dict[str, float] = {name: 0.0 for name in names}
    for repeat in range(int(os.environ.get("BENCH_REPEATS", 3))):
        for name in names:
            times = VARIANTS[name](repeat)
            rates[name].append(STEPS / statistics.median(times))
            best[name] = max(best[name], STEPS / min(times))
            threads = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("Threads:"))
            print(f"bench: repeat {repeat + 1}: {name}: {rates[name][-1]:.1f} steps/s ({threads} threads)",
                  file=sys.stderr, flush=True)
    print(json.dumps({"rates": rates, "best": best, "steps": STEPS}), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a worker of a group leaves at once (see cluster_trainer.cli.entry_point)

"""Loop overhead and checkpoint cost, against plain `model.fit`, in one process.

Same model, data, batch size and MirroredStrategy (2 logical CPU devices) for
every variant; variants are interleaved and repeated, and each reports the
median time of its epochs after the first (which includes tracing):

- `fit` on the same `tf.data` pipeline the loop builds (epoch 0's order,
  batched): the baseline for the loop's own overhead.
- `fit` on the numpy arrays: what a user's `fit(x, y)` costs, through Keras's
  array adapter.
- `cluster-trainer, no saves`: our loop with checkpoints off.
- `cluster-trainer, save every N steps`: checkpoints to local disk.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cluster_trainer.native_logs import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

from cluster_trainer.devices import make_strategy  # noqa: E402

STRATEGY = make_strategy(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import cluster_trainer as ct  # noqa: E402
from cluster_trainer.data import ArraySource  # noqa: E402

SAMPLES, FEATURES, CLASSES, BATCH = 8192, 64, 10, 128
SAVE_EVERY = 16
STEPS = -(-SAMPLES // BATCH)  # per epoch


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def make_job(width: int, policy: ct.CheckpointPolicy, timer: EpochTimer, epochs: int) -> ct.Job:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, CLASSES, SAMPLES), CLASSES).astype("float32")

    def build(config):
        model = keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(width, activation="relu"),
             keras.layers.Dense(width, activation="relu"), keras.layers.Dense(CLASSES, activation="softmax")]
        )
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        return model

    return ct.Job(name="bench", build_model=build, train_data=(x, y), callbacks=lambda config: [timer],
                  epochs=epochs, batch_size=BATCH, seed=0, checkpoint=policy)


def run_fit(width: int, epochs: int, same_pipeline: bool) -> list[float]:
    timer = EpochTimer()
    job = make_job(width, ct.CheckpointPolicy(every_steps=None, every_epoch=False), timer, epochs)
    keras.utils.set_random_seed(0)
    with STRATEGY.scope():
        model = job.build_model({})
    if same_pipeline:
        dataset = ArraySource(job.train_data, shuffle=True).epoch_dataset(0, job.seed, BATCH)
        model.fit(dataset, epochs=epochs, callbacks=[timer], verbose=0)
    else:
        x, y = job.train_data
        model.fit(x, y, batch_size=BATCH, epochs=epochs, callbacks=[timer], verbose=0, shuffle=True)
    return timer.times[1:]


SAVE_STATS: list[dict] = []


def run_loop(width: int, epochs: int, policy: ct.CheckpointPolicy) -> list[float]:
    timer = EpochTimer()
    job = make_job(width, policy, timer, epochs)
    with tempfile.TemporaryDirectory() as run:
        result = ct.train(job, run, strategy=STRATEGY, verbose=0, echo=lambda message: None)
    if result.checkpoint_stats["saves"] > 1:
        SAVE_STATS.append(result.checkpoint_stats)
    return timer.times[1:]


NO_SAVES = "cluster-trainer loop, no saves"
BASELINE = "model.fit, same tf.data pipeline (baseline)"
ON_ARRAYS = "model.fit(x, y) on numpy arrays"


def _variants(width: int, epochs: int, with_arrays: bool) -> dict:
    variants = {
        BASELINE: lambda: run_fit(width, epochs + 1, True),
        ON_ARRAYS: lambda: run_fit(width, epochs + 1, False),
        NO_SAVES: lambda: run_loop(width, epochs + 1, ct.CheckpointPolicy(every_steps=None, every_epoch=False)),
        f"cluster-trainer loop, save every {SAVE_EVERY} steps (background writer)": lambda: run_loop(
            width, epochs + 1, ct.CheckpointPolicy(every_steps=SAVE_EVERY, every_epoch=False, keep_last=2)),
        "cluster-trainer loop, save every 128 steps (background writer)": lambda: run_loop(
            width, epochs + 1, ct.CheckpointPolicy(every_steps=128, every_epoch=False, keep_last=2)),
    }
    if not with_arrays:
        del variants[ON_ARRAYS]
    return variants


def measure(width: int, epochs: int, repeats: int, with_arrays: bool) -> dict:
    """Steps/s of every variant at one model width: per repetition (median epoch) and best epoch.

    Each repetition runs every variant once, one after the other. A ratio is
    taken within a repetition (a slow minute of a shared machine slows both
    sides of it); the fastest epoch over the whole run is the other estimate,
    since noise on a shared machine only ever adds time.
    """
    variants = _variants(width, epochs, with_arrays)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    best: dict[str, float] = {name: 0.0 for name in variants}
    SAVE_STATS.clear()
    for repeat in range(repeats):
        for name, variant in variants.items():
            epoch_times = variant()
            rates[name].append(STEPS / statistics.median(epoch_times))
            best[name] = max(best[name], STEPS / min(epoch_times))
            print(f"width {width}, repeat {repeat + 1}/{repeats}: {name}: {rates[name][-1]:.1f} steps/s", flush=True)
    return {"width": width, "epochs": epochs, "repeats": repeats, "rates": rates, "best": best,
            "save_stats": list(SAVE_STATS)}


def paired_ratios(result: dict, name: str, to: str) -> list[float]:
    return sorted(a / b for a, b in zip(result["rates"][name], result["rates"][to]))


def table(result: dict) -> str:
    width, rates, best = result["width"], result["rates"], result["best"]

    def ratio(name: str, to: str) -> str:
        paired = paired_ratios(result, name, to)
        return f"{statistics.median(paired):.2f} ({paired[0]:.2f}–{paired[-1]:.2f}), best {best[name] / best[to]:.2f}"

    params = FEATURES * width + width + width * width + width + width * CLASSES + CLASSES
    rows = [
        "| variant | steps/s: median (best epoch) | ratio to fit | ratio to no saves |",
        "|---|---:|---:|---:|",
    ]
    for name in rates:
        to_no_saves = ratio(name, NO_SAVES) if "save every" in name else ""
        rows.append(f"| {name} | {statistics.median(rates[name]):.1f} ({best[name]:.1f}) | {ratio(name, BASELINE)} "
                    f"| {to_no_saves} |")
    text = (
        f"**MLP {FEATURES}-{width}-{width}-{CLASSES}** ({params:,} parameters, state with Adam slots "
        f"~{params * 3 * 4 / 1e6:.1f} MB), {SAMPLES} examples, global batch {BATCH} ({STEPS} steps/epoch); "
        f"{result['repeats']} repetitions of {result['epochs']} timed epochs per variant.\n\n" + "\n".join(rows) + "\n"
    )
    stats = result["save_stats"]
    if stats:
        saves = sum(s["saves"] for s in stats)
        copy_ms = 1000 * statistics.median(s["host_copy_median_seconds"] for s in stats)
        stall_ms = 1000 * sum(s["stall_seconds"] for s in stats) / saves
        text += (f"\nPer save ({saves} saves): host copy {copy_ms:.1f} ms (median) on the training thread; "
                 f"blocked on the previous upload {stall_ms:.1f} ms on average.\n")
    return text


def run(args, repeats: int) -> tuple[str, list[dict]]:
    """Every width in `args.widths`; the first with `repeats` repetitions, wider ones (slower
    steps) with half as many and without the `fit(x, y)` variant. Returns the text and results."""
    results = [measure(width, args.epochs, repeats if i == 0 else max(1, repeats // 2), with_arrays=i == 0)
               for i, width in enumerate(args.widths)]
    text = (
        "MirroredStrategy over 2 logical CPU devices; variants interleaved. Steps/s: the median over repetitions of "
        "each repetition's median epoch, and the fastest epoch. Ratios: the median (and range) of the ratios within "
        "each repetition, and the ratio of fastest epochs. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.\n\n"
    )
    return text + "\n".join(table(result) for result in results), results

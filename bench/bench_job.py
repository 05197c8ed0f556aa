"""The job the preemption and resume benchmarks run with `cluster-trainer run --no-ray`.

A job file, configured through the environment so that one file serves every
benchmark (the benchmarks start it as a subprocess and signal that process):

    BENCH_MODEL        "mlp" (64 features -> Dense 64 relu -> Dense 10 softmax, the seed job's shape)
                       or "dense:MB" (Dense 1024x1024 layers adding up to MB of checkpoint, Adam slots
                       included: see `bench.checkpoint_io.model_of_size`)
    BENCH_SAMPLES      examples per epoch (default 4096)
    BENCH_BATCH        global batch size (default 32)
    BENCH_EPOCHS       epochs (default 3)
    BENCH_EVERY_STEPS  checkpoint every N steps, or "auto" (default 0: never mid-epoch)
    BENCH_SHARD_MB     largest checkpoint shard in MiB (default: CheckpointPolicy's)
    BENCH_EVERY_EPOCH  1 to checkpoint at each epoch end (default 0)
    BENCH_PROGRESS     a file that gets "FIRST LAST T_FIRST" after every batch: the global step
                       before the first batch this process trained, the global step after its
                       latest batch, and the wall time (time.time()) at which the first batch ended
    BENCH_PROGRESS_DIR the same, into DIR/<pid>.progress, one file per training process: read in the
                       process that loads the job and carried in the job's config, so Ray actors on
                       other nodes (which do not inherit the driver's environment) write there too
    BENCH_SIGNAL_AT    "SIGTERM:S" or "SIGKILL:S": the process signals itself right after global
                       step S, so every method of a comparison is interrupted at exactly that step
    BENCH_RAW_WRITE    "S:URI": right after global step S, encode the model's state as a checkpoint
                       would and time a raw `fs.pipe` of those files to URI from this process (the
                       training process, with its threads and memory), printing
                       "bench: raw write in the training process: SECONDS s, BYTES bytes"; then delete them

The data is generated from fixed seeds (the same arrays as `bench.keras_fit`).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import keras
import numpy as np

import cluster_trainer as ct

FEATURES, CLASSES = 64, 10


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def make_data(samples: int, features: int = FEATURES, classes: int = CLASSES):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(samples, features)).astype("float32")
    teacher = np.random.default_rng(7).normal(size=(features, classes)).astype("float32")
    y = keras.utils.to_categorical((x @ teacher).argmax(axis=1), classes).astype("float32")
    return x, y


def dense_layers(megabytes: float) -> int:
    """Dense 1024x1024 layers whose weights plus Adam's two slots come to about `megabytes`."""
    return max(1, round(megabytes / 3 / 4.2))


def build_model(config):
    spec = config["model"]
    if spec == "mlp":
        model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(CLASSES, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    else:
        layers = dense_layers(float(spec.split(":")[1]))
        model = keras.Sequential([keras.Input((1024,))] + [keras.layers.Dense(1024) for _ in range(layers)])
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


class Progress(keras.callbacks.Callback):
    """Reports the global step after every batch, and signals this process at BENCH_SIGNAL_AT."""

    def __init__(self, progress_dir: str | None = None):
        super().__init__()
        self._path = (os.path.join(progress_dir, f"{os.getpid()}.progress") if progress_dir
                      else os.environ.get("BENCH_PROGRESS"))
        kind, _, step = os.environ.get("BENCH_SIGNAL_AT", ":").partition(":")
        self._signal = getattr(signal, kind) if kind else None
        self._signal_step = int(step) if step else None
        self._first = None
        self._first_time = None
        step, _, self._raw_uri = os.environ.get("BENCH_RAW_WRITE", ":").partition(":")
        self._raw_step = int(step) if step else None

    # Where this process reports is not run state: keep it out of the checkpoint.
    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def on_train_batch_end(self, batch, logs=None):
        self.report(int(self.model.optimizer.iterations.numpy()))

    def report(self, step: int) -> None:
        """Write `first step, this step, first step's wall time`; signal this process at the chosen step."""
        if self._first is None:
            self._first, self._first_time = step - 1, time.time()
        if self._path:
            temporary = f"{self._path}.tmp"
            with open(temporary, "w") as f:
                f.write(f"{self._first} {step} {self._first_time:.6f}")
            os.replace(temporary, self._path)
        if self._signal is not None and step == self._signal_step:
            os.kill(os.getpid(), self._signal)
        if step == self._raw_step:
            self._raw_write()

    def _raw_write(self) -> None:
        from bench.raw_io import raw_write
        from cluster_trainer.checkpoint.format import serialize
        from cluster_trainer.state import capture_model_state
        from cluster_trainer.storage import Storage

        tensors, _ = capture_model_state(self.model)
        files, _ = serialize(sequence=1, step=0, attempt=1, tensors=tensors, state={},
                             shard_bytes=env_int("BENCH_SHARD_MB", ct.CheckpointPolicy.shard_mb) * 2**20)
        seconds, _ = raw_write(Storage(self._raw_uri), files, "raw-in-process")
        print(f"bench: raw write in the training process: {seconds:.4f} s, {sum(map(len, files.values()))} bytes",
              file=sys.stderr, flush=True)


_every = os.environ.get("BENCH_EVERY_STEPS", "0")
_every = _every if _every == "auto" else int(_every) or None
_progress_dir = os.environ.get("BENCH_PROGRESS_DIR")
_model = os.environ.get("BENCH_MODEL", "mlp")
_features = FEATURES if _model == "mlp" else 1024
_samples = env_int("BENCH_SAMPLES", 4096)
if _model == "mlp":
    _train = make_data(_samples)
else:  # a regression onto random targets: the step's cost is the layers', the data is small
    _x = np.random.default_rng(1).normal(size=(_samples, 1024)).astype("float32")
    _train = (_x, _x[:, ::-1].copy())

job = ct.Job(
    name="bench",
    build_model=build_model,
    train_data=_train,
    callbacks=lambda config: [Progress(config.get("progress_dir"))],
    epochs=env_int("BENCH_EPOCHS", 3),
    batch_size=env_int("BENCH_BATCH", 32),
    seed=0,
    config={"model": _model, **({"progress_dir": _progress_dir} if _progress_dir else {})},
    checkpoint=ct.CheckpointPolicy(every_steps=_every, every_epoch=bool(env_int("BENCH_EVERY_EPOCH", 0)),
                                   keep_last=2, shard_mb=env_int("BENCH_SHARD_MB", ct.CheckpointPolicy.shard_mb)),
)

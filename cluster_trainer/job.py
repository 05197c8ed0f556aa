"""The job contract: what a user writes, and how a job file is loaded.

A job file is a Python file with a module-level `job = cluster_trainer.Job(...)`.
Everything that decides the result of a run lives in the job (model, data,
callbacks, epochs, batch size, seed, config), so a resumed run rebuilds the
same thing from the same file.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from cluster_trainer.errors import ConfigError, JobError


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """When checkpoints are committed, which are kept, and how they are written.

    Args:
        every_steps: "auto" (recommended): the run paces its commits from what it
            measures (what a save costs the training thread, what a commit takes on
            this store, the step time, the interruptions its attempts have seen;
            see `cluster_trainer.cadence`); or commit after every N training steps;
            or None: never mid-epoch.
        max_overhead: with `every_steps="auto"`, the share of training time saves
            may cost the training thread (0.03: 3%).
        every_epoch: commit at the end of every epoch (after `on_epoch_end`).
        keep_last: how many of the newest committed checkpoints to keep.
        keep_best: an epoch metric (e.g. "val_loss"): also keep the epoch-end
            checkpoint where it was best.
        best_mode: "min" or "max", for `keep_best`.
        keep_every_epochs: also keep the epoch-end checkpoint of every N-th epoch.
        shard_mb: largest tensor shard, in MiB (shards are written in parallel).
        max_in_flight: background commits at once; a save beyond waits.

    Example:
        >>> CheckpointPolicy(every_steps=100, keep_last=2, keep_best="val_loss").retention().keep_best
        'val_loss'
        >>> CheckpointPolicy(every_steps="auto").max_overhead
        0.03
    """

    every_steps: int | str | None = None
    max_overhead: float = 0.03
    every_epoch: bool = True
    keep_last: int = 3
    keep_best: str | None = None
    best_mode: str = "min"
    keep_every_epochs: int | None = None
    shard_mb: int = 64
    max_in_flight: int = 1

    def __post_init__(self):
        every = self.every_steps
        fixed = isinstance(every, int) and not isinstance(every, bool) and every >= 1
        if every is not None and every != "auto" and not fixed:
            raise JobError(f'CheckpointPolicy.every_steps must be an integer >= 1, "auto" (paced by what the run '
                           f"measures) or None; got {every!r}")
        overhead = self.max_overhead
        if not isinstance(overhead, (int, float)) or isinstance(overhead, bool) or not 0 < overhead < 1:
            raise JobError(f"CheckpointPolicy.max_overhead must be a fraction of training time between 0 and 1 "
                           f"(0.03: 3%), got {overhead!r}")
        for field in ("keep_last", "shard_mb", "max_in_flight"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise JobError(f"CheckpointPolicy.{field} must be an integer >= 1, got {value!r}")
        self.retention()  # validates keep_last, best_mode, keep_every_epochs

    def due_at_step(self, global_step: int) -> bool:
        """Whether a fixed interval commits at `global_step`; with "auto" the run's `Cadence` decides."""
        if self.every_steps == "auto":
            raise JobError('every_steps="auto" is decided by the run: ask cluster_trainer.cadence.Cadence.due()')
        return self.every_steps is not None and global_step % self.every_steps == 0

    def retention(self):
        from cluster_trainer.checkpoint.retention import Retention

        return Retention(self.keep_last, self.keep_best, self.best_mode, self.keep_every_epochs)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each attempt of a run asks its Ray cluster for; ignored when training in-process (`--no-ray`).

    One attempt is one Ray actor on one node. MirroredStrategy runs over the
    actor's GPUs (Ray sets `CUDA_VISIBLE_DEVICES` to the ones it assigned), or
    over `--devices` logical CPU devices when it has none.

    Args:
        num_cpus: Ray's logical CPUs for the actor (scheduling only: TensorFlow
            still uses the node's cores).
        num_gpus: GPUs for the actor: a whole number, or a fraction below 1 to
            share one GPU.
        custom: custom resources a node must offer, e.g. `{"spot_a100": 1}` for
            nodes started with `ray start --resources='{"spot_a100": 8}'`.
        label_selector: node labels the actor must be placed on, e.g.
            `{"pool": "spot"}` for nodes started with `ray start --labels pool=spot`,
            or `{"pool": "!on-demand"}` (Ray's selector syntax: `value`, `!value`,
            `in(a,b)`, `!in(a,b)`).

    Example:
        >>> Resources(num_gpus=4, custom={"spot_a100": 1}).ray_options()
        {'num_cpus': 1, 'num_gpus': 4, 'resources': {'spot_a100': 1}}
        >>> Resources(num_gpus=1.5)
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.JobError: Resources.num_gpus must be a whole number, or a fraction below 1 to share a GPU; got 1.5
    """

    num_cpus: float = 1
    num_gpus: float = 0
    custom: Mapping[str, float] = dataclasses.field(default_factory=dict)
    label_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for field in ("num_cpus", "num_gpus"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise JobError(f"Resources.{field} must be a number >= 0, got {value!r}")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise JobError("Resources.num_gpus must be a whole number, or a fraction below 1 to share a GPU; "
                           f"got {self.num_gpus!r}")
        if not isinstance(self.custom, Mapping):
            raise JobError(f"Resources.custom must be a dict of resource name -> amount, got {self.custom!r}")
        for key, value in self.custom.items():
            if not isinstance(key, str) or not key or key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise JobError(f"Resources.custom: {key!r} is not a custom resource name (use num_cpus/num_gpus for CPU/GPU)")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise JobError(f"Resources.custom[{key!r}] must be a number > 0, got {value!r}")
        if not isinstance(self.label_selector, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in self.label_selector.items()
        ):
            raise JobError(f"Resources.label_selector must be a dict of label -> value strings, got {self.label_selector!r}")
        object.__setattr__(self, "custom", dict(self.custom))
        object.__setattr__(self, "label_selector", dict(self.label_selector))

    def ray_options(self) -> dict:
        """The actor options Ray takes for these resources."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom:
            options["resources"] = dict(self.custom)
        if self.label_selector:
            options["label_selector"] = dict(self.label_selector)
        return options

    def describe(self) -> str:
        """`CPU=1, GPU=4, spot_a100=1, labels pool=spot`, for messages."""
        parts = [f"CPU={self.num_cpus:g}"] + ([f"GPU={self.num_gpus:g}"] if self.num_gpus else [])
        parts += [f"{k}={v:g}" for k, v in sorted(self.custom.items())]
        if self.label_selector:
            parts.append("labels " + ",".join(f"{k}={v}" for k, v in sorted(self.label_selector.items())))
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a job's `callbacks(config, run)` may ask about the run.

    Attributes:
        uri: the run's storage URI.
        files_dir: a local directory for files callbacks write; it is kept with
            the run (`<run>/files/`, mirrored there on object stores).
    """

    uri: str
    files_dir: str

    def path(self, *parts: str) -> str:
        """A local path for a file kept with the run, e.g. `run.path("tensorboard")` for TensorBoard."""
        return os.path.join(self.files_dir, *parts)


@dataclasses.dataclass(frozen=True)
class Job:
    """A training job: model, data, callbacks and the numbers that define a run.

    Args:
        name: a short name, shown in logs and stored with every checkpoint.
        build_model: `build_model(config) -> keras.Model`, compiled. Called inside
            the distribution strategy's scope, so variables are mirrored.
        train_data: `(x, y)` or `(x, y, sample_weight)` numpy arrays (shuffled each
            epoch by `(seed, epoch)`, resumed without reading skipped batches); a
            `keras.utils.PyDataset` (its batch indices shuffled likewise, resumed
            in O(1)); a `tf.data.Dataset` whose order is the same each time it is
            iterated, batched or not (resumed by skipping); or a builder
            `fn(epoch, seed) -> tf.data.Dataset` of *unbatched* `(x, y)` examples
            whose order depends only on its arguments (resumed by skipping), or
            `fn(epoch, seed, skip)`, which skips the first `skip` examples itself
            (before its parse, where skipping is cheap). A third element of a
            tuple or of a dataset's elements is the per-example weight, as in `fit`.
        validation_data: same forms as `train_data`, or None. Never shuffled.
        callbacks: `callbacks(config)` or `callbacks(config, run)` returning Keras
            callbacks. `run` is a `RunContext` (use `run.path("tb")` for log dirs).
        epochs: number of epochs.
        batch_size: the global batch size (split across replicas).
        seed: the run seed: model initialisation, data order, dropout.
        config: hyperparameters; `--set key=value` overrides them with typed values.
        checkpoint: a `CheckpointPolicy`.
        history_every_steps: also log a history row every N training steps (`<run>/history/steps.parquet`);
            None logs one row per epoch only.
        deterministic: turn on TensorFlow op determinism (bitwise-equal resumes).
        storage_options: fsspec options for the run's store (an endpoint, a
            region); `--storage-option` overrides them. Not for secrets: use the
            clouds' credential mechanisms.
        resources: what each attempt asks a Ray cluster for (`Resources`: CPUs,
            GPUs, custom resources, node labels); `--num-gpus`, `--num-cpus`,
            `--resource` and `--label-selector` override it. Ignored in-process.
        shuffle: shuffle arrays and PyDataset batches each epoch (`fit`'s `shuffle`;
            a `tf.data` pipeline orders itself).
        class_weight: `{class index: weight}`, as in `fit`: each training example's
            loss is weighted by its class (one output; not with sample weights).
        steps_per_epoch: train this many batches per epoch, as `fit` does: the
            epochs are consecutive windows of the data, a pass that ends mid-epoch
            ends that epoch early, and the next epoch starts a new pass. Required
            for infinite data (`.repeat()`), whose epochs then continue one stream.
        validation_steps: validate on at most this many batches, from the start of
            the validation data each time.
        validation_batch_size: the batch size of validation arrays and builders
            (default: `batch_size`).
        validation_freq: validate every N epochs (an int), or after the epochs listed
            (1-based, e.g. `[1, 5, 10]`), as in `fit`.

    Example:
        >>> import keras, numpy as np
        >>> def build(config):
        ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        ...     model.compile(optimizer=keras.optimizers.Adam(config["lr"]), loss="mse")
        ...     return model
        >>> job = Job(name="tiny", build_model=build,
        ...           train_data=(np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32")),
        ...           epochs=2, batch_size=4, config={"lr": 1e-3})
        >>> job.with_overrides(["lr=0.01"]).config["lr"]
        0.01
    """

    name: str
    build_model: Callable[[dict], Any]
    train_data: Any
    validation_data: Any = None
    callbacks: Callable[..., Sequence[Any]] | None = None
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    history_every_steps: int | None = None
    deterministic: bool = True
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Resources = Resources()
    shuffle: bool = True
    class_weight: Mapping[int, float] | None = None
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    validation_batch_size: int | None = None
    validation_freq: int | Sequence[int] = 1
    source_path: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise JobError("Job.name must be a non-empty string")
        if not callable(self.build_model):
            raise JobError(f"Job.build_model must be a function build_model(config) -> keras.Model, got {self.build_model!r}")
        if self.callbacks is not None and not callable(self.callbacks):
            raise JobError("Job.callbacks must be a function callbacks(config[, run]) returning a list of Keras callbacks")
        for field, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise JobError(f"Job.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise JobError(f"Job.seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        if not isinstance(self.checkpoint, CheckpointPolicy):
            raise JobError("Job.checkpoint must be a cluster_trainer.CheckpointPolicy")
        every = self.history_every_steps
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise JobError(f"Job.history_every_steps must be an integer >= 1, or None; got {every!r}")
        if not isinstance(self.resources, Resources):
            raise JobError(f"Job.resources must be a cluster_trainer.Resources(num_cpus=..., num_gpus=..., ...), "
                           f"got {self.resources!r}")
        if self.shuffle not in (True, False):
            raise JobError(f"Job.shuffle must be True or False, got {self.shuffle!r} (fit's shuffle='batch', for "
                           "HDF5 arrays, is not supported: load the arrays, or pass a PyDataset)")
        for field in ("steps_per_epoch", "validation_steps", "validation_batch_size"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise JobError(f"Job.{field} must be a positive integer, or None; got {value!r}")
        if self.class_weight is not None:
            if not isinstance(self.class_weight, Mapping) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float))
                and not isinstance(v, bool) for k, v in self.class_weight.items()
            ):
                raise JobError(f"Job.class_weight must be a dict of class index -> weight, like {{0: 1.0, 1: 5.0}}; "
                               f"got {self.class_weight!r}")
            object.__setattr__(self, "class_weight", {k: float(v) for k, v in self.class_weight.items()})
        freq = self.validation_freq
        if isinstance(freq, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in freq):
            object.__setattr__(self, "validation_freq", tuple(freq))
        elif not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
            raise JobError(f"Job.validation_freq must be a positive integer or a list of epochs (from 1); got {freq!r}")
        object.__setattr__(self, "config", dict(self.config))

    def validates_after(self, epoch: int) -> bool:
        """Whether validation runs at the end of `epoch` (0-based), by `validation_freq` as `fit` reads it.

        Example:
            >>> job = Job(name="j", build_model=print, train_data=(), validation_freq=2)
            >>> [job.validates_after(epoch) for epoch in range(4)]
            [False, True, False, True]
        """
        if isinstance(self.validation_freq, int):
            return (epoch + 1) % self.validation_freq == 0
        return epoch + 1 in self.validation_freq

    def with_overrides(self, assignments: Sequence[str]) -> "Job":
        """A copy whose config has `key=value` assignments applied (typed; see `parse_override`)."""
        config = dict(self.config)
        for assignment in assignments:
            key, value = parse_override(assignment, config)
            config[key] = value
        return dataclasses.replace(self, config=config)

    def make_callbacks(self, run: RunContext) -> list:
        if self.callbacks is None:
            return []
        params = inspect.signature(self.callbacks).parameters
        made = self.callbacks(self.config, run) if len(params) >= 2 else self.callbacks(self.config)
        return list(made or [])


def parse_value(raw: str) -> Any:
    """A command-line value, typed: `true`/`false`, a Python literal, else the string itself.

    Example:
        >>> parse_value("1e-3"), parse_value("True"), parse_value("[1, 2]"), parse_value("adam")
        (0.001, True, [1, 2], 'adam')
    """
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return raw


def parse_override(assignment: str, config: Mapping[str, Any]) -> tuple[str, Any]:
    """Parse `key=value` into a typed value matching the config's current type.

    Values are Python literals (`1e-3`, `64`, `true`, `[32, 64]`, `'adam'`);
    anything that is not a literal is a string. An int given for a float key
    becomes a float. Unknown keys are an error, so a typo does not go unnoticed.

    Example:
        >>> parse_override("lr=1e-3", {"lr": 0.1})
        ('lr', 0.001)
        >>> parse_override("units=64", {"units": 32})
        ('units', 64)
    """
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    if key not in config:
        known = ", ".join(sorted(config)) or "(the job has no config)"
        raise ConfigError(f"--set {key}: no such config key; the job's keys are: {known}")
    value = None if raw.strip().lower() in ("none", "null") else parse_value(raw)
    current = config[key]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and value is not None and type(value) is not type(current):
        raise ConfigError(
            f"--set {key}={raw}: expected {_article(type(current).__name__)} {type(current).__name__} like {current!r}, "
            f"got {type(value).__name__}"
        )
    return key, value


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_job_path(path: str) -> str:
    """The job file's absolute path; `JobError` if there is no such file (checked without importing it).

    Example:
        >>> check_job_path("no/such/job.py")
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.JobError: job file not found: ... (pass the path of a .py file defining `job = cluster_trainer.Job(...)`)
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise JobError(f"job file not found: {path} (pass the path of a .py file defining `job = cluster_trainer.Job(...)`)")
    return path


def load_job(path: str) -> Job:
    """Load the module-level `job` from a Python file.

    Raises `JobError` with a one-line message when the file is missing, fails to
    import, or does not define a `cluster_trainer.Job` named `job`.
    """
    path = check_job_path(path)
    module_name = "cluster_trainer_job_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except JobError:
        raise
    except Exception as e:  # the user's code: name the file and the error
        raise JobError(f"job file {path} failed to import: {type(e).__name__}: {e}") from e
    job = getattr(module, "job", None)
    if job is None:
        raise JobError(f"job file {path} defines no module-level `job`; add `job = cluster_trainer.Job(...)`")
    if not isinstance(job, Job):
        raise JobError(f"`job` in {path} is a {type(job).__name__}, not a cluster_trainer.Job")
    return dataclasses.replace(job, source_path=path)

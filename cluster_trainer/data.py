"""Resumable input pipelines: each epoch's batches are a function of (seed, epoch).

`tf.data` iterators cannot be checkpointed under a distribution strategy
(tensorflow#56372), and `shuffle(reshuffle_each_iteration=True)` replays epoch
0's order in a fresh process. So the data position is two integers,
`(epoch, batch)`, and a source rebuilds any epoch from the seed and starts it at
any batch:

- `ArraySource` (in-memory arrays): a permutation drawn from `(seed, epoch)`;
  starting at batch `b` slices the permutation, reading nothing it skips: O(1).
- `DatasetSource` (a user builder `fn(epoch, seed) -> tf.data.Dataset` of
  unbatched examples): starting at batch `b` skips `b * batch_size` examples
  after the builder's pipeline, which reads and parses them: O(b). A builder
  that takes a `skip` argument, `fn(epoch, seed, skip)`, is given that count
  instead and skips where it is cheap: after the shuffle, before the parse
  (`map`), so the skipped records are read but not decoded.

On several workers each worker builds the same global batches and feeds its
own replicas their part of each (`replica_batches`), so a batch and a
position mean what they mean in one process. A builder's pipeline therefore
runs in full on every worker: each reads and decodes every example, and keeps
its share.
- `DatasetObjectSource` (a `tf.data.Dataset` itself, what users pass to
  `fit`): its order must be the same each time it is iterated, which is read
  from its graph (a `shuffle` that reshuffles each iteration, or has no seed,
  is refused); batched or unbatched, told apart by the graph; resumed by
  skipping: O(b).
- `PyDatasetSource` (a `keras.utils.PyDataset`): batches by index, so epoch e's
  order is a permutation of the indices drawn from `(seed, e)` and starting at
  batch b reads nothing it skips: O(1). Read through Keras's own adapter, with
  the dataset's `workers`/`use_multiprocessing`, as in `fit`.

The loop asks a source for a *pass* over its data: without `steps_per_epoch`
an epoch is one pass; with it, `fit`'s epochs are consecutive windows of a
pass (of an infinite dataset: windows of its one endless pass), so
`epoch_dataset(pass, ...)` is given the pass number and the batch within it.
Every source also has the PyDataset hooks `fit` drives (`on_epoch_begin`,
`on_epoch_end`; no-ops for the others) and `stop()`, which ends the
background reads of a pass the loop leaves early.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from cluster_trainer import keras_compat
from cluster_trainer.errors import JobError


class _Lifecycle:
    """What every source has: `fit`'s PyDataset hooks (no-ops here), class weights, whether it is endless."""

    infinite = False
    class_weight: Mapping[int, float] | None = None

    def on_epoch_begin(self) -> None:
        pass

    def on_epoch_end(self) -> None:
        pass

    def stop(self) -> None:
        """End the background reads of the pass in progress (a PyDataset's workers)."""

    def describe(self) -> str | None:
        """One line saying how the data is read, where that is not obvious; else None."""
        return None


class ArraySource(_Lifecycle):
    """In-memory `(x, y)` or `(x, y, sample_weight)` arrays (x and y may be dicts or tuples of arrays)."""

    def __init__(self, arrays: tuple, shuffle: bool):
        self.arrays = arrays
        self.shuffle = shuffle
        try:
            lengths = {len(np.asarray(a)) if np.ndim(a) else -1 for a in tf.nest.flatten(arrays)}
        except (TypeError, ValueError) as e:
            raise JobError(f"data arrays must be NumPy arrays (x, y), one row per example: {e}") from None
        if -1 in lengths:
            raise JobError("data arrays must have one row per example; got a scalar")
        if len(lengths) != 1:
            raise JobError(f"data arrays have different lengths {sorted(lengths)}; x and y need one row per example")
        self.num_examples = lengths.pop()
        if self.num_examples == 0:
            raise JobError("data arrays are empty")

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_examples / batch_size)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([seed, epoch]).permutation(self.num_examples)

    def epoch_dataset(self, epoch: int, seed: int, batch_size: int, start_batch: int = 0) -> tf.data.Dataset:
        rows = self.order(epoch, seed)[start_batch * batch_size :]
        sliced = tf.nest.map_structure(lambda a: np.asarray(a)[rows], self.arrays)
        return tf.data.Dataset.from_tensor_slices(sliced).batch(batch_size).with_options(_untuned())


def _untuned() -> tf.data.Options:
    """Options for a pipeline that has nothing for tf.data's autotuner to tune (slices of arrays, batched).

    Left on, it costs every epoch's end: deleting the iterator a distribution strategy made over an
    autotuned pipeline waits on the autotuner's thread. Measured with TF 2.21 on one CPU replica
    (64 steps of ~12 ms an epoch): 0.2-1.7 s at every epoch's end, 4.2 s for an iterator used 6 s;
    3 ms with the autotuner off (docs/BENCHMARKS.md, "Several workers").
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class DatasetSource(_Lifecycle):
    """A builder `fn(epoch, seed) -> tf.data.Dataset` of unbatched examples, or `fn(epoch, seed, skip)`.

    A builder with a `skip` parameter must return the epoch's examples without
    the first `skip` of them, and is trusted to: the loop then adds no skip of
    its own. Put `.skip(skip)` after the order is decided and before the parse.

    A builder of an infinite dataset (`.repeat()`) needs `Job.steps_per_epoch`:
    it is built once, for epoch 0, and the epochs are consecutive windows of it.

    Example:
        >>> def builder(epoch, seed, skip=0):
        ...     records = tf.data.Dataset.range(10).shuffle(10, seed=seed * 1000 + epoch)
        ...     return records.skip(skip).map(lambda r: (tf.cast(r, "float32"), r % 2))
        >>> source = DatasetSource(builder)
        >>> later = [int(x) for x, _ in source.epoch_dataset(1, 0, batch_size=4, start_batch=1).unbatch()]
        >>> later == [int(x) for x, _ in source.epoch_dataset(1, 0, batch_size=4).unbatch()][4:]
        True
    """

    shuffle = None

    def __init__(self, builder: Callable[..., tf.data.Dataset]):
        self.builder = builder
        try:
            self.skips_itself = "skip" in inspect.signature(builder).parameters
        except (TypeError, ValueError):  # a builtin or C callable without a signature
            self.skips_itself = False

    def _build(self, epoch: int, seed: int, skip: int = 0) -> tf.data.Dataset:
        dataset = self.builder(epoch, seed, skip=skip) if self.skips_itself else self.builder(epoch, seed)
        if not isinstance(dataset, tf.data.Dataset):
            raise JobError(f"data builder returned {type(dataset).__name__}; it must return a tf.data.Dataset of unbatched examples")
        return dataset

    @functools.cached_property
    def _cardinality(self) -> int:
        return int(self._build(0, 0).cardinality())

    @property
    def infinite(self) -> bool:
        return self._cardinality == tf.data.INFINITE_CARDINALITY

    def num_batches(self, batch_size: int) -> int | None:
        """Batches in one pass; None when the length is unknown (the pass ends when the data does) or infinite."""
        if self._cardinality < 0:
            return None
        return math.ceil(self._cardinality / batch_size)

    def epoch_dataset(self, epoch: int, seed: int, batch_size: int, start_batch: int = 0) -> tf.data.Dataset:
        skip = start_batch * batch_size
        dataset = self._build(epoch, seed, skip)
        if skip and not self.skips_itself:
            dataset = dataset.skip(skip)
        return with_class_weight(dataset.batch(batch_size), self.class_weight)


def replica_batches(global_batches: tf.data.Dataset, replicas: int, replica_ids: Sequence[int]) -> tf.data.Dataset:
    """The parts of every global batch that go to `replica_ids` (of `replicas` in all), one element per
    replica and global batch: what a worker of a multi-worker run feeds its own replicas.

    The split is MirroredStrategy's, so that step `k` trains each replica on the same examples
    whatever the number of workers: a global batch of `n` examples gives each replica
    `ceil(n / replicas)` consecutive examples in replica order, the last replicas fewer, or none
    (an empty batch) when `n` is small (the last batch of an epoch).

    Example:
        >>> batches = tf.data.Dataset.range(10).batch(8)   # a full global batch of 8, then 2 examples
        >>> [b.numpy().tolist() for b in replica_batches(batches, replicas=4, replica_ids=[2, 3])]
        [[4, 5], [6, 7], [], []]
    """
    return global_batches.flat_map(_replica_parts(replicas, tuple(replica_ids)))


@functools.lru_cache(maxsize=16)
def _replica_parts(replicas: int, replica_ids: tuple[int, ...]):
    """`replica_batches`'s split as one `tf.function`: a dataset built each epoch looks its trace up
    instead of tracing the split again (about a second per epoch on a busy 2-core machine)."""
    ids = tf.constant(replica_ids, tf.int64)

    @tf.function(autograph=False)
    def parts(*batch):
        batch = batch[0] if len(batch) == 1 else batch
        size = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]
        each = (size + replicas - 1) // replicas

        def part(replica):
            start = tf.minimum(replica * each, size)
            end = tf.minimum(start + each, size)
            return tf.nest.map_structure(lambda t: t[start:end], batch)

        return tf.data.Dataset.from_tensor_slices(ids).map(part)

    return parts


class DatasetObjectSource(_Lifecycle):
    """A `tf.data.Dataset` object, as passed to `fit`: its order must be the same each time it is iterated.

    `fit` iterates the dataset again for every epoch; a resumed process must
    see the same order, so a dataset whose graph shows a `shuffle` that
    reshuffles each iteration (the default) or has no seed, an unseeded
    stateful random op, or `deterministic=False` is refused, with the builder
    to write instead. Its elements are what `fit` would see: a dataset whose
    pipeline ends in a batching op (`batch`, `padded_batch`, `ragged_batch`,
    `bucket_by_sequence_length`, `rebatch`, with any `map` or `prefetch` after
    it) is *batched* and used as it is; any other is *unbatched* and batched
    with `Job.batch_size`. `batched=` says it explicitly. Resuming at batch b
    skips b batches (b * batch_size examples), which reads them: O(b).

    Example:
        >>> source = DatasetObjectSource(tf.data.Dataset.range(10).batch(4))
        >>> source.batched, source.num_batches(32)
        (True, 3)
        >>> [b.numpy().tolist() for b in source.epoch_dataset(0, 0, 32, start_batch=2)]
        [[8, 9]]
    """

    def __init__(self, dataset: tf.data.Dataset, batched: bool | None = None, what: str = "train_data"):
        graph = keras_compat.dataset_graph(dataset)
        problem = order_problem(dataset, graph)
        if problem is not None:
            raise JobError(
                f"Job.{what} is a tf.data.Dataset whose order {problem}, so a resumed run cannot replay an epoch: "
                f"pass a builder instead, e.g. `{what}=lambda epoch, seed: examples.shuffle(n, seed=seed * 1000 + "
                "epoch)` (unbatched examples), or shuffle with a seed and reshuffle_each_iteration=False"
            )
        self.dataset = dataset
        self.what = what
        self.batched = ends_in_batching(graph) if batched is None else bool(batched)
        cardinality = int(dataset.cardinality())
        self.infinite = cardinality == tf.data.INFINITE_CARDINALITY
        self._cardinality = cardinality if cardinality >= 0 else None

    def num_batches(self, batch_size: int) -> int | None:
        if self._cardinality is None:
            return None
        return self._cardinality if self.batched else math.ceil(self._cardinality / batch_size)

    def epoch_dataset(self, epoch: int, seed: int, batch_size: int, start_batch: int = 0) -> tf.data.Dataset:
        skip = start_batch if self.batched else start_batch * batch_size
        dataset = self.dataset.skip(skip) if skip else self.dataset
        return with_class_weight(dataset if self.batched else dataset.batch(batch_size), self.class_weight)

    def describe(self) -> str:
        length = ("infinite" if self.infinite else "length unknown" if self._cardinality is None
                  else f"{self._cardinality} elements")
        if self.batched:
            return (f"{self.what} is a batched tf.data.Dataset ({length}): its batches are used as they are "
                    "(Job.batch_size does not apply); a resume skips batches")
        return (f"{self.what} is an unbatched tf.data.Dataset ({length}): batched with Job.batch_size; "
                "a resume skips examples")


class PyDatasetSource(_Lifecycle):
    """A `keras.utils.PyDataset`: batches by index, resumed at any batch in O(1).

    Epoch e visits the indices in a permutation drawn from `(seed, e)` (in
    index order with `Job.shuffle=False`, and for an infinite PyDataset, whose
    `num_batches` is None); starting at batch b reads index `order[b]` next
    and nothing before it. Batches are read through Keras's own adapter, so the
    dataset's `workers`, `use_multiprocessing` and `max_queue_size` apply as in
    `fit`, and its `on_epoch_begin`/`on_epoch_end` are called where `fit` calls
    them (the loop calls them through this source).

    Example:
        >>> class Indices(keras.utils.PyDataset):
        ...     def __len__(self):
        ...         return 4
        ...     def __getitem__(self, index):
        ...         return np.full((2, 1), index, "float32"), np.zeros((2, 1), "float32")
        >>> source = PyDatasetSource(Indices(), shuffle=False)
        >>> [int(x[0, 0]) for x, _ in source.epoch_dataset(0, 0, batch_size=2, start_batch=1)]
        [1, 2, 3]
        >>> source.stop()
    """

    def __init__(self, py_dataset: keras.utils.PyDataset, shuffle: bool):
        self.py_dataset = py_dataset
        self.shuffle = shuffle
        self._batches = py_dataset.num_batches
        self.infinite = self._batches is None
        if self._batches is not None and self._batches < 1:
            raise JobError(f"the PyDataset {type(py_dataset).__name__} has no batches (its length is {self._batches})")
        self._signature = None  # the batches' TensorSpecs, taken once from the first batches, as fit does
        self._stop: Callable[[], None] | None = None

    def num_batches(self, batch_size: int) -> int | None:
        return self._batches

    def order(self, epoch: int, seed: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._batches)
        return np.random.default_rng([seed, epoch]).permutation(self._batches)

    def epoch_dataset(self, epoch: int, seed: int, batch_size: int, start_batch: int = 0) -> tf.data.Dataset:
        self.stop()
        indices = None if self.infinite else self.order(epoch, seed)[start_batch:]
        view = _PassView(self.py_dataset, indices, start_batch)
        dataset, self._stop, self._signature = keras_compat.py_dataset_batches(view, self._signature, self.class_weight)
        return dataset

    def on_epoch_begin(self) -> None:
        self.py_dataset.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.py_dataset.on_epoch_end()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


class _PassView(keras.utils.PyDataset):
    """The rest of one pass over a PyDataset: batch i is `dataset[indices[i]]`, or `dataset[start + i]`
    for an infinite one. Its own epoch hooks do nothing: the loop calls the dataset's."""

    def __init__(self, dataset: keras.utils.PyDataset, indices: np.ndarray | None, start: int):
        super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        self.dataset = dataset
        self.indices = indices
        self.start = start

    @property
    def num_batches(self) -> int | None:
        return None if self.indices is None else len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.start + index if self.indices is None else int(self.indices[index])]


def with_class_weight(dataset: tf.data.Dataset, class_weight: Mapping[int, float] | None) -> tf.data.Dataset:
    """Batches `(x, y)` become `(x, y, weights)`, each example weighted by its class, as in `fit`."""
    if not class_weight:
        return dataset
    try:
        return dataset.map(keras_compat.class_weight_map_fn(class_weight))
    except ValueError as e:  # Keras's own checks: sample weights given too, several outputs
        raise JobError(f"Job.class_weight: {' '.join(str(e).split())}") from None


# What a dataset's graph tells: ops whose elements are batches, ops that undo them, and stateful
# random ops, whose draws differ from process to process unless they have a seed.
_BATCHING_OPS = {
    "BatchDataset", "BatchDatasetV2", "PaddedBatchDataset", "PaddedBatchDatasetV2", "ParallelBatchDataset",
    "MapAndBatchDataset", "ExperimentalMapAndBatchDataset", "DenseToSparseBatchDataset",
    "ExperimentalDenseToSparseBatchDataset", "GroupByWindowDataset", "ExperimentalGroupByWindowDataset",
    "RebatchDataset", "RebatchDatasetV2", "ExperimentalRebatchDataset",
}
_UNBATCHING_OPS = {"UnbatchDataset", "ExperimentalUnbatchDataset"}
_STATEFUL_RANDOM_OPS = {
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "ParameterizedTruncatedNormal",
    "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2",
}


def _const_int(graph, name: str) -> int | None:
    name = name.split(":")[0].lstrip("^")
    node = next((node for node in graph.node if node.name == name and node.op == "Const"), None)
    if node is None:
        return None
    values = node.attr["value"].tensor.int64_val
    return int(values[0]) if len(values) else 0


def order_problem(dataset: tf.data.Dataset, graph) -> str | None:
    """Why iterating `dataset` again, in this process or a new one, may give another order; None if it cannot."""
    if dataset.options().deterministic is False:
        return "is nondeterministic (Options.deterministic=False)"
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    for node in nodes:
        if node.op.startswith("Shuffle"):
            if node.attr["reshuffle_each_iteration"].b if "reshuffle_each_iteration" in node.attr else True:
                return "changes each time it is iterated (shuffle(..., reshuffle_each_iteration=True), the default)"
            if [_const_int(graph, name) for name in node.input[2:4]] == [0, 0]:
                return "comes from a shuffle without a seed, different in every process"
        elif node.op.startswith("RandomDataset") and node.attr["rerandomize_each_iteration"].b:
            return "changes each time it is iterated (Dataset.random(rerandomize_each_iteration=True))"
        elif node.op in _STATEFUL_RANDOM_OPS and node.attr["seed"].i == 0 and node.attr["seed2"].i == 0:
            return f"draws from an unseeded random op ({node.op}), different in every process"
        elif "deterministic" in node.attr and node.attr["deterministic"].s == b"false":
            return f"is nondeterministic ({node.op} with deterministic=False)"
    return None


def ends_in_batching(graph) -> bool:
    """Whether a dataset's elements are batches: following each op's first input back from the output,
    a batching op comes before an unbatching op or the source."""
    by_name = {node.name: node for node in graph.node}
    node = next(node for node in graph.node if node.op == "_Retval")
    while node.input:
        node = by_name.get(node.input[0].split(":")[0].lstrip("^"))
        if node is None or node.op in _UNBATCHING_OPS:
            return False
        if node.op in _BATCHING_OPS:
            return True
    return False


def as_source(data: Any, *, shuffle: bool, what: str, class_weight: Mapping[int, float] | None = None):
    """Wrap a job's `train_data`/`validation_data` in a source; None stays None.

    `shuffle` applies to arrays and PyDatasets, as in `fit`; `class_weight`
    makes each batch `(x, y, weights)`.
    """
    if data is None:
        return None
    if isinstance(data, (ArraySource, DatasetSource, DatasetObjectSource, PyDatasetSource)):
        source = data
    elif isinstance(data, keras.utils.PyDataset):
        source = PyDatasetSource(data, shuffle=shuffle)
    elif isinstance(data, tf.data.Dataset):
        source = DatasetObjectSource(data, what=what)
    elif isinstance(data, tf.distribute.DistributedDataset):
        raise JobError(f"Job.{what} is a distributed dataset: pass the tf.data.Dataset itself; the loop distributes it")
    elif isinstance(data, types.GeneratorType) or (hasattr(data, "__next__") and not callable(data)):
        raise JobError(f"Job.{what} is a Python iterator, which cannot be replayed after a resume: make it a "
                       "keras.utils.PyDataset (batches by index) or a builder fn(epoch, seed) -> tf.data.Dataset")
    elif callable(data):
        source = DatasetSource(data)
    elif isinstance(data, tuple) and len(data) in (1, 2, 3):
        source = ArraySource(data, shuffle=shuffle)
    else:
        raise JobError(f"Job.{what} must be (x, y[, sample_weight]) arrays, a tf.data.Dataset, a keras.utils.PyDataset "
                       f"or a builder fn(epoch, seed) -> tf.data.Dataset, got {type(data).__name__}")
    if class_weight and isinstance(source, ArraySource):
        # As fit does for arrays: each example's weight, up front (a class missing from class_weight weighs 1).
        if len(source.arrays) != 2 or tf.nest.is_nested(source.arrays[1]):
            raise JobError("Job.class_weight needs train_data (x, y) with one array of targets and no sample weights, "
                           "as in fit: multiply the class weights into the sample weights instead")
        x, y = source.arrays
        source = ArraySource((x, y, keras_compat.class_weight_to_sample_weights(y, class_weight)), shuffle=source.shuffle)
    elif class_weight:
        source.class_weight = dict(class_weight)  # applied to each batch, as fit does for datasets and PyDatasets
    return source

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
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from cluster_trainer.errors import JobError


class ArraySource:
    """In-memory `(x, y)` arrays (each may be a dict or tuple of arrays)."""

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
        return tf.data.Dataset.from_tensor_slices(sliced).batch(batch_size)


class DatasetSource:
    """A builder `fn(epoch, seed) -> tf.data.Dataset` of unbatched examples, or `fn(epoch, seed, skip)`.

    A builder with a `skip` parameter must return the epoch's examples without
    the first `skip` of them, and is trusted to: the loop then adds no skip of
    its own. Put `.skip(skip)` after the order is decided and before the parse.

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

    def num_batches(self, batch_size: int) -> int | None:
        cardinality = int(self._build(0, 0).cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise JobError(
                "the data builder returns an infinite dataset (.repeat()?): return one epoch's examples; "
                "the loop builds each epoch itself"
            )
        if cardinality < 0:  # UNKNOWN: the epoch ends when the data does
            return None
        return math.ceil(cardinality / batch_size)

    def epoch_dataset(self, epoch: int, seed: int, batch_size: int, start_batch: int = 0) -> tf.data.Dataset:
        skip = start_batch * batch_size
        dataset = self._build(epoch, seed, skip)
        if skip and not self.skips_itself:
            dataset = dataset.skip(skip)
        return dataset.batch(batch_size)


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


def as_source(data: Any, *, shuffle: bool, what: str):
    """Wrap a job's `train_data`/`validation_data` in a source; None stays None."""
    if data is None:
        return None
    if isinstance(data, (ArraySource, DatasetSource)):
        return data
    if isinstance(data, tf.data.Dataset):
        raise JobError(
            f"Job.{what} is a tf.data.Dataset; pass a builder `lambda epoch, seed: dataset` instead, "
            "so each epoch's order can be rebuilt on resume"
        )
    if callable(data):
        return DatasetSource(data)
    if isinstance(data, tuple) and len(data) in (1, 2, 3):
        return ArraySource(data, shuffle=shuffle)
    raise JobError(f"Job.{what} must be (x, y) arrays or a builder fn(epoch, seed) -> tf.data.Dataset, got {type(data).__name__}")

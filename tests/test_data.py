"""Data position: resuming at batch b of epoch e feeds exactly the batches of the uninterrupted run."""

import numpy as np
import pytest
import tensorflow as tf

from cluster_trainer.data import ArraySource, DatasetSource, as_source
from cluster_trainer.errors import JobError

X = np.arange(100, dtype="float32").reshape(50, 2)
Y = np.arange(50, dtype="int64")


def batches(dataset):
    return [tuple(t.numpy() for t in batch) for batch in dataset]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        for l, r in zip(left, right):
            assert np.array_equal(l, r)


@pytest.mark.parametrize("start", [0, 1, 3, 6])
def test_array_source_resumes_at_any_batch(start):
    source = ArraySource((X, Y), shuffle=True)
    full = batches(source.epoch_dataset(epoch=2, seed=5, batch_size=8))
    assert_same_batches(batches(source.epoch_dataset(epoch=2, seed=5, batch_size=8, start_batch=start)), full[start:])


def test_each_epoch_has_its_own_order_and_it_is_reproducible():
    source = ArraySource((X, Y), shuffle=True)
    assert not np.array_equal(source.order(0, 5), source.order(1, 5))
    assert np.array_equal(source.order(1, 5), ArraySource((X, Y), shuffle=True).order(1, 5))
    assert sorted(source.order(3, 5)) == list(range(50))


@pytest.mark.parametrize("start", [0, 2, 6])
def test_dataset_builder_resumes_by_skipping(start):
    def builder(epoch, seed):
        return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, seed=seed * 1000 + epoch)

    source = DatasetSource(builder)
    full = batches(source.epoch_dataset(1, 9, 8))
    assert source.num_batches(8) == 7
    assert_same_batches(batches(source.epoch_dataset(1, 9, 8, start_batch=start)), full[start:])


def test_a_dataset_instead_of_a_builder_names_the_fix():
    with pytest.raises(JobError, match="pass a builder `lambda epoch, seed: dataset`"):
        as_source(tf.data.Dataset.range(3), shuffle=True, what="train_data")
    with pytest.raises(JobError, match="different lengths"):
        as_source((X, Y[:10]), shuffle=True, what="train_data")


def test_an_infinite_builder_is_refused_instead_of_training_forever():
    source = DatasetSource(lambda epoch, seed: tf.data.Dataset.from_tensor_slices((X, Y)).repeat())
    with pytest.raises(JobError, match="infinite dataset"):
        source.num_batches(8)


def test_nested_lists_are_a_job_error():
    with pytest.raises(JobError, match="one row per example"):
        as_source(([[1, 2], [3, 4]], 5), shuffle=True, what="train_data")

"""Data position: resuming at batch b of epoch e feeds exactly the batches of the uninterrupted run."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops

from cluster_trainer import keras_compat
from cluster_trainer.data import ArraySource, DatasetSource, as_source
from cluster_trainer.errors import JobError
from harness import latest

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


def test_a_strategys_input_over_arrays_runs_without_tf_datas_autotuner_and_gives_the_same_batches():
    """Deleting a strategy's iterator over an autotuned pipeline waits on the autotuner's thread at every
    epoch's end (docs/BENCHMARKS.md): the arrays' pipeline and the strategy's per-device pipelines have
    nothing to tune, so the loop runs them without it; no batch changes, and the patch ends with the run."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    source = ArraySource((X, Y), shuffle=True)
    dataset = source.epoch_dataset(epoch=1, seed=5, batch_size=8)
    assert dataset.options().autotune.enabled is False
    original, device_pipelines = multi_device_iterator_ops._create_device_dataset, []
    with keras_compat.untuned_device_pipelines():
        untuned = multi_device_iterator_ops._create_device_dataset

        def recording(*args, **kwargs):
            device_pipelines.append(untuned(*args, **kwargs))
            return device_pipelines[-1]

        multi_device_iterator_ops._create_device_dataset = recording
        try:
            distributed = batches(strategy.experimental_distribute_dataset(dataset))
        finally:
            multi_device_iterator_ops._create_device_dataset = untuned
    assert multi_device_iterator_ops._create_device_dataset is original
    assert device_pipelines and all(d.options().autotune.enabled is False for d in device_pipelines)
    assert_same_batches(distributed, batches(dataset))
    assert len(distributed) == 7


@pytest.mark.parametrize("start", [0, 2, 6])
def test_dataset_builder_resumes_by_skipping(start):
    def builder(epoch, seed):
        return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, seed=seed * 1000 + epoch)

    source = DatasetSource(builder)
    full = batches(source.epoch_dataset(1, 9, 8))
    assert source.num_batches(8) == 7
    assert_same_batches(batches(source.epoch_dataset(1, 9, 8, start_batch=start)), full[start:])


@pytest.mark.parametrize("start", [0, 2, 6])
def test_a_builder_that_takes_skip_skips_itself_before_its_parse_and_gets_the_same_batches(start):
    def builder(epoch, seed, skip):
        shuffled = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, seed=seed * 1000 + epoch)
        return shuffled.skip(skip).map(lambda x, y: (x * 2, y))  # the parse, after the skip

    def builder_without_skip(epoch, seed):
        return builder(epoch, seed, 0)

    source = DatasetSource(builder)
    assert source.skips_itself and not DatasetSource(builder_without_skip).skips_itself
    full = batches(DatasetSource(builder_without_skip).epoch_dataset(1, 9, 8))
    assert source.num_batches(8) == 7
    assert_same_batches(batches(source.epoch_dataset(1, 9, 8, start_batch=start)), full[start:])


@pytest.mark.parametrize("dataset, problem", [
    (tf.data.Dataset.range(50).shuffle(50), "reshuffle_each_iteration=True"),
    (tf.data.Dataset.range(50).shuffle(50, reshuffle_each_iteration=False), "shuffle without a seed"),
    (tf.data.Dataset.range(50).map(lambda x: x + tf.cast(tf.random.uniform(()) > 0.5, tf.int64)), "unseeded random op"),
    (tf.data.Dataset.range(3).interleave(lambda i: tf.data.Dataset.range(5), num_parallel_calls=2,
                                         deterministic=False), "deterministic=False"),
    (tf.data.Dataset.range(2).flat_map(lambda i: tf.data.Dataset.range(5).shuffle(5)), "reshuffle_each_iteration=True"),
], ids=["reshuffles", "unseeded", "random_map", "nondeterministic", "nested_shuffle"])
def test_a_dataset_whose_order_changes_per_iteration_is_refused_with_the_builder_form(dataset, problem):
    with pytest.raises(JobError, match=problem) as refused:
        as_source(dataset, shuffle=True, what="train_data")
    assert "`train_data=lambda epoch, seed: examples.shuffle(n, seed=seed * 1000 + epoch)`" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("dataset, batched", [
    (tf.data.Dataset.from_tensor_slices((X, Y)), False),
    (tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50, seed=1, reshuffle_each_iteration=False), False),
    (tf.data.Dataset.from_tensor_slices((X, Y)).batch(8).map(lambda x, y: (x * 2, y)).prefetch(2), True),
    (tf.data.Dataset.from_tensor_slices((X, Y)).padded_batch(8), True),
    (tf.data.Dataset.from_tensor_slices((X, Y)).batch(8).unbatch(), False),
    (tf.data.Dataset.from_tensor_slices((X, Y)).batch(8).repeat(), True),
], ids=["plain", "seeded_fixed_shuffle", "batch_map_prefetch", "padded_batch", "unbatched_again", "batch_repeat"])
def test_a_dataset_is_told_batched_or_unbatched_from_its_graph_and_resumes_by_skipping(dataset, batched):
    source = as_source(dataset, shuffle=True, what="train_data")
    assert source.batched is batched
    assert ("a batched" if batched else "an unbatched") in source.describe()
    assert_same_batches(batches(source.epoch_dataset(0, 0, 8, start_batch=3).take(2)),
                        batches(source.epoch_dataset(0, 0, 8).skip(3).take(2)))
    if not batched:
        assert_same_batches(batches(source.epoch_dataset(0, 0, 8).take(1)), batches(dataset.batch(8).take(1)))


def test_a_python_generator_is_refused_with_what_to_pass_instead():
    with pytest.raises(JobError, match="PyDataset .* or a builder"):
        as_source((pair for pair in zip(X, Y)), shuffle=True, what="train_data")


def test_arrays_of_different_lengths_are_a_job_error():
    with pytest.raises(JobError, match="different lengths"):
        as_source((X, Y[:10]), shuffle=True, what="train_data")


def test_infinite_data_without_steps_per_epoch_is_refused_instead_of_training_forever(tmp_path):
    import cluster_trainer as ct

    job = ct.Job(name="forever", build_model=lambda config: None,
                 train_data=lambda epoch, seed: tf.data.Dataset.from_tensor_slices((X, Y)).repeat())
    with pytest.raises(JobError, match="infinite .* set Job.steps_per_epoch"):
        ct.train(job, str(tmp_path / "run"), verbose=0, echo=lambda message: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nested_lists_are_a_job_error():
    with pytest.raises(JobError, match="one row per example"):
        as_source(([[1, 2], [3, 4]], 5), shuffle=True, what="train_data")


def test_an_epoch_of_unknown_length_trains_every_batch_as_fit_does(tmp_path):
    """A builder whose cardinality TensorFlow cannot tell (a `filter`): the loop's compiled step finds
    the end of the data itself. Same steps, same weights and the same epoch history (train loss included)
    as `fit` on the same batches."""
    import keras

    import cluster_trainer as ct
    from cluster_trainer.devices import make_strategy

    def examples(epoch, seed):
        return tf.data.Dataset.from_tensor_slices((X / 100, (Y % 2).astype("float32"))).filter(lambda x, y: True)

    def build(config):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    class Batches(keras.callbacks.Callback):
        ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(batch)

    strategy = make_strategy(None)
    job = ct.Job(name="unknown-length", build_model=build, train_data=examples, epochs=2, batch_size=8, seed=3,
                 callbacks=lambda config: [Batches()], checkpoint=ct.CheckpointPolicy(every_steps=None))
    assert int(examples(0, 0).cardinality()) == tf.data.UNKNOWN_CARDINALITY
    result = ct.train(job, str(tmp_path / "run"), strategy=strategy, verbose=0, echo=lambda message: None)
    assert Batches.ends == [0, 1, 2, 3, 4, 5, 6] * 2  # 50 examples in batches of 8, each epoch

    keras.utils.set_random_seed(3)
    with strategy.scope():
        reference = build({})
    fit_history = reference.fit(examples(0, 3).batch(8), epochs=2, verbose=0).history
    assert result.history == fit_history and len(result.history["loss"]) == 2
    trained = latest(tmp_path / "run")
    kernels = [trained.tensors[e["key"]] for e in trained.state["variables"] if e["stable_path"].endswith("kernel")]
    assert len(kernels) == 2 and result.position.global_step == 14
    for ours, theirs in zip(kernels, [v.numpy() for v in reference.trainable_variables if "kernel" in v.path]):
        np.testing.assert_array_equal(ours, theirs)

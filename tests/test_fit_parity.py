"""What a Keras user passes to `fit` means the same here, and survives an interruption.

In this process, on one replica (where `fit` is deterministic): each case
trains a job with `cluster_trainer.train` and the same model with `model.fit`
on the same data and arguments, and compares the epoch history and the weights
bit for bit. Then a run interrupted mid-way (a preemption notice at an exact
step: it commits there and stops) and resumed in a new `train` call, with new
data objects as a new process would build them, ends bitwise equal to the
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from typing import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf

import cluster_trainer as ct
from cluster_trainer.data import PyDatasetSource
from cluster_trainer.devices import enable_determinism, make_strategy
from cluster_trainer.errors import CheckpointError
from cluster_trainer.preemption import PreemptedError
from harness import assert_bitwise_equal_runs, latest, tree_digest

FEATURES, CLASSES, BATCH = 6, 3, 16
_rng = np.random.default_rng(0)
X = _rng.normal(size=(96, FEATURES)).astype("float32")  # 6 batches of 16
Y = keras.utils.to_categorical(_rng.integers(0, CLASSES, 96), CLASSES).astype("float32")
SAMPLE_WEIGHT = _rng.uniform(0.2, 2.0, 96).astype("float32")
XV = _rng.normal(size=(40, FEATURES)).astype("float32")
YV = keras.utils.to_categorical(_rng.integers(0, CLASSES, 40), CLASSES).astype("float32")
CLASS_WEIGHT = {0: 1.0, 1: 3.0, 2: 0.5}


def build(config):
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.2, seed=1),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


class Batches(keras.utils.PyDataset):
    """Batches of arrays by index. With `reorder_seed` it reorders its examples itself in `on_epoch_end`,
    from a generator it seeds itself (what the README asks of such a PyDataset). It records its hooks,
    the indices read in this process and, in `readers_log`, the process and thread of every read."""

    def __init__(self, x, y, reorder_seed=None, readers_log=None, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y
        self.rows = np.arange(len(x))
        self.rng = None if reorder_seed is None else np.random.default_rng(reorder_seed)
        self.readers_log = readers_log
        self.hooks: list[str] = []
        self.read: list[int] = []

    def __len__(self):
        return math.ceil(len(self.x) / BATCH)

    def __getitem__(self, index):
        self.read.append(index)
        if self.readers_log is not None:
            with open(self.readers_log, "a") as log:
                log.write(f"{os.getpid()} {threading.get_ident()}\n")
        rows = self.rows[index * BATCH:(index + 1) * BATCH]
        return self.x[rows], self.y[rows]

    def on_epoch_begin(self):
        self.hooks.append("begin")

    def on_epoch_end(self):
        self.hooks.append("end")
        if self.rng is not None:
            self.rows = self.rng.permutation(self.rows)


class InterruptAt(keras.callbacks.Callback):
    """Sends this process SIGTERM (a preemption notice) at `hook` once the optimizer is at `step`; does
    nothing without a step, so the uninterrupted run has the same callback list."""

    def __init__(self, hook: str | None = None, step: int | None = None):
        super().__init__()
        self.hook, self.step = hook, step

    def get_state(self):  # where to stop is this call's business, not the run's
        return {}

    def set_state(self, state):
        pass

    def _maybe_notify(self, hook):
        if hook == self.hook and int(self.model.optimizer.iterations.numpy()) == self.step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "the loop handles no signals"
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, batch, logs=None):
        self._maybe_notify("train_batch_end")

    def on_epoch_end(self, epoch, logs=None):
        self._maybe_notify("epoch_end")


def job(train_data, validation_data=None, interrupt=(None, None), **fit_arguments) -> ct.Job:
    return ct.Job(name="fit-parity", build_model=build, train_data=train_data, validation_data=validation_data,
                  callbacks=lambda config: [InterruptAt(*interrupt)], epochs=3, batch_size=BATCH, seed=4,
                  checkpoint=ct.CheckpointPolicy(every_steps=None), **fit_arguments)


def train(job: ct.Job, storage):
    return ct.train(job, str(storage), strategy=make_strategy(None), verbose=0, echo=lambda message: None)


def fit(job: ct.Job, *data, **kwargs):
    """`model.fit` on the job's model, seeded as the loop seeds a run; returns its history and model."""
    strategy = make_strategy(None)
    enable_determinism(job.seed)
    with strategy.scope():
        model = job.build_model(job.config)
    history = model.fit(*data, epochs=job.epochs, verbose=0, **kwargs)
    return history.history, model


def assert_trained_as_fit(result, storage, fit_history, model):
    assert result.history == fit_history
    trained = latest(storage).tensors
    weights = [trained[f"model/trainable/{i:05d}"] for i in range(len(model.trainable_variables))]
    for ours, theirs in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(ours, theirs.numpy())


# -- the cases: a job (given where to interrupt it), fit's data and arguments, and an interruption ----------


@dataclasses.dataclass
class Case:
    make_job: Callable[[tuple], ct.Job]
    fit_data: tuple
    fit_arguments: dict
    interruption: tuple | None = None  # (hook, optimizer step) of a preemption notice; None: compared with fit only


def arrays_with_class_weight_and_validation_arguments(tmp_path):
    return Case(
        lambda interrupt: job((X, Y), (XV, YV), interrupt, shuffle=False, class_weight=CLASS_WEIGHT,
                              validation_freq=[1, 3], validation_steps=2, validation_batch_size=8),
        (X, Y), dict(batch_size=BATCH, shuffle=False, class_weight=CLASS_WEIGHT, validation_data=(XV, YV),
                     validation_freq=[1, 3], validation_steps=2, validation_batch_size=8))


def arrays_with_sample_weights_in_windows_of_steps_per_epoch(tmp_path):
    # 6 batches a pass, 4 an epoch: epochs of 4, 2 (the pass ends) and 4 batches, as fit's iterator gives them.
    # Interrupted at the end of epoch 2, whose 2 batches ended a pass: epoch 3 begins a new one.
    return Case(
        lambda interrupt: job((X, Y, SAMPLE_WEIGHT), (XV, YV), interrupt, shuffle=False, steps_per_epoch=4,
                              validation_freq=2),
        (X, Y), dict(sample_weight=SAMPLE_WEIGHT, batch_size=BATCH, shuffle=False, steps_per_epoch=4,
                     validation_data=(XV, YV), validation_freq=2),
        interruption=("epoch_end", 6))


def endless_dataset_with_class_weight(tmp_path):
    # An infinite batched dataset: epochs of 4 batches continue one stream across its passes of 6. Interrupted
    # at batch 1 of epoch 2 (stream batch 5); the resumed run skips 5 batches of a new iterator.
    stream = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH).repeat()
    unbatched_validation = tf.data.Dataset.from_tensor_slices((XV, YV))
    return Case(
        lambda interrupt: job(stream, unbatched_validation, interrupt, steps_per_epoch=4, class_weight=CLASS_WEIGHT),
        (stream,), dict(steps_per_epoch=4, class_weight=CLASS_WEIGHT, validation_data=unbatched_validation.batch(BATCH)),
        interruption=("train_batch_end", 5))


def py_dataset_that_reorders_itself(tmp_path):
    # Ours read by 2 worker processes, fit's by its own thread: fit with workers > 1 starts each epoch with
    # the batches its queue held when it reset (keras 3.15), so its order is not the dataset's.
    def make_job(interrupt):
        return job(Batches(X, Y, reorder_seed=7, readers_log=tmp_path / "readers", workers=2, use_multiprocessing=True),
                   Batches(XV, YV), interrupt, shuffle=False, class_weight=CLASS_WEIGHT)

    return Case(make_job, (Batches(X, Y, reorder_seed=7),),
                dict(validation_data=Batches(XV, YV), shuffle=False, class_weight=CLASS_WEIGHT))


@pytest.mark.parametrize("case", [
    arrays_with_class_weight_and_validation_arguments,
    arrays_with_sample_weights_in_windows_of_steps_per_epoch,
    endless_dataset_with_class_weight,
    py_dataset_that_reorders_itself,
], ids=lambda case: case.__name__)
def test_a_run_trains_exactly_as_fit_with_the_same_arguments_and_resumes_bitwise(case, tmp_path):
    case = case(tmp_path)
    reference = case.make_job((None, None))
    result = train(reference, tmp_path / "reference")
    fit_history, model = fit(reference, *case.fit_data, **case.fit_arguments)
    assert_trained_as_fit(result, tmp_path / "reference", fit_history, model)
    if isinstance(reference.train_data, Batches):  # its hooks came as fit sent them; worker processes read it
        fit_train, fit_validation = case.fit_data[0], case.fit_arguments["validation_data"]
        assert reference.train_data.hooks == fit_train.hooks and reference.validation_data.hooks == fit_validation.hooks
        readers = {int(line.split()[0]) for line in (tmp_path / "readers").read_text().splitlines()}
        assert readers - {os.getpid()}
    if case.interruption is not None:
        resumed = interrupted_and_resumed(case.make_job, tmp_path / "run", *case.interruption)
        assert resumed.attempt == 2 and resumed.history == result.history
        assert_bitwise_equal_runs(latest(tmp_path / "reference"), latest(tmp_path / "run"))


def interrupted_and_resumed(make_job, storage, hook: str, step: int):
    """Train until a notice at (`hook`, `step`), then resume with a job built anew; returns the resumed result."""
    with pytest.raises(PreemptedError):
        train(make_job((hook, step)), storage)
    return train(make_job((None, None)), storage)


def test_a_shuffled_py_dataset_that_also_reorders_itself_resumes_mid_epoch_bitwise(tmp_path):
    """The run's permutation of its batches, its own reordering in on_epoch_end (replayed on the new
    objects), 2 worker threads."""
    def make_job(interrupt):
        return job(Batches(X, Y, reorder_seed=7, workers=2), Batches(XV, YV), interrupt)

    reference = train(make_job((None, None)), tmp_path / "reference")
    resumed = interrupted_and_resumed(make_job, tmp_path / "run", "train_batch_end", 8)
    assert resumed.attempt == 2 and resumed.history == reference.history
    assert_bitwise_equal_runs(latest(tmp_path / "reference"), latest(tmp_path / "run"))


def test_a_py_dataset_starts_late_in_an_epoch_without_reading_the_batches_before():
    dataset = Batches(np.arange(200, dtype="float32")[:, None], np.zeros((200, 1), "float32"))
    source = PyDatasetSource(dataset, shuffle=True)
    order = source.order(epoch=3, seed=5)
    first = next(iter(source.epoch_dataset(3, 5, BATCH, start_batch=9)))
    source.stop()
    assert first[0].numpy()[0, 0] == order[9] * BATCH
    assert dataset.read and set(dataset.read) <= set(order[9:].tolist())


def test_a_resume_with_another_steps_per_epoch_or_shuffle_is_refused_and_changes_nothing(tmp_path):
    storage = tmp_path / "run"
    make_job = arrays_with_sample_weights_in_windows_of_steps_per_epoch(tmp_path).make_job
    with pytest.raises(PreemptedError):
        train(make_job(("train_batch_end", 2)), storage)
    before = tree_digest(storage)
    for change in (dict(steps_per_epoch=3), dict(shuffle=True)):
        with pytest.raises(CheckpointError, match="Resuming would feed different batches"):
            train(dataclasses.replace(make_job((None, None)), **change), storage)
    assert tree_digest(storage) == before


def test_gradient_accumulation_trains_as_fit_does_where_fit_can(tmp_path):
    """`fit` fails with gradient accumulation under any MirroredStrategy (keras 3.15: an all-reduce inside
    a `cond`); without a strategy it trains. The run, on a MirroredStrategy of one replica, trains the same:
    same history, same weights, bit for bit."""
    def build_accumulating(config):
        model = build(config)
        model.compile(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.05, gradient_accumulation_steps=4,
                                                       clipnorm=1.0),
                      loss="categorical_crossentropy", metrics=["accuracy"])
        return model

    accumulating = dataclasses.replace(job((X, Y), shuffle=False), build_model=build_accumulating)
    result = train(accumulating, tmp_path / "run")
    enable_determinism(accumulating.seed)
    model = build_accumulating({})  # no strategy: where fit can accumulate
    fit_history = model.fit(X, Y, batch_size=BATCH, shuffle=False, epochs=accumulating.epochs, verbose=0).history
    assert int(model.optimizer.iterations) == 3 * 6 // 4  # updates, not steps: accumulation took place
    assert_trained_as_fit(result, tmp_path / "run", fit_history, model)

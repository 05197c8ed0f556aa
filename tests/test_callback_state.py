"""Callback state: what is kept, what is configuration, and what cannot be kept."""

import random

import keras
import numpy as np
import pytest

from cluster_trainer import callback_state


class Scheduler(keras.callbacks.Callback):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor  # configuration
        self.counter = 0  # state
        self.seen = set()
        self.by_epoch = {}
        self.names = np.array(["a", "b"])
        self.scale = keras.Variable(1.0)
        self.hook = lambda: None  # not data
        self.rng = random.Random(1)
        self.np_rng = np.random.default_rng(2)

    def step(self, epoch):
        self.counter += 1
        self.seen.add(epoch)
        self.by_epoch[epoch] = 0.5 * epoch
        self.names = np.array(["x", "yy", "zzz"])
        self.scale.assign(2.5)
        self.rng.random()
        self.np_rng.normal()


def round_trip(before, after):
    initial = callback_state.baseline([before])
    before.step(3)
    before.step(4)
    state, tensors = callback_state.capture([before], initial)
    callback_state.restore([after], state, tensors)
    return state


def test_changed_user_attributes_come_back_with_their_types():
    after = Scheduler(factor=0.1)
    variable = after.scale
    round_trip(Scheduler(factor=0.1), after)
    assert after.counter == 2
    assert after.seen == {3, 4}
    assert after.by_epoch == {3: 1.5, 4: 2.0}
    assert after.names.tolist() == ["x", "yy", "zzz"]
    assert after.scale is variable and float(after.scale.numpy()) == 2.5  # assigned into, not replaced
    twin = Scheduler(factor=0.1)
    twin.step(3), twin.step(4)
    assert after.rng.random() == twin.rng.random()  # generators continue where they were
    assert after.np_rng.normal() == twin.np_rng.normal()


def test_attributes_still_as_constructed_are_configuration_and_a_new_value_wins():
    """`--set factor=0.5` on resume must not be undone by the checkpoint."""
    after = Scheduler(factor=0.5)
    state = round_trip(Scheduler(factor=0.1), after)
    assert "factor" not in state["00-Scheduler"]
    assert after.factor == 0.5


def test_attributes_that_are_not_data_are_skipped_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        state = round_trip(Scheduler(factor=0.1), Scheduler(factor=0.1))
    assert "hook" not in state["00-Scheduler"]
    assert "attribute 'hook' holds a function, which is not stored with checkpoints" in caplog.text


def test_stock_callback_state_survives_json_and_best_weights_go_to_tensors():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stopper = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    stopper.set_model(model)
    stopper.on_train_begin()
    stopper.wait, stopper.best, stopper.best_epoch = 2, 0.25, 4
    stopper.best_weights = model.get_weights()
    state, tensors = callback_state.capture([stopper])
    assert set(state["00-EarlyStopping"]) == {"__extra__", "wait", "stopped_epoch", "best", "best_weights", "best_epoch"}
    assert len(tensors) == 2  # kernel and bias of best_weights
    fresh = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    fresh.on_train_begin()  # resets: restore must come after it
    callback_state.restore([fresh], state, tensors)
    assert (fresh.wait, fresh.best, fresh.best_epoch) == (2, 0.25, 4)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.best_weights, model.get_weights()))


def test_backup_and_restore_is_refused_with_the_reason(tmp_path):
    with pytest.raises(Exception, match="remove keras.callbacks.BackupAndRestore"):
        callback_state.tracked([keras.callbacks.BackupAndRestore(str(tmp_path))])

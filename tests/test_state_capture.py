"""Capturing the model's state for a background upload: a snapshot that later training cannot change;
each replica's copy of layer state that differs between replicas, restored per replica."""

import json
import subprocess
import sys

import pytest

# In a fresh interpreter: two logical CPU devices can only be made before TensorFlow starts,
# and other tests in this worker may have started it.
SCRIPT = """
import json
import numpy as np
from cluster_trainer.native_logs import import_tensorflow_quietly
import_tensorflow_quietly()
import keras
from cluster_trainer.devices import make_strategy
from cluster_trainer.state import capture_model_state, restore_model_state, stable_path

strategy = make_strategy(2)
with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
x, y = np.random.default_rng(0).normal(size=(32, 8)).astype("float32"), np.ones((32, 4), "float32")
model.fit(x, y, epochs=1, verbose=0)
tensors, _ = capture_model_state(model)
flush, _ = capture_model_state(model, copy=False)  # what a preemption flush takes: no copy of its own
flush_equal = sorted(tensors) == sorted(flush) and all(
    flush[k].dtype == tensors[k].dtype and flush[k].shape == tensors[k].shape and np.array_equal(flush[k], tensors[k])
    for k in tensors)
snapshot = {key: array.copy() for key, array in tensors.items()}
model.fit(x * 3, y * 5, epochs=2, verbose=0)
after, index = capture_model_state(model)

# Restored into a new model on the same 2 replicas: every copy as it was. On 1 replica: a fallback, said.
def new_model(strategy):
    with strategy.scope():
        fresh = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
        fresh.compile(optimizer="adam", loss="mse", metrics=["mae"])
        fresh.fit(x[:2], y[:2], epochs=1, verbose=0)
    return fresh
same = new_model(strategy)
same_fell_back = restore_model_state(same, after, index)
restored, _ = capture_model_state(same)
single = new_model(make_strategy(None))
single_fell_back = restore_model_state(single, after, index)
moving_mean = next(e["key"] for e in index if e["stable_path"].endswith("moving_mean"))
print(json.dumps({
    "per_replica": sorted(e["stable_path"] for e in index if e.get("replicas")),
    "copies_differ": after[moving_mean].ndim == 2 and not np.array_equal(after[moving_mean][0], after[moving_mean][1]),
    "restored_equal": all(np.array_equal(restored[k], after[k]) for k in after),
    "same_fell_back": same_fell_back,
    "single_fell_back": sorted(stable_path(path) for path in single_fell_back),
    "single_took_first_copy": bool(np.array_equal(single.layers[1].moving_mean.numpy(), after[moving_mean][0])),
    "replicas": strategy.num_replicas_in_sync,
    "flush_equal": flush_equal,
    "own_memory": all(array.flags.owndata for array in tensors.values()),
    "changed_by_capture_time": sorted(k for k in snapshot if not np.array_equal(tensors[k], snapshot[k])),
    "changed_by_training": sorted(k for k in snapshot if not np.array_equal(after[k], snapshot[k])),
}))
"""


@pytest.fixture(scope="module")
def report():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_captured_arrays_are_copies_that_later_training_does_not_touch(report):
    assert report["replicas"] == 2
    assert report["own_memory"]
    assert report["flush_equal"], "the flush's capture (no copy) differs from the copying one"
    assert report["changed_by_training"], "training changed nothing: the test would prove nothing"
    assert report["changed_by_capture_time"] == [], "captured arrays changed while training went on"


def test_batchnorm_statistics_are_kept_per_replica_and_a_single_replica_resume_says_it_fell_back(report):
    """Each replica updates its copy of the moving statistics from its part of the batch (in fit too)."""
    assert report["copies_differ"], "the replicas' copies are equal: the test would prove nothing"
    assert {"sequential/batch_normalization/moving_mean",
            "sequential/batch_normalization/moving_variance"} <= set(report["per_replica"])
    assert "sequential/dense/kernel" not in report["per_replica"]  # weights are equal on every replica
    assert report["restored_equal"] and report["same_fell_back"] == []
    assert {"sequential/batch_normalization/moving_mean", "mean_absolute_error/total"} <= set(report["single_fell_back"])
    assert report["single_took_first_copy"]

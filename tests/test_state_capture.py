"""Capturing the model's state for a background upload: a snapshot that later training cannot change."""

import json
import subprocess
import sys

# In a fresh interpreter: two logical CPU devices can only be made before TensorFlow starts,
# and other tests in this worker may have started it.
SCRIPT = """
import json
import numpy as np
from cluster_trainer.native_logs import import_tensorflow_quietly
import_tensorflow_quietly()
import keras
from cluster_trainer.devices import make_strategy
from cluster_trainer.state import capture_model_state

strategy = make_strategy(2)
with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
x, y = np.ones((32, 8), "float32"), np.ones((32, 4), "float32")
model.fit(x, y, epochs=1, verbose=0)
tensors, _ = capture_model_state(model)
flush, _ = capture_model_state(model, copy=False)  # what a preemption flush takes: no copy of its own
flush_equal = sorted(tensors) == sorted(flush) and all(
    flush[k].dtype == tensors[k].dtype and flush[k].shape == tensors[k].shape and np.array_equal(flush[k], tensors[k])
    for k in tensors)
snapshot = {key: array.copy() for key, array in tensors.items()}
model.fit(x * 3, y * 5, epochs=2, verbose=0)
after, _ = capture_model_state(model)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "flush_equal": flush_equal,
    "own_memory": all(array.flags.owndata for array in tensors.values()),
    "changed_by_capture_time": sorted(k for k in snapshot if not np.array_equal(tensors[k], snapshot[k])),
    "changed_by_training": sorted(k for k in snapshot if not np.array_equal(after[k], snapshot[k])),
}))
"""


def test_captured_arrays_are_copies_that_later_training_does_not_touch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["own_memory"]
    assert report["flush_equal"], "the flush's capture (no copy) differs from the copying one"
    assert report["changed_by_training"], "training changed nothing: the test would prove nothing"
    assert report["changed_by_capture_time"] == [], "captured arrays changed while training went on"

"""A test job that changes process-global state while it builds, as real jobs do.

The seed MLP (`jobs/mlp.py`), whose `build_model` changes Keras's global
settings when `config["policy"]` asks for it, and leaves them alone otherwise,
as a user's job does: `mixed_float16` turns on mixed precision (the global dtype
policy, which Keras keeps per thread) and a larger epsilon; `float64` sets
`floatx` (which Keras keeps per process). It also draws `config["draws"]`
numbers from Keras's global SeedGenerator and NumPy's and Python's global
generators. A process that trains a float32 run after those must carry none of
it over.
"""

import dataclasses
import os
import random

import keras
import numpy as np

import cluster_trainer as ct

HERE = os.path.dirname(os.path.abspath(__file__))
base = ct.load_job(os.path.join(HERE, "..", "..", "jobs", "mlp.py"))


def build_model(config):
    if config["policy"] == "float64":
        keras.config.set_floatx("float64")
    elif config["policy"] != "float32":
        keras.config.set_dtype_policy(config["policy"])
        keras.config.set_epsilon(1e-4)
    keras.random.normal((config["draws"],))
    np.random.random(config["draws"])
    random.random()
    return base.build_model(config)


job = dataclasses.replace(base, name="global-state", build_model=build_model,
                          config={**base.config, "policy": "float32", "draws": 1})

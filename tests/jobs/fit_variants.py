"""A job for the multi-worker tests of what `fit` takes besides arrays: BatchNormalization (layer
state whose copies differ between replicas), and the data chosen by `CT_TEST_DATA`:

- `pydataset`: a `keras.utils.PyDataset` of 20 batches, epochs of `steps_per_epoch=8` (windows of
  its pass), validation in batches of 16, and `every_steps="auto"`;
- `unknown`: a `tf.data` builder whose length TensorFlow cannot tell (a `filter`), so an epoch
  ends where the data does, with `every_steps=5`.
"""

import os

import keras
import numpy as np
import tensorflow as tf

import cluster_trainer as ct

FEATURES, CLASSES, BATCH = 8, 4, 32


def make_data(samples: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = keras.utils.to_categorical((x @ np.random.default_rng(7).normal(size=(FEATURES, CLASSES))).argmax(axis=1),
                                   CLASSES).astype("float32")
    return x, y


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, index):
        return self.x[index * BATCH:(index + 1) * BATCH], self.y[index * BATCH:(index + 1) * BATCH]


def build_model(config):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Dense(CLASSES, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


x, y = make_data(20 * BATCH, seed=1)
if os.environ.get("CT_TEST_DATA") == "pydataset":
    data = dict(train_data=Batches(x, y), steps_per_epoch=8, validation_batch_size=16, epochs=3,
                checkpoint=ct.CheckpointPolicy(every_steps="auto", every_epoch=True, keep_last=2))
else:
    def examples(epoch, seed):  # built when asked: no TensorFlow op may run before the strategy is made
        return tf.data.Dataset.from_tensor_slices((x[:-7], y[:-7])).shuffle(  # a partial last batch too
            len(x), seed=seed * 1000 + epoch).filter(lambda a, b: True)

    data = dict(train_data=examples, epochs=2,
                checkpoint=ct.CheckpointPolicy(every_steps=5, every_epoch=True, keep_last=2))

job = ct.Job(name="fit-variants", build_model=build_model, validation_data=make_data(96, seed=2), batch_size=BATCH,
             seed=3, **data)

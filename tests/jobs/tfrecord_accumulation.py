"""A TFRecord pipeline of unknown length, EarlyStopping on the training loss, and gradient accumulation.

What a Keras user writes for data on disk: a builder that reads a TFRecord
file, shuffles it with a per-epoch seed, skips (when resuming) before the
parse, and parses with `map`. TensorFlow cannot tell how many records the file
holds, so each epoch ends when the data does. `EarlyStopping(monitor="loss")`
needs the epoch's training loss, which such an epoch must still report.
`AdamW(weight_decay=..., gradient_accumulation_steps=3)` updates the weights
every third step; under MirroredStrategy `fit` fails at its first step (an
all-reduce inside a `cond`), and the trainer moves that all-reduce out.

The records are written once, at import, to `CT_TEST_DATA_DIR` (a test's
temporary directory; the system's temporary directory otherwise).
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import cluster_trainer as ct

FEATURES, CLASSES, EXAMPLES = 16, 4, 320  # 10 steps of 32 per epoch, which TensorFlow cannot tell
RECORDS = os.path.join(os.environ.get("CT_TEST_DATA_DIR", tempfile.gettempdir()), "ct-test-examples.tfrecord")


def write_records(path: str) -> None:
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(FEATURES, CLASSES))
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    y = (x @ teacher + rng.normal(size=(EXAMPLES, CLASSES))).argmax(axis=1).astype("int64")
    partial = f"{path}.{os.getpid()}.partial"
    with tf.io.TFRecordWriter(partial) as writer:
        for features, label in zip(x, y):
            example = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=features)),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }))
            writer.write(example.SerializeToString())
    os.replace(partial, path)  # whole or absent, for the next process that imports this job


if not os.path.exists(RECORDS):
    write_records(RECORDS)


def parse(record):
    example = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([FEATURES], tf.float32),
                                                 "y": tf.io.FixedLenFeature([], tf.int64)})
    return example["x"], tf.one_hot(example["y"], CLASSES)


def train_data(epoch, seed, skip):
    records = tf.data.TFRecordDataset(RECORDS).shuffle(EXAMPLES, seed=seed * 1000 + epoch)
    return records.skip(skip).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def build_model(config):
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.AdamW(config["lr"], weight_decay=0.01, gradient_accumulation_steps=3),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def callbacks(config):
    return [keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=config["min_delta"])]


job = ct.Job(
    name="tfrecord-accumulation",
    build_model=build_model,
    train_data=train_data,
    callbacks=callbacks,
    epochs=6,
    batch_size=32,
    seed=9,
    config={"lr": 0.02, "min_delta": 0.16},
    checkpoint=ct.CheckpointPolicy(every_steps=5, every_epoch=True, keep_last=2),
)

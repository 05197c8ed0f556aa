"""A realistic small CNN: images from a TFRecord file, augmentation layers, BatchNormalization, a
learning-rate schedule, gradient accumulation and EarlyStopping on the training loss.

What a Keras user writes for images on disk:

- a builder that reads a TFRecord file, shuffles it with a per-epoch seed, skips
  (when resuming) before the parse and parses with `map`: TensorFlow cannot tell
  how many records the file holds, so each epoch ends when the data does, and
  must still report its training loss (`EarlyStopping(monitor="loss")` reads it);
- RandomFlip, RandomRotation and RandomZoom inside the model, each with a seed,
  then Conv2D -> BatchNormalization -> Dropout: under MirroredStrategy each
  replica keeps its own copy of the moving statistics (in `fit` too), which a
  resume must restore per replica or validation drifts;
- AdamW with weight decay on a `CosineDecay` schedule, updating every second
  step (`gradient_accumulation_steps=2`), which `fit` cannot run under
  MirroredStrategy (an all-reduce inside a `cond`).

The records are written once, at import, to `CT_TEST_DATA_DIR` (a test's
temporary directory; the system's temporary directory otherwise).
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import cluster_trainer as ct

SIZE, CLASSES, EXAMPLES = 12, 3, 256  # 8 steps of 32 per epoch, which TensorFlow cannot tell
RECORDS = os.path.join(os.environ.get("CT_TEST_DATA_DIR", tempfile.gettempdir()), "ct-test-images.tfrecord")


def make_images(samples: int, seed: int):
    """A bright 3x3 square in one of three horizontal bands (the label), under noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples)
    x = rng.normal(0.0, 0.5, size=(samples, SIZE, SIZE, 1)).astype("float32")
    for i, label in enumerate(labels):
        top, left = int(label) * 4 + rng.integers(0, 2), rng.integers(0, SIZE - 3)
        x[i, top : top + 3, left : left + 3, 0] += 1.5
    return x, keras.utils.to_categorical(labels, CLASSES).astype("float32")


def write_records(path: str) -> None:
    x, y = make_images(EXAMPLES, seed=1)
    partial = f"{path}.{os.getpid()}.partial"
    with tf.io.TFRecordWriter(partial) as writer:
        for image, label in zip(x, y):
            writer.write(image.tobytes() + label.tobytes())
    os.replace(partial, path)  # whole or absent, for the next process that imports this job


if not os.path.exists(RECORDS):
    write_records(RECORDS)


def parse(record):
    values = tf.io.decode_raw(record, tf.float32)
    return tf.reshape(values[: SIZE * SIZE], (SIZE, SIZE, 1)), values[SIZE * SIZE :]


def train_data(epoch, seed, skip):
    records = tf.data.TFRecordDataset(RECORDS).shuffle(EXAMPLES, seed=seed * 1000 + epoch)
    return records.skip(skip).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def build_model(config):
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.RandomFlip("horizontal", seed=11),
            keras.layers.RandomRotation(0.05, seed=12),
            keras.layers.RandomZoom(0.1, seed=13),
            keras.layers.Conv2D(8, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.2, seed=14),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(config["lr"], decay_steps=config["decay_steps"], alpha=0.1)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-3, gradient_accumulation_steps=2),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def callbacks(config):
    return [keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=config["min_delta"])]


job = ct.Job(
    name="realistic-cnn",
    build_model=build_model,
    train_data=train_data,
    validation_data=make_images(64, seed=2),
    callbacks=callbacks,
    epochs=5,
    batch_size=32,
    seed=5,
    config={"lr": 0.01, "decay_steps": 24, "min_delta": 0.1},
    checkpoint=ct.CheckpointPolicy(every_steps=4, every_epoch=True, keep_last=2),
)

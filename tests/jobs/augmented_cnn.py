"""A realistic small CNN: augmentation layers, Conv2D -> BatchNormalization -> Dropout, a CosineDecay schedule.

What a Keras user writes for images: RandomFlip, RandomRotation and RandomZoom
inside the model (each with a seed), Conv2D then BatchNormalization then
Dropout, and AdamW on a `CosineDecay` learning-rate schedule. Under
MirroredStrategy each replica keeps its own copy of BatchNormalization's moving
statistics (they are updated from that replica's part of the batch, in `fit`
too); a resumed run must restore each replica's copy, or validation drifts.
"""

import keras
import numpy as np

import cluster_trainer as ct

SIZE, CLASSES = 12, 3
STEPS_PER_EPOCH = 8  # 256 examples, global batch 32


def make_images(samples: int, seed: int):
    """A bright 3x3 square in one of three horizontal bands (the label), under noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples)
    x = rng.normal(0.0, 0.5, size=(samples, SIZE, SIZE, 1)).astype("float32")
    for i, label in enumerate(labels):
        top, left = int(label) * 4 + rng.integers(0, 2), rng.integers(0, SIZE - 3)
        x[i, top : top + 3, left : left + 3, 0] += 1.5
    return x, keras.utils.to_categorical(labels, CLASSES).astype("float32")


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
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


job = ct.Job(
    name="augmented-cnn",
    build_model=build_model,
    train_data=make_images(256, seed=1),
    validation_data=make_images(64, seed=2),
    epochs=3,
    batch_size=32,
    seed=5,
    config={"lr": 0.01, "decay_steps": 3 * STEPS_PER_EPOCH},
    checkpoint=ct.CheckpointPolicy(every_steps=4, every_epoch=True, keep_last=2),
)

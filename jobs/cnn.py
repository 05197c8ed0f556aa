"""A small CNN on generated 16x16 images, with Dropout and the callbacks that keep files.

Each image holds a bright square in one of four quadrants (the label) under
noise. The job uses:

- Dropout, whose random masks continue exactly after a resume (its
  SeedGenerator state is part of the checkpoint);
- `BatchLearningRate`, the per-batch LR scheduler with an internal `counter`
  from "accurately resuming a training process": a plain user callback that
  resumes its counter without any code for it;
- TensorBoard and CSVLogger writing under the run, continuing at the right
  step and row after a resume.

    cluster-trainer run jobs/cnn.py --storage runs/cnn
    tensorboard --logdir runs/cnn/files/tensorboard
"""

import keras
import numpy as np

import cluster_trainer as ct

SIZE, CLASSES = 16, 4


def make_images(samples: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples)
    x = rng.normal(0.0, 0.6, size=(samples, SIZE, SIZE, 1)).astype("float32")
    half = SIZE // 2
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        top, left = row * half + rng.integers(0, 4), col * half + rng.integers(0, 4)
        x[i, top : top + 4, left : left + 4, 0] += 1.5
    return x, keras.utils.to_categorical(labels, CLASSES).astype("float32")


class BatchLearningRate(keras.callbacks.Callback):
    """Sets the learning rate before every batch to `initial / (1 + decay * counter)`.

    `counter` counts batches over the whole run; a restart that forgot it would
    jump the learning rate back up. cluster-trainer keeps it (a plain int
    attribute) without this class doing anything for it.
    """

    def __init__(self, initial: float, decay: float):
        super().__init__()
        self.initial = initial
        self.decay = decay
        self.counter = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.initial / (1.0 + self.decay * self.counter))
        self.counter += 1


def build_model(config):
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Conv2D(config["filters"], 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Dropout(config["dropout"]),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(config["lr"], momentum=0.9), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def callbacks(config, run):
    return [
        BatchLearningRate(initial=config["lr"], decay=config["lr_decay"]),
        # Batch-level scalars every 4 steps too: they must continue at the right steps after a resume.
        keras.callbacks.TensorBoard(run.path("tensorboard"), write_steps_per_second=True, update_freq=4),
        keras.callbacks.CSVLogger(run.path("history.csv")),
    ]


job = ct.Job(
    name="cnn",
    build_model=build_model,
    train_data=make_images(512, seed=1),
    validation_data=make_images(128, seed=2),
    callbacks=callbacks,
    epochs=6,
    batch_size=32,
    seed=3,
    config={"lr": 0.05, "lr_decay": 0.01, "filters": 8, "dropout": 0.25},
    checkpoint=ct.CheckpointPolicy(every_steps=10, every_epoch=True, keep_last=3),
)

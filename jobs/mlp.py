"""The seed articles' MLP: Dense 64 relu -> Dense 10 softmax, Adam, categorical cross-entropy.

On generated data (a noisy random teacher, so validation loss turns up after a
few epochs), with the three callbacks whose state Keras forgets on restart:
EarlyStopping(patience=3, restore_best_weights=True), ModelCheckpoint
(save_best_only=True) and ReduceLROnPlateau.

    cluster-trainer run jobs/mlp.py --storage runs/mlp
    cluster-trainer run jobs/mlp.py --storage runs/mlp-fast --set lr=3e-3 --devices 2
"""

import keras
import numpy as np

import cluster_trainer as ct

FEATURES, CLASSES = 20, 10


def make_data(samples: int, seed: int):
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(7).normal(size=(FEATURES, CLASSES))
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    logits = x @ teacher + 2.0 * rng.normal(size=(samples, CLASSES))
    y = keras.utils.to_categorical(logits.argmax(axis=1), CLASSES).astype("float32")
    return x, y


def build_model(config):
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(config["units"], activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config["lr"]),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def callbacks(config, run):
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(run.path("best.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5),
    ]


job = ct.Job(
    name="mlp",
    build_model=build_model,
    train_data=make_data(1024, seed=1),
    validation_data=make_data(256, seed=2),
    callbacks=callbacks,
    epochs=30,
    batch_size=64,
    seed=42,
    config={"lr": 1e-2, "units": 64},
    checkpoint=ct.CheckpointPolicy(every_steps=8, every_epoch=True, keep_last=3, keep_best="val_loss"),
)

"""The distribution strategy: MirroredStrategy over GPUs, or logical CPU devices.

One code path for GPU and CPU machines: on a GPU machine all visible GPUs (or
the first N) are replicas; without GPUs, the CPU is split into N logical
devices, so multi-replica behaviour (per-replica metric state, gradient
all-reduce, uneven last batches) is the same and testable on a laptop.
"""

from __future__ import annotations

import tensorflow as tf

from cluster_trainer.errors import ClusterTrainerError


def make_strategy(devices: int | None = None) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over `devices` replicas (default: every GPU, else 1 CPU).

    Must run before TensorFlow initialises its devices (the first op), because
    logical CPU devices cannot be added afterwards.
    """
    if devices is not None and devices < 1:
        raise ClusterTrainerError(f"--devices must be >= 1, got {devices}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if devices is not None and devices > len(gpus):
            raise ClusterTrainerError(f"--devices {devices} asks for more GPUs than the {len(gpus)} visible")
        names = [f"/gpu:{i}" for i in range(devices or len(gpus))]
        return tf.distribute.MirroredStrategy(names)
    count = devices or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    current = tf.config.get_logical_device_configuration(cpu)
    if count > 1 and (current is None or len(current) != count):
        try:
            tf.config.set_logical_device_configuration(cpu, wanted)
        except RuntimeError as e:
            raise ClusterTrainerError(
                f"cannot split the CPU into {count} devices after TensorFlow started; "
                "create the strategy before running any TensorFlow op"
            ) from e
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(count)])


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TF ops deterministic."""
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


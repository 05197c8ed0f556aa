"""The distribution strategy: MirroredStrategy over GPUs, or logical CPU devices; on several
machines, MultiWorkerMirroredStrategy over each machine's devices.

One code path for GPU and CPU machines: on a GPU machine all visible GPUs (or
the first N) are replicas; without GPUs, the CPU is split into N logical
devices, so multi-replica behaviour (per-replica metric state, gradient
all-reduce, uneven last batches) is the same and testable on a laptop. A
multi-worker run keeps that meaning per worker: `devices` counts each
worker's own replicas.
"""

from __future__ import annotations

import tensorflow as tf

from cluster_trainer import keras_compat
from cluster_trainer.errors import ClusterTrainerError
from cluster_trainer.workers import Workers

def make_strategy(devices: int | None = None, workers: Workers | None = None) -> tf.distribute.Strategy:
    """A MirroredStrategy over `devices` replicas (default: every GPU, else 1 CPU); with `workers`,
    a MultiWorkerMirroredStrategy over that many replicas on each worker.

    Must run before TensorFlow initialises its devices (the first op), because
    logical CPU devices cannot be added afterwards, nor collective ops configured.
    """
    if devices is not None and devices < 1:
        raise ClusterTrainerError(f"--devices must be >= 1, got {devices}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and devices is not None and devices > len(gpus):
        raise ClusterTrainerError(f"--devices {devices} asks for more GPUs than the {len(gpus)} visible")
    if workers is not None:
        return _multi_worker_strategy(devices or len(gpus) or 1, bool(gpus), workers)
    if gpus:
        names = [f"/gpu:{i}" for i in range(devices or len(gpus))]
        return tf.distribute.MirroredStrategy(names)
    count = devices or 1
    _split_cpu(count)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(count)])


def _multi_worker_strategy(count: int, on_gpus: bool, workers: Workers) -> tf.distribute.Strategy:
    # No collective timeout: TensorFlow 2.21 keeps a thread asleep for the whole timeout after every
    # collective (measured: 2 threads per step, thousands a minute). A worker that is killed or whose
    # machine vanishes fails the others anyway, through the coordination service (its connection
    # refused at once, or its heartbeats missed within about 10 s).
    options = tf.distribute.experimental.CommunicationOptions()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(workers.addresses)}), task_type="worker", task_id=workers.index,
        num_accelerators={"GPU": count} if on_gpus else {}, rpc_layer="grpc",
    )
    try:
        if on_gpus or count == 1:
            return tf.distribute.MultiWorkerMirroredStrategy(resolver, options)
        _split_cpu(count)
        return keras_compat.multi_worker_strategy(resolver, count, options)
    except RuntimeError as e:
        if "startup" not in str(e):
            raise
        raise ClusterTrainerError(
            "cannot join the multi-worker run after TensorFlow started in this process; "
            "create the strategy (call train) before running any TensorFlow op"
        ) from e


def _split_cpu(count: int) -> None:
    """Split the CPU into `count` logical devices (once; before TensorFlow starts)."""
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


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TF ops deterministic."""
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()



def on_several_workers(strategy: tf.distribute.Strategy) -> bool:
    """Whether some of the strategy's replicas are on other workers (machines, processes)."""
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return False  # the default strategy (a model built outside any scope): one process, one replica
    return len(strategy.extended.worker_devices) < strategy.num_replicas_in_sync


def local_replica_ids(strategy: tf.distribute.Strategy) -> list[int]:
    """The ids, among all the strategy's replicas, of this worker's own: `0..n-1` in one process."""
    if not on_several_workers(strategy):
        return list(range(strategy.num_replicas_in_sync))
    ids = strategy.run(tf.function(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group + 0))
    return [int(i) for i in strategy.experimental_local_results(ids)]

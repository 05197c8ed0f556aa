"""The worker processes that train one run together, and which one this process is.

A run on several machines is one training process per machine (a *worker*),
each with its local GPUs (or logical CPU devices), together under
`tf.distribute.MultiWorkerMirroredStrategy`. Every worker runs the same job
on the same storage URI; worker 0 is the *chief*, the only one that writes to
the run's storage. A worker learns who it is from a `Workers` passed to
`cluster_trainer.loop.train(..., workers=...)` (the Ray driver does that), or
from the `TF_CONFIG` environment variable TensorFlow itself reads (a plain
Kubernetes setup with one pod per worker, `--no-ray`).

Nothing here imports TensorFlow: the driver that places the workers uses it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Sequence

from cluster_trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Workers:
    """The workers of a multi-worker run (`host:port` of each one's collective server) and this one's index.

    Worker 0 is the chief: it alone writes checkpoints, history and run files.
    Every worker must be given the same `addresses`, in the same order.

    Args:
        addresses: `host:port` where each worker's TensorFlow server listens, worker 0 first.
        index: this worker's position in `addresses`.

    Example:
        >>> workers = Workers(["10.0.0.1:2222", "10.0.0.2:2222"], index=1)
        >>> workers.count, workers.is_chief
        (2, False)
        >>> workers.tf_config()
        '{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}, "task": {"type": "worker", "index": 1}}'
        >>> Workers(["10.0.0.1:2222"], index=1)
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.ConfigError: worker index 1 is not one of the 1 worker address(es); the index counts from 0
    """

    addresses: Sequence[str]
    index: int

    def __post_init__(self):
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.addresses:
            raise ConfigError("a multi-worker run needs at least one worker address (host:port)")
        for address in self.addresses:
            host, sep, port = str(address).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"worker address {address!r} is not host:port")
        if len(set(self.addresses)) != len(self.addresses):
            raise ConfigError(f"worker addresses repeat: {list(self.addresses)}; each worker needs its own host:port")
        if not isinstance(self.index, int) or not 0 <= self.index < len(self.addresses):
            raise ConfigError(f"worker index {self.index} is not one of the {len(self.addresses)} worker address(es); "
                              "the index counts from 0")

    @property
    def count(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def tf_config(self) -> str:
        """This worker's `TF_CONFIG`, as TensorFlow reads it."""
        return json.dumps({"cluster": {"worker": list(self.addresses)}, "task": {"type": "worker", "index": self.index}})

    @classmethod
    def from_tf_config(cls, value: str | None = None) -> Workers | None:
        """The workers `TF_CONFIG` names (default: the environment's), or None when it names at most one.

        Example:
            >>> Workers.from_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}')
            Workers(addresses=('a:1', 'b:2'), index=0)
            >>> Workers.from_tf_config('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}') is None
            True
        """
        if value is None:
            value = os.environ.get("TF_CONFIG", "")
        if not value.strip():
            return None
        try:
            config = json.loads(value)
            cluster, task = config.get("cluster") or {}, config.get("task") or {}
        except (ValueError, AttributeError):
            raise ConfigError("TF_CONFIG is not JSON of the form {\"cluster\": {\"worker\": [\"host:port\", ...]}, "
                              "\"task\": {\"type\": \"worker\", \"index\": N}}") from None
        others = sorted(set(cluster) - {"worker"})
        if others or task.get("type", "worker") != "worker":
            raise ConfigError(
                f"TF_CONFIG names task types {others or [task.get('type')]}: cluster-trainer runs "
                "MultiWorkerMirroredStrategy over 'worker' tasks only (worker 0 is the chief); list every machine "
                "under cluster.worker"
            )
        addresses = cluster.get("worker") or []
        if len(addresses) <= 1:
            return None
        return cls(addresses, int(task.get("index", 0)))


def loopback_addresses(count: int) -> list[str]:
    """`127.0.0.1:PORT` for `count` workers on this machine, each port free now (tests, the chaos
    harness and benchmarks run a group of processes on one machine; a port may be taken again
    before a worker binds it, which fails that run loudly).

    Example:
        >>> addresses = loopback_addresses(2)
        >>> len(set(addresses)), addresses[0].startswith("127.0.0.1:")
        (2, True)
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all held open together, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()

"""Every private Ray API the trainer relies on, in one place.

Checked on Ray 2.60 (pyproject.toml pins >=2.60,<2.61). An upgrade that moves
one of these breaks this file, with the message below, and nothing else.

- `ray._private.state.state.get_draining_nodes()`: the GCS's draining-nodes table,
  `{node_id_hex: deadline_ms}` with the deadline in milliseconds since the Unix epoch and
  0 for a drain without a deadline (`ray drain-node` without `--deadline-remaining-seconds`).
  Public Ray has no way to ask "is my node being drained?".
- `ray.init(_node_ip_address=...)`: a "hidden option" of `ray.init`, and
  `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, to keep the embedded local cluster on
  127.0.0.1: Ray turns a loopback node address into the machine's routable one
  (`services.resolve_ip_for_localhost`) unless that flag is off, as Ray has it on macOS and
  Windows, where it runs single-node clusters only. With the node's address 127.0.0.1, Ray's
  servers (GCS, raylet, workers' gRPC, the dashboard agent, the runtime-env agent) listen on
  127.0.0.1 only; without it they listen on every interface (both checked with `ss -ltnp`).
"""

from __future__ import annotations

CHECKED_ON = "2.60"


def _unsupported(what: str, error: Exception) -> RuntimeError:
    import ray

    return RuntimeError(
        f"Ray {ray.__version__} no longer has {what} ({type(error).__name__}: {error}); cluster-trainer was checked "
        f"on Ray {CHECKED_ON}: install ray=={CHECKED_ON}.* (pyproject.toml pins that range)"
    )


def draining_nodes() -> dict[str, int]:
    """`{node_id_hex: deadline_ms}` of the nodes being drained (0: no deadline)."""
    try:
        from ray._private.state import state
    except ImportError as e:
        raise _unsupported("ray._private.state.state", e) from e
    return dict(state.get_draining_nodes())


def init_local(**kwargs):
    """Start a local Ray in this process, every one of its servers listening on 127.0.0.1 only."""
    import ray

    try:
        from ray._private import ray_constants

        enabled = ray_constants.ENABLE_RAY_CLUSTER
    except (ImportError, AttributeError) as e:
        raise _unsupported("ray._private.ray_constants.ENABLE_RAY_CLUSTER", e) from e
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init resolves the node's address
    try:
        return ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled

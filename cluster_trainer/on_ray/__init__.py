"""Runs on Ray: the only part of the package that imports Ray, and only inside functions.

- `connection`: connect to a cluster (`RAY_ADDRESS`, `--ray-address`) or start a local Ray on 127.0.0.1.
- `actor`: `TrainActor`, one attempt of a run on one node, and how it gets the job.
- `notices`: the preemption notices an actor polls (its node's drain, the driver's stop).
- `retry`: what happens after an attempt ends (preemption and failure budgets, backoff); no Ray.
- `driver`: `run`, which starts attempts, watches them and starts the next.
- `private`: every private Ray API used, checked on the pinned Ray version.

`--no-ray` runs never import this package's Ray-using modules.
"""

from cluster_trainer.errors import RunError

__all__ = ["RunError", "RunOutcome", "connect", "disconnect", "run"]


def __getattr__(name):
    if name in ("run", "RunOutcome"):
        from cluster_trainer.on_ray import driver

        return getattr(driver, name)
    if name in ("connect", "disconnect"):
        from cluster_trainer.on_ray import connection

        return getattr(connection, name)
    raise AttributeError(f"module 'cluster_trainer.on_ray' has no attribute {name!r}")

"""Connecting this process to Ray: a cluster's address, `RAY_ADDRESS`, or a local Ray on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Callable

from cluster_trainer.errors import EXIT_BAD_INPUT, EXIT_FAILURE, RunError
from cluster_trainer.on_ray import private

# Ray forwards actor output to the driver asynchronously; give the last lines time to arrive.
LOG_FLUSH_SECONDS = 1.0


def connect(address: str | None = None, echo: Callable[[str], None] | None = None, offer_no_ray: bool = True) -> bool:
    """Connect this process to Ray, as `run` does; True if this call connected (then call `disconnect()`).

    `address`: "auto", "HOST:PORT" (the GCS), or None: `RAY_ADDRESS` if set, else a new local Ray
    on 127.0.0.1 (usage stats and dashboard off), stopped by `disconnect()`. Returns False, and
    changes nothing, when Ray is already initialised here (a notebook, a Tune trial). A closed
    address fails in seconds with `RunError` (exit code 2), not after Ray's minutes of retries.
    `offer_no_ray`: whether messages suggest --no-ray (`run` has it; `sweep` needs Ray).

    Example:
        >>> connected = connect("auto")        # doctest: +SKIP
        >>> # ... tasks, actors, cluster_trainer.run(...) ...
        >>> if connected:                      # doctest: +SKIP
        ...     disconnect()
    """
    import ray

    echo = echo or (lambda message: print(f"cluster-trainer: {message}", file=sys.stderr, flush=True))
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not sys.stderr.isatty():  # a log file or `ray job logs`: no colour codes around Ray's line prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        echo("starting a local Ray on 127.0.0.1 (pass --ray-address to use a running cluster"
             + (", --no-ray to train in this process)" if offer_no_ray else ")"))
        try:
            private.init_local(include_dashboard=False, **quiet)
        except Exception as e:
            fix = "pass --no-ray to train in this process" if offer_no_ray else "pass --ray-address of a running cluster"
            raise RunError(f"could not start a local Ray: {type(e).__name__}: {e}; {fix}", EXIT_FAILURE) from e
        return True
    where = check_address(address, offer_no_ray)
    try:
        ray.init(address=address, **quiet)
    except Exception as e:
        raise RunError(f"cannot connect to Ray at {where}: {type(e).__name__}: {first_line(e)}; "
                       f"{_fix(offer_no_ray)}", EXIT_BAD_INPUT) from e
    echo(f"connected to Ray at {where} ({sum(1 for n in ray.nodes() if n.get('Alive'))} node(s))")
    return True


def disconnect() -> None:
    """Leave Ray (stopping a local Ray `connect` started), once the actors' last lines have arrived."""
    import ray

    time.sleep(LOG_FLUSH_SECONDS)  # Ray forwards actor output asynchronously
    ray.shutdown()


def _fix(offer_no_ray: bool) -> str:
    return ("check the address (HOST:PORT of the cluster's GCS, or auto for the cluster `ray start` ran on this "
            "machine)" + (", or pass --no-ray to train in this process" if offer_no_ray else ""))


def check_address(address: str | None, offer_no_ray: bool = True) -> str | None:
    """The address `ray.init(address)` would connect to, refused in one line (`RunError`, exit code 2)
    if it is malformed or nothing listens there; None where a new local Ray would start.
    `offer_no_ray`: whether the message suggests --no-ray (`run` has it; `sweep` needs Ray).

    Example:
        >>> check_address("127.0.0.1:1")
        Traceback (most recent call last):
        ...
        cluster_trainer.errors.RunError: cannot connect to Ray at 127.0.0.1:1: Connection refused; check the address ...
    """
    # As ray.init reads it: RAY_ADDRESS wins over no address and over "auto".
    where = os.environ["RAY_ADDRESS"] if address in (None, "auto") and os.environ.get("RAY_ADDRESS") else address
    if where is not None:
        check_reachable(where, _fix(offer_no_ray))
    return where


def check_reachable(address: str, fix: str) -> None:
    """Fail in seconds, with one line, where `ray.init` would retry a closed port for minutes."""
    if address == "auto" or "://" in address:
        return  # Ray finds the local cluster itself / Ray Client has its own errors
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RunError(f"--ray-address {address!r} is not HOST:PORT or auto; {fix}", EXIT_BAD_INPUT)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RunError(f"cannot connect to Ray at {address}: {e.strerror or e}; {fix}", EXIT_BAD_INPUT) from None


def first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)

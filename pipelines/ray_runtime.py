"""Connecting a driver to Ray: a cluster address, or a private local instance on loopback."""

from __future__ import annotations

import os


def connect_ray(address: str | None = None, log_to_driver: bool = False):
    """Join the cluster at `address`, or start a private local Ray instance bound to 127.0.0.1.

    An already initialised Ray (tests, notebooks) is reused as it is. Returns the ray module.
    log_to_driver: show the workers' output here (training progress lines).
    """
    # Before Ray starts: without it Ray listens on the machine's external interface too.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray starts workers at niceness 15 so its daemons win every wake-up; on a few cores that
    # preempts one of torch's OpenMP threads mid-region and the other waits at the barrier:
    # Ray Train steps +14.7 % over a plain loop on 2 cores, +9.5 % at niceness 0 (benchmarks/train.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # address="local": never attach to some other cluster found through RAY_ADDRESS.
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver, _node_ip_address="127.0.0.1")
    return ray

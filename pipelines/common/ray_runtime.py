"""Connecting a driver to Ray: a cluster address, or a private local instance on loopback.

Console policy: the project's commands draw their own progress bar and print their own summary,
so Ray's INFO lines, Ray Data's progress bars and its plan printing are off unless the user asked
for them (`pifuhd --verbose`, which sets PIFUHD_VERBOSE=1 for this process and its jobs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

VERBOSE_ENV = "PIFUHD_VERBOSE"
# Ray loggers that speak at WARNING about things that are as intended here.
_EXPECTED_NOTICES = (
    "ray._private.authentication.authentication_token_setup",  # token auth is on: good
    "ray.data._internal.progress",  # progress bars are off: on purpose
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


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
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose()
    if not verbose():  # Ray Data's console lines ("execution finished", ...) at WARNING; its log file keeps all
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ == "PlainRayHandler":
                handler.setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    level = logging.INFO if verbose() else logging.WARNING
    if not verbose():
        for name in _EXPECTED_NOTICES:
            logging.getLogger(name).setLevel(logging.ERROR)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
    else:
        # address="local": never attach to some other cluster found through RAY_ADDRESS.
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver, _node_ip_address="127.0.0.1",
                 logging_level=level)
    # Ray's core worker installs a SIGTERM handler that aborts the process; a command's own handler
    # (pipelines/cli.py: unwind, write the rows received, shut Ray down) comes back in its place.
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return ray

"""Stage actors that end with their pipeline.

Ray Data releases an actor pool's handles when a pipeline ends, but an actor lives on while
objects it produced are in scope (Ray keeps their lineage): the finished pipeline's stage actors
can hold their CPUs and GPUs for minutes, and work submitted after the pipeline (the bulk job's
retries of inputs whose worker died) waits behind them. So every stage actor of a pipeline
registers its own handle with a `StageActorRegistry` that the driver owns, and the driver kills
them all the moment the pipeline is over (`end_stage_actors`), finished, failed or abandoned.

An actor a pool lets go of while the pipeline runs (an autoscaling pool shrinking) stays alive,
held by the registry, until the pipeline ends; Ray's lineage would have kept it alive as well.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class StageActorRegistry:
    """A Ray actor (no CPU) holding the handles of one pipeline's stage actors."""

    def __init__(self) -> None:
        self.handles: dict[str, object] = {}  # actor id (hex) -> handle: a restarted actor registers once

    def add(self, actor_id: str, handle) -> None:
        self.handles[actor_id] = handle

    def all(self) -> list:
        return list(self.handles.values())


def start_registry():
    """A new registry actor owned by this driver, on the driver's node: it dies with the driver, and
    never with a worker node the job can lose."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(StageActorRegistry).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote()


def register_this_actor(registry) -> None:
    """Called in a stage actor's constructor: its handle goes to `registry` (None: not in a pipeline)."""
    import ray

    if registry is None or not ray.is_initialized():
        return
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # a plain task or the driver (a retry run alone)
        return
    try:
        ray.get(registry.add.remote(context.get_actor_id(), context.current_actor), timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as exc:  # the stage still works; Ray releases it in the end
        log.warning("this stage actor could not register with its pipeline (%s)", exc)


def end_stage_actors(registry) -> int:
    """Kill every actor registered with `registry`, then the registry; the number killed."""
    import ray

    try:
        handles = ray.get(registry.all.remote(), timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as exc:  # the registry itself died: nothing to find
        log.warning("could not list the pipeline's stage actors (%s); they end when Ray releases them", exc)
        handles = []
    for handle in handles:
        ray.kill(handle, no_restart=True)
    ray.kill(registry, no_restart=True)
    return len(handles)

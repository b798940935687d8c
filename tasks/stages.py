"""Every trunk stage as a Prefect task, and the caller that lets dag.run drive them: per-block stages are
submitted (they fan out over the task runner: threads, Dask, one GPU each), the others run in line.

The fan-out is bounded: at most `memory.max_concurrent_blocks` block tasks are in flight at once (Prefect's
thread pool is unbounded, and every block at once held several times the model's weights); the caller
waits for the oldest before it submits one more.

Several devices (`--device cuda` on a multi-GPU machine): the bound is the sum of each device's, and every
block task leases a device from the run's pool (squeezeflow/device_pool.py) while it runs."""
from __future__ import annotations

import threading

from prefect.states import Completed, State

from squeezeflow import dag, device_pool
from squeezeflow.dag import Stage
from squeezeflow.runners import block_annotations
from squeezeflow.stages import STAGE_FUNCTIONS

from ._stage import stage_task


def _run_stage(store_uri: str, kind: str, inputs: dict, pool: str | None = None):
    # `pool`: the run's device pool (several GPUs): the block leases a device for its run, outside its inputs.
    with device_pool.lease_from(pool):
        value, remembered = dag.execute(store_uri, kind, inputs)
    return Completed(data=value, name="Cached") if remembered else value


# Task names are the stage kinds the UI shows; a per-block compress task is simply "compress".
TASK_NAMES = {kind: ("compress" if kind == "compress-block" else kind) for kind in STAGE_FUNCTIONS}
TASKS = {kind: stage_task(name)(_run_stage) for kind, name in TASK_NAMES.items()}


# Per flow-run thread (concurrent flow runs in one process each have their own): the block tasks in
# flight, and the bound planned for each (model, recipe).
_fan_out = threading.local()


def _done(future) -> bool:
    inner = getattr(future, "wrapped_future", None)
    return inner.done() if inner is not None and hasattr(inner, "done") else future.state.is_final()


def _wait_for_a_slot(stage: Stage, inputs: dict) -> tuple[list, str | None]:
    """Block until fewer than the planned number of block tasks are in flight; returns the in-flight list
    and the run's device pool key (None: one device)."""
    if not hasattr(_fan_out, "in_flight"):
        _fan_out.in_flight, _fan_out.limits, _fan_out.pools = [], {}, {}
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    model, recipe = inputs["model"], inputs["recipe"]
    # Planned once per run, model and recipe (memory available now, not at some earlier run's start).
    key = (str(run.flow_run.id) if run and run.flow_run else "", repr(model.key_form()), recipe.name)
    if key not in _fan_out.limits:
        _fan_out.limits[key], _fan_out.pools[key] = _plan(key, model, recipe, inputs)
    in_flight = _fan_out.in_flight
    in_flight[:] = [f for f in in_flight if not _done(f)]
    while len(in_flight) >= _fan_out.limits[key]:
        in_flight[0].wait()  # blocks are alike in size: the oldest is the next to finish
        in_flight[:] = [f for f in in_flight if not _done(f)]
    return in_flight, _fan_out.pools[key]


def _plan(key: tuple, model, recipe, inputs: dict) -> tuple[int, str | None]:
    """(block tasks in flight at most, the key of the run's device pool or None for one device)."""
    from squeezeflow import memory
    from squeezeflow.compute import stage_compute

    compute = stage_compute(model)
    devices = device_pool.devices_for(compute)
    stats, block = inputs.get("stats"), inputs.get("block", 0)
    if len(devices) == 1:
        return memory.max_concurrent_blocks(model, recipe, stats, block), None

    def on(device: str):
        return model.model_copy(update={"compute": compute.model_copy(update={"device": device})})

    pool = device_pool.DevicePool(devices, [memory.max_concurrent_blocks(on(d), recipe, stats, block) for d in devices])
    name = repr(key)
    device_pool.register(name, pool)
    return pool.capacity, name


def prefect_call(store_uri: str, stage: Stage, inputs: dict):
    task = TASKS[stage.kind]
    if stage.fan_out:
        in_flight, pool = _wait_for_a_slot(stage, inputs)
        with block_annotations():  # on Dask with GPU workers: one GPU per block task; else a no-op
            future = task.submit(store_uri, stage.kind, inputs, pool)
        in_flight.append(future)
        return future
    out = task(store_uri, stage.kind, inputs)
    return out.result() if isinstance(out, State) else out  # a remembered stage's "Cached" state

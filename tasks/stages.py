"""Every trunk stage as a Prefect task, and the caller that lets dag.run drive them: per-block stages are
submitted (they fan out over the task runner: threads, Dask, one GPU each), the others run in line.

The fan-out is bounded: at most `memory.max_concurrent_blocks` block tasks are in flight at once (Prefect's
thread pool is unbounded, and every block at once held several times the model's weights); the caller
waits for the oldest before it submits one more."""
from __future__ import annotations

import threading

from prefect.states import Completed, State

from squeezeflow import dag
from squeezeflow.dag import Stage
from squeezeflow.runners import block_annotations
from squeezeflow.stages import STAGE_FUNCTIONS

from ._stage import stage_task


def _run_stage(store_uri: str, kind: str, inputs: dict):
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


def _wait_for_a_slot(stage: Stage, inputs: dict) -> list:
    """Block until fewer than the planned number of block tasks are in flight; returns the in-flight list."""
    from squeezeflow import memory

    if not hasattr(_fan_out, "in_flight"):
        _fan_out.in_flight, _fan_out.limits = [], {}
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    model, recipe = inputs["model"], inputs["recipe"]
    # Planned once per run, model and recipe (memory available now, not at some earlier run's start).
    key = (str(run.flow_run.id) if run and run.flow_run else "", repr(model.key_form()), recipe.name)
    if key not in _fan_out.limits:
        _fan_out.limits[key] = memory.max_concurrent_blocks(model, recipe, inputs.get("stats"), inputs.get("block", 0))
    in_flight = _fan_out.in_flight
    in_flight[:] = [f for f in in_flight if not _done(f)]
    while len(in_flight) >= _fan_out.limits[key]:
        in_flight[0].wait()  # blocks are alike in size: the oldest is the next to finish
        in_flight[:] = [f for f in in_flight if not _done(f)]
    return in_flight


def prefect_call(store_uri: str, stage: Stage, inputs: dict):
    task = TASKS[stage.kind]
    if stage.fan_out:
        in_flight = _wait_for_a_slot(stage, inputs)
        with block_annotations():  # on Dask with GPU workers: one GPU per block task; else a no-op
            future = task.submit(store_uri, stage.kind, inputs)
        in_flight.append(future)
        return future
    out = task(store_uri, stage.kind, inputs)
    return out.result() if isinstance(out, State) else out  # a remembered stage's "Cached" state

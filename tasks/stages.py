"""Every trunk stage as a Prefect task, and the caller that lets dag.run drive them: per-block stages are
submitted (they fan out over the task runner: threads, Dask, one GPU each), the others run in line."""
from __future__ import annotations

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


def prefect_call(store_uri: str, stage: Stage, inputs: dict):
    task = TASKS[stage.kind]
    if stage.fan_out:
        with block_annotations():  # on Dask with GPU workers: one GPU per block task; else a no-op
            return task.submit(store_uri, stage.kind, inputs)
    out = task(store_uri, stage.kind, inputs)
    return out.result() if isinstance(out, State) else out  # a remembered stage's "Cached" state

import os
import time

from squeezeflow import pipeline
from squeezeflow.config import Recipe
from squeezeflow.stats import StatsRef
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("compress", tags=["compress"])
def compress_block(store_uri: str, model: pipeline.ModelInfo, block: int, recipe: Recipe,
                   stats: dict[str, StatsRef]) -> Ref:
    """Compress one decoder block (the flow fans out one of these per block)."""
    ref = pipeline.compress_block(open_store(store_uri), model, block, recipe, stats)
    # Fault-injection hook for the crash/resume tests: widen the window in which a run can be killed.
    if delay := float(os.environ.get("SQUEEZEFLOW_FAULT_COMPRESS_DELAY_S", "0")):
        time.sleep(delay)
    return ref


@stage_task("compress", name="compress-sequential", tags=["compress"])
def compress_sequential(store_uri: str, model: pipeline.ModelInfo, recipe: Recipe, calib: Ref,
                        stats: dict[str, StatsRef]) -> list[Ref]:
    """Compress block by block through the already-compressed blocks (GPTQ); checkpointed per block."""
    return pipeline.compress_sequential(open_store(store_uri), model, recipe, calib, stats)

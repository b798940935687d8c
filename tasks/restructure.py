"""Structural methods (layer removal) as Prefect tasks: one task per selection round, one per method.

The round task is called from inside the method's task (Prefect 3 runs nested task calls), so the UI
shows every greedy TRSP/SLEB round, and a killed run resumes at the first round not yet stored: each
round's state is also checkpointed in the artifact store under its own index key (pipeline.structure_round).
"""
from squeezeflow import pipeline
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("transform", name="structure-round")
def structure_round(store_uri: str, model: pipeline.ModelInfo, config, calib: Ref, k: int, state: dict) -> dict:
    """Round k of a structural method: e.g. train the gates and mask the smallest one (TRSP)."""
    return pipeline.structure_round(open_store(store_uri), model, config, calib, k, state)


@stage_task("transform", name="restructure")
def restructure(store_uri: str, model: pipeline.ModelInfo, config, calib: Ref) -> pipeline.StructureStep:
    """Apply one structural method (its rounds, then removal): a plain, shallower HF checkpoint."""
    def round_task(_store, m, c, cal, k, state):
        return structure_round(store_uri, m, c, cal, k, state)

    return pipeline.restructure(open_store(store_uri), model, config, calib, round_fn=round_task)

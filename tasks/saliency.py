from squeezeflow import pipeline
from squeezeflow.stats import StatsRef
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("saliency")
def saliency(store_uri: str, model: pipeline.ModelInfo, calib: Ref, statistics: tuple[str, ...]) -> dict[str, StatsRef]:
    """Stream the model block by block and collect every statistic the recipe needs, in one pass."""
    return pipeline.saliency(open_store(store_uri), model, calib, statistics)

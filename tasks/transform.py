from squeezeflow import pipeline
from squeezeflow.config import Recipe
from squeezeflow.stats import StatsRef
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("transform")
def transform(store_uri: str, model: pipeline.ModelInfo, recipe: Recipe, stats: dict[str, StatsRef],
              calib: Ref | None = None) -> pipeline.ModelInfo:
    """Rewrite the model as the recipe's method needs it before compression (QUAD's expansion, BackSlash's
    tuning on the calibration windows)."""
    return pipeline.transform(open_store(store_uri), model, recipe, stats, calib)

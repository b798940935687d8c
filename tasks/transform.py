from squeezeflow import pipeline
from squeezeflow.config import Recipe
from squeezeflow.stats import StatsRef
from squeezeflow.store import open_store

from ._stage import stage_task


@stage_task("transform")
def transform(store_uri: str, model: pipeline.ModelInfo, recipe: Recipe, stats: dict[str, StatsRef]) -> pipeline.ModelInfo:
    """Rewrite the model as the recipe's method needs it before compression (QUAD's expansion)."""
    return pipeline.transform(open_store(store_uri), model, recipe, stats)

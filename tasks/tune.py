from squeezeflow import pipeline
from squeezeflow.config import Recipe
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("tune")
def tune(store_uri: str, model: pipeline.ModelInfo, recipe: Recipe, calib: Ref, packed: Ref) -> Ref:
    """Tune the packed checkpoint on calibration text (QUAD's PEFT of outlier weights and scales)."""
    return pipeline.tune(open_store(store_uri), model, recipe, calib, packed)

from squeezeflow import pipeline
from squeezeflow.config import EvalSpec
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("evaluate")
def evaluate(store_uri: str, model: pipeline.ModelInfo, packed: Ref | None, spec: EvalSpec, recipe: str) -> Ref:
    """Perplexity, size and bits of the packed model loaded back from its files (or of the base model)."""
    return pipeline.evaluate(open_store(store_uri), model, packed, spec, recipe)

from squeezeflow import pipeline
from squeezeflow.config import Recipe
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("pack")
def pack(store_uri: str, model: pipeline.ModelInfo, recipe: Recipe, blocks: list[Ref]) -> Ref:
    """Bit-pack the compressed blocks into an HF-loadable directory (a tree in the store)."""
    return pipeline.pack(open_store(store_uri), model, recipe, blocks)

from prefect.cache_policies import NO_CACHE

from squeezeflow import pipeline
from squeezeflow.stats import StatsRef
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("publish", name="assemble")
def assemble(store_uri: str, plan: pipeline.Plan, calib: Ref, stats: dict[str, StatsRef], blocks: list[Ref],
             packed: Ref, metrics: Ref, baseline: Ref) -> Ref:
    """Build the publishable artifact (report + manifest) in the store."""
    return pipeline.assemble(open_store(store_uri), plan, calib, stats, blocks, packed, metrics, baseline)


# Not cached: publishing is idempotent (same artifact id => no-op) and must see the registry as it is now.
@stage_task("publish", cache_policy=NO_CACHE, persist_result=False)
def publish(store_uri: str, artifact: Ref, registry_uri: str) -> dict:
    """Upload to the S3 registry, manifest last, and move the `latest` alias."""
    return pipeline.publish(open_store(store_uri), artifact, registry_uri)

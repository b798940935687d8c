"""Prefect tasks of the nightly re-calibration that are not compression stages: sealing the gate's
decision into the candidate, and publishing it under the alias the decision earned."""

from squeezeflow import gate as gate_lib
from squeezeflow.store import Ref, open_store

from ._stage import stage_task


@stage_task("stamp-gate")
def stamp_gate(store_uri: str, artifact: Ref, gate: dict) -> Ref:
    """The candidate artifact with the gate block in its lineage (new content id)."""
    return gate_lib.stamp(open_store(store_uri), artifact, gate)


# Not cached: aliases must be moved against the registry as it is now (publish and promote are idempotent).
@stage_task("publish-candidate")
def publish_candidate(store_uri: str, artifact: Ref, registry_uri: str, promote: bool) -> dict:
    """Publish without touching `latest`; then `production` and `latest` move to it if it passed the gate,
    else only `candidate` does. Production's entry and aliases are untouched by a rejection."""
    import json

    from squeezeflow.registry import Registry

    path = open_store(store_uri).materialize(artifact)
    manifest = json.loads((path / "manifest.json").read_text())
    reg = Registry(registry_uri)
    entry = reg.publish(path, manifest["model"], manifest["recipe"], manifest["artifact_id"], alias=None)
    aliases = ("production", "latest") if promote else ("candidate",)
    for alias in aliases:
        reg.promote(entry.uri, alias)
    return {"uri": entry.uri, "artifact_id": entry.artifact_id, "model": entry.model, "recipe": entry.recipe,
            "aliases": list(aliases)}

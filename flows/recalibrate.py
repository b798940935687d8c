"""Nightly re-calibration: rebuild each production artifact on fresh calibration data, gate, promote.

For every registry entry aliased `production` (or the refs given), the flow reads the manifest (model,
recipe, calibration record, evaluation protocol), samples new calibration windows and runs the same
recipe through the compress flow's plan (squeezeflow/dag.py). The candidate, the production artifact and
the base model are then evaluated on production's protocol, and the gate (squeezeflow.gate) decides. The
decision is sealed into the candidate's lineage before it is published, and shown as a Prefect markdown
artifact. A passing candidate becomes `production` (and `latest`); a failing one is published under
`candidate` only, so production's entry and aliases stay exactly as they were.

Deployed on a cron schedule from the entrypoint `flows/recalibrate.py:recalibrate_flow`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from squeezeflow import gate as gate_lib
from squeezeflow import dag, pipeline
from squeezeflow.calibration import CalibrationSet
from squeezeflow.config import ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.flows.compress import Destinations, table_artifact_key
from squeezeflow.gate import FreshCalibration, GateThresholds
from squeezeflow.recipes import Recipe
from squeezeflow.registry import MANIFEST, Registry, verify_dir
from squeezeflow.settings import store_uri as default_store_uri
from squeezeflow.store import ArtifactStore, Ref, open_store
from squeezeflow.tasks.gate import publish_candidate, stamp_gate
from squeezeflow.tasks.stages import prefect_call

PRODUCTION = "production"


class Recalibration(BaseModel):
    """One production artifact to re-calibrate, everything checked before heavy work starts."""

    production_uri: str
    production_id: str
    production_recipe: str
    production_dir: str     # the verified local copy of the production entry
    job: pipeline.Job       # the candidate: production's model, recipe (or the override), fresh data


def production_entries(reg: Registry, refs: list[str]) -> list[str]:
    """The entry URIs to re-calibrate: `refs` resolved, or every entry carrying the production alias."""
    if refs:
        return list(dict.fromkeys(reg.resolve(r) for r in refs))
    uris = [e["uri"] for e in reg.list() if PRODUCTION in e["aliases"]]
    if not uris:
        raise BadInput(f"no registry entry in {reg.uri} carries the {PRODUCTION!r} alias; promote one first "
                       "(squeezeflow registry promote REF --alias production) or pass artifacts explicitly")
    return uris


def prepare(reg: Registry, uri: str, calibration: FreshCalibration, recipe_override: str) -> Recalibration:
    """Pull and verify the production artifact and preflight its candidate (same model, same recipe unless
    overridden, fresh calibration, production's evaluation protocol)."""
    path = reg.pull(uri)
    manifest = verify_dir(path)  # authenticated: the gate compares against what production really is
    lineage = manifest["lineage"]
    recipe = recipe_override or Recipe.model_validate(lineage["recipe"])
    job = pipeline.preflight(ModelRef(ref=lineage["model"]["ref"]), recipe,
                              calibration.spec_for(lineage.get("calibration") or {}), gate_lib.eval_spec(manifest))
    gate_lib.check_recorded_texts(manifest, job.evaluation_sha256)  # production's own evaluation text
    if job.model.fingerprint != lineage["model"]["fingerprint"]:
        raise BadInput(f"{uri}: its base model {lineage['model']['ref']!r} has changed since production was built "
                       f"(fingerprint {job.model.fingerprint[:12]} != {lineage['model']['fingerprint'][:12]}); "
                       "re-compress it with the compress flow instead")
    return Recalibration(production_uri=uri, production_id=manifest["artifact_id"],
                         production_recipe=manifest["recipe"], production_dir=str(path), job=job)


def packed_files(store: ArtifactStore, artifact_dir: str) -> Ref:
    """The packed checkpoint inside an artifact (everything but manifest.json and report/), stored: the
    same tree the compress flow evaluated, so production is evaluated exactly like a candidate."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "packed"
        shutil.copytree(artifact_dir, out, ignore=shutil.ignore_patterns(MANIFEST, "report", ".squeezeflow-complete"))
        return store.put_dir(out, kind="packed-model")


@flow(name="recalibrate-nightly", log_prints=True, persist_result=False)
def recalibrate_flow(
    artifacts: list[str] = [],  # noqa: B006 - Prefect copies parameters
    calibration: FreshCalibration = FreshCalibration(),
    recipe_override: str = "",
    gate: GateThresholds = GateThresholds(),
    destinations: Destinations = Destinations(),
) -> dict:
    """Re-calibrate every production artifact on fresh data; promote each candidate that passes the gate.

    Args:
        artifacts: Registry refs (s3:// URI, model/recipe@alias, model/recipe/id); empty = every entry
            aliased production.
        calibration: Fresh calibration text and how much of it to sample; empty fields = production's.
        recipe_override: Run this recipe (preset or YAML) instead of production's, e.g. to try a new recipe
            against production; empty = production's own recipe.
        gate: When a candidate may replace production (per held-out split).
        destinations: Artifact store and registry (publish=false: decide and record, publish nothing).
    """
    logger = get_run_logger()
    store = destinations.apply_blocks() or default_store_uri()
    registry = pipeline.registry_for(destinations.registry)
    reg = Registry(registry)
    todo = [prepare(reg, uri, calibration, recipe_override) for uri in production_entries(reg, artifacts)]
    decisions = []
    for one in todo:  # every candidate preflighted above: all valid, or none runs
        decisions.append(_recalibrate_one(store, registry, one, gate, bool(recipe_override),
                                          destinations.publish, logger))
    return {"decisions": decisions}


def _recalibrate_one(store: str, registry: str, rc: Recalibration, thresholds: GateThresholds, override: bool,
                     publish: bool, logger) -> dict:
    job, m = rc.job, rc.job.model
    logger.info("re-calibrating %s (%s) with %s on %s", rc.production_uri, m.name, job.recipe.name,
                job.calibration.source)
    # The compress flow's own plan, without its publish stage (the gate decides what is published).
    out = pipeline.by_role(job, dag.run(dag.plan(job), store, prefect_call))
    calib, baseline, artifact = out["calib"], out["baseline"], out["artifact"]
    s = open_store(store)
    production = dag.Stage(f"{job.recipe.name}/evaluate-production", "evaluate")
    production_metrics = s.get_json(prefect_call(store, production, {
        "model": m, "packed": packed_files(s, rc.production_dir), "spec": job.evaluation,
        "recipe": rc.production_recipe, "texts_sha256": job.evaluation_sha256}))
    candidate_metrics = pipeline.artifact_json(s, artifact, MANIFEST)["metrics"]

    decision = gate_lib.decide(candidate_metrics, production_metrics, thresholds)
    block = gate_lib.record(
        decision, thresholds, candidate=candidate_metrics, base=s.get_json(baseline),
        production={"uri": rc.production_uri, "artifact_id": rc.production_id, "metrics": production_metrics},
        calibration=CalibrationSet.get(s, calib).provenance, recipe=job.recipe.name, recipe_override=override,
        evaluation=job.evaluation)
    gated = stamp_gate(store, artifact, block)
    entry = publish_candidate(store, gated, registry, decision["passed"]) if publish else None
    uri = entry["uri"] if entry else None
    create_markdown_artifact(key=table_artifact_key("recalibrate", f"{m.name}-{rc.production_recipe}"),
                             markdown=gate_lib.render_markdown(block, uri),
                             description=f"{m.name} · {job.recipe.name}: {block['decision']}")
    logger.info("%s: %s (%s)", rc.production_uri, block["decision"], block["reason"])
    return {"production": rc.production_uri, "candidate": uri,
            "candidate_artifact_id": pipeline.artifact_json(s, gated, MANIFEST)["artifact_id"],
            "store_ref": gated.model_dump(), "passed": decision["passed"], "decision": block["decision"],
            "reason": block["reason"], "aliases": entry["aliases"] if entry else []}

"""The six-stage compression DAG: calibrate -> saliency -> compress (one task per block) -> pack ->
evaluate -> publish. Every task is cached on its inputs, so a run that crashed resumes where it stopped.
"""
from __future__ import annotations

import re
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from squeezeflow import pipeline, progress
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef, RecipeSpec
from squeezeflow.flows.run_progress import flow_progress
from squeezeflow.runners import block_annotations
from squeezeflow.settings import store_uri as default_store_uri
from squeezeflow.store import open_store
from squeezeflow.tasks.calibrate import calibrate
from squeezeflow.tasks.compress import compress_block, compress_sequential
from squeezeflow.tasks.evaluate import evaluate
from squeezeflow.tasks.pack import pack
from squeezeflow.tasks.publish import assemble, publish
from squeezeflow.tasks.restructure import restructure
from squeezeflow.tasks.saliency import saliency
from squeezeflow.tasks.transform import transform
from squeezeflow.tasks.tune import tune


class Destinations(BaseModel):
    """Where results go. Empty = the defaults (local store in the cache, embedded S3 registry)."""

    store: str = Field("", description="Artifact store: local directory or s3://bucket/prefix")
    registry: str = Field("", description="Registry: s3://bucket/prefix; empty = embedded SeaweedFS")
    publish: bool = True


def compress_recipe(store: str, plan: pipeline.Plan, calib, stats: dict, baseline, registry: str | None,
                    run: progress.RunProgress | None = None):
    """compress -> pack -> evaluate -> assemble -> publish for one recipe, given the shared stages'
    outputs. Called inside a flow (this one or the sweep); returns (artifact ref, registry entry).
    `run` (optional) is told when each stage starts, for the progress artifact and the CLI bar."""
    def stage(what: str) -> None:
        if run is not None:
            run.stage(f"{what} {plan.recipe.name}")

    m = plan.model
    stage("compress")  # layer removal and transforms count as part of compression
    # Only the statistics this recipe declared: same cache keys and lineage as a single-recipe run.
    stats = {k: v for k, v in stats.items() if k in plan.statistics}
    wplan = plan
    if plan.structural:  # layer removal first; the weight method then sees the shallower model
        for config in plan.recipe.methods[:plan.structural]:
            step = restructure(store, m, config, calib)
            m = step.model
        wplan = pipeline.weight_plan(plan, m)
        if wplan is not None:  # its statistics are collected on the model as it now stands
            stats = saliency(store, m, calib, wplan.statistics)
    if wplan is None:  # removal only: the artifact is the shallower plain checkpoint
        blocks, packed = [], step.ref
    else:
        if wplan.transform:
            m = transform(store, m, wplan.recipe, stats, calib)
        if wplan.sequential:
            blocks = compress_sequential(store, m, wplan.recipe, calib, stats)
        else:  # layer-wise: one task per block, so a crash loses at most one block and a cluster can fan out
            with block_annotations():  # on Dask with GPU workers: one GPU per block task; else a no-op
                futures = [compress_block.submit(store, m, i, wplan.recipe, stats) for i in range(m.num_layers)]
            blocks = []
            for f in futures:  # in block order: the count only moves when the next block in line is done
                blocks.append(f.result())
                progress.report("compress", len(blocks), m.num_layers)
        stage("pack")
        packed = pack(store, m, wplan.recipe, blocks)
        if wplan.tune:
            packed = tune(store, m, wplan.recipe, calib, packed)
    stage("evaluate")
    metrics = evaluate(store, plan.model, packed, plan.evaluation, plan.recipe.name)
    stage("publish")
    artifact = assemble(store, plan, calib, stats, blocks, packed, metrics, baseline)
    entry = publish(store, artifact, registry) if registry else None
    return artifact, entry


def table_artifact_key(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', name.lower())}"


@flow(name="compress", log_prints=True, persist_result=False)
def compress_flow(
    model: ModelRef = ModelRef(),
    recipe: RecipeSpec = "rtn-w4g64",
    calibration: CalibrationSpec = CalibrationSpec(),
    evaluation: EvalSpec = EvalSpec(),
    destinations: Destinations = Destinations(),
) -> dict:
    """Compress `model` with `recipe` (a preset such as rtn-w4g64 / rtn-w3g64, or a recipe YAML path).

    Args:
        model: The model to compress: a prepared name, a local HF directory, a registry alias or s3:// URI.
        recipe: A preset from the list, or (other tab) any preset of the same families or a recipe YAML path.
        calibration: Calibration text and how many windows of it the statistics are collected on.
        evaluation: Held-out perplexity protocol, run on the packed model loaded back from its files.
        destinations: Artifact store and S3 registry (empty = the defaults); publish off to skip the registry.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    plan = pipeline.preflight(model, recipe, calibration, evaluation)
    store = destinations.store or default_store_uri()
    registry = pipeline.registry_for(destinations.registry) if destinations.publish else None
    m = plan.model
    logger.info("compressing %s (%s) with %s", m.name, m.fingerprint[:12], plan.recipe.name)

    with flow_progress(table_artifact_key("compress-progress", plan.recipe.name), [plan.recipe.name],
                       f"{m.name} · {plan.recipe.name}: progress") as run:
        run.stage("calibrate")
        calib = calibrate(store, m, plan.calibration)
        run.stage("saliency")
        stats = saliency(store, m, calib, plan.statistics)
        run.stage("evaluate fp32")
        baseline = evaluate(store, m, None, plan.evaluation, "fp32")
        artifact, entry = compress_recipe(store, plan, calib, stats, baseline, registry, run)
        run.done()

    result = pipeline.summarize(open_store(store), artifact, entry, time.perf_counter() - started)
    create_table_artifact(key=table_artifact_key("compress", plan.recipe.name),
                          table=pipeline.table_rows(result), description=f"{m.name} · {plan.recipe.name}")
    return result

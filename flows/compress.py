"""The compress flow: preflight, then the job's plan (squeezeflow/dag.py) as Prefect tasks; a crashed run resumes."""
from __future__ import annotations

import re
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from squeezeflow import dag, pipeline
from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from squeezeflow.flows.destinations import Destinations  # noqa: F401  (other flows and the CLI import it here)
from squeezeflow.flows.run_progress import flow_progress
from squeezeflow.recipes import RecipeSpec
from squeezeflow.settings import store_uri as default_store_uri
from squeezeflow.store import open_store
from squeezeflow.tasks.stages import prefect_call


def table_artifact_key(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', name.lower())}"


def run_plan(stages: list[dag.Stage], store: str, key: str, title: str) -> dict:
    """dag.run through Prefect tasks, with the run's progress bar as a Prefect artifact."""
    with flow_progress(key, stages, title) as progress:
        outputs = dag.run(stages, store, prefect_call, on_stage=progress.stage_started)
        progress.done()
    return outputs


@flow(name="compress", log_prints=True, persist_result=False)
def compress_flow(model: ModelRef = ModelRef(), recipe: RecipeSpec = "rtn-w4g64",
                  calibration: CalibrationSpec = CalibrationSpec(), evaluation: EvalSpec = EvalSpec(),
                  destinations: Destinations = Destinations(), compute: ComputeSpec = ComputeSpec()) -> dict:
    """Compress `model` with `recipe` (a preset such as rtn-w4g64, or a recipe YAML path).

    Args:
        model: The model to compress: a prepared name, a local HF directory, a registry alias or s3:// URI.
        recipe: A preset from the list, or (other tab) any preset of the same families or a recipe YAML path.
        calibration: Calibration text and how many windows of it the statistics are collected on.
        evaluation: Held-out perplexity protocol, run on the packed model loaded back from its files.
        destinations: Artifact store and S3 registry (empty = the defaults); publish off to skip the registry.
        compute: Device (auto = one GPU when present; cuda = every visible GPU) and precision the stages compute in.
    """
    store = destinations.apply_blocks() or default_store_uri()  # first: preflight may read s3://
    started, job = time.perf_counter(), pipeline.preflight(model, recipe, calibration, evaluation, compute,
                                                               destinations.max_shard_size)
    registry = pipeline.registry_for(destinations.registry) if destinations.publish else None
    get_run_logger().info("compressing %s (%s) with %s on %s", job.model.name, job.model.fingerprint[:12],
                          job.recipe.name, job.compute.device)
    outputs = run_plan(dag.plan(job, registry), store, table_artifact_key("compress-progress", job.recipe.name),
                       f"{job.model.name} · {job.recipe.name}: progress")
    out = pipeline.by_role(job, outputs)
    result = pipeline.summarize(open_store(store), out["artifact"], out["entry"], time.perf_counter() - started)
    create_table_artifact(key=table_artifact_key("compress", job.recipe.name), table=pipeline.table_rows(result),
                          description=f"{job.model.name} · {job.recipe.name}")
    return result

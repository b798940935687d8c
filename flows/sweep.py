"""Many recipes on one model in one flow run. One plan (squeezeflow/dag.py): calibration, the
statistics pass (the union of every recipe's statistics, one streamed pass) and the fp32 baseline run
once; each recipe then runs its own compress -> pack -> evaluate -> publish. The result is a comparison table (markdown, CSV, JSON) and two
plots (perplexity vs effective bits; per-layer reconstruction error), stored as one tree in the store and
shown as Prefect table and markdown artifacts."""
from __future__ import annotations

import base64
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from squeezeflow import dag, pipeline
from squeezeflow.config import CalibrationSpec, ComputeSpec, EvalSpec, ModelRef
from squeezeflow.evaluation import plots
from squeezeflow.evaluation.comparison import comparison_files
from squeezeflow.flows.compress import Destinations, run_plan, table_artifact_key
from squeezeflow.recipes import RecipeSpec
from squeezeflow.settings import store_uri as default_store_uri
from squeezeflow.store import open_store


@flow(name="sweep", log_prints=True, persist_result=False)
def sweep_flow(
    model: ModelRef = ModelRef(),
    recipes: list[RecipeSpec] = ["rtn-w4g64", "rtn-w3g64", "gptq-w3g64"],  # noqa: B006 - Prefect copies parameters
    calibration: CalibrationSpec = CalibrationSpec(),
    evaluation: EvalSpec = EvalSpec(),
    destinations: Destinations = Destinations(),
    compute: ComputeSpec = ComputeSpec(),
) -> dict:
    """Compress `model` with every recipe in `recipes` and compare them against the fp32 baseline.

    Args:
        model: The model to compress: a prepared name, a local HF directory, a registry alias or s3:// URI.
        recipes: Recipes to compare: presets from the list, other presets of the same families, or YAML paths.
        calibration: Calibration text, shared by every recipe (one statistics pass for all of them).
        evaluation: Held-out perplexity protocol, run on each packed model loaded back from its files.
        destinations: Artifact store and S3 registry (empty = the defaults); publish off to skip the registry.
        compute: Device (auto = one GPU when present; cuda = every visible GPU) and precision the stages compute in.
    """
    started, store = time.perf_counter(), destinations.apply_blocks() or default_store_uri()
    jobs = [pipeline.preflight(model, r, calibration, evaluation, compute, destinations.max_shard_size)
            for r in recipes]  # all valid, or none runs
    registry = pipeline.registry_for(destinations.registry) if destinations.publish else None
    m = jobs[0].model
    stages = dag.plan(jobs, registry)  # one calibration, one statistics pass, one fp32 baseline for all
    get_run_logger().info("sweep of %d recipes on %s; statistics %s", len(jobs), m.name, stages[1].inputs["statistics"])
    outputs = run_plan(stages, store, table_artifact_key("sweep-progress", m.name),
                       f"{m.name}: sweep progress")
    results = []
    for job in jobs:
        out = pipeline.by_role(job, outputs)
        results.append(pipeline.summarize(open_store(store), out["artifact"], out["entry"], time.perf_counter() - started))

    metrics = [results[0]["results"][0]] + [r["results"][1] for r in results]
    errors = {r["results"][1]["recipe"]: pipeline.artifact_json(open_store(store), r["artifact"], "report/layer_errors.json")
              for r in results}
    files = comparison_files(metrics)
    files["plots/perplexity_vs_bits.png"] = plots.perplexity_vs_bits(metrics)
    files["plots/layer_errors.png"] = plots.layer_errors(errors)
    report = open_store(store).put_tree({name: open_store(store).put_bytes(data, "file")
                                         for name, data in files.items()}, kind="sweep-report")
    create_table_artifact(key=table_artifact_key("sweep", m.name), table=pipeline.table_rows({"results": metrics}),
                          description=f"{m.name}: {', '.join(recipes)}")
    images = "\n\n".join(f"![{name}](data:image/png;base64,{base64.b64encode(files[name]).decode()})"
                           for name in ("plots/perplexity_vs_bits.png", "plots/layer_errors.png"))
    create_markdown_artifact(key=table_artifact_key("sweep-report", m.name),
                             markdown=files["comparison.md"].decode() + "\n" + images)
    return {"results": metrics, "artifacts": [r["artifact"] for r in results], "report": report.model_dump()}

"""The library's entry point, without Prefect: preflight a job, plan its stages, run them.

    job = pipeline.preflight(ModelRef(ref="smollm2-135m"), "rtn-w4g64", CalibrationSpec(), EvalSpec())
    out = pipeline.run_job(job, LocalStore("store"))        # {"packed": Ref, "artifact": Ref, ...}

The graph itself lives in squeezeflow/dag.py (the flow runs the same plan through Prefect tasks); the
stage functions in squeezeflow/stages/. The names below are re-exported for library users and tests.
"""
from __future__ import annotations

from typing import Any

from .dag import Stage, Use, execute, plan, probe, run
from .job import Job, ModelInfo, preflight, structural_count, target_linears
from .memo import STAGE_VERSIONS
from .stages.assemble import artifact_json, assemble, publish, registry_for, summarize, table_rows
from .stages.calibrate import calibrate, statistics
from .stages.compress import compress_block, compress_sequential, compress_weights, linear_stats, transform
from .stages.evaluate import eval_protocol, evaluate, evaluate_path
from .stages.pack import pack, tune
from .stages.restructure import StructureStep, restructure, structure_round
from .store import ArtifactStore


def run_job(job: Job, store: ArtifactStore | str, registry: str | None = None, until: str | None = None,
            on_stage=None) -> dict[str, Any]:
    """Run `job`'s plan with plain calls; `until` stops after the first stage of that kind (e.g. "pack").
    Returns the outputs by role: calib, stats, steps, blocks, packed, baseline, metrics, artifact, entry."""
    stages = plan(job, registry)
    if until is not None:
        last = max(i for i, s in enumerate(stages) if s.kind == until or s.id.endswith("/" + until))
        stages = stages[:last + 1]
    out = run(stages, store, on_stage=on_stage)
    return by_role(job, out)


def by_role(job: Job, outputs: dict[str, Any]) -> dict[str, Any]:
    """The outputs of one job's stages under role names (what tests, benchmarks and the flow read)."""
    r = job.recipe.name
    blocks = outputs.get(f"{r}/compress")
    if blocks is None:
        blocks = [outputs[k] for k in sorted((k for k in outputs if k.startswith(f"{r}/compress[")),
                                             key=lambda k: int(k.split("[")[1].rstrip("]")))]
    steps = [outputs[f"{r}/restructure[{i}]"] for i in range(job.structural) if f"{r}/restructure[{i}]" in outputs]
    packed = outputs.get(f"{r}/tune", outputs.get(f"{r}/pack"))
    if packed is None and steps and job.weight_recipe is None:
        packed = steps[-1].ref
    stats = outputs.get(f"{r}/statistics", outputs.get("statistics"))
    if stats is not None and f"{r}/statistics" not in outputs:
        stats = {k: v for k, v in stats.items() if k in job.statistics}
    return {"calib": outputs.get("calibrate"), "stats": stats, "steps": steps, "blocks": blocks, "packed": packed,
            "baseline": outputs.get("evaluate-fp32"), "metrics": outputs.get(f"{r}/evaluate"),
            "artifact": outputs.get(f"{r}/assemble"), "entry": outputs.get(f"{r}/publish")}


def compress_to_packed(store: ArtifactStore, job: Job, calib=None, stats=None) -> tuple[list, Any]:
    """[restructure] -> [transform] -> compress -> pack -> [tune] with plain calls: (blocks, packed).
    `calib` and `stats` are accepted for older callers; the plan computes (or finds) them itself."""
    out = run_job(job, store, until="tune" if job.tunes else ("pack" if job.weight_recipe else "restructure"))
    return out["blocks"], out["packed"]


# The older name of the statistics stage.
saliency = statistics

__all__ = ["STAGE_VERSIONS", "ArtifactStore", "Job", "ModelInfo", "Stage", "StructureStep", "Use", "artifact_json",
           "assemble", "by_role", "calibrate", "compress_block", "compress_sequential", "compress_to_packed",
           "compress_weights", "eval_protocol", "evaluate", "evaluate_path", "execute", "linear_stats", "pack",
           "plan", "preflight", "probe", "publish", "registry_for", "restructure", "run", "run_job", "saliency",
           "statistics", "structural_count", "structure_round", "summarize", "table_rows", "target_linears",
           "transform", "tune"]

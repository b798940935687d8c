"""The compression graph, once: a Job becomes a typed list of stages, and ONE loop runs them.

    calibrate -> statistics -> evaluate fp32 -> [restructure]* -> [statistics] -> [transform]
      -> compress (one stage per block, or one sequential stage) -> pack -> [tune] -> evaluate
      -> assemble -> [publish]

How a stage is called is the caller's business: `call_plain` runs it here (tests, benchmarks, library
users); the Prefect flow passes a caller that runs each stage as a task and fans per-block stages out.
Either way a stage runs through `execute`, which remembers its output in the store under its inputs'
key (squeezeflow/memo.py): a rerun finds every finished stage, whoever ran it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from . import memo
from .job import Job
from .shards import DEFAULT_MAX_SHARD_BYTES
from .stages import STAGE_FUNCTIONS
from .store import ArtifactStore, open_store


@dataclass(frozen=True)
class Use:
    """An input that is an earlier stage's output (`pick`: only these keys of a dict output; `attr`: one
    attribute of it)."""

    stage: str
    pick: tuple[str, ...] | None = None
    attr: str | None = None


@dataclass(frozen=True)
class Stage:
    id: str                      # unique in the plan, e.g. "rtn-w4g64/compress[3]"
    kind: str                    # a key of stages.STAGE_FUNCTIONS
    inputs: dict[str, Any] = field(default_factory=dict)  # values, Use(...) or lists of Use(...)
    fan_out: bool = False        # independent of its siblings: a caller may run them concurrently
    label: str = ""              # what progress displays ("compress rtn-w4g64")

    @property
    def after(self) -> list[str]:
        return sorted({u.stage for u in _uses(self.inputs)})


def _uses(value) -> list[Use]:
    if isinstance(value, Use):
        return [value]
    if isinstance(value, dict):
        return [u for v in value.values() for u in _uses(v)]
    if isinstance(value, (list, tuple)):
        return [u for v in value for u in _uses(v)]
    return []


def plan(jobs: Job | list[Job], registry: str | None = None) -> list[Stage]:
    """The stages of one job, or of several jobs on the same model sharing calibration, one statistics
    pass (the union of what they need) and the fp32 baseline (a sweep)."""
    jobs = [jobs] if isinstance(jobs, Job) else list(jobs)
    first = jobs[0]
    m = first.model
    stages = [Stage("calibrate", "calibrate", {"model": m, "spec": first.calibration,
                                               "text_sha256": first.calibration_sha256}, label="calibrate"),
              Stage("statistics", "statistics", {"model": m, "calib": Use("calibrate"),
                                                 "statistics": tuple(sorted({s for j in jobs for s in j.statistics}))},
                    label="statistics"),
              Stage("evaluate-fp32", "evaluate", {"model": m, "packed": None, "spec": first.evaluation, "recipe": "fp32",
                                                  "texts_sha256": first.evaluation_sha256}, label="evaluate fp32")]
    for job in jobs:
        stages += _recipe_stages(job, registry)
    return stages


def _recipe_stages(job: Job, registry: str | None) -> list[Stage]:
    r = job.recipe.name
    out: list[Stage] = []

    def add(name: str, kind: str, inputs: dict, what: str, fan_out: bool = False) -> Use:
        out.append(Stage(f"{r}/{name}", kind, inputs, fan_out, f"{what} {r}"))
        return Use(f"{r}/{name}")

    calib = Use("calibrate")
    stats = Use("statistics", pick=job.statistics)
    model, steps = job.model, []
    for i, config in enumerate(job.recipe.methods[:job.structural]):
        step = add(f"restructure[{i}]", "restructure", {"model": model, "config": config, "calib": calib}, "compress")
        steps.append(step)
        model = Use(step.stage, attr="model")
    weights = job.weight_recipe
    blocks: list | Use = []
    if weights is None:  # layer removal only: the artifact is the shallower plain checkpoint
        packed = Use(steps[-1].stage, attr="ref")
    else:
        if job.structural:  # the weight method's statistics, on the model as it now stands
            stats = add("statistics", "statistics", {"model": model, "calib": calib,
                                                     "statistics": job.weight_statistics}, "compress")
        if job.transforms:
            model = add("transform", "transform", {"model": model, "recipe": weights, "stats": stats, "calib": calib},
                        "compress")
        if job.sequential:
            blocks = add("compress", "compress-sequential", {"model": model, "recipe": weights, "calib": calib,
                                                             "stats": stats}, "compress")
        else:
            blocks = [add(f"compress[{b}]", "compress-block", {"model": model, "block": b, "recipe": weights,
                                                               "stats": stats}, "compress", fan_out=True)
                      for b in range(job.layers_after)]
        pack_inputs = {"model": model, "recipe": weights, "blocks": blocks}
        if job.max_shard_size != DEFAULT_MAX_SHARD_BYTES:  # the default keeps the keys runs had before
            pack_inputs["max_shard_size"] = job.max_shard_size
        packed = add("pack", "pack", pack_inputs, "pack")
        if job.tunes:
            packed = add("tune", "tune", {"model": model, "recipe": weights, "calib": calib, "packed": packed}, "pack")
    metrics = add("evaluate", "evaluate", {"model": job.model, "packed": packed, "spec": job.evaluation, "recipe": r,
                                           "texts_sha256": job.evaluation_sha256}, "evaluate")
    artifact = add("assemble", "assemble", {"job": job, "calib": calib, "stats": stats, "blocks": blocks,
                                            "packed": packed, "metrics": metrics, "baseline": Use("evaluate-fp32"),
                                            "steps": steps}, "publish")
    if registry:
        add("publish", "publish", {"artifact": artifact, "registry": registry}, "publish")
    return out


# ------------------------------------------------------------------------------------------------
# Running a stage, and the loop
# ------------------------------------------------------------------------------------------------
def stage_key(kind: str, inputs: dict) -> str | None:
    version = STAGE_FUNCTIONS[kind].version
    return None if version is None else memo.stage_key(version, {"kind": kind, **inputs})


def execute(store: str | ArtifactStore, kind: str, inputs: dict) -> tuple[Any, bool]:
    """Run one stage on resolved inputs unless its output is remembered: (output, was it remembered)."""
    store = open_store(store) if isinstance(store, str) else store
    fn = STAGE_FUNCTIONS[kind]
    key = stage_key(kind, inputs)
    if key is None:
        return fn.fn(store, **inputs), False
    value, hit = memo.remembered(store, key, fn.output, lambda: fn.fn(store, **inputs))
    return (_revived(value, store) if hit else value), hit


def _revived(value, store: ArtifactStore):
    """A remembered model derived in the store is materialized again (scratch may have been cleaned)."""
    return value.revived(store) if hasattr(value, "revived") else value


class Caller(Protocol):
    """How the loop calls a stage: returns its output, or a future with `.result()`."""

    def __call__(self, store: str, stage: Stage, inputs: dict) -> Any: ...


def call_plain(store: str | ArtifactStore, stage: Stage, inputs: dict) -> Any:
    return execute(store, stage.kind, inputs)[0]


def resolve(value, outputs: dict[str, Any]):
    """`value` with every Use replaced by the output it names (waiting on futures)."""
    if isinstance(value, Use):
        out = outputs[value.stage]
        if hasattr(out, "result") and callable(out.result):
            out = outputs[value.stage] = out.result()
        if value.pick is not None:
            out = {k: v for k, v in out.items() if k in value.pick}
        return getattr(out, value.attr) if value.attr else out
    if isinstance(value, dict):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    return value


def run(stages: list[Stage], store: str | ArtifactStore, call: Caller = call_plain,
        on_stage: Callable[[Stage], None] | None = None) -> dict[str, Any]:
    """Run every stage in order; returns {stage id: output}. Fan-out stages come back from the caller as
    futures; the first stage that needs one waits for it."""
    outputs: dict[str, Any] = {}
    for stage in stages:
        if on_stage is not None:
            on_stage(stage)
        outputs[stage.id] = call(store, stage, resolve(stage.inputs, outputs))
    return {k: resolve(Use(k), outputs) for k in outputs}


def probe(stages: list[Stage], store: str | ArtifactStore) -> list[dict]:
    """What `run` would do now, computing nothing: each stage's inputs, cache key and whether its output
    is remembered. A stage whose inputs come from a stage not yet run has no key yet."""
    store = open_store(store) if isinstance(store, str) else store
    outputs: dict[str, Any] = {}
    rows = []
    for stage in stages:
        row = {"id": stage.id, "kind": stage.kind, "after": stage.after, "key": None, "cached": False,
               "ready": all(u in outputs for u in stage.after)}
        if row["ready"]:
            inputs = resolve(stage.inputs, outputs)
            row["key"] = stage_key(stage.kind, inputs)
            if row["key"] is not None:
                found = memo.lookup(store, row["key"], STAGE_FUNCTIONS[stage.kind].output)
                if found is not None:
                    outputs[stage.id], row["cached"] = found, True
        rows.append(row)
    return rows

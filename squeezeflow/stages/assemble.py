"""The publishable artifact (packed files + report/ + manifest.json with lineage), publishing it, and the
run's summary."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..job import Job
from ..provenance import code_version, library_versions
from ..stats import StatsRef
from ..store import ArtifactStore, Ref, canonical_json
from .pack import FORMAT_VERSION
from .restructure import StructureStep, chain_lineage, chain_report


def assemble(store: ArtifactStore, job: Job, calib: Ref, stats: dict[str, StatsRef], blocks: list[Ref],
             packed: Ref, metrics: Ref, baseline: Ref, steps: list[StructureStep] = ()) -> Ref:
    """The publishable artifact: packed files + report/ + manifest.json (lineage, metrics, every file's
    sha256). Its id is a hash of its content, so identical runs give identical artifacts."""
    from ..calibration import CalibrationSet
    from ..compatibility import compatibility
    from ..evaluation.report import render
    from ..modelcard import write_model_card
    from ..registry import content_id
    from ..store import sha256_file

    m, base = store.get_json(metrics), store.get_json(baseline)
    layer_errors = {}
    for i, ref in enumerate(blocks):
        for name, info in sorted(json.loads(store.get_tensors_metadata(ref)["layers"]).items()):
            layer_errors[f"model.layers.{i}.{name}"] = {k: v for k, v in info.items() if k.endswith("_err")}
    lineage = {
        "model": {"name": job.model.name, "ref": job.model.ref, "fingerprint": job.model.fingerprint},
        "recipe": job.recipe.model_dump(mode="json"),
        # Where and in which precision it was computed (resolved: `auto` is recorded as what it chose).
        "compute": job.compute.model_dump(mode="json"),
        "calibration": CalibrationSet.get(store, calib).provenance,
        "statistics": {name: s.key for name, s in sorted(stats.items())},
        "stage_outputs": {"calibrate": calib.sha256, "compress": [b.sha256 for b in blocks],
                          "pack": packed.sha256, "evaluate": metrics.sha256},
        "code": code_version(),
        "libraries": library_versions(),
        "seed": job.calibration.seed,
    }
    if job.structural:
        lineage["chain"] = chain_lineage(store, job, list(steps))
    fallback = moe_fallback(store, blocks)
    if fallback:
        lineage["moe_fallback"] = fallback
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        shutil.copytree(store.materialize(packed), out)
        # In the lineage, so the content id covers it like everything else the manifest claims.
        lineage["compatibility"] = compatibility(out)
        (out / "report").mkdir()
        (out / "report" / "metrics.json").write_bytes(canonical_json({"results": [base, m]}))
        (out / "report" / "layer_errors.json").write_bytes(canonical_json(layer_errors))
        (out / "report" / "report.md").write_text(render(m, base, lineage, layer_errors)
                                                  + (chain_report(lineage["chain"], m) if job.structural else ""))
        write_model_card(out, lineage, m, base)   # README.md, listed in the manifest like every file
        files = {p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(out.rglob("*")) if p.is_file()}
        artifact_id = content_id(files, lineage)
        manifest = {"format_version": FORMAT_VERSION, "artifact_id": artifact_id, "model": job.model.name,
                    "recipe": job.recipe.name, "lineage": lineage, "metrics": m, "baseline": base, "files": files}
        (out / "manifest.json").write_bytes(canonical_json(manifest))
        return store.put_dir(out, kind="artifact")


def moe_fallback(store: ArtifactStore, blocks: list[Ref]) -> dict | None:
    """The MoE experts whose statistics came from the dense fallback (squeezeflow/moe.py), by block."""
    from ..moe import FALLBACK_RULE, MIN_ROUTED_TOKENS

    experts = [{"layer": i, **f} for i, ref in enumerate(blocks)
               for f in json.loads(store.get_tensors_metadata(ref).get("moe_fallback", "[]"))]
    return {"rule": FALLBACK_RULE, "min_routed_tokens": MIN_ROUTED_TOKENS, "experts": experts} if experts else None


def publish(store: ArtifactStore, artifact: Ref, registry: str) -> dict:
    """Upload to the registry (manifest last) and move the `latest` alias; idempotent."""
    from ..registry import Registry

    path = store.materialize(artifact)
    manifest = json.loads((path / "manifest.json").read_text())
    entry = Registry(registry).publish(path, manifest["model"], manifest["recipe"], manifest["artifact_id"])
    return {"uri": entry.uri, "artifact_id": manifest["artifact_id"], "model": manifest["model"],
            "recipe": manifest["recipe"]}


def registry_for(uri: str | None) -> str:
    """The registry to publish to (empty = SQUEEZEFLOW_REGISTRY, else the embedded server), checked
    reachable now, as part of preflight."""
    from ..registry import open_registry
    from ..s3 import check_reachable

    registry = open_registry(uri or None)
    check_reachable(registry.uri)
    return registry.uri


def summarize(store: ArtifactStore, artifact: Ref, entry: dict | None, wall_s: float) -> dict:
    """A run's result: the metrics schema of ARCHITECTURE.md for the base model and the artifact."""
    manifest = artifact_json(store, artifact, "manifest.json")
    uri = entry["uri"] if entry else None
    result = dict(manifest["metrics"], uri=uri)
    result["speed"] = dict(result.get("speed") or {}, flow_wall_s=round(wall_s, 2))
    return {"artifact": {"uri": uri, "artifact_id": manifest["artifact_id"], "store_ref": artifact.model_dump()},
            "results": [manifest["baseline"], result]}


def artifact_json(store: ArtifactStore, artifact: Ref | dict, path: str):
    """One JSON file of an artifact tree in the store (e.g. report/layer_errors.json)."""
    ref = artifact if isinstance(artifact, Ref) else Ref(**artifact.get("store_ref", artifact))
    return json.loads(store.get_bytes(store.get_tree(ref)[path]))


def table_rows(result: dict) -> list[dict]:
    rows = []
    for m in result["results"]:
        row = {"recipe": m["recipe"], **{f"ppl {k}": round(v, 3) for k, v in m["perplexity"].items()},
               "bits/weight": round(m["bits_per_weight"], 3), "sparsity": round(m.get("weight_sparsity", 0.0), 3),
               "size MiB": round(m["size_bytes"] / 2**20, 1)}
        if "flow_wall_s" in (m.get("speed") or {}):
            row["wall s"] = m["speed"]["flow_wall_s"]
        rows.append(row)
    return rows

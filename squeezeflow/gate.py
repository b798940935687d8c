"""The quality gate of nightly re-calibration: may a freshly calibrated candidate replace production?

The candidate, the current production artifact and the base model are evaluated on the same protocol
(production's recorded one), and the candidate passes only if, on every held-out split, its perplexity is
at most `max_ppl_increase` above production's and its KL to the base model within the KL limits. The
decision, with every input, threshold and number, becomes a `gate` block in the candidate's lineage before
it is published: manifests are content-addressed, so the record cannot be edited afterwards without the
artifact failing its identity check. Nothing here reads the clock, so the same inputs give the same bytes.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import CalibrationSpec, EvalSpec, Spec
from .errors import BadInput
from .store import ArtifactStore, Ref, canonical_json, sha256_file

GATE_VERSION = 1
# KL is recorded to 8 decimals; below this, differences between two near-lossless artifacts are rounding.
KL_ABS_TOLERANCE = 1e-6


class GateThresholds(Spec):
    """When a candidate may replace production. Per held-out split, all must hold."""

    max_ppl_increase: float = Field(0.01, ge=0.0, le=1.0,
                                    description="Max relative perplexity increase over production (0.01 = +1%)")
    max_kl_increase: float | None = Field(0.10, ge=0.0, le=100.0,
                                          description="Max relative increase of KL to the base model over "
                                                      "production's (null = not checked)")
    max_kl: float | None = Field(None, ge=0.0, description="Absolute ceiling on KL to the base model, nats per "
                                                           "token (null = none)")


class FreshCalibration(Spec):
    """Where the new calibration text comes from and how much of it to sample. Empty fields take the
    production artifact's recorded values, so the candidate differs from production only in its data."""

    source: str = Field("", description="New text: s3:// prefix, directory or .txt/.jsonl file, or a named split; "
                                        "empty = re-read the source production was calibrated on")
    n_samples: int | None = Field(None, ge=1, le=100_000, description="Calibration windows (empty = production's)")
    seqlen: int | None = Field(None, ge=16, le=131_072, description="Tokens per window (empty = production's)")
    seed: int | None = Field(None, ge=0, description="Sampling seed (empty = production's)")

    def spec_for(self, recorded: dict) -> CalibrationSpec:
        """The CalibrationSpec for a candidate of an artifact whose calibration provenance is `recorded`."""
        def pick(mine, field):
            if mine not in (None, ""):
                return mine
            if recorded.get(field) in (None, ""):
                raise BadInput(f"production's calibration record has no {field!r}; give it explicitly")
            return recorded[field]

        return CalibrationSpec(source=pick(self.source, "source"), n_samples=pick(self.n_samples, "n"),
                               seqlen=pick(self.seqlen, "seqlen"), seed=pick(self.seed, "seed"))


def eval_spec(manifest: dict) -> EvalSpec:
    """The evaluation protocol production was measured with, from its manifest's metrics."""
    metrics = manifest.get("metrics") or {}
    protocols = (metrics.get("protocol") or {}).get("evaluation") or {}
    if not protocols:
        raise BadInput(f"artifact {manifest.get('artifact_id')} records no evaluation protocol; it cannot be "
                       "re-evaluated for the gate")
    seqlens = {p["seqlen"] for p in protocols.values()}
    if len(seqlens) != 1:
        raise BadInput(f"artifact {manifest.get('artifact_id')} was evaluated with several seqlens {sorted(seqlens)}")
    # Windows are chosen evenly spaced up to a cap; the recorded count reproduces the same selection.
    kl = [k["windows"] for k in (metrics.get("kl") or {}).values() if isinstance(k, dict) and "windows" in k]
    return EvalSpec(splits=tuple(protocols), seqlen=seqlens.pop(), max_windows=max(p["windows"] for p in protocols.values()),
                    kl_windows=max(kl) if kl else EvalSpec().kl_windows, cloze_items=0)


def check_recorded_texts(manifest: dict, texts_sha256: dict[str, str]) -> None:
    """Production's evaluation sources still hold the text it was measured on (`texts_sha256`: what
    preflight read from them now). A file or s3:// prefix edited since would have the gate compare both
    artifacts on other text than production's recorded numbers: one line naming the source instead."""
    protocols = manifest["metrics"]["protocol"]["evaluation"]
    changed = [split for split, p in protocols.items()
               if p.get("corpus_sha256") and texts_sha256.get(split) != p["corpus_sha256"]]
    if changed:
        split = changed[0]
        raise BadInput(f"evaluation source {split!r} no longer holds the text production was evaluated on "
                       f"(sha256 {str(texts_sha256.get(split))[:12]}… != recorded "
                       f"{protocols[split]['corpus_sha256'][:12]}…); restore it or re-compress production")


def _criterion(name: str, split: str, candidate, limit: float, production) -> dict[str, Any]:
    ok = isinstance(candidate, (int, float)) and math.isfinite(candidate) and candidate <= limit
    return {"criterion": name, "split": split, "candidate": candidate, "production": production,
            "limit": round(limit, 8), "passed": bool(ok)}


def decide(candidate: dict, production: dict, thresholds: GateThresholds) -> dict[str, Any]:
    """Pass/fail per criterion and overall, with a one-line reason. `candidate` and `production` are
    metrics (ARCHITECTURE.md schema) measured on the same protocol."""
    criteria = []
    for split, p in sorted(production["perplexity"].items()):
        c = candidate.get("perplexity", {}).get(split)
        criteria.append(_criterion("perplexity", split, c, p * (1 + thresholds.max_ppl_increase), p))
    for split, pk in sorted((production.get("kl") or {}).items()):
        c = (candidate.get("kl", {}).get(split) or {}).get("kl")
        if thresholds.max_kl_increase is not None:
            limit = pk["kl"] * (1 + thresholds.max_kl_increase) + KL_ABS_TOLERANCE
            criteria.append(_criterion("kl_vs_production", split, c, limit, pk["kl"]))
        if thresholds.max_kl is not None:
            criteria.append(_criterion("kl_max", split, c, thresholds.max_kl, pk["kl"]))
    if not criteria:
        raise BadInput("the gate has nothing to compare: production's metrics have no perplexity")
    failed = [c for c in criteria if not c["passed"]]
    if failed:
        reason = "; ".join(f"{c['criterion']} on {c['split']}: candidate {_fmt(c['candidate'])} > limit "
                           f"{_fmt(c['limit'])} (production {_fmt(c['production'])})" for c in failed)
    else:
        reason = f"all {len(criteria)} criteria within their limits"
    return {"passed": not failed, "reason": reason, "criteria": criteria}


def _fmt(x) -> str:
    return f"{x:.6g}" if isinstance(x, (int, float)) else str(x)


def record(decision: dict, thresholds: GateThresholds, *, production: dict, candidate: dict, base: dict,
           calibration: dict, recipe: str, recipe_override: bool, evaluation: EvalSpec) -> dict[str, Any]:
    """The `gate` block: everything needed to re-check the decision by hand."""
    def numbers(m: dict) -> dict:
        return {"perplexity": m.get("perplexity", {}), "kl": m.get("kl", {}),
                "bits_per_weight": m.get("bits_per_weight")}

    return {
        "version": GATE_VERSION,
        "decision": "promote" if decision["passed"] else "reject",
        "passed": decision["passed"],
        "reason": decision["reason"],
        "criteria": decision["criteria"],
        "thresholds": thresholds.model_dump(mode="json"),
        "inputs": {"recipe": recipe, "recipe_override": recipe_override, "calibration": calibration,
                   "evaluation": evaluation.model_dump(mode="json")},
        "production": {"uri": production["uri"], "artifact_id": production["artifact_id"],
                       "metrics": numbers(production["metrics"])},
        "candidate": {"metrics": numbers(candidate)},
        "base": {"metrics": numbers(base)},
    }


def render_markdown(gate: dict, candidate_uri: str | None) -> str:
    verdict = "PROMOTED to production" if gate["passed"] else "REJECTED (kept as alias `candidate`)"
    lines = [f"# Re-calibration gate: {verdict}", "",
             f"- production: `{gate['production']['uri']}`",
             f"- candidate: {f'`{candidate_uri}`' if candidate_uri else 'this artifact'} (recipe {gate['inputs']['recipe']}"
             + (", override" if gate["inputs"]["recipe_override"] else "") + ")",
             f"- calibration: {gate['inputs']['calibration'].get('source')} "
             f"(text sha256 {str(gate['inputs']['calibration'].get('text_sha256'))[:12]}…)",
             f"- reason: {gate['reason']}", "",
             "| criterion | split | candidate | production | limit | pass |", "|---|---|---|---|---|---|"]
    for c in gate["criteria"]:
        lines.append(f"| {c['criterion']} | {c['split']} | {_fmt(c['candidate'])} | {_fmt(c['production'])} | "
                     f"{_fmt(c['limit'])} | {'yes' if c['passed'] else '**no**'} |")
    base = gate["base"]["metrics"]["perplexity"]
    lines += ["", "base model perplexity: " + ", ".join(f"{s} {_fmt(v)}" for s, v in sorted(base.items())),
              "", "thresholds: " + json.dumps(gate["thresholds"], sort_keys=True)]
    return "\n".join(lines) + "\n"


def stamp(store: ArtifactStore, artifact: Ref, gate: dict) -> Ref:
    """A copy of an assembled artifact whose lineage carries the `gate` block (and report/gate.md), with
    its file list and content id recomputed: a new, self-consistent artifact."""
    from .registry import MANIFEST, content_id

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "artifact"
        shutil.copytree(store.materialize(artifact), out, ignore=shutil.ignore_patterns(".squeezeflow-complete"))
        manifest = json.loads((out / MANIFEST).read_bytes())
        (out / MANIFEST).unlink()
        (out / "report" / "gate.md").write_text(render_markdown(gate, None))
        lineage = dict(manifest["lineage"], gate=gate)
        files = {p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(out.rglob("*")) if p.is_file()}
        manifest.update(lineage=lineage, files=files, artifact_id=content_id(files, lineage))
        (out / MANIFEST).write_bytes(canonical_json(manifest))
        return store.put_dir(out, kind="artifact")

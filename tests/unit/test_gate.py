"""The re-calibration gate's decision, its inputs, and the sealed gate block (no servers, no model)."""
from __future__ import annotations

import json
import math

import pytest

from squeezeflow import gate
from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.gate import FreshCalibration, GateThresholds
from squeezeflow.registry import content_id, verify_dir
from squeezeflow.store import LocalStore, canonical_json, sha256_bytes

SPLITS = ("sotu-2000-2021", "moby-dick")


def metrics(ppl=(30.0, 70.0), kl=(0.010, 0.020)) -> dict:
    return {"perplexity": dict(zip(SPLITS, ppl)), "kl": {s: {"kl": k, "windows": 4} for s, k in zip(SPLITS, kl)},
            "bits_per_weight": 4.5}


def failed(decision) -> list[tuple[str, str]]:
    return [(c["criterion"], c["split"]) for c in decision["criteria"] if not c["passed"]]


def test_identical_numbers_pass():
    d = gate.decide(metrics(), metrics(), GateThresholds())
    assert d["passed"] and d["reason"] == "all 4 criteria within their limits"


def test_perplexity_within_and_beyond_the_relative_limit():
    t = GateThresholds(max_ppl_increase=0.01)
    assert gate.decide(metrics(ppl=(30.29, 70.69)), metrics(), t)["passed"]  # +0.97%, +0.99%
    d = gate.decide(metrics(ppl=(30.0, 70.71)), metrics(), t)  # moby-dick +1.01%
    assert not d["passed"] and failed(d) == [("perplexity", "moby-dick")]
    assert d["reason"].startswith("perplexity on moby-dick: candidate 70.71 > limit 70.7 (production 70)")
    assert gate.decide(metrics(ppl=(25.0, 60.0)), metrics(), t)["passed"]  # better is always fine


def test_kl_relative_and_absolute_limits():
    d = gate.decide(metrics(kl=(0.0115, 0.020)), metrics(), GateThresholds(max_kl_increase=0.10))
    assert failed(d) == [("kl_vs_production", "sotu-2000-2021")]
    assert gate.decide(metrics(kl=(0.0115, 0.020)), metrics(), GateThresholds(max_kl_increase=None))["passed"]
    d = gate.decide(metrics(), metrics(), GateThresholds(max_kl_increase=None, max_kl=0.015))
    assert failed(d) == [("kl_max", "moby-dick")]
    # Lossless production (KL 0): rounding-level KL still passes, real damage does not.
    assert gate.decide(metrics(kl=(5e-7, 5e-7)), metrics(kl=(0.0, 0.0)), GateThresholds())["passed"]
    assert not gate.decide(metrics(kl=(1e-4, 0.0)), metrics(kl=(0.0, 0.0)), GateThresholds())["passed"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_non_finite_or_missing_numbers_fail(bad):
    cand = metrics()
    cand["perplexity"]["moby-dick"] = bad
    if bad is None:
        del cand["perplexity"]["moby-dick"]
    d = gate.decide(cand, metrics(), GateThresholds())
    assert not d["passed"] and failed(d) == [("perplexity", "moby-dick")]


def test_thresholds_are_bounded():
    with pytest.raises(ValueError):
        GateThresholds(max_ppl_increase=-0.1)
    with pytest.raises(ValueError):
        GateThresholds(max_ppl_increase=0.01, surprise=1)


def test_fresh_calibration_falls_back_to_productions_record():
    recorded = {"source": "s3://bucket/calib/", "n": 64, "seqlen": 512, "seed": 3}
    spec = FreshCalibration(source="/data/new").spec_for(recorded)
    assert (spec.source, spec.n_samples, spec.seqlen, spec.seed) == ("/data/new", 64, 512, 3)
    assert FreshCalibration(n_samples=8).spec_for(recorded).source == "s3://bucket/calib/"
    with pytest.raises(BadInput, match="no 'source'"):
        FreshCalibration().spec_for({"n": 4, "seqlen": 64, "seed": 0})


def test_eval_spec_reproduces_productions_protocol():
    manifest = {"artifact_id": "x", "metrics": {**metrics(), "protocol": {"evaluation": {
        s: {"seqlen": 128, "windows": 8} for s in SPLITS}}}}
    spec = gate.eval_spec(manifest)
    assert (spec.splits, spec.seqlen, spec.max_windows, spec.kl_windows) == (SPLITS, 128, 8, 4)
    with pytest.raises(BadInput, match="no evaluation protocol"):
        gate.eval_spec({"artifact_id": "x", "metrics": {}})


def _artifact(store: LocalStore, tmp_path):
    root = tmp_path / "art"
    (root / "report").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "report" / "metrics.json").write_bytes(canonical_json({"results": [metrics(), metrics()]}))
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_bytes(p.read_bytes()), "size": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file()}
    lineage = {"model": {"name": "m"}, "recipe": {"name": "r"}}
    manifest = {"artifact_id": content_id(files, lineage), "model": "m", "recipe": "r", "lineage": lineage,
                "metrics": metrics(), "baseline": metrics(), "files": files}
    (root / "manifest.json").write_bytes(canonical_json(manifest))
    return store.put_dir(root, kind="artifact"), manifest


def test_stamp_seals_the_decision_into_a_new_self_consistent_artifact(tmp_path):
    store = LocalStore(tmp_path / "store")
    ref, original = _artifact(store, tmp_path)
    decision = gate.decide(metrics(), metrics(), GateThresholds())
    block = gate.record(decision, GateThresholds(), production={"uri": "s3://b/p", "artifact_id": "p1", "metrics": metrics()},
                        candidate=metrics(), base=metrics(ppl=(20.0, 50.0)), calibration={"source": "/new"},
                        recipe="r", recipe_override=False, evaluation=gate.eval_spec(
                            {"metrics": {"protocol": {"evaluation": {s: {"seqlen": 64, "windows": 2} for s in SPLITS}}}}))
    stamped = gate.stamp(store, ref, block)
    assert gate.stamp(store, ref, block) == stamped  # deterministic: same inputs, same bytes
    path = store.materialize(stamped)
    manifest = verify_dir(path)  # authenticates: the new content id covers the gate block
    assert manifest["artifact_id"] != original["artifact_id"]
    assert manifest["lineage"]["gate"] == json.loads(canonical_json(block))
    assert "report/gate.md" in manifest["files"] and "this artifact" in (path / "report" / "gate.md").read_text()

    # Editing the recorded decision afterwards is detected.
    forged = tmp_path / "forged"
    import shutil

    shutil.copytree(path, forged, ignore=shutil.ignore_patterns(".squeezeflow-complete"), copy_function=shutil.copyfile)
    m = json.loads((forged / "manifest.json").read_text())
    m["lineage"]["gate"]["passed"] = False
    (forged / "manifest.json").write_bytes(canonical_json(m))
    with pytest.raises(IntegrityError, match="modified"):
        verify_dir(forged)

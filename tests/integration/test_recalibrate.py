"""Nightly re-calibration end to end: tiny random Llama, real SeaweedFS registry, real Prefect server.

A production artifact (rtn-w4g64) is published with the compress flow and promoted; the nightly flow then
runs by hand on a directory of new text. A same-recipe candidate passes the gate and becomes production;
a far too aggressive override (rtn-w2g64) is refused and production is left exactly as it was. Both
decisions are read back from the candidate's manifest and from the Prefect API's markdown artifacts.
"""
from __future__ import annotations

import hashlib

import pytest

from prefect_fixtures import prefect_server, run_flow_in_child, shared_inputs, tiny_llama  # noqa: F401
from squeezeflow.registry import Registry, verify_dir
from test_registry import all_objects

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CALIB = {"n_samples": 4, "seqlen": 64}
EVAL = {"seqlen": 64, "max_windows": 2}
RECIPE = "rtn-w4g64"
RECALIBRATE = "squeezeflow.flows.recalibrate:recalibrate_flow"


@pytest.fixture(scope="module")
def production(prefect_server, tiny_llama, s3_server, tmp_path_factory):
    """A registry holding one production artifact, and a directory of new calibration text."""
    import uuid

    from squeezeflow.calibration import load_text

    tmp = tmp_path_factory.mktemp("recalibrate")
    reg = Registry(f"s3://{s3_server['bucket']}/recal-{uuid.uuid4().hex[:8]}")
    store = str(tmp / "store")
    out = run_flow_in_child({"model": {"ref": str(tiny_llama)}, "recipe": RECIPE, "calibration": CALIB,
                             "evaluation": EVAL, "destinations": {"store": store, "registry": reg.uri}}, tmp / "compress")
    reg.promote(out["result"]["artifact"]["uri"], "production")
    fresh = tmp / "fresh"
    fresh.mkdir()
    text = load_text("sotu-calib").text
    (fresh / "night-1.txt").write_text(text[-60_000:])  # other text than the windows production sampled
    return {"registry": reg, "store": store, "fresh": fresh, "tmp": tmp, "model": tiny_llama.name,
            "fresh_sha256": hashlib.sha256(text[-60_000:].encode()).hexdigest()}


def _run(production, name: str, **params) -> dict:
    params = {"calibration": {"source": str(production["fresh"])},
              "destinations": {"store": production["store"], "registry": production["registry"].uri}, **params}
    out = run_flow_in_child(params, production["tmp"] / name, flow=RECALIBRATE)
    [decision] = out["result"]["decisions"]  # the registry has exactly one production entry
    return {**decision, "flow_run_id": out["flow_run_id"]}


def _markdown(flow_run_id: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    [md] = [a for a in artifacts if a.type == "markdown"]
    return md.data


def _manifest(reg: Registry, uri: str, tmp) -> dict:
    return verify_dir(reg.pull(uri, tmp / uri.rsplit("/", 1)[1]))  # authenticated: gate block included


def test_a_candidate_on_fresh_data_that_holds_quality_is_promoted(production):
    reg, model = production["registry"], production["model"]
    before = reg.resolve(f"{model}/{RECIPE}@production")
    d = _run(production, "good")
    assert d["passed"] and d["decision"] == "promote" and d["production"] == before
    assert d["candidate"] != before
    assert reg.resolve(f"{model}/{RECIPE}@production") == d["candidate"]
    assert reg.resolve(f"{model}/{RECIPE}@latest") == d["candidate"]
    assert [h["uri"] for h in reg.history(model, RECIPE, "production")][-2:] == [before, d["candidate"]]

    manifest = _manifest(reg, d["candidate"], production["tmp"])
    gate = manifest["lineage"]["gate"]
    assert gate["decision"] == "promote" and gate["passed"] and all(c["passed"] for c in gate["criteria"])
    assert {c["criterion"] for c in gate["criteria"]} == {"perplexity", "kl_vs_production"}
    assert {c["split"] for c in gate["criteria"]} == {"sotu-2000-2021", "moby-dick"}
    assert gate["production"]["uri"] == before and gate["thresholds"]["max_ppl_increase"] == 0.01
    assert gate["inputs"]["calibration"]["text_sha256"] == production["fresh_sha256"]  # really the new text
    assert gate["inputs"]["evaluation"]["max_windows"] == EVAL["max_windows"]  # production's protocol
    assert manifest["lineage"]["calibration"]["text_sha256"] == production["fresh_sha256"]
    assert manifest["metrics"]["perplexity"] == gate["candidate"]["metrics"]["perplexity"]
    compat = manifest["lineage"]["compatibility"]
    assert compat["formats"][0]["name"] == "intq" and compat["runtimes"]["vllm-compressed-tensors"]["supported"]

    md = _markdown(d["flow_run_id"])
    assert "PROMOTED" in md and d["candidate"] in md and "| perplexity | moby-dick |" in md


def test_a_far_too_aggressive_candidate_is_refused_and_production_is_untouched(production):
    reg, model = production["registry"], production["model"]
    prod_uri = reg.resolve(f"{model}/{RECIPE}@production")
    prod_prefix = prod_uri.split("/", 3)[3] + "/"
    aliases = f"{reg.loc.prefix}/aliases/{model}/{RECIPE}/"
    watched = {k: v for k, v in all_objects(reg).items() if k.startswith((prod_prefix, aliases))}
    history = reg.history(model, RECIPE, "production")

    d = _run(production, "bad", recipe_override="rtn-w2g64")
    assert not d["passed"] and d["decision"] == "reject" and d["production"] == prod_uri
    assert d["aliases"] == ["candidate"]
    # Production: same alias target, same alias objects (ETag and time), same entry bytes, same history.
    assert reg.resolve(f"{model}/{RECIPE}@production") == prod_uri
    assert {k: v for k, v in all_objects(reg).items() if k.startswith((prod_prefix, aliases))} == watched
    assert reg.history(model, RECIPE, "production") == history
    # The rejected candidate is kept under its own recipe, aliased `candidate` only (not latest).
    assert reg.resolve(f"{model}/rtn-w2g64@candidate") == d["candidate"]
    assert [e["aliases"] for e in reg.list(model=model, recipe="rtn-w2g64")] == [["candidate"]]

    gate = _manifest(reg, d["candidate"], production["tmp"])["lineage"]["gate"]
    assert gate["decision"] == "reject" and gate["inputs"]["recipe_override"] and gate["inputs"]["recipe"] == "rtn-w2g64"
    failed = [c for c in gate["criteria"] if not c["passed"]]
    assert failed and all(c["candidate"] > c["limit"] for c in failed)
    assert gate["reason"].startswith(f"{failed[0]['criterion']} on {failed[0]['split']}")
    md = _markdown(d["flow_run_id"])
    assert "REJECTED" in md and "**no**" in md


def test_bad_input_is_refused_before_any_work(production):
    from squeezeflow.errors import BadInput
    from squeezeflow.flows.recalibrate import prepare, production_entries
    from squeezeflow.gate import FreshCalibration

    reg = production["registry"]
    [uri] = production_entries(reg, [])
    fresh = FreshCalibration(source=str(production["fresh"]))
    assert prepare(reg, uri, fresh, "").job.recipe.name == RECIPE  # the valid case preflights
    with pytest.raises(BadInput, match="recipe 'rtn-w99'"):
        prepare(reg, uri, fresh, "rtn-w99")
    with pytest.raises(BadInput, match="not found"):
        prepare(reg, uri, FreshCalibration(source=str(production["tmp"] / "missing")), "")
    with pytest.raises(BadInput, match="carries the 'production' alias"):
        production_entries(Registry(reg.uri + "-empty"), [])

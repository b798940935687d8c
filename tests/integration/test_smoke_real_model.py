"""Smoke test on real weights: SmolLM2-135M cut to 3 blocks, through all six stages of the flow on a real
Prefect server, published to the real SeaweedFS registry, then consumed as a user would."""
import json
import os
import subprocess
import sys

import pytest

import squeezeflow
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.registry import open_registry

from prefect_fixtures import prefect_server, run_flow_in_child, shared_inputs  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

CALIB = CalibrationSpec(n_samples=8, seqlen=128, seed=0)
EVAL = EvalSpec(seqlen=128, max_windows=4)


@pytest.fixture(scope="module")
def published(prefect_server, s3_server, smollm_truncated, tmp_path_factory):
    store = tmp_path_factory.mktemp("smoke-store")
    params = {"model": {"ref": str(smollm_truncated)}, "recipe": "rtn-w3g64",
              "calibration": CALIB.model_dump(mode="json"), "evaluation": EVAL.model_dump(mode="json"),
              "destinations": {"store": str(store)}}
    return run_flow_in_child(params, tmp_path_factory.mktemp("smoke-run"))["result"]

def test_flow_publishes_with_metrics_schema(published):
    base, art = published["results"]
    assert base["recipe"] == "fp32" and art["recipe"] == "rtn-w3g64"
    assert art["uri"].startswith("s3://squeezeflow/registry/models/smollm2-3l/rtn-w3g64/")
    for m in (base, art):
        assert set(m["perplexity"]) == {"sotu-2000-2021", "moby-dick"}
        assert all(v > 1 for v in m["perplexity"].values())
    assert art["bits_per_weight"] == pytest.approx(3.5)  # 3-bit codes + fp16 scale and zero per 64
    assert base["bits_per_weight"] == 32 and art["size_bytes"] < base["size_bytes"]


def test_registry_list_json_via_cli(published):
    out = subprocess.run([sys.executable, "-m", "squeezeflow.cli", "registry", "list", "--json"],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)["artifacts"]
    mine = [e for e in entries if e["uri"] == published["artifact"]["uri"]]
    assert len(mine) == 1
    e = mine[0]
    assert {"uri", "model", "recipe", "aliases", "created", "metrics"} <= set(e)
    assert "latest" in e["aliases"] and e["recipe"] == "rtn-w3g64"


def test_pulled_artifact_loads_generates_and_matches_report(published, smollm_truncated, tmp_path):
    uri = published["artifact"]["uri"]
    path = open_registry().pull(uri, tmp_path / "pulled")
    model = squeezeflow.load(str(path))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The state of the union is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8 and tok.decode(out[0, ids.shape[1]:]).strip()
    # The perplexity recomputed on the pulled files equals the one recorded in the report.
    manifest = json.loads((path / "manifest.json").read_text())
    info = pipeline.ModelInfo(ref=str(smollm_truncated), name="x", path=str(smollm_truncated),
                              fingerprint="-", num_layers=3)
    for split, (windows, _) in pipeline.eval_protocol(info, EVAL).items():
        assert perplexity(model, windows)["perplexity"] == pytest.approx(manifest["metrics"]["perplexity"][split], rel=1e-5)
    report = (path / "report" / "report.md").read_text()
    assert "rtn-w3g64" in report and "4-bit grid" in report


def test_alias_resolves_and_prefect_table_artifact_exists(published):
    uri = published["artifact"]["uri"]
    assert open_registry().resolve("smollm2-3l/rtn-w3g64@latest") == uri
    # A ModelRef may be an alias or an entry URI: both resolve to the same verified local copy.
    from squeezeflow.models import resolve_model

    by_alias, by_uri = resolve_model("smollm2-3l/rtn-w3g64@latest"), resolve_model(uri)
    assert by_alias.path == by_uri.path and (by_alias.path / "manifest.json").is_file()
    assert by_alias.fingerprint == by_uri.fingerprint
    model = squeezeflow.load("smollm2-3l/rtn-w3g64@latest")
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "QuantLinear"
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["compress-rtn-w3g64"])))
    assert arts and arts[0].type == "table"
    rows = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    assert [r["recipe"] for r in rows] == ["fp32", "rtn-w3g64"]

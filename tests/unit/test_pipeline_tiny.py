"""The six stages as plain functions on a tiny random Llama: outputs, caching, determinism, manifest."""
import json

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.intq.rtn import dequantize_groupwise
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import run_stages

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)
METRIC_KEYS = {"recipe", "uri", "bits_per_weight", "size_bytes", "perplexity", "kl", "accuracy", "speed", "protocol"}


@pytest.fixture(scope="module")
def plan(tiny_model):
    return pipeline.preflight(ModelRef(ref=str(tiny_model)), "rtn-w4g32", CALIB, EVAL)


@pytest.fixture(scope="module")
def runs(plan, tmp_path_factory):
    a = LocalStore(tmp_path_factory.mktemp("store-a"))
    b = LocalStore(tmp_path_factory.mktemp("store-b"))
    return (a, run_stages(a, plan)), (b, run_stages(b, plan))


def test_identical_inputs_give_byte_identical_artifacts(runs):
    (sa, ra), (sb, rb) = runs
    files_a = {k: sa.get_bytes(v) for k, v in sa.get_tree(ra["artifact"]).items()}
    files_b = {k: sb.get_bytes(v) for k, v in sb.get_tree(rb["artifact"]).items()}
    assert [f for f in files_a if files_a[f] != files_b.get(f)] == []
    assert ra["artifact"].sha256 == rb["artifact"].sha256
    assert {"config.json", "model.safetensors", "manifest.json", "report/report.md", "report/metrics.json",
            "tokenizer.json"} <= set(files_a)


def test_manifest_schema_and_lineage(runs, plan, tiny_model):
    store, r = runs[0]
    d = store.materialize(r["artifact"])
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and len(manifest["artifact_id"]) == 16
    assert METRIC_KEYS <= set(manifest["metrics"]) and METRIC_KEYS <= set(manifest["baseline"])
    assert set(manifest["metrics"]["perplexity"]) == {"sotu-2000-2021", "moby-dick"}
    lin = manifest["lineage"]
    assert lin["model"]["fingerprint"] == plan.model.fingerprint
    assert lin["calibration"]["seed"] == 0 and lin["calibration"]["seqlen"] == 32 and len(lin["calibration"]["text_sha256"]) == 64
    assert lin["recipe"]["methods"][0] == {"method": "rtn", "bits": 4, "group_size": 32}
    assert {"torch", "transformers", "safetensors"} <= set(lin["libraries"])
    for split, p in manifest["metrics"]["protocol"]["evaluation"].items():
        assert p["seqlen"] == 32 and p["windows"] == 2 and len(p["corpus_sha256"]) == 64
    # Every file is listed with its real hash; the manifest itself is not.
    from squeezeflow.store import sha256_file
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert all(sha256_file(d / f) == manifest["files"][f]["sha256"] for f in files)


def test_bits_per_weight_counts_codes_scales_and_zeros(runs):
    store, r = runs[0]
    m = json.loads((store.materialize(r["artifact"]) / "manifest.json").read_text())["metrics"]
    # 4-bit codes + fp16 scale + fp16 zero per 32 weights = 4 + 32/32 = 5.0 bits exactly.
    assert m["bits_per_weight"] == pytest.approx(5.0)
    assert m["quantized"] is True


def test_packed_model_computes_the_rtn_weights(runs, tiny_model):
    store, r = runs[0]
    packed = load_model(store.materialize(r["packed"]))
    dense = load_model(tiny_model)
    blocks = store.get_tensors(r["blocks"][0])
    w_hat = dequantize_groupwise(blocks["self_attn.q_proj.codes"], blocks["self_attn.q_proj.scales"],
                                 blocks["self_attn.q_proj.zeros"], 32)
    assert torch.equal(packed.model.layers[0].self_attn.q_proj.dequantize(), w_hat)
    for name, mod in dense.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert type(packed.get_submodule(name)).__name__ == "QuantLinear"
    ids = torch.randint(0, 49152, (1, 12))
    assert packed.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


def test_statistics_are_reused_from_the_store(runs, plan, monkeypatch):
    store, r = runs[0]
    import squeezeflow.stats as stats_mod

    def boom(*a, **k):
        raise AssertionError("statistics recomputed although they are in the store")

    monkeypatch.setattr(stats_mod, "LayerStream", boom)
    again = pipeline.saliency(store, plan.model, r["calib"], plan.statistics)
    assert again == r["stats"]


def test_report_mentions_protocol_and_baseline(runs):
    store, r = runs[0]
    text = (store.materialize(r["artifact"]) / "report" / "report.md").read_text()
    assert "| fp32 |" in text and "| rtn-w4g32 |" in text and "4 windows × 32 tokens" in text


def test_packed_model_metrics_include_kl_against_base(runs):
    store, r = runs[0]
    m = json.loads((store.materialize(r["artifact"]) / "manifest.json").read_text())
    for split in ("sotu-2000-2021", "moby-dick"):
        kl = m["metrics"]["kl"][split]
        assert kl["kl"] > 0 and 0 < kl["top1_agreement"] <= 1 and kl["positions"] == 2 * 31
    assert m["baseline"]["kl"] == {}  # the base model is the reference, not compared with itself


def test_cloze_accuracy_is_deterministic_and_stamped(plan, runs, tiny_model):
    store, r = runs[0]
    spec = EvalSpec(seqlen=32, max_windows=1, kl_windows=0, cloze_items=3)
    a = pipeline.evaluate_path(store.materialize(r["packed"]), plan.model, spec, "x")["accuracy"]
    b = pipeline.evaluate_path(store.materialize(r["packed"]), plan.model, spec, "x")["accuracy"]
    assert a == b and set(a) == {"next_sentence", "last_word"}
    assert a["next_sentence"]["n"] == 3 and len(a["next_sentence"]["file_sha256"]) == 64
    assert 0 <= a["next_sentence"]["acc"] <= 1 and a["next_sentence"]["split"] == "sotu-2000-2021"

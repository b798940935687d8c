"""Block streaming is each dense family's own forward, and the recipes run on each (tiny random models).

For every architecture in sf_testing.TINY_ARCHS: LayerStream's embed -> blocks -> head matches the plain
transformers forward within 1e-4 relative (what `squeezeflow models check` reports), with sequences longer
than the sliding windows; a recipe matrix runs through the plain loop (one store per architecture) and each
artifact loads with `squeezeflow.load` and generates; recipes a family cannot take are refused at preflight.
"""
import json
import subprocess
import sys

import pytest
import torch

from squeezeflow import architectures, pipeline
from squeezeflow.cli_models import check_model
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.errors import BadInput
from squeezeflow.store import LocalStore
from sf_testing import RECIPE_FAMILIES, TINY_ARCHS, fast_recipe, load_and_generate, make_tiny

ARCHS = tuple(TINY_ARCHS)
CALIB = CalibrationSpec(n_samples=2, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=1, kl_windows=0)
# QUAD/QuaRot rewrite these layouts exactly (Qwen3's q/k norms, Phi3's fused qkv/gate_up, Qwen2's biases);
# Gemma2/3's output norms do not commute with the residual rotation and are refused at preflight.
QUAD_OK = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


@pytest.fixture(scope="module")
def tiny_archs(smollm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {a: make_tiny(a, root / a, smollm_path) for a in ARCHS}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return {a: LocalStore(tmp_path_factory.mktemp(f"store-{a}")) for a in ARCHS}


def _streamed_rel_diff(path, seqlen=32) -> float:
    return check_model(path, n_windows=2, seqlen=seqlen)["max_rel_logit_diff"]


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_forward_is_the_models_own(tiny_archs, arch):
    result = check_model(tiny_archs[arch], n_windows=2, seqlen=32)
    assert result["max_rel_logit_diff"] <= 1e-4 and result["exact"], result["max_rel_logit_diff"]
    layout = result["layout"]
    assert len(layout["attention_types"]) == 2 and layout["linears_per_block"]
    if arch in ("mistral", "qwen2", "gemma2", "gemma3"):
        assert "sliding_attention" in layout["attention_types"] and layout["sliding_window"] == 16
    if arch == "phi3":
        assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= set(layout["linears_per_block"])
    if arch == "qwen2":
        assert layout["linears_per_block"]["self_attn.q_proj"][2] is True  # biased
    if arch in ("gemma2", "gemma3"):
        assert layout["embed_scale"] == pytest.approx(64 ** 0.5)
    quad = result["recipes"]["quad-w4a4"]
    assert (quad == "ok") == (arch in QUAD_OK), quad
    assert all(v == "ok" for k, v in result["recipes"].items() if not k.startswith(("quad", "quarot")))


def test_wrong_mask_or_scale_would_be_seen(tiny_archs, monkeypatch):
    """The check has teeth: Mistral streamed with one full causal mask (the old Llama-only streamer), or
    Gemma3 without its √d embedding scale, is far outside the tolerance."""
    monkeypatch.setattr(architectures, "layer_types",
                        lambda config: [architectures.FULL] * config.num_hidden_layers)
    assert _streamed_rel_diff(tiny_archs["mistral"]) > 1e-2
    monkeypatch.undo()
    monkeypatch.setattr(architectures, "embed_scale", lambda config, model: None)
    assert _streamed_rel_diff(tiny_archs["gemma3"]) > 1e-2


def test_models_check_cli_json(tiny_archs):
    proc = subprocess.run([sys.executable, "-m", "squeezeflow.cli", "models", "check", str(tiny_archs["mistral"]),
                           "--json", "--windows", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["seqlen"] == 64 > result["layout"]["sliding_window"]  # default: twice the window
    assert result["max_rel_logit_diff"] <= 1e-4
    assert result["layout"]["attention_types"] == ["sliding_attention", "sliding_attention"]


def test_unknown_layout_refused_in_one_line(tmp_path, smollm_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(smollm_path).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BadInput, match="'gpt2'.*cannot be streamed") as e:
        pipeline.preflight(ModelRef(ref=str(tmp_path / "gpt2")), "rtn-w4g32", CALIB, EVAL)
    assert "\n" not in str(e.value)


MATRIX = [(a, r) for a in ARCHS for r in RECIPE_FAMILIES]  # every family on every architecture
# QUAD/QuaRot on every family they support but Llama (tests/unit/test_quad.py runs it there): their transform,
# role table and packed format are what differs by family, and a tiny run takes seconds.
MATRIX += [(a, r) for a in ARCHS for r in ("quad-w4a4", "quarot-w4a4") if a in QUAD_OK - {"llama"}]
MATRIX += [("phi3", "quad-w4a4a8-peft4")]   # the PEFT tunes fused qkv/gate_up QuadLinears too


@pytest.mark.parametrize("arch,recipe", MATRIX, ids=[f"{a}-{r}" for a, r in MATRIX])
def test_recipe_runs_and_artifact_generates(tiny_archs, stores, arch, recipe):
    store = stores[arch]
    job = pipeline.preflight(ModelRef(ref=str(tiny_archs[arch])), fast_recipe(recipe), CALIB, EVAL)
    out = pipeline.run_job(job, store)
    artifact = store.materialize(out["artifact"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["lineage"]["model"]["fingerprint"] == job.model.fingerprint
    load_and_generate(artifact)
    if recipe.startswith(("quad", "quarot")):   # every linear of every block packed as QUAD, fused ones included
        from squeezeflow.models import load_model

        block = load_model(artifact).model.layers[0]
        linears = {n: type(m).__name__ for n, m in block.named_modules() if n.endswith("_proj")}
        assert linears and set(linears.values()) == {"QuadLinear"}, linears
        assert ("self_attn.qkv_proj" in linears) == (arch == "phi3")


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - QUAD_OK))
def test_quad_refused_at_preflight(tiny_archs, arch):
    assert arch in ("gemma2", "gemma3")
    for recipe in ("quad-w4a4", "quarot-w4a4", "quad-w4a4a8-peft"):
        with pytest.raises(BadInput, match="cannot rewrite this Gemma[23] checkpoint: "
                                           "its post-attention/post-feedforward RMSNorms .* does not commute with "
                                           "the residual-stream rotation") as e:
            pipeline.preflight(ModelRef(ref=str(tiny_archs[arch])), recipe, CALIB, EVAL)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_head_and_embedding_are_the_models_own(tiny_archs, arch, monkeypatch):
    """Evaluation's head (rows read a slice of the vocabulary at a time, streamed.ChunkedHead) and the row-wise
    embedding lookup give the model's own modules' values exactly: tied and untied heads, Gemma's √d scale and
    soft-capped logits. The head is forced onto the read-per-slice path with slices that do not divide V."""
    from squeezeflow.evaluation import streamed
    from squeezeflow.models import LayerStream, load_model

    monkeypatch.setattr(streamed, "RESIDENT_HEAD", 0)
    monkeypatch.setattr(streamed, "VOCAB_ROWS", 5000)
    model = load_model(tiny_archs[arch])
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    stream = LayerStream(tiny_archs[arch])
    head = streamed.ChunkedHead(stream)
    assert head.rows is not None and head.weight is None  # the row reader, not a materialized module
    with torch.no_grad():
        embedded = torch.cat(stream.embed(list(ids)))
        want_emb = model.model.embed_tokens(ids)
        if stream.embed_scale is not None and not torch.equal(embedded, want_emb):
            want_emb = want_emb * torch.tensor(stream.embed_scale, dtype=want_emb.dtype)
        assert torch.equal(embedded, want_emb)
        h = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
        want = architectures.softcap_logits(model.config, model.lm_head(model.model.norm(h)))
        assert torch.equal(head.logits(head.norm(h)), want)

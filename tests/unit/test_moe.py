"""Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral; tiny random models, 4 experts top-2) end to end.

Streaming unfuses the routed experts into one nn.Linear per expert projection (squeezeflow/moe.py): the
streamed forward matches transformers' within 1e-4 from both checkpoint forms (Hub-style per-expert names, as
`save_pretrained` writes them, and transformers-5's fused [E, ...] tensors); every recipe family compresses
each expert's projections (and Qwen2-MoE's shared expert) and leaves the router in full precision; the packed
artifact loads with `squeezeflow.load` and generates; an expert no calibration token is routed to gets its
statistics from the dense fallback, recorded in the manifest.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from squeezeflow import moe, pipeline
from squeezeflow.cli_models import check_model
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.job import target_linears
from squeezeflow.models import LayerStream
from squeezeflow.store import LocalStore
from sf_testing import RECIPE_FAMILIES, TINY_MOE_ARCHS, fast_recipe, load_and_generate, make_tiny

ARCHS = tuple(TINY_MOE_ARCHS)
CALIB = CalibrationSpec(n_samples=2, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=1, kl_windows=0)
MATRIX = [(a, r) for a in ARCHS for r in RECIPE_FAMILIES]  # every recipe family on every MoE family
def _generates(path, packed: bool = False):
    model = load_and_generate(path)
    if packed:  # the skeleton was unfused and the packed modules took the experts' linears
        experts = model.model.layers[-1].mlp.experts
        assert isinstance(experts, moe.UnfusedExperts)
        assert not isinstance(experts[3].down_proj, torch.nn.Linear)
        assert isinstance(model.model.layers[-1].mlp.gate.weight, torch.nn.Parameter)
    return model


@pytest.fixture(scope="module")
def tiny_moe(smollm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: make_tiny(a, root / a, smollm_path) for a in ARCHS}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return {a: LocalStore(tmp_path_factory.mktemp(f"store-{a}")) for a in ARCHS}


def _fused_copy(src, dest):
    """The same model saved as transformers 5 holds it: fused [E, ...] expert tensors."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dest)
    model = AutoModelForCausalLM.from_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert any(k.endswith("mlp.experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_forward_is_the_models_own(tiny_moe, arch, tmp_path):
    hub = tiny_moe[arch]
    with safe_open(hub / "model.safetensors", "pt") as st:  # save_pretrained writes one matrix per expert
        keys = set(st.keys())
    expert = "block_sparse_moe.experts.3.w1.weight" if arch == "mixtral" else "mlp.experts.3.gate_proj.weight"
    assert f"model.layers.0.{expert}" in keys
    for path in (hub, _fused_copy(hub, tmp_path / "fused")):
        result = check_model(path, n_windows=2, seqlen=32)
        assert result["max_rel_logit_diff"] <= 1e-4 and result["exact"], (path, result["max_rel_logit_diff"])
        experts = result["layout"]["experts"]
        assert experts["num_experts"] == 4 and experts["top_k"] == 2 and experts["moe_layers"] == [0, 1]
        assert experts["shared_experts"] == (["mlp.shared_expert"] if arch == "qwen2_moe" else [])
        assert "mlp.gate" in experts["full_precision"]
        assert "mlp.experts.*.down_proj" in result["layout"]["linears_per_block"]
        assert result["recipes"]["quad-w4a4"].startswith("refused")
    # Both forms pass preflight's checkpoint validation and stream the same per-expert matrices.
    pipeline.preflight(ModelRef(ref=str(tmp_path / "fused")), "rtn-w4g32", CALIB, EVAL)
    linears = target_linears(tmp_path / "fused")  # what every method compresses: experts yes, routers no
    assert "model.layers.1.mlp.experts.3.down_proj" in linears and "model.layers.1.mlp.gate" not in linears
    assert "model.layers.1.mlp.shared_expert_gate" not in linears
    a, b = LayerStream(hub), LayerStream(tmp_path / "fused")
    sa, sb = a.block_state(1), b.block_state(1)
    assert sa.keys() == sb.keys() and "mlp.experts.2.up_proj.weight" in sa and "mlp.gate.weight" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unfused_experts_compute_the_fused_module(tiny_moe):
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(tiny_moe["qwen2_moe"]).eval()
    ids = torch.randint(0, 49152, (2, 24))
    with torch.no_grad():
        ref = fused(ids).logits
        assert moe.unfuse_experts(fused) == 2
        assert isinstance(fused.model.layers[0].mlp.experts, moe.UnfusedExperts)
        assert torch.allclose(fused(ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,recipe", MATRIX, ids=[f"{a}-{r}" for a, r in MATRIX])
def test_recipe_runs_and_artifact_generates(tiny_moe, stores, arch, recipe):
    store = stores[arch]
    job = pipeline.preflight(ModelRef(ref=str(tiny_moe[arch])), fast_recipe(recipe), CALIB, EVAL)
    out = pipeline.run_job(job, store)
    artifact = store.materialize(out["artifact"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["lineage"]["model"]["fingerprint"] == job.model.fingerprint
    config = json.loads((artifact / "config.json").read_text())
    if job.weight_recipe is not None:  # a weight method ran: every expert projection is packed, the router not
        modules = config["quantization_config"]["modules"]
        last = config["num_hidden_layers"] - 1
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{last}.mlp.experts.{e}.{proj}" in modules
        assert not any(".mlp.gate" == n[-9:] or n.endswith("shared_expert_gate") for n in modules)
        if arch == "qwen2_moe":
            assert f"model.layers.{last}.mlp.shared_expert.down_proj" in modules
        names = set()
        for f in artifact.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                names |= set(st.keys())
        assert f"model.layers.{last}.mlp.gate.weight" in names  # the router, dense
        assert not any(n.startswith(f"model.layers.{last}.mlp.experts.0.gate_proj.") and n.endswith(".weight")
                       for n in names)
    model = _generates(artifact, packed=job.weight_recipe is not None)
    if recipe in ("rtn-w4g32", "gptq-w4g32"):  # the packed expert holds that expert's weights, 4-bit close
        dense = LayerStream(tiny_moe[arch]).block_state(1)["mlp.experts.3.down_proj.weight"]
        w = model.model.layers[1].mlp.experts[3].down_proj.dequantize(torch.float32)
        assert float((w - dense).norm() / dense.norm()) < 0.2


def test_fallback_rule_on_the_experts_module():
    """Hooks on an expert's linears see its routed tokens; an expert routed fewer than MIN_ROUTED_TOKENS sees
    every token that entered the block (in expert order, after the pass); without hooks nothing is deferred."""
    torch.manual_seed(0)
    experts = moe.UnfusedExperts(4, 8, 16, torch.nn.SiLU())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(20, 8)
    index = torch.stack([torch.arange(20) % 3, (torch.arange(20) + 1) % 3], dim=1)  # expert 3: never routed
    index[0, 1] = 3                                                                   # ... except one token
    weights = torch.full((20, 2), 0.5)
    ref = experts(x, index, weights)
    seen: dict[int, int] = {}
    handles = [experts[e].gate_proj.register_forward_pre_hook(
        lambda _m, args, e=e: seen.__setitem__(e, seen.get(e, 0) + args[0].shape[0])) for e in range(4)]
    with moe.routed_statistics(experts):
        out = experts(x, index, weights)
        assert seen == {}  # deferred to the end of the pass
    for h in handles:
        h.remove()
    assert torch.equal(out, ref)
    assert experts.routed_tokens.tolist() == [13, 13, 13, 1]
    assert seen == {0: 13, 1: 13, 2: 13, 3: 20}  # expert 3: 1 routed token < 8 -> all 20
    stats = {"hdiag": moe.routed_token_counts(torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"experts": experts})}))}
    assert moe.fallbacks(stats) == [{"experts": "mlp.experts", "expert": 3, "routed_tokens": 1}]


def _starve_expert(src, dest, expert: int = 3):
    """`src` with layer 0's router biased away from `expert`: dimension 0 of the residual stream is a constant
    10 (embedding column; attention does not write it), and the router reads it with -50 for `expert`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.model.layers[0].self_attn.o_proj.weight[0].zero_()
        model.model.layers[0].post_attention_layernorm.weight[0] = 1.0
        router = model.model.layers[0].mlp.gate.weight
        router[:, 0] = 50.0
        router[expert, 0] = -50.0
    model.save_pretrained(dest)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(f, dest / f.name)
    return dest


@pytest.mark.parametrize("recipe", ["gptq-w4g32", "wanda-p50"])
def test_starved_expert_falls_back_and_is_recorded(tiny_moe, tmp_path_factory, recipe):
    path = tmp_path_factory.getbasetemp() / "starved-mixtral"
    if not path.exists():
        _starve_expert(tiny_moe["mixtral"], path)
    store = LocalStore(tmp_path_factory.mktemp("store-starved"))
    job = pipeline.preflight(ModelRef(ref=str(path)), recipe, CALIB, EVAL)
    out = pipeline.run_job(job, store)
    manifest = json.loads((store.materialize(out["artifact"]) / "manifest.json").read_text())
    fallback = manifest["lineage"]["moe_fallback"]
    assert fallback["min_routed_tokens"] == moe.MIN_ROUTED_TOKENS and "dense pass" in fallback["rule"]
    assert {"layer": 0, "experts": "mlp.experts", "expert": 3, "routed_tokens": 0} in fallback["experts"]
    # The starved expert still has statistics (from all 64 tokens), so it was compressed like the others.
    if out["stats"] and "hdiag" in out["stats"]:
        h = store.get_tensors(out["stats"]["hdiag"].blocks[0])
        assert h["mlp.experts.routed_tokens"][3] == 0 and torch.isfinite(h["mlp.experts.3.gate_proj"]).all()
    _generates(store.materialize(out["artifact"]), packed=True)


def test_plain_transformers_refuses_packed_moe(tiny_moe, stores, tmp_path):
    """Without squeezeflow, a packed MoE artifact stops loudly (naming Squeezeflow), as dense ones do."""
    from test_plain_transformers import run_without_squeezeflow

    store = stores["mixtral"]
    job = pipeline.preflight(ModelRef(ref=str(tiny_moe["mixtral"])), "rtn-w4g32", CALIB, EVAL)
    artifact = store.materialize(pipeline.run_job(job, store)["artifact"])
    code = ("import json, sys\nfrom transformers import AutoModelForCausalLM\ntry:\n"
            "    AutoModelForCausalLM.from_pretrained(sys.argv[1]); out = 'loaded'\n"
            "except Exception as e:\n    out = str(e)\n"
            "print(json.dumps({'error': out, 'squeezeflow imported': 'squeezeflow' in sys.modules}))")
    error = run_without_squeezeflow(code, str(artifact))["error"]
    assert "Squeezeflow packed checkpoint" in error, error
    # Nor does an export to compressed-tensors hand transformers per-expert names its fused experts cannot take.
    from squeezeflow.errors import BadInput
    from squeezeflow.export import export

    with pytest.raises(BadInput, match="cannot export a mixture-of-experts artifact") as e:
        export(str(artifact), tmp_path / "exported")
    assert "\n" not in str(e.value) and not (tmp_path / "exported").exists()


def test_truncated_moe_keeps_its_checkpoint_form(tiny_moe, tmp_path):
    """truncate_model copies the checkpoint's own names (Mixtral's w1/w2/w3), so transformers loads the copy."""
    from squeezeflow.models import truncate_model

    short = truncate_model(tiny_moe["mixtral"], tmp_path / "short", 1).path
    with safe_open(short / "model.safetensors", "pt") as st:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in st.keys()
        assert not any(k.startswith("model.layers.1.") for k in st.keys())
    assert check_model(short, n_windows=1, seqlen=32)["max_rel_logit_diff"] <= 1e-4

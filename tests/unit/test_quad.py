"""QUAD / QuaRot: rotations, the function-preserving expansion, the "quad" packed format, and the
pipeline end to end (transform -> sequential GPTQ -> pack -> PEFT -> evaluate) on a tiny Llama."""
import json

import pytest
import torch
import torch.nn.functional as F

from squeezeflow import pipeline
from squeezeflow.calibration import CalibrationSet
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.recipes import preset
from squeezeflow.errors import BadInput
from squeezeflow.kernels import rotation
from squeezeflow.kernels.formats import check_params, make_module, packed_tensors
from squeezeflow.kernels.quad_linear import fake_quant_per_token
from squeezeflow.methods import get_method
from squeezeflow.methods.quad.transform import expansion, transform_checkpoint, transform_state
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import make_tiny, run_stages

CALIB = CalibrationSpec(n_samples=8, seqlen=64, seed=0)
EVAL = EvalSpec(seqlen=64, max_windows=2)


def _cov(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, d, generator=g, dtype=torch.float64)
    x[:, 3] *= 40.0   # a massive-activation channel, as real residual streams have
    x[:, 7] *= 15.0
    return x.T @ x / len(x)


@pytest.mark.parametrize("n", [64, 576, 1536, 9, 1])
def test_rotation_is_orthogonal_and_apply_matches_dense(n):
    A, s = rotation.random_factors(n, seed=3)
    R = rotation.dense(A, s)
    assert (R @ R.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(rotation.apply(x, A.double(), s.double()), x @ R, atol=1e-12)
    A2, s2 = rotation.random_factors(n, seed=3)
    assert torch.equal(A, A2) and torch.equal(s, s2)   # seeded: the same rotation every time


def test_expansion_is_an_isometry_and_isolates_the_outlier_directions():
    cov = _cov(64)
    M, _ = expansion(cov, 8, seed=0)
    assert M.shape == (64, 72)
    assert (M @ M.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-10   # ‖QQᵀ − I‖ in fp64
    # The outlier block of the expanded stream holds (nearly) all the energy of the massive channels.
    e3 = torch.zeros(64, dtype=torch.float64)
    e3[3] = 1.0
    y = e3 @ M
    assert y[:8].norm() > 0.999 and y[8:].norm() < 0.05


def test_transform_preserves_the_function_and_loads_in_plain_transformers(tiny_model, tmp_path):
    out = tmp_path / "quad"
    transform_checkpoint(tiny_model, out, _cov(64), 8, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 72 and config["head_dim"] == 16 and not config["tie_word_embeddings"]
    a, b = load_model(tiny_model), load_model(out)   # b: no Squeezeflow module involved
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).abs().max() < 1e-4 * la.abs().max()
    assert b.model.embed_tokens.weight.shape == (49152, 72)


def _rel_logit_diff(src, dst) -> float:
    a, b = load_model(src), load_model(dst)   # b: a plain transformers model of the same class
    assert type(a) is type(b)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return ((la - lb).abs().max() / la.abs().max()).item()


def _qwen3_sensitive_to_head_norm_eps(src):
    """A large rms_norm_eps and strong v/o projections, so a q_norm/k_norm eps off by d/(d + r) moves the
    logits far beyond the tolerance (with 1e-6 and a random tiny model's weak attention it would not show)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 0.3}))
    state = load_file(src / "model.safetensors")
    state = {k: v * 10 if k.endswith(("v_proj.weight", "o_proj.weight")) else v for k, v in state.items()}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3"])
def test_transform_preserves_each_supported_family(arch, smollm_path, tmp_path):
    from safetensors.torch import load_file

    src = make_tiny(arch, tmp_path / arch, smollm_path)
    if arch == "qwen3":
        _qwen3_sensitive_to_head_norm_eps(src)
    out = tmp_path / "quad"
    transform_checkpoint(src, out, _cov(64), 8, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["model_type"]) == (72, 16, json.loads(
        (src / "config.json").read_text())["model_type"])
    assert _rel_logit_diff(src, out) < 1e-4
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    layer = "model.layers.1."
    if arch == "phi3":   # fused readers: all output rows kept, input side expanded to d + r
        assert after[layer + "self_attn.qkv_proj.weight"].shape == (4 * 16 + 2 * 2 * 16, 72)
        assert after[layer + "mlp.gate_up_proj.weight"].shape == (2 * 128, 72)
    if arch == "qwen2":  # q/k/v biases act on the output side: unchanged
        assert torch.equal(after[layer + "self_attn.q_proj.bias"], before[layer + "self_attn.q_proj.bias"])
    if arch == "qwen3":  # q/k norms act on head_dim: same shape and weights
        assert torch.equal(after[layer + "self_attn.q_norm.weight"], before[layer + "self_attn.q_norm.weight"])


def test_qwen3_head_norm_eps_compensation_is_needed(smollm_path, tmp_path, monkeypatch):
    """The q_proj/k_proj scaling is what keeps Qwen3's q/k norms exact under the rescaled rms_norm_eps:
    without it the transformed model is measurably off (the check above has teeth)."""
    from squeezeflow.methods.quad import transform

    src = make_tiny("qwen3", tmp_path / "qwen3", smollm_path)
    _qwen3_sensitive_to_head_norm_eps(src)
    monkeypatch.setattr(transform, "HEAD_NORMS", {n: "self_attn.unscaled" for n in transform.HEAD_NORMS})
    transform_checkpoint(src, tmp_path / "quad", _cov(64), 8, seed=0)
    assert _rel_logit_diff(src, tmp_path / "quad") > 1e-4


def test_refusal_reasons_per_family():
    from transformers import GPT2Config, Gemma2Config, MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    method = get_method(preset("quad-w4a4").methods[0])
    assert method.refusal(Qwen3Config()) is None
    assert "does not commute with the residual-stream rotation" in method.refusal(Gemma2Config())
    for config in (Qwen2MoeConfig(), Qwen3MoeConfig(), MixtralConfig()):
        assert "mixture-of-experts MLP" in method.refusal(config)
    assert "does not know the 'gpt2' block layout" in method.refusal(GPT2Config())


_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
             "original_max_position_embeddings": 256}


def test_phi3_longrope_takes_quarot_and_refuses_quad(smollm_path, tmp_path):
    """Phi3Config validates longrope factors against hidden_size // heads: an expanded checkpoint (r > 0)
    does not load, so QUAD is refused before any work; QuaRot (r = 0) keeps hidden_size and stays exact."""
    from transformers import AutoConfig

    src = make_tiny("phi3", tmp_path / "phi3", smollm_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"rope_parameters": _LONGROPE}))
    hf_config = AutoConfig.from_pretrained(src)
    assert get_method(preset("quarot-w4a4").methods[0]).refusal(hf_config) is None
    assert "longrope factors" in get_method(preset("quad-w4a4").methods[0]).refusal(hf_config)
    with pytest.raises(BadInput, match="cannot rewrite this Phi3 checkpoint: transformers checks its longrope factors") as e:
        pipeline.preflight(ModelRef(ref=str(src)), "quad-w4a4", CALIB, EVAL)
    assert "\n" not in str(e.value)
    transform_checkpoint(src, tmp_path / "quarot", _cov(64), 0, seed=0)
    assert _rel_logit_diff(src, tmp_path / "quarot") < 1e-4
    transform_checkpoint(src, tmp_path / "quad", _cov(64), 8, seed=0)
    with pytest.raises(Exception, match="short_factor"):   # what the refusal spares the user after the stats pass
        load_model(tmp_path / "quad")


def test_transform_refuses_too_many_outlier_dims_and_unknown_tensors(tiny_model):
    from safetensors.torch import load_file

    state = load_file(tiny_model / "model.safetensors")
    config = json.loads((tiny_model / "config.json").read_text())
    with pytest.raises(BadInput, match="outside 0..8"):
        transform_state(state, config, _cov(64), 9, 0)
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(BadInput, match="Llama-style"):
        transform_state(state, config, _cov(64), 8, 0)


def test_fake_quant_per_token_levels_clip_and_gradient():
    x = torch.randn(5, 64, requires_grad=True)
    q = fake_quant_per_token(x, 4, 0.9)
    for row, qrow in zip(x, q):
        scale = row.abs().max() * 0.9 / 7
        levels = torch.round(qrow / scale)
        assert torch.allclose(levels * scale, qrow, atol=1e-6)
        assert levels.min() >= -8 and levels.max() <= 7 and levels.unique().numel() <= 16
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))     # straight-through
    assert fake_quant_per_token(x, 16, 0.9) is x


def test_quad_format_forward_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 12, 72, 8
    codes = torch.randint(0, 16, (out_f, in_f - r), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_f, 1, generator=g) * 0.01
    w_out = torch.randn(out_f, r, generator=g)
    A, s = rotation.random_factors(in_f, 5)
    params = {"bits": 4, "outlier_cols": r, "act_bits": 4, "act_clip": 0.9, "rotate": True}
    fields = packed_tensors("quad", codes=codes, scales=scales, w_outlier=w_out, rot_a=A, rot_signs=s, **params)
    assert fields["qweight"].dtype == torch.int32 and fields["qweight"].numel() * 32 == out_f * (in_f - r) * 4
    m = make_module("quad", params, in_f, out_f, bias=False)
    m.load_state_dict(fields)
    x = torch.randn(3, in_f, generator=g)
    xr = x @ rotation.dense(A, s).float()
    w_main = (codes.float() - 8) * scales.half().float()
    expected = fake_quant_per_token(xr[:, r:], 4, 0.9) @ w_main.T + xr[:, :r] @ w_out.half().float().T
    assert torch.allclose(m(x), expected, atol=1e-5)


@pytest.mark.parametrize("bad,match", [({"act_bits": 3}, "act_bits"), ({"act_clip": 1.5}, "act_clip"),
                                       ({"outlier_cols": -1}, "outlier_cols"), ({"rotate": "yes"}, "rotate")])
def test_quad_format_params_are_checked(bad, match):
    params = {"bits": 4, "outlier_cols": 8, "act_bits": 4, "act_clip": 0.9, "rotate": False} | bad
    with pytest.raises(ValueError, match=match):
        check_params("quad", params)


def test_presets():
    assert preset("quad-w4a4").methods[0].r == 64
    assert preset("quarot-w4a4").methods[0].r == 0
    m = preset("quad-w4a4a8-peft").methods[0]
    assert m.act8 and m.peft_steps == 200
    assert preset("quad-w4a4-r16").methods[0].r == 16
    with pytest.raises(BadInput, match="QuaRot has no outlier"):
        preset("quarot-w4a4-r16")


def test_quad_pipeline_end_to_end(tiny_model, tmp_path):
    store = LocalStore(tmp_path)
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "quad-w4a4a8", CALIB, EVAL)
    assert plan.transforms and plan.sequential and "residual_cov" in plan.statistics
    assert plan.recipe.methods[0].r == 8          # capped at hidden / 8, and the recipe says so
    out = run_stages(store, plan)
    packed = store.materialize(out["packed"])
    model = load_model(packed)
    layer = model.model.layers[1]
    assert type(layer.self_attn.q_proj).__name__ == "QuadLinear"
    assert (layer.self_attn.q_proj.outlier_cols, layer.self_attn.q_proj.act_bits) == (8, 4)
    assert (layer.mlp.down_proj.outlier_cols, layer.mlp.down_proj.act_bits, layer.mlp.down_proj.rotate) == (0, 8, True)
    metrics = store.get_json(out["metrics"])
    # The evaluation ran on this very checkpoint: reloading it reproduces the reported perplexity.
    again = pipeline.evaluate_path(packed, plan.model, EVAL, plan.recipe.name)
    assert again["perplexity"] == metrics["perplexity"]
    # Effective bits from bytes: int4 codes + fp16 scales + fp16 outlier columns.
    assert 4.0 < metrics["bits_per_weight"] < 6.0
    # QUAD with quantization switched off entirely would be the dense model; quantized, it must differ
    # from it but stay close (top-1 agreement well above chance on a random tiny model's logits).
    assert all(v["kl"] > 0 for v in metrics["kl"].values())


def test_quad_beats_quarot_on_output_error_with_outlier_channels(tiny_model, tmp_path):
    """With a massive-activation channel in the residual stream, keeping the outlier directions in
    full precision must reduce the error of the quantized model's hidden states against the dense one."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "outlier-model"
    src.mkdir()
    for f in tiny_model.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(tiny_model / "model.safetensors")
    state["model.embed_tokens.weight"][:, 5] *= 60.0     # one channel far larger than the rest
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    store = LocalStore(tmp_path / "store")
    errs = {}
    for recipe in ("quarot-w4a4", "quad-w4a4"):
        plan = pipeline.preflight(ModelRef(ref=str(src)), recipe, CALIB, EVAL)
        out = run_stages(store, plan, base=False)
        model, dense = load_model(store.materialize(out["packed"])), load_model(src)
        windows = CalibrationSet.get(store, out["calib"]).windows
        with torch.no_grad():
            errs[recipe] = F.kl_div(model(windows).logits.log_softmax(-1), dense(windows).logits.log_softmax(-1),
                                    log_target=True, reduction="batchmean").item()
    assert errs["quad-w4a4"] < errs["quarot-w4a4"], errs


def test_peft_tunes_only_outliers_and_scales(tiny_model, tmp_path):
    from safetensors.torch import load_file

    store = LocalStore(tmp_path)
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), "quad-w4a4a8-peft4", CALIB, EVAL)
    assert plan.tunes
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    target = pipeline.transform(store, plan.model, plan.recipe, stats)
    blocks = pipeline.compress_sequential(store, target, plan.recipe, calib, stats)
    packed = pipeline.pack(store, target, plan.recipe, blocks)
    # A larger learning rate than the default, so four steps move the fp16 tensors visibly.
    fast = plan.recipe.model_copy(update={"methods": [plan.recipe.methods[0].model_copy(update={"peft_lr": 1e-3})]})
    tuned = pipeline.tune(store, target, fast, calib, packed)
    assert pipeline.tune(store, target, fast, calib, packed) == tuned    # cached: same inputs, same output
    before = load_file(store.materialize(packed) / "model.safetensors")
    after = load_file(store.materialize(tuned) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".scales", ".w_outlier")) for k in changed)
    assert any(k.endswith(".w_outlier") for k in changed) and any(k.endswith(".scales") for k in changed)
    config = json.loads((store.materialize(tuned) / "config.json").read_text())
    assert config["quantization_config"]["peft"]["steps"] == 4
    assert type(load_model(store.materialize(tuned)).model.layers[0].mlp.up_proj).__name__ == "QuadLinear"


def test_quad_dequantize_is_what_the_layer_computes_without_activation_quant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g) * 0.05
    x = torch.randn(256, 64, generator=g)
    method = get_method(preset("quad-w4a16").methods[0])
    c = method.compress_linear("model.layers.0.mlp.down_proj", w, {"xtx": x.T @ x})
    assert c.params["rotate"] and c.params["outlier_cols"] == 0
    m = make_module("quad", c.params, 64, 16, bias=False)
    m.load_state_dict(packed_tensors("quad", **c.tensors, **c.params))
    assert torch.allclose(m(x), x @ method.dequantize(c).T, atol=1e-4)
    assert ((method.dequantize(c) - w).norm() / w.norm()) < 0.15

"""QuantLinear ("intq") and loading packed checkpoints through transformers' from_pretrained."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import squeezeflow.hf_integration as hf_integration
from squeezeflow.kernels.formats import FORMATS, make_module, packed_tensors
from squeezeflow.kernels.quant_linear import QuantLinear


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest, asymmetric per group from its min/max: (codes uint8, scales fp16, zeros fp16)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    maxq = 2**bits - 1
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / maxq).clamp(min=1e-5).half()
    zeros = torch.round(-low / scales.float()).clamp(0, maxq).half()
    codes = torch.round(groups / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).clamp(0, maxq)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, zeros


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The format's formula written out independently of QuantLinear."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (codes.float() - z) * s


def random_layer(out_features: int, in_features: int, bits: int, group_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    return rtn(weight, bits, group_size)


# ---- QuantLinear ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "in_features", "group_size"),
    [(2, 64, 16), (3, 96, 32), (4, 128, 64), (5, 40, 8), (6, 48, 48), (7, 72, 24), (8, 64, 64)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_matches_dense_linear(bits: int, in_features: int, group_size: int, with_bias: bool) -> None:
    codes, scales, zeros = random_layer(24, in_features, bits, group_size, seed=bits)
    bias = torch.randn(24) if with_bias else None
    layer = QuantLinear.from_codes(codes, scales, zeros, bits, group_size, bias=bias)
    weight = dequantize_reference(codes, scales, zeros, group_size)
    assert torch.equal(layer.dequantize(), weight)

    x = torch.randn(3, 5, in_features)
    assert torch.equal(layer(x), F.linear(x, weight, bias))
    # Lower-precision activations: dequantize in fp32, then cast to the input dtype.
    xb = x.to(torch.bfloat16)
    expected = F.linear(xb, weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
    assert torch.equal(layer(xb), expected)


def test_buffers_have_the_documented_layout() -> None:
    codes, scales, zeros = random_layer(16, 96, 3, 32)
    layer = QuantLinear.from_codes(codes, scales, zeros, 3, 32)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (16, 9)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (16, 3)
    assert layer.zeros.dtype == torch.float16 and layer.zeros.shape == (16, 3)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros"}


def test_dequantized_weight_cache() -> None:
    codes, scales, zeros = random_layer(8, 32, 4, 16)
    layer = QuantLinear.from_codes(codes, scales, zeros, 4, 16)
    x = torch.randn(2, 32)
    layer(x)
    assert layer._cache is None  # off by default

    layer.cache_dequantized = True
    first = layer(x)
    cached = layer._cache
    assert cached is not None
    assert torch.equal(layer(x), first) and layer._cache is cached

    # An in-place edit of a buffer (as load_state_dict does) must not serve the stale weight.
    layer.scales.mul_(2)
    assert torch.allclose(layer(x), 2 * first, atol=1e-5)
    assert layer._cache is not cached

    layer.invalidate_cache()
    assert layer._cache is None


def test_dtype_casts_keep_packed_fields_exact() -> None:
    codes, scales, zeros = random_layer(8, 64, 3, 32)
    layer = QuantLinear.from_codes(codes, scales, zeros, 3, 32, bias=torch.randn(8))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    after = layer.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    layer.to("meta")
    assert layer.qweight.device.type == "meta" and layer.scales.dtype == torch.float16


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantLinear(100, 8, bits=4, group_size=64)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 8, bits=9, group_size=64)
    codes, scales, zeros = random_layer(8, 64, 4, 32)
    with pytest.raises(ValueError, match="integer zero-points"):
        QuantLinear.from_codes(codes, scales, zeros + 0.5, 4, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantLinear.from_codes(codes, scales[:, :1], zeros, 4, 32)


def test_format_registry() -> None:
    assert FORMATS["intq"] is QuantLinear
    module = make_module("intq", {"format": "intq", "bits": 3, "group_size": 32}, 64, 16, bias=True)
    assert isinstance(module, QuantLinear) and module.bias is not None
    codes, scales, zeros = random_layer(16, 64, 3, 32)
    fields = packed_tensors("intq", codes=codes, scales=scales, zeros=zeros, bits=3, group_size=32)
    assert set(fields) == {"qweight", "scales", "zeros"}
    assert {k: v.shape for k, v in fields.items()} == {k: v.shape for k, v in module.state_dict().items() if k != "bias"}
    with pytest.raises(ValueError, match="unknown packed format"):
        make_module("nope", {}, 64, 16, bias=False)
    with pytest.raises(ValueError, match="unknown"):
        make_module("intq", {"bits": 4, "group_size": 32, "sym": True}, 64, 16, bias=False)


# ---- packed checkpoints through from_pretrained -----------------------------------------------

# Mixed settings: 4-bit grouped, 3-bit (codes straddle words), and per-channel groups.
MODULE_SETTINGS = {
    "self_attn.q_proj": (4, 32),
    "self_attn.k_proj": (3, 64),
    "self_attn.v_proj": (8, 64),
    "self_attn.o_proj": (4, 64),
    "mlp.gate_proj": (3, 32),
    "mlp.up_proj": (2, 64),
    "mlp.down_proj": (4, 128),  # group_size == in_features: per output channel
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def write_packed_checkpoint(path: Path, format_version: int = 1, fmt: str = "intq") -> LlamaForCausalLM:
    """Quantize every decoder linear of a tiny Llama with RTN and save it packed to ``path``.

    Returns the dense model holding the dequantized weights (the reference the packed one must match).
    """
    model = tiny_llama()
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else None
        if suffix not in MODULE_SETTINGS:
            continue
        bits, group_size = MODULE_SETTINGS[suffix]
        codes, scales, zeros = rtn(module.weight.data, bits, group_size)
        for field, tensor in packed_tensors("intq", codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size).items():
            tensors[f"{name}.{field}"] = tensor
        modules[name] = {"format": fmt, "bits": bits, "group_size": group_size}
        module.weight.data = dequantize_reference(codes, scales, zeros, group_size)

    packed_weights = {f"{name}.weight" for name in modules}
    for key, tensor in model.state_dict().items():
        # lm_head is tied to the embeddings: HF checkpoints store the shared tensor once.
        if key not in packed_weights and key != "lm_head.weight":
            tensors[key] = tensor.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    # Without "dtype", from_pretrained takes the first floating tensor's dtype, which could be fp16 scales.
    config["dtype"] = "float32"
    config["quantization_config"] = {"quant_method": "squeezeflow", "format_version": format_version, "modules": modules}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return model


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    path = tmp_path_factory.mktemp("packed")
    dense = write_packed_checkpoint(path)
    return dense, path


def test_packed_checkpoint_loads_and_matches_dense(packed: tuple[LlamaForCausalLM, Path]) -> None:
    dense, path = packed
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    # Packed tensors keep their stored dtypes and values.
    from safetensors.torch import load_file

    stored = load_file(str(path / "model.safetensors"))
    for field in ("qweight", "scales", "zeros"):
        loaded = getattr(model.model.layers[0].mlp.gate_proj, field)
        expected = stored[f"model.layers.0.mlp.gate_proj.{field}"]
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected)

    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = dense(input_ids).logits
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)

    generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 17)
    assert torch.equal(generated, dense.generate(input_ids, max_new_tokens=5, do_sample=False))


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    write_packed_checkpoint(tmp_path, format_version=2)
    with pytest.raises(ValueError, match="format_version 2"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    write_packed_checkpoint(tmp_path, fmt="nope")
    with pytest.raises(ValueError, match="unknown packed format 'nope'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_registration_is_idempotent(packed: tuple[LlamaForCausalLM, Path]) -> None:
    hf_integration.register()
    importlib.reload(hf_integration)
    model = AutoModelForCausalLM.from_pretrained(packed[1])
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)

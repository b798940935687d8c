import pytest
import torch

from squeezeflow.methods.intq import RTNConfig
from squeezeflow.recipes import load_recipe
from squeezeflow.errors import BadInput
from squeezeflow.methods.intq.rtn import RTN, dequantize_groupwise, quantize_groupwise


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
def test_rtn_error_is_within_half_a_step(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(32, 128) * 0.05
    codes, scales, zeros = quantize_groupwise(w, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    w_hat = dequantize_groupwise(codes, scales, zeros, group)
    step = scales.float().repeat_interleave(group, dim=1)
    # Min-max covers the group's range, so every weight is at most half a step from its grid point
    # (plus fp16 rounding of the scale, which can shift the grid end by a hair).
    assert ((w - w_hat).abs() <= step / 2 + 1e-6 + step * 2 ** bits * 1e-3).all()
    if bits == 8:
        assert (w - w_hat).abs().max() < 1e-3


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [(w - dequantize_groupwise(*quantize_groupwise(w, b, 64), 64)).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_per_channel_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.5  # constant positive row: the grid still holds it exactly
    m = RTN(RTNConfig(bits=4, group_size=None))
    c = m.compress_linear("x", w, {})
    assert c.params["group_size"] == 64
    assert torch.allclose(m.dequantize(c), w, atol=1e-3)


@pytest.mark.parametrize("name,bits,group", [("rtn-w4g64", 4, 64), ("rtn-w3g32", 3, 32), ("rtn-w8gc", 8, None), ("rtn-w2", 2, None)])
def test_presets(name, bits, group):
    r = load_recipe(name)
    assert r.name == name and r.methods[0].bits == bits and r.methods[0].group_size == group


@pytest.mark.parametrize("name", ["rtn-w1g64", "rtn-w9g64", "awq-w4g64", "rtn-w4g0", "rtn-w4g64-act", "gptq-w1g64"])
def test_bad_presets_are_bad_input(name):
    with pytest.raises(BadInput):
        load_recipe(name)


def test_yaml_recipe(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("methods:\n  - {method: rtn, bits: 3, group_size: 32}\n")
    r = load_recipe(str(f))
    assert r.name == "mine" and r.methods[0].bits == 3
    f.write_text("methods:\n  - {method: rtn, bits: 3, group_size: 32, colour: red}\n")
    with pytest.raises(BadInput, match="colour"):
        load_recipe(str(f))


def test_group_must_divide_inputs():
    m = RTN(RTNConfig(bits=4, group_size=128))
    with pytest.raises(BadInput, match="does not divide in_features 576"):
        m.check({"model.layers.0.self_attn.q_proj": (576, 576)})
    RTN(RTNConfig(bits=4, group_size=64)).check({"q": (576, 576), "down": (576, 1536)})

"""Exp-Golomb storage: the coder (bit-exact round trip, known bits, corrupt input), the "eg" packed format
around intq and rf8, tiny-model pipeline round trips for rf8 / fp8 / *-eg, and BackSlash (λ = 0 no-op)."""
import json

import numpy as np
import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.gg import BackSlashConfig
from squeezeflow.kernels import expgolomb, formats
from squeezeflow.kernels import rf8_linear
from squeezeflow.methods import get_method
from squeezeflow.methods.gg import backslash, ggd
from squeezeflow.methods.intq.rtn import quantize_groupwise
from squeezeflow.models import decoder_linears, load_model
from squeezeflow.store import LocalStore

CALIB = CalibrationSpec(n_samples=4, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)


def test_known_stream():
    # 5 is most frequent (rank 0 -> "1"), 7 next (rank 1 -> "010"): 1 1 1 010 + two pad zeros.
    stream, symbols, offsets = expgolomb.encode(np.array([5, 5, 7, 5]))
    assert symbols.tolist() == [5, 7] and offsets.tolist() == [0]
    assert stream.tolist() == [0b11010100]
    assert expgolomb.decode(stream, symbols, offsets, 4).tolist() == [5, 5, 7, 5]
    assert expgolomb.code_lengths(np.arange(7)).tolist() == [1, 3, 3, 5, 5, 5, 5]


@pytest.mark.parametrize("n,chunk,dist", [(1, 4096, "one"), (1000, 7, "uniform"), (50_001, 4096, "laplace"),
                                          (4096 * 3, 4096, "laplace"), (300, 1, "uniform")])
def test_round_trip_is_bit_exact(n, chunk, dist):
    rng = np.random.default_rng(n)
    if dist == "one":
        codes = np.array([200])
    elif dist == "uniform":
        codes = rng.integers(0, 256, n)
    else:
        codes = np.clip(np.round(rng.laplace(8, 1.5, n)), 0, 15).astype(np.int64)
    stream, symbols, offsets = expgolomb.encode(codes, chunk=chunk)
    assert np.array_equal(expgolomb.decode(stream, symbols, offsets, n, chunk=chunk), codes)
    assert stream.size == -(-expgolomb.encoded_bits(codes) // 8)
    assert offsets.size == -(-n // chunk)


def test_frequency_ranking_beats_fixed_length_on_peaked_codes():
    # Laplace weights, one min-max grid per row: most codes sit near the grid's zero. (With groups of
    # 64 the grid follows the group's own extremes and k = 0 exp-Golomb loses to fixed length.)
    w = ggd.sample(1.0, 0.02, (256, 512), torch.Generator().manual_seed(0)).float()
    codes, _, _ = quantize_groupwise(w, 4, 512)
    bits = expgolomb.encoded_bits(codes) / codes.numel()
    assert bits < 4.0
    assert expgolomb.rank_table(codes)[0] in (7, 8)   # the code of ~0 is the most frequent


def test_bad_streams_raise():
    codes = np.arange(100) % 9
    stream, symbols, offsets = expgolomb.encode(codes, chunk=16)
    with pytest.raises(ValueError, match="too short"):
        expgolomb.decode(stream[:-1], symbols, offsets, 100, chunk=16)
    with pytest.raises(ValueError, match="offsets must increase"):
        expgolomb.decode(stream, symbols, offsets[::-1].copy(), 100, chunk=16)
    with pytest.raises(ValueError, match="offsets"):
        expgolomb.decode(stream, symbols, offsets[:-1], 100, chunk=16)
    with pytest.raises(ValueError, match="rank table"):
        expgolomb.decode(stream, symbols[:3], offsets, 100, chunk=16)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        expgolomb.encode(np.array([1, 300]))


def test_eg_params_are_checked():
    good = {"format": "eg", "inner": "intq", "bits": 4, "group_size": 32, "stream_bytes": 10, "n_symbols": 16, "chunk": 4096}
    formats.check_params("eg", good)
    with pytest.raises(ValueError, match="missing"):
        formats.check_params("eg", {k: v for k, v in good.items() if k != "stream_bytes"})
    with pytest.raises(ValueError, match="inner"):
        formats.check_params("eg", dict(good, inner="vq"))
    with pytest.raises(ValueError, match="n_symbols"):
        formats.check_params("eg", dict(good, n_symbols=0))
    with pytest.raises(ValueError, match="group_size"):
        formats.check_params("eg", dict(good, group_size=0))


@pytest.mark.parametrize("inner", ["intq", "rf8"])
def test_eg_module_decodes_the_inner_weight(inner):
    from squeezeflow.kernels.eg_linear import stream_params

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * 0.03
    if inner == "intq":
        codes, scales, zeros = quantize_groupwise(w, 4, 32)
        tensors, params = {"codes": codes, "scales": scales, "zeros": zeros}, {"bits": 4, "group_size": 32}
    else:
        codes, exp_bias = rf8_linear.encode(w)
        tensors, params = {"codes": codes, "exp_bias": exp_bias}, {}
    plain = formats.make_module(inner, params, 64, 48, False)
    plain.load_state_dict(formats.packed_tensors(inner, **tensors, **params))
    params = {"inner": inner, **params, **stream_params(codes, chunk=512)}
    fields = formats.packed_tensors("eg", **tensors, **params)
    layer = formats.make_module("eg", params, 64, 48, False)
    layer.load_state_dict(fields)
    assert "qweight" not in fields and "stream" in fields
    assert torch.equal(layer.decoded_codes(), codes)
    assert torch.equal(layer.dequantize(), plain.dequantize())
    with pytest.raises(ValueError, match="parameters say"):
        formats.packed_tensors("eg", **tensors, **dict(params, stream_bytes=params["stream_bytes"] + 1))


def _packed(tiny_model, tmp_path, recipe):
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CALIB, EVAL)
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    blocks, packed = pipeline.compress_to_packed(store, plan, calib, stats)
    return store, plan, blocks, store.materialize(packed)


@pytest.mark.parametrize("recipe,plain,module", [("rf8", None, "RF8Linear"), ("fp8-e4m3", None, "FP8Linear"),
                                                 ("rtn-w4g32-eg", "rtn-w4g32", "EGLinear"),
                                                 ("rf8-eg", "rf8", "EGLinear")])
def test_tiny_pipeline_round_trip(tiny_model, tmp_path, recipe, plain, module):
    store, plan, blocks, path = _packed(tiny_model, tmp_path, recipe)
    net = load_model(path)                               # from_pretrained through the squeezeflow quantizer
    method = get_method(plan.recipe.methods[0])
    dense = load_model(tiny_model)
    layers = json.loads(store.get_tensors_metadata(blocks[0])["layers"])
    data = store.get_tensors(blocks[0])
    from squeezeflow.methods.base import CompressedLinear
    for name, lin in decoder_linears(dense.model.layers[0]).items():
        c = CompressedLinear(layers[name]["format"], layers[name]["params"],
                             {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")})
        lin.weight.data = method.dequantize(c)
        assert type(net.get_submodule(f"model.layers.0.{name}")).__name__ == module
    ids = torch.arange(100, 120).unsqueeze(0)
    with torch.no_grad():
        for name, lin in decoder_linears(net.model.layers[0]).items():
            assert torch.equal(lin.dequantize(), decoder_linears(dense.model.layers[0])[name].weight)
    if plain:   # exp-Golomb changes the storage, never the weights: same logits as the fixed-length recipe
        ref = load_model(_packed(tiny_model, tmp_path / "plain", plain)[3])
        with torch.no_grad():
            assert torch.equal(net(ids).logits, ref(ids).logits)


def test_backslash_lambda_zero_is_an_exact_no_op(tiny_model, tmp_path):
    windows = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    backslash.tune_checkpoint(tiny_model, tmp_path / "out", windows, BackSlashConfig(lam=0.0))
    for f in sorted(tiny_model.iterdir()):
        if f.is_file():
            assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()


def test_backslash_lowers_the_rate_term(tiny_model, tmp_path):
    windows = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = BackSlashConfig(lam=50.0, steps=3, lr=1e-3, seqlen=32, windows=4)
    rec = backslash.tune_checkpoint(tiny_model, tmp_path / "out", windows, cfg)
    assert rec["steps"] == 3 and len(rec["log"]) == 3 and rec["seconds_per_step"] > 0
    before = [w for layer in load_model(tiny_model).model.layers for w in
              (lin.weight for lin in decoder_linears(layer).values())]
    after = [w for layer in load_model(tmp_path / "out").model.layers for w in
             (lin.weight for lin in decoder_linears(layer).values())]
    nu = backslash.pooled_shape(before)
    with torch.no_grad():
        assert float(backslash.rate(after, nu, cfg.eps)) < float(backslash.rate(before, nu, cfg.eps))
    assert 0.1 <= rec["nu_final"] <= 3.0


def test_backslash_recipe_runs_tune_quantize_and_codes(tiny_model, tmp_path):
    _, _, _, zero = _packed(tiny_model, tmp_path / "a", "backslash-l0-w4g32")
    _, _, _, plain = _packed(tiny_model, tmp_path / "b", "rtn-w4g32-eg")
    # λ = 0: the same codes and stream as plain RTN + exp-Golomb
    assert (zero / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    modules = json.loads((zero / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["format"] for m in modules.values()} == {"eg"} and {m["inner"] for m in modules.values()} == {"intq"}

"""NoWag-VQ (squeezeflow.methods.nowag.vq) and its packed format "vq" (kernels/vq_linear.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.nowag import NoWagVQConfig
from squeezeflow.recipes import load_recipe
from squeezeflow.errors import BadInput
from squeezeflow.kernels.formats import FORMATS, check_params, make_module, packed_tensors
from squeezeflow.kernels.intpack import packed_width
from squeezeflow.kernels.vq_linear import VQLinear
from squeezeflow.methods import get_method, registrations
from squeezeflow.methods.nowag.kmeans import matrix_subvectors, nearest_centroids
from squeezeflow.methods.nowag.norm import denormalize, normalize
from squeezeflow.methods.nowag.vq import NoWagVQ
from squeezeflow.store import LocalStore


def layer(out=96, inn=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen) * torch.rand(1, inn, generator=gen) * 0.1
    h = torch.rand(inn, generator=gen) ** 4
    return w, h


@pytest.fixture(scope="module")
def compressed():
    w, h = layer()
    method = NoWagVQ(NoWagVQConfig(bits=1, d=6))   # K = 64
    return method, w, h, method.compress_linear("m.q_proj", w, {"hdiag": h})


def test_registered_and_preset():
    assert registrations()["nowag-vq"].method is NoWagVQ and FORMATS["vq"] is VQLinear
    cfg = load_recipe("nowag-vq2").methods[0]
    assert isinstance(get_method(cfg), NoWagVQ) and get_method(cfg).k == 4096
    assert get_method(load_recipe("nowag-vq3").methods[0]).k == 4096


def test_normalize_denormalize_is_exact_to_fp32_rounding():
    w, _ = layer(64, 80)
    w_bar, r, c = normalize(w)
    torch.testing.assert_close(denormalize(w_bar, r, c), w, rtol=4e-7, atol=1e-9)


def test_compressed_fields_and_metrics(compressed):
    method, w, h, c = compressed
    assert c.format == "vq" and c.params == {"bits": 1, "d": 6, "k": 64}
    t = c.tensors
    assert t["codes"].shape == (96, 17) and not t["codes"].dtype.is_floating_point
    assert t["codebook"].dtype == torch.float16 and t["codebook"].shape == (64, 6)
    assert t["row_norms"].dtype == torch.float16 and t["row_norms"].shape == (96,)
    assert t["col_norms"].dtype == torch.float16 and t["col_norms"].shape == (100,)
    m = c.metrics
    assert m["vq_converged"] and 1 <= m["vq_iterations"] <= 100 and 1 <= m["vq_codes_used"] <= 64
    assert 0 < m["vq_normalized_rel_err"] < 1
    assert all(isinstance(v, (bool, int, float)) for v in m.values())   # JSON-able, no timings


def test_codes_are_nearest_to_the_stored_fp16_codebook(compressed):
    method, w, h, c = compressed
    r16, c16 = c.tensors["row_norms"].float(), c.tensors["col_norms"].float()
    w_bar = w / r16.unsqueeze(1) / c16.unsqueeze(0)
    points, weights, groups = matrix_subvectors(w_bar, h, 6)
    codes = nearest_centroids(points, c.tensors["codebook"].float(), weights, groups)
    assert torch.equal(codes.view(96, -1), c.tensors["codes"].long())


def test_deterministic(compressed):
    method, w, h, c = compressed
    again = NoWagVQ(NoWagVQConfig(bits=1, d=6)).compress_linear("m.q_proj", w.clone(), {"hdiag": h.clone()})
    assert all(torch.equal(c.tensors[k], again.tensors[k]) for k in c.tensors) and c.metrics == again.metrics


def test_vq_beats_rounding_the_normalized_weight_to_one_bit(compressed):
    method, w, h, c = compressed
    w_hat = method.dequantize(c)
    err = ((w - w_hat) ** 2 * h).sum() / (w ** 2 * h).sum()
    w_bar, r, col = normalize(w)
    sign = denormalize(w_bar.sign() * w_bar.abs().mean(), r, col)
    assert err < ((w - sign) ** 2 * h).sum() / (w ** 2 * h).sum()


@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_layer_computes_exactly_the_dequantized_weight(compressed, with_bias):
    method, w, h, c = compressed
    bias = torch.randn(96) if with_bias else None
    fields = packed_tensors("vq", **c.tensors, **c.params, bias=bias)
    assert set(fields) == {"qcodes", "codebook", "row_norms", "col_norms"} | ({"bias"} if with_bias else set())
    assert fields["qcodes"].dtype == torch.int32 and fields["qcodes"].shape == (96, packed_width(17, 6))
    module = make_module("vq", {"format": "vq", **c.params}, 100, 96, with_bias)
    module.load_state_dict(fields)
    w_hat = method.dequantize(c)
    assert torch.equal(module.dequantize(), w_hat)
    x = torch.randn(2, 5, 100)
    assert torch.equal(module(x), F.linear(x, w_hat, bias))
    module.denormalize_otf = True
    torch.testing.assert_close(module(x), F.linear(x, w_hat, bias), rtol=1e-5, atol=1e-6)
    assert torch.equal(module.forward_otf(x), module(x))
    module.cache_dequantized = True
    first = module(x)
    assert torch.equal(module(x), first)
    # A half-precision model computes in half, from the same stored fields.
    module.half()
    assert module.codebook.dtype == torch.float16 and module(x.half()).dtype == torch.float16


def test_effective_bits_from_packed_bytes():
    # k_proj of SmolLM2 at nowag-vq2: 12-bit indices for 6 weights, + fp16 codebook and norms.
    out, inn, bits, d, k = 192, 576, 2, 6, 4096
    n_sub = inn // d
    codes = torch.randint(0, k, (out, n_sub))
    fields = packed_tensors("vq", codes=codes, codebook=torch.randn(k, d), row_norms=torch.ones(out),
                            col_norms=torch.ones(inn), bits=bits, d=d, k=k)
    total_bits = 8 * sum(t.numel() * t.element_size() for t in fields.values())
    expect = out * n_sub * bits * d + 16 * k * d + 16 * (out + inn)
    assert total_bits == expect
    # A 4096 x 6 fp16 codebook is large next to a small matrix: 5.67 bits per weight here.
    assert total_bits / (out * inn) == pytest.approx(2 + 3.556 + 0.111, abs=1e-3)
    # Over the whole model (one codebook per matrix) the overhead shrinks: gate_proj 1536x576.
    assert (1536 * 96 * 12 + 16 * k * d + 16 * (1536 + 576)) / (1536 * 576) == pytest.approx(2.48, abs=0.01)


def test_format_params_are_validated():
    check_params("vq", {"format": "vq", "bits": 2, "d": 6, "k": 4096})
    for bad in ({"bits": 2, "d": 6}, {"bits": 2, "d": 6, "k": 1000}, {"bits": 3, "d": 6, "k": 2 ** 18},
                {"bits": 2, "d": 6, "k": 4096, "group_size": 64}, {"bits": True, "d": 6, "k": 64}):
        with pytest.raises(ValueError):
            check_params("vq", bad)
    with pytest.raises(ValueError, match="columns"):
        VQLinear.pack_fields(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(64, 6), torch.ones(4),
                             torch.ones(10), 1, 6, 64)


def test_bad_input():
    method = NoWagVQ(NoWagVQConfig(bits=1, d=6))
    w, h = layer(8, 12)
    with pytest.raises(BadInput, match="hdiag"):
        method.compress_linear("x", w, {})
    with pytest.raises(BadInput, match="entries"):
        method.compress_linear("x", w, {"hdiag": torch.ones(11)})
    with pytest.raises(BadInput, match="non-negative"):
        method.compress_linear("x", w, {"hdiag": -torch.ones(12)})
    with pytest.raises(BadInput, match="NaN"):
        method.compress_linear("x", w.masked_fill(w > 0, math.nan), {"hdiag": h})
    with pytest.raises(BadInput, match="bits\\*d"):
        NoWagVQ(NoWagVQConfig.model_construct(bits=3, d=6)).check({"q": (576, 576)})
    method.check({"q": (576, 576), "tiny": (2, 3)})   # any shape works (padding, lossless when tiny)


def test_small_matrix_is_lossless_up_to_fp16():
    w, h = layer(4, 10)   # 4 rows x 2 subvectors of 6 <= 64 centroids
    method = NoWagVQ(NoWagVQConfig(bits=1, d=6))
    c = method.compress_linear("x", w, {"hdiag": h})
    assert c.metrics["vq_lossless"] and c.metrics["vq_iterations"] == 0
    torch.testing.assert_close(method.dequantize(c), w, rtol=2e-3, atol=1e-6)


def test_tiny_llama_end_to_end(tiny_model, tmp_path):
    recipe = tmp_path / "vq-tiny.yaml"
    recipe.write_text("methods:\n  - {method: nowag-vq, bits: 2, d: 3}\n")   # K = 64
    text = tmp_path / "calib.txt"   # a small local corpus: tokenizing the default one takes seconds
    text.write_text(" ".join(f"Sentence {i} of a small calibration text about vectors and codebooks." for i in range(60)))
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), str(recipe),
                              CalibrationSpec(source=str(text), n_samples=2, seqlen=32),
                              EvalSpec(seqlen=32, max_windows=1))
    assert plan.statistics == ("hdiag",) and not plan.sequential
    store = LocalStore(tmp_path / "store")
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    blocks = [pipeline.compress_block(store, plan.model, i, plan.recipe, stats) for i in range(plan.model.num_layers)]
    packed = pipeline.pack(store, plan.model, plan.recipe, blocks)

    from squeezeflow.models import load_model
    net = load_model(store.materialize(packed))
    dense = load_model(tiny_model)
    method = get_method(plan.recipe.methods[0])
    with torch.no_grad():
        for i, ref in enumerate(blocks):
            data = store.get_tensors(ref)
            for name, mod in dense.model.layers[i].named_modules():
                if isinstance(mod, torch.nn.Linear):
                    fields = {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
                    from squeezeflow.methods.base import CompressedLinear
                    w_hat = method.dequantize(CompressedLinear("vq", {}, fields))
                    packed_mod = net.model.layers[i].get_submodule(name)
                    assert isinstance(packed_mod, VQLinear)
                    assert torch.equal(packed_mod.dequantize(), w_hat)
                    mod.weight.copy_(w_hat)
        ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(net(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)

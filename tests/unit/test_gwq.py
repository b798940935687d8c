"""GWQ: outlier selection, grid fitting without the outliers, the intq_outliers format, and the
pipeline end to end (layer-wise RTN base and sequential GPTQ base) on a tiny model."""
import json

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.gwq import GWQConfig
from squeezeflow.recipes import preset
from squeezeflow.kernels.formats import make_module, packed_tensors
from squeezeflow.kernels.outlier_linear import column_dtype
from squeezeflow.methods import get_method
from squeezeflow.methods.gwq import quantize_groupwise_excluding
from squeezeflow.methods.intq.rtn import dequantize_groupwise, quantize_groupwise
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import run_stages


def _layer(seed=0, out_f=16, in_f=128):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    grads = torch.rand(out_f, in_f, generator=gen)
    stats = {"gradients:8.abs_sum": grads, "gradients:8.sq_sum": grads.square() * 2,
             "hdiag": torch.rand(in_f, generator=gen) + 0.5}
    return w, stats


def test_grid_without_exclusions_is_exactly_rtn():
    w, _ = _layer()
    a = quantize_groupwise_excluding(w, 3, 32, torch.zeros_like(w, dtype=torch.bool))
    b = quantize_groupwise(w, 3, 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_outliers_do_not_stretch_the_grid_and_stay_exact():
    w, stats = _layer(1)
    w[3, 5] = 5.0  # a huge outlier: with it in the range every other weight of its group rounds to 0
    stats["gradients:8.abs_sum"][3, 5] = 100.0
    method = get_method(GWQConfig(bits=3, group_size=32, outlier_frac=0.01))
    c = method.compress_linear("l", w, stats)
    assert bool(c.tensors["keep"][3, 5]) and c.params["nnz"] == round(0.01 * w.numel())
    w_hat = method.dequantize(c)
    assert w_hat[3, 5].item() == pytest.approx(5.0)
    rtn = dequantize_groupwise(*quantize_groupwise(w, 3, 32), 32)
    group = slice(0, 32)
    err_gwq = (w_hat[3, group] - w[3, group]).square().sum()
    err_rtn = (rtn[3, group] - w[3, group]).square().sum()
    assert err_gwq < err_rtn / 10


@pytest.mark.parametrize("score", ["abs_grad", "taylor", "fisher", "hessian", "magnitude", "random"])
def test_each_score_selects_its_top_weights(score):
    w, stats = _layer(2)
    method = get_method(GWQConfig(bits=4, group_size=32, outlier_frac=0.05, score=score))
    keep = method.compress_linear("model.layers.0.mlp.up_proj", w, stats).tensors["keep"]
    s = method.saliency("model.layers.0.mlp.up_proj", w, stats)
    assert int(keep.sum()) == round(0.05 * w.numel())
    assert s[keep].min() >= s[~keep].max()
    expected = {"abs_grad": stats["gradients:8.abs_sum"], "fisher": stats["gradients:8.sq_sum"],
                "taylor": stats["gradients:8.abs_sum"] * w.abs(), "magnitude": w.abs(),
                "hessian": w.square() * stats["hdiag"]}
    if score in expected:
        assert torch.equal(s, expected[score])
    else:  # random: seeded per layer name, reproducible, different across layers
        again = method.saliency("model.layers.0.mlp.up_proj", w, stats)
        other = method.saliency("model.layers.1.mlp.up_proj", w, stats)
        assert torch.equal(s, again) and not torch.equal(s, other)


def test_requires_the_gradient_statistic_it_names():
    assert get_method(preset("gwq-w3g64-n32").methods[0]).statistics == ("gradients:32",)
    assert get_method(preset("gwq-w3g64-hessian").methods[0]).statistics == ()
    gptq = get_method(preset("gwq-w3g64-gptq").methods[0])
    assert gptq.statistics == ("xtx",) and gptq.dense_statistics == ("gradients:8",) and gptq.schedule == "sequential"
    with pytest.raises(ValueError, match="gradients:8.abs_sum"):
        get_method(GWQConfig(group_size=32)).compress_linear("l", torch.randn(4, 32), {})


@pytest.mark.parametrize("in_f,col_dtype", [(128, torch.uint8), (576, torch.int16)])
def test_packed_format_round_trip_and_sparse_forward(in_f, col_dtype):
    w, stats = _layer(3, 24, in_f)
    method = get_method(GWQConfig(bits=3, group_size=64, outlier_frac=0.02))
    c = method.compress_linear("l", w, stats)
    fields = packed_tensors("intq_outliers", **c.tensors, **c.params)
    assert fields["outlier_col"].dtype == col_dtype == column_dtype(in_f)
    assert fields["outlier_row_ptr"].shape == (25,) and int(fields["outlier_row_ptr"][-1]) == c.params["nnz"]
    layer = make_module("intq_outliers", c.params, in_f, 24, bias=False)
    layer.load_state_dict(fields)
    assert torch.equal(layer.dequantize(), method.dequantize(c))
    x = torch.randn(2, 5, in_f)
    torch.testing.assert_close(layer.forward_sparse(x), layer(x), rtol=1e-5, atol=1e-6)


def test_packing_refuses_outlier_codes_that_do_not_dequantize_to_zero():
    w, stats = _layer(4)
    c = get_method(GWQConfig(bits=3, group_size=32)).compress_linear("l", w, stats)
    codes = c.tensors["codes"].clone()
    r, col = c.tensors["keep"].nonzero()[0]
    codes[r, col] = (codes[r, col] + 1) % 8
    with pytest.raises(ValueError, match="zero-point"):
        packed_tensors("intq_outliers", **{**c.tensors, "codes": codes}, **c.params)


@pytest.mark.parametrize("recipe", ["gwq-w4g32-n2", "gwq-w4g32-gptq-n2"])
def test_pipeline_end_to_end(recipe, tiny_model, tmp_path):
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CalibrationSpec(n_samples=4, seqlen=32),
                              EvalSpec(seqlen=32, max_windows=2, kl_windows=1))
    assert "gradients:2" in plan.statistics and plan.sequential == recipe.endswith("gptq-n2")
    run = run_stages(store, plan, base=False)
    packed = store.materialize(run["packed"])
    modules = json.loads((packed / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["format"] for m in modules.values()} == {"intq_outliers"}
    net = load_model(packed)
    layer = net.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "OutlierQuantLinear" and layer.nnz == round(0.01 * layer.in_features * layer.out_features)
    data = store.get_tensors(run["blocks"][1])
    w = dequantize_groupwise(data["mlp.down_proj.codes"], data["mlp.down_proj.scales"], data["mlp.down_proj.zeros"], 32)
    w[data["mlp.down_proj.keep"]] += data["mlp.down_proj.outlier_values"].float()
    assert torch.equal(layer.dequantize(), w)
    metrics = store.get_json(run["metrics"])
    # 4-bit codes + fp16 scale and zero per 32 + 1% outliers (fp16 value + uint8 column) + row pointers.
    assert 5.0 + 0.01 * 24 < metrics["bits_per_weight"] < 5.0 + 0.01 * 24 + 0.6

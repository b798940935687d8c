"""NoWag-P, Wanda and magnitude pruning: masks, METHODS.md sanity checks, and the pipeline end to end."""
import json

import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.methods.nowag import NoWagPConfig, WandaConfig
from squeezeflow.recipes import preset
from squeezeflow.errors import BadInput
from squeezeflow.methods import get_method
from squeezeflow.methods.nowag.norm import denormalize, normalize
from squeezeflow.methods.nowag.pruning import prune_mask
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import run_stages


def _w_h(seed=0, out_f=32, in_f=48):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen), torch.rand(in_f, generator=gen) + 0.1


def test_normalize_denormalize_is_exact_to_fp32_rounding():
    w, _ = _w_h()
    w_bar, r, c = normalize(w * 3 + 0.5)
    torch.testing.assert_close(denormalize(w_bar, r, c), w * 3 + 0.5, rtol=1e-6, atol=1e-6)
    # Rows of the normalized matrix have unit norm (up to the 1e-5 guard).
    torch.testing.assert_close(w_bar.norm(dim=1), torch.ones(32), rtol=1e-4, atol=1e-4)


def test_sparsity_zero_is_the_identity():
    w, h = _w_h()
    method = get_method(NoWagPConfig(sparsity=0.0))
    c = method.compress_linear("l", w, {"hdiag": h})
    assert bool(c.tensors["mask"].all())
    assert torch.equal(method.dequantize(c), w.half().float())


@pytest.mark.parametrize("recipe", ["nowag-p50", "wanda-p50", "magnitude-p50", "nowag-p2:4", "wanda-p4:8"])
def test_masks_hit_the_requested_pattern(recipe):
    w, h = _w_h(1)
    method = get_method(preset(recipe).methods[0])
    c = method.compress_linear("l", w, {"hdiag": h})
    mask = c.tensors["mask"]
    assert mask.float().mean().item() == pytest.approx(0.5)
    if ":" in recipe:
        n, m = map(int, recipe.split("p")[-1].split(":"))
        assert bool((mask.reshape(32, -1, m).sum(-1) == n).all())
    if recipe.startswith("wanda"):  # Wanda compares within each output row
        assert bool((mask.sum(1) == 24).all())
    kept = method.dequantize(c)
    assert torch.equal(kept[mask], w.half().float()[mask]) and bool((kept[~mask] == 0).all())


def test_nowag_score_is_normalized_weight_squared_times_importance():
    w, h = _w_h(2)
    c = get_method(NoWagPConfig(sparsity=0.75)).compress_linear("l", w, {"hdiag": h})
    w_bar, _, _ = normalize(w)
    score = w_bar.square() * h
    threshold = score[c.tensors["mask"]].min()
    assert bool((score[~c.tensors["mask"]] <= threshold).all())
    # Scaling a column of W and the inverse of its importance's square root leaves NoWag's choice alone
    # for unstructured pruning: normalization removes the column scale.
    w2 = w.clone()
    w2[:, 0] *= 100
    c2 = get_method(NoWagPConfig(sparsity=0.75)).compress_linear("l", w2, {"hdiag": h})
    assert torch.equal(c2.tensors["mask"], c.tensors["mask"])


def test_importance_changes_the_choice():
    w, h = _w_h(3)
    base = get_method(WandaConfig(sparsity=0.5)).compress_linear("l", w, {"hdiag": h}).tensors["mask"]
    h2 = h.clone()
    h2[:8] = 1e6  # the first 8 inputs matter enormously: Wanda must keep them all
    heavy = get_method(WandaConfig(sparsity=0.5)).compress_linear("l", w, {"hdiag": h2}).tensors["mask"]
    assert bool(heavy[:, :8].all()) and not torch.equal(base, heavy)


def test_masks_are_deterministic_with_ties():
    score = torch.ones(4, 8)
    a = prune_mask(score, 0.5, None, per_row=False)
    assert torch.equal(a, prune_mask(score.clone(), 0.5, None, per_row=False))
    assert bool(a[:2].all()) and not bool(a[2:].any())  # ties: earlier positions win


def test_nm_that_does_not_divide_is_refused_in_preflight(tiny_model):
    with pytest.raises(BadInput, match="divisible by 48"):
        pipeline.preflight(ModelRef(ref=str(tiny_model)), "nowag-p24:48",
                           CalibrationSpec(n_samples=2, seqlen=16), EvalSpec(seqlen=16, max_windows=1))


@pytest.mark.parametrize("recipe,bits", [("nowag-p50", 9.0), ("wanda-p2:4", 9.0)])
def test_pipeline_packs_sparse_and_loads_with_from_pretrained(tiny_model, tmp_path, recipe, bits):
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(tiny_model)), recipe, CalibrationSpec(n_samples=4, seqlen=32),
                              EvalSpec(seqlen=32, max_windows=2, kl_windows=1))
    assert "hdiag" in plan.statistics and not plan.sequential
    run = run_stages(store, plan, base=False)
    blocks, packed = run["blocks"], store.materialize(run["packed"])
    config = json.loads((packed / "config.json").read_text())
    fmt = "nm" if ":" in recipe else "sparse"
    assert {e["format"] for e in config["quantization_config"]["modules"].values()} == {fmt}
    # The packed model computes exactly the pruned weights the method chose.
    dense = load_model(tiny_model)
    net = load_model(packed)
    for i in range(plan.model.num_layers):
        data = store.get_tensors(blocks[i])
        w_packed = net.model.layers[i].self_attn.q_proj.dequantize()
        mask = data["self_attn.q_proj.mask"]
        assert torch.equal(w_packed, torch.where(mask, data["self_attn.q_proj.weight"].float(), 0.0))
        assert mask.float().mean().item() == pytest.approx(0.5)
    metrics = store.get_json(run["metrics"])
    assert metrics["bits_per_weight"] == pytest.approx(bits)
    assert metrics["weight_sparsity"] == pytest.approx(0.5)  # counted from the stored values
    assert metrics["kl"]["moby-dick"]["kl"] > 0
    x = torch.randint(0, 1000, (1, 16))
    assert not torch.allclose(net(x).logits, dense(x).logits)

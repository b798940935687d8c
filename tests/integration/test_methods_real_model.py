"""Each compression method on real weights (SmolLM2-135M cut to 3 blocks): compressed, packed, published
to the real SeaweedFS registry, pulled back and loaded with from_pretrained as a consumer would; the
loaded model's perplexity equals the one in the artifact's report."""
import json

import pytest
import torch

import squeezeflow
from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.registry import open_registry
from squeezeflow.store import LocalStore
from sf_testing import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

CALIB = CalibrationSpec(n_samples=8, seqlen=128, seed=0)
EVAL = EvalSpec(seqlen=128, max_windows=4, kl_windows=1)

# recipe -> (packed module class, bits per weight from bytes, sparsity from bytes)
CASES = {
    "nowag-p2:4": ("NMLinear", 9.0, 0.5),
    "wanda-p50": ("SparseLinear", 9.0, 0.5),
    # 3-bit codes + fp16 scale/zero per 64 (3.5) + 1% outliers x (fp16 value + int16 column) + CSR row pointers.
    "gwq-w3g64-n2": ("OutlierQuantLinear", 3.867, 0.0),
    # Per ORIGINAL weight: int4 codes + fp16 scale per row; readers also keep r = 64 fp16 input columns
    # of the 576 + 63 expanded inputs (r = 64 rounded to the 9 heads); writers have 639 output rows; online rotation factors.
    "quad-w4a4a8": ("QuadLinear", 5.343, 0.0),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_method_publishes_pulls_loads_and_matches_report(recipe, s3_server, smollm_truncated, tmp_path):
    module_type, bits, sparsity = CASES[recipe]
    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(smollm_truncated)), recipe, CALIB, EVAL)
    run = run_stages(store, plan)
    base, metrics = store.get_json(run["metrics"]), None
    entry = pipeline.publish(store, run["artifact"], pipeline.registry_for(None))
    path = open_registry().pull(entry["uri"], tmp_path / "pulled")
    manifest = json.loads((path / "manifest.json").read_text())
    metrics, baseline = manifest["metrics"], manifest["baseline"]
    assert metrics == base
    assert metrics["bits_per_weight"] == pytest.approx(bits, abs=0.05)
    assert metrics["weight_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    # The 3-block cut is no language model (its perplexity is astronomical), so the compressed one is only
    # required to stay near it and to really differ from it: a broken format lands orders of magnitude away.
    for split, ppl in metrics["perplexity"].items():
        assert baseline["perplexity"][split] / 20 < ppl < 20 * baseline["perplexity"][split]
        assert metrics["kl"][split]["kl"] > 0 and metrics["kl"][split]["top1_agreement"] > 0.3

    model = squeezeflow.load(str(path))
    assert type(model.model.layers[1].mlp.down_proj).__name__ == module_type
    for split, (windows, _) in pipeline.eval_protocol(plan.model, EVAL).items():
        assert perplexity(model, windows)["perplexity"] == pytest.approx(metrics["perplexity"][split], rel=1e-5)
    ids = torch.tensor([[504, 1029, 282, 260, 1462, 314]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == 10


@pytest.mark.parametrize("r", [0, 64])
def test_quad_transform_preserves_real_model_perplexity(r, smollm_truncated, tmp_path):
    """METHODS.md sanity check: the expanded, rotated model without quantization has the original's
    perplexity within 1e-3 relative (real weights, real residual covariance, both held-out splits)."""
    from squeezeflow.models import load_model

    store = LocalStore(tmp_path / "store")
    plan = pipeline.preflight(ModelRef(ref=str(smollm_truncated)), f"quad-w4a4-r{r}" if r else "quarot-w4a4", CALIB, EVAL)
    calib = pipeline.calibrate(store, plan.model, plan.calibration)
    stats = pipeline.saliency(store, plan.model, calib, plan.statistics)
    target = pipeline.transform(store, plan.model, plan.recipe, stats)
    dense, transformed = load_model(smollm_truncated), load_model(target.path)
    used = plan.recipe.methods[0].r     # 64 rounds to 63, a multiple of SmolLM2's 9 heads
    assert used == (63 if r else 0) and transformed.config.hidden_size == 576 + used
    for split, (windows, _) in pipeline.eval_protocol(plan.model, EVAL).items():
        a, b = perplexity(dense, windows)["perplexity"], perplexity(transformed, windows)["perplexity"]
        assert abs(b / a - 1) <= 1e-3, (split, a, b)

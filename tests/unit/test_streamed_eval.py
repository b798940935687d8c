"""Streamed evaluation (one block of each model in memory) computes what the whole loaded model computes:
perplexity and KL / top-1 agreement of packed artifacts of every format family, and of dense ones."""
import pytest
import torch

from squeezeflow import pipeline
from squeezeflow.config import CalibrationSpec, EvalSpec, ModelRef
from squeezeflow.evaluation.kl import kl_and_agreement
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.evaluation import streamed
from squeezeflow.evaluation.streamed import CheckpointStream, streamed_kl, streamed_perplexity
from squeezeflow.models import load_model
from squeezeflow.store import LocalStore
from sf_testing import fast_recipe

CALIB = CalibrationSpec(n_samples=2, seqlen=32, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=1, kl_windows=0)
# One recipe per packed format: integer groups (asym, GPTQ), GWQ outliers, 2:4 and unstructured sparsity,
# VQ codebooks, QUAD's expanded + rotated layout, RF8, FP8, exp-Golomb; TRSP's plain shallower checkpoint.
RECIPES = ("rtn-w4g32", "gptq-w4g32", "gwq-w4g32", "nowag-p2:4", "nowag-p50", "nowag-vq2d4", "quad-w4a4",
           "rf8", "fp8-e4m3", "rtn-w4g32-eg", "trsp-50")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalStore(tmp_path_factory.mktemp("store"))


def _packed(store, model_path, name):
    job = pipeline.preflight(ModelRef(ref=str(model_path)), fast_recipe(name), CALIB, EVAL)
    return store.materialize(pipeline.compress_to_packed(store, job)[1])


@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_equals_whole_model(store, tiny_model, recipe, monkeypatch):
    path = _packed(store, tiny_model, recipe)
    windows = torch.randint(0, 49152, (6, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(streamed, "CHUNK_WINDOWS", 4)  # two passes over the blocks, as a long set takes
    whole = load_model(path)
    for m in whole.modules():
        if hasattr(m, "cache_dequantized"):
            m.cache_dequantized = True
    want = perplexity(whole, windows)
    got = streamed_perplexity(CheckpointStream(path), windows)
    # Summed per window instead of per batch of 4: the same terms in another order.
    assert got["nll_sum"] == pytest.approx(want["nll_sum"], rel=1e-6, abs=0), (got, want)
    assert got["predicted_tokens"] == want["predicted_tokens"]
    want_kl = kl_and_agreement(whole, load_model(tiny_model), windows[:3])
    got_kl = streamed_kl(CheckpointStream(path), CheckpointStream(tiny_model), windows[:3])
    assert got_kl["kl"] == pytest.approx(want_kl["kl"], rel=1e-5, abs=1e-9) and got_kl["kl"] > 0
    assert got_kl["top1_agreement"] == want_kl["top1_agreement"]
    assert got_kl["positions"] == want_kl["positions"]


def test_dense_stream_on_the_real_model(smollm_truncated):
    windows = torch.randint(0, 49152, (3, 48), generator=torch.Generator().manual_seed(1))
    want = perplexity(load_model(smollm_truncated), windows)["nll_sum"]
    assert streamed_perplexity(CheckpointStream(smollm_truncated), windows)["nll_sum"] == pytest.approx(want, rel=1e-6)

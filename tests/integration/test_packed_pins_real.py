"""Packed weights on real SmolLM2 weights (cut to 3 blocks) are byte-identical to what the code produced
before the trunk refactor (issue 22): sha256 of the packed model.safetensors recorded with the
pre-refactor pipeline (commit 2520c00) before any change, 4 × 64 calibration tokens."""
import pytest

from squeezeflow.config import CalibrationSpec, EvalSpec
from squeezeflow.store import LocalStore
from sf_testing import packed_sha256

pytestmark = [pytest.mark.smoke]

CALIB = CalibrationSpec(n_samples=4, seqlen=64, seed=0)
EVAL = EvalSpec(seqlen=32, max_windows=2)

PINNED = {
    "rtn-w4g64": "75479e716dbe6e240cfc024551af3be804ebbb7b6b6de31bfa3053f236050f65",
    "gptq-w3g64-act-mse": "1439ad15fcb82ec04452b8cc398ab384b5cf28cb9289c3fa7c7d9f02a1398b7e",
    "gwq-w3g64": "1b6dc7a5dbe284605f1bd906ff04a034c7cf38901c5c3522b1a28d48a726ac5e",
    "nowag-p50": "4539f83a2e21eb9e37b043922e4421edd37cca168abda99fa59ae3df40afff32",
    "rf8": "f3777f459171cdd95377bd23228cb108afb71f64dbb401a76de9daf1cf2bac00",
    "fp8-e4m3": "bd513fff53d10ad65b6bcebaff43495a10742e551b2c55ded3473e30571f21c7",
    "rtn-w4g64-eg": "4dc88fd1a32b042f05146c5cd28a154b1dad61352ea87db3ff85a2f5164654d6",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalStore(tmp_path_factory.mktemp("pins-real"))  # shared: one calibration, one statistics pass


@pytest.mark.parametrize("recipe", sorted(PINNED))
def test_packed_real_weights_are_byte_identical_to_before_the_refactor(recipe, smollm_truncated, store):
    assert packed_sha256(store, smollm_truncated, recipe, CALIB, EVAL) == PINNED[recipe]

"""No global state where a parameter will do: methods and evaluation that seed torch draw from a forked
generator, so the caller's global RNG is exactly as it was afterwards (and their own draws unchanged:
tests/unit/test_packed_pins.py pins the bytes of TRSP, QUAD-PEFT and BackSlash artifacts)."""
import torch

from squeezeflow.rng import isolated_rng


def test_isolated_rng_leaves_the_global_generator_alone():
    @isolated_rng
    def draws():
        torch.manual_seed(123)
        return torch.rand(3)

    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    a, b = draws(), draws()
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), before)


def test_evaluation_leaves_the_global_generator_alone(tiny_model):
    from squeezeflow import pipeline
    from squeezeflow.config import EvalSpec

    info = pipeline.ModelInfo(ref=str(tiny_model), name="t", path=str(tiny_model), fingerprint="-", num_layers=2)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    pipeline.evaluate_path(tiny_model, info, EvalSpec(seqlen=32, max_windows=1, kl_windows=0), "fp32")
    assert torch.equal(torch.random.get_rng_state(), before)

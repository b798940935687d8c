"""The methods run where their input tensors are (the "tensors in, tensors out" contract), checked without a
GPU: each method compresses a CPU weight while torch's default device is "meta". A tensor made without naming
its device (a factory call without device=, here or in the kernels a method calls) then lands on meta instead
of the input's device, as it would land on the host during a CUDA run: it fails on mixing with the inputs or
shows up as a meta output. The outputs must be on the input's device, in the format's dtypes, and byte-equal
to a run without the meta default (the seeded draws come from host generators, so the result does not move).
tests/unit/test_device_lint.py checks the same rule on the source text."""
import pytest
import torch

from squeezeflow.methods import get_method, parse_preset

OUT, IN = 32, 64
# preset -> {field: dtype} of its packed tensors (the ones that must have a fixed dtype)
CASES = {
    "rtn-w4g32": {"codes": torch.uint8, "scales": torch.float16, "zeros": torch.float16},
    "gptq-w3g32": {"codes": torch.uint8, "scales": torch.float16, "zeros": torch.float16},
    "gptq-w3g32-act": {"codes": torch.uint8, "scales": torch.float16, "zeros": torch.float16},
    "nowag-vq2d2": {"codes": torch.int16, "codebook": torch.float16, "row_norms": torch.float16},
    "nowag-p50": {"mask": torch.bool, "weight": torch.float16},
    "wanda-p2:4": {"mask": torch.bool, "weight": torch.float16},
    "magnitude-p50": {"mask": torch.bool, "weight": torch.float16},
    "fp8-e4m3": {"codes": torch.float8_e4m3fn, "scales": torch.float16},
    "fp8-e4m3-gptq": {"codes": torch.float8_e4m3fn, "scales": torch.float16},
    "rf8": {"codes": torch.uint8, "exp_bias": torch.int8},
    "gwq-w3g32-random": {"codes": torch.uint8, "keep": torch.bool, "outlier_values": torch.float16},
    "gwq-w3g32-gptq-hessian": {"codes": torch.uint8, "keep": torch.bool, "outlier_values": torch.float16},
    "quad-w4a4-r8": {"codes": torch.uint8, "w_outlier": torch.float16},
    "rtn-w4g32-eg": {"codes": torch.uint8},
}
# QUAD's role comes from the name: a reader keeps outlier columns, a writer is rotated online.
NAMES = {"quad-w4a4-r8": ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")}


def _inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g, device="cpu")
    x = torch.randn(256, IN, generator=g, device="cpu") * torch.linspace(0.2, 3.0, IN, device="cpu")
    return w, {"hdiag": x.square().mean(0), "xtx": x.T @ x}


def _compress(preset: str, name: str, w: torch.Tensor, stats: dict[str, torch.Tensor]):
    [config] = parse_preset(preset)
    method = get_method(config)
    c = method.compress_linear(name, w, stats)
    return c, method.dequantize(c)


@pytest.mark.parametrize("preset", sorted(CASES))
def test_outputs_stay_on_the_inputs_device(preset):
    w, stats = _inputs()
    for name in NAMES.get(preset, ("model.layers.0.mlp.down_proj",)):
        expected, expected_hat = _compress(preset, name, w, stats)
        with torch.device("meta"):       # every tensor made without a device now lands on meta
            c, w_hat = _compress(preset, name, w, stats)
        assert {k: t.device.type for k, t in c.tensors.items()} == {k: "cpu" for k in c.tensors}
        assert {k: c.tensors[k].dtype for k in CASES[preset]} == CASES[preset]
        assert (w_hat.device.type, w_hat.dtype, tuple(w_hat.shape)) == ("cpu", torch.float32, (OUT, IN))
        assert c.tensors.keys() == expected.tensors.keys()
        for k, t in c.tensors.items():
            assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                               expected.tensors[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                               else expected.tensors[k]), k
        assert torch.equal(w_hat, expected_hat)


def test_the_meta_default_catches_a_deviceless_tensor():
    """The check above can fail: a method-like function that makes a host tensor without naming the device."""
    w = torch.zeros(4, 4, device="cpu")
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        mask = torch.zeros(w.numel(), dtype=torch.bool)   # the device-less call the lint forbids
        mask[torch.arange(2, device="cpu")] = True
        torch.where(mask.view(4, 4), w, 0.0).sum().item()


@pytest.mark.parametrize("init", ["kmeans++", "kmeans++-clip"])
def test_kmeans_keeps_its_work_on_the_points_device(init):
    from squeezeflow.methods.nowag.kmeans import matrix_subvectors, weighted_kmeans

    w, stats = _inputs()
    points, weights, groups = matrix_subvectors(w, stats["hdiag"], 2)
    expected = weighted_kmeans(points, 64, weights, groups, init=init, seed=3)
    with torch.device("meta"):
        r = weighted_kmeans(points, 64, weights, groups, init=init, seed=3)
    assert (r.centroids.device.type, r.assignments.device.type) == ("cpu", "cpu")
    assert (r.centroids.dtype, r.assignments.dtype) == (torch.float32, torch.int64)
    assert torch.equal(r.centroids, expected.centroids) and torch.equal(r.assignments, expected.assignments)
    assert not r.lossless and r.iterations > 0

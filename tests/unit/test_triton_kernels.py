"""Triton kernels (kernels/triton_*.py) against their torch references, on the CPU through Triton's
interpreter (TRITON_INTERPRET=1), on small shapes chosen to hit partial blocks, straddling codes and
padding. The same kernels compile for the GPU; benchmarks/kernels.py times them there.
"""

import os

# The interpreter is chosen when a kernel is decorated, i.e. when its module is first imported: set it
# before anything imports triton or our kernel modules.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from squeezeflow.kernels import triton_dispatch  # noqa: E402
from squeezeflow.kernels.outlier_linear import OutlierQuantLinear  # noqa: E402
from squeezeflow.kernels.quant_linear import QuantLinear  # noqa: E402
from squeezeflow.kernels.semi_structured import semi_structured_reason  # noqa: E402
from squeezeflow.kernels.sparse_linear import NMLinear  # noqa: E402
from squeezeflow.kernels.triton_common import interpreted  # noqa: E402
from squeezeflow.kernels.triton_intq import GEMV_MAX_ROWS, _aligned, intq_linear  # noqa: E402
from squeezeflow.kernels.triton_outliers import csr_add_, intq_outliers_linear  # noqa: E402
from squeezeflow.kernels.triton_vq import vq_gemv  # noqa: E402
from squeezeflow.kernels.vq_linear import VQLinear  # noqa: E402


def test_kernels_run_in_the_interpreter():
    # Guards the premise of this file: were triton imported before the env var was set, the kernels
    # below would try to compile for a GPU that is not here.
    assert interpreted()


def random_intq(out_f: int, in_f: int, bits: int, group_size: int, bias: bool, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    n_groups = in_f // group_size
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, n_groups, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).float()
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, bias=b)


def reference(module, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, module.dequantize(x.dtype), bias)


# Rows 1 and 3 take the GEMV kernel, 20 the tl.dot GEMM; out 40 and in 96 leave partial blocks.
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_intq_kernel_matches_dequant_linear(bits, rows):
    module = random_intq(40, 96, bits, 32, bias=rows != 3, seed=bits)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    y = intq_linear(x, module.qweight, module.scales, module.zeros, bits, 32, module.bias)
    torch.testing.assert_close(y, reference(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 17])
def test_intq_kernel_float16_and_batch_dims(rows):
    module = random_intq(24, 128, 4, 64, bias=True)
    x = torch.randn(2, rows, 128).half()
    y = intq_linear(x, module.qweight, module.scales, module.zeros, 4, 64, module.bias)
    assert y.shape == (2, rows, 24) and y.dtype == torch.float16
    torch.testing.assert_close(y, reference(module, x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 48), (2, 256), (8, 32)])
def test_intq_gemv_word_aligned_and_generic_paths(bits, group_size):
    # (4, 48): 48 is no power of two, so batch 1 takes the generic GEMV; the others the word-aligned one.
    assert _aligned(bits, group_size) == (group_size != 48)
    module = random_intq(37, group_size * 3, bits, group_size, bias=True, seed=group_size)
    x = torch.randn(1, 1, group_size * 3)
    y = intq_linear(x, module.qweight, module.scales, module.zeros, bits, group_size, module.bias)
    torch.testing.assert_close(y, reference(module, x), rtol=1e-5, atol=1e-5)


def test_intq_kernel_per_channel_group():
    module = random_intq(16, 48, 3, 48, bias=False)  # group_size == in: one group per row
    x = torch.randn(2, 48)
    torch.testing.assert_close(intq_linear(x, module.qweight, module.scales, module.zeros, 3, 48), reference(module, x))


def test_intq_kernel_rejects_wrong_width():
    module = random_intq(8, 64, 4, 32, bias=False)
    with pytest.raises(ValueError, match="features"):
        intq_linear(torch.randn(1, 32), module.qweight, module.scales, module.zeros, 4, 32)


def random_outliers(out_f: int, in_f: int, bits: int, group_size: int, density: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_groups = in_f // group_size
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, n_groups, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).float()
    keep = torch.rand(out_f, in_f, generator=g) < density
    keep[1] = False  # a row without outliers
    keep[2, :40] = True  # a row with more outliers than one kernel block (32)
    zero_codes = zeros.long().repeat_interleave(group_size, dim=1)
    codes[keep] = zero_codes[keep]
    nnz = int(keep.sum())
    values = torch.randn(nnz, generator=g)
    module = OutlierQuantLinear.from_params({"bits": bits, "group_size": group_size, "nnz": nnz}, in_f, out_f, False)
    for name, t in OutlierQuantLinear.pack_fields(codes, scales, zeros, keep, values, bits, group_size, nnz).items():
        setattr(module, name, t)
    return module


@pytest.mark.parametrize("rows", [1, 20])
def test_outlier_kernels_match_dense_reference(rows):
    module = random_outliers(24, 300, 3, 60, density=0.03)  # in 300 > 256: int16 column indices
    assert module.outlier_col.dtype == torch.int16
    x = torch.randn(rows, 300)
    y = intq_outliers_linear(x, module.qweight, module.scales, module.zeros, module.outlier_row_ptr,
                             module.outlier_col, module.outlier_values, 3, 60)
    torch.testing.assert_close(y, reference(module, x), rtol=1e-5, atol=1e-5)


def test_csr_pass_alone_equals_sparse_product():
    module = random_outliers(16, 64, 4, 32, density=0.1)  # uint8 column indices
    x = torch.randn(5, 64)
    y = torch.zeros(5, 16)
    csr_add_(y, x, module.outlier_row_ptr, module.outlier_col, module.outlier_values)
    expected = (module.outliers_csr() @ x.T).T
    torch.testing.assert_close(y, expected)
    assert y.abs().sum() > 0


def random_vq(out_f: int, in_f: int, bits: int, d: int, bias: bool, seed: int = 0) -> VQLinear:
    g = torch.Generator().manual_seed(seed)
    k = 2 ** (bits * d)
    codes = torch.randint(0, k, (out_f, -(-in_f // d)), generator=g)
    codebook = torch.randn(k, d, generator=g)
    rows, cols = torch.rand(out_f, generator=g) + 0.5, torch.rand(in_f, generator=g) + 0.5
    b = torch.randn(out_f, generator=g) if bias else None
    return VQLinear.from_codes(codes, codebook, rows, cols, bits, d, k, bias=b)


# (2, 6): 12-bit indices that straddle words and a padded last subvector (70 = 11*6 + 4);
# (2, 4): 8-bit indices, in a multiple of d; (1, 5): 5-bit indices.
@pytest.mark.parametrize("bits,d", [(2, 6), (2, 4), (1, 5)])
@pytest.mark.parametrize("rows", [1, 4])
def test_vq_gemv_matches_dequant_linear(bits, d, rows):
    module = random_vq(40, 70 if d != 4 else 64, bits, d, bias=rows == 1)
    x = torch.randn(rows, module.in_features)
    y = vq_gemv(x, module.qcodes, module.codebook, module.row_norms, module.col_norms, module.index_bits, module.bias)
    torch.testing.assert_close(y, reference(module, x), rtol=1e-4, atol=1e-4)


def test_vq_gemv_refuses_gemm_batches():
    module = random_vq(8, 12, 2, 6, bias=False)
    with pytest.raises(ValueError, match="at most"):
        vq_gemv(torch.randn(GEMV_MAX_ROWS + 1, 12), module.qcodes, module.codebook, module.row_norms,
                module.col_norms, module.index_bits)


@pytest.mark.parametrize("rows", [1, 12])
def test_modules_dispatch_to_triton_when_asked(monkeypatch, rows):
    modules = [random_intq(24, 64, 4, 32, bias=True), random_outliers(16, 64, 4, 32, density=0.1),
               random_vq(16, 30, 2, 6, bias=True)]
    x = torch.randn(rows, 64)
    expected = [reference(m, x[:, : m.in_features]) for m in modules]
    calls = []
    import squeezeflow.kernels.triton_intq as tq
    import squeezeflow.kernels.triton_outliers as to
    real = tq.intq_linear
    for mod in (tq, to):
        monkeypatch.setattr(mod, "intq_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(triton_dispatch.ENV, "triton")
    for m, want in zip(modules, expected):
        torch.testing.assert_close(m(x[:, : m.in_features]), want, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # intq and intq_outliers went through the Triton integer kernel


def test_cpu_keeps_torch_path_by_default(monkeypatch):
    monkeypatch.delenv(triton_dispatch.ENV, raising=False)
    assert not triton_dispatch.use_triton(torch.randn(2))
    monkeypatch.setenv(triton_dispatch.ENV, "torch")
    assert not triton_dispatch.use_triton(torch.randn(2))
    monkeypatch.setenv(triton_dispatch.ENV, "fast")
    with pytest.raises(ValueError, match="SQUEEZEFLOW_KERNELS"):
        triton_dispatch.use_triton(torch.randn(2))


def test_two_four_falls_back_off_gpu():
    mask = torch.zeros(64, 128, dtype=torch.bool)
    mask.view(64, 32, 4)[..., 1:3] = True
    weight = torch.randn(64, 128)
    module = NMLinear.from_params({"n": 2, "m": 4}, 128, 64, False)
    for name, t in NMLinear.pack_fields(mask, weight, 2, 4).items():
        setattr(module, name, t)
    x = torch.randn(3, 128).half()
    assert "CUDA" in semi_structured_reason(2, 4, 64, 128, x)
    assert "not 2:4" in semi_structured_reason(4, 8, 64, 128, x)
    torch.testing.assert_close(module(x), reference(module, x))

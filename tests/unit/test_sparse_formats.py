"""The "sparse" (bitmask) and "nm" packed formats: exact round trip, real byte savings, bad input."""
import pytest
import torch

from squeezeflow.kernels.formats import check_params, make_module, packed_tensors
from squeezeflow.kernels.sparse_linear import NMLinear, SparseLinear
from squeezeflow.methods.nowag.pruning import prune_mask


def _module(fmt, params, fields, out_f, in_f):
    module = make_module(fmt, params, in_f, out_f, bias="bias" in fields)
    module.load_state_dict(fields)
    return module


def test_unstructured_round_trip_and_forward():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen)
    mask = torch.rand(24, 40, generator=gen) > 0.6
    bias = torch.randn(24, generator=gen)
    fields = packed_tensors("sparse", mask=mask, weight=w, nnz=int(mask.sum()), bias=bias)
    assert fields["values"].numel() == int(mask.sum()) and fields["values"].dtype == torch.float16
    assert fields["mask"].shape == (24, 2)  # 40 bits -> 2 int32 words per row
    layer = _module("sparse", {"nnz": int(mask.sum())}, fields, 24, 40)
    expected = torch.where(mask, w.half().float(), 0.0)
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(3, 40, generator=gen)
    torch.testing.assert_close(layer(x), x @ expected.T + bias)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_round_trip(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    w = torch.randn(16, 64, generator=gen)
    mask = prune_mask(torch.rand(16, 64, generator=gen), 0.0, (n, m), per_row=False)
    fields = packed_tensors("nm", mask=mask, weight=w, n=n, m=m)
    assert fields["values"].shape == (16, 64 // m * n)
    layer = _module("nm", {"n": n, "m": m}, fields, 16, 64)
    assert torch.equal(layer.dequantize(), torch.where(mask, w.half().float(), 0.0))


def test_sparse_bytes_really_shrink():
    w = torch.randn(64, 64)
    mask = prune_mask(w.abs(), 0.5, None, per_row=False)
    sparse = packed_tensors("sparse", mask=mask, weight=w, nnz=int(mask.sum()))
    nm = packed_tensors("nm", mask=prune_mask(w.abs(), 0.0, (2, 4), False), weight=w, n=2, m=4)
    bits = lambda f: 8 * sum(t.numel() * t.element_size() for t in f.values()) / w.numel()  # noqa: E731
    assert bits(sparse) == pytest.approx(9.0)       # 16 bits x 50% + 1-bit mask
    assert bits(nm) == pytest.approx(9.0)           # (16 + 2 index bits) x 2/4


def test_bad_fields_and_params_are_refused():
    w = torch.randn(8, 16)
    mask = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="nnz"):
        packed_tensors("sparse", mask=mask, weight=w, nnz=3)
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        packed_tensors("nm", mask=mask, weight=w, n=2, m=4)
    with pytest.raises(ValueError, match="multiple of m"):
        NMLinear(18, 4, 2, 4)
    with pytest.raises(ValueError, match="missing"):
        check_params("sparse", {"format": "sparse"})
    with pytest.raises(ValueError, match="0 < n < m"):
        check_params("nm", {"n": 4, "m": 4})
    with pytest.raises(ValueError, match="nnz"):
        SparseLinear(4, 4, nnz=17)


def test_dtype_cast_keeps_storage_and_changes_compute_dtype():
    w = torch.randn(8, 16)
    mask = prune_mask(w.abs(), 0.0, (2, 4), False)
    layer = _module("nm", {"n": 2, "m": 4}, packed_tensors("nm", mask=mask, weight=w, n=2, m=4), 8, 16)
    layer.to(torch.bfloat16)
    assert layer.values.dtype == torch.float16 and layer.indices.dtype == torch.int32
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16

"""Triton second pass for the "intq_outliers" format (GWQ): add the sparse fp16 outliers, stored as
CSR by output row, to the output of the integer kernel (kernels/triton_intq.py).

    y[m, o] += sum over j in row_ptr[o] .. row_ptr[o+1]-1 of values[j] * x[m, col[j]]

One program per (output row, block of input rows). GWQ keeps about 1% of weights, so this pass reads
a few values per row; it stays a separate kernel because fusing it into the dequant tile would need a
search of each row's column list per tile.

Reference: ``y + (outliers_csr() @ x.T).T``, as ``OutlierQuantLinear.forward_sparse`` computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_intq import intq_linear


@triton.jit
def _csr_add_kernel(y_ptr, x_ptr, rp_ptr, col_ptr, val_ptr, M, stride_xm, stride_ym,
                    BM: tl.constexpr, BNNZ: tl.constexpr):
    row = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    m_mask = rm < M
    start = tl.load(rp_ptr + row)
    end = tl.load(rp_ptr + row + 1)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(start, end, BNNZ):
        j = j0 + tl.arange(0, BNNZ)
        j_mask = j < end
        col = tl.load(col_ptr + j, mask=j_mask, other=0).to(tl.int64)
        val = tl.load(val_ptr + j, mask=j_mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        acc += tl.sum(xv.to(tl.float32) * val[None, :], axis=1)
    y_ptrs = y_ptr + rm * stride_ym + row
    y = tl.load(y_ptrs, mask=m_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=m_mask)


def csr_add_(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
    """In place: ``y[m, o] += (CSR @ x.T).T`` for ``y [M, out]``, ``x [M, in]`` (both row-major)."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"csr_add_: y [M, out] and x [M, in] needed, got {tuple(y.shape)} and {tuple(x.shape)}")
    if row_ptr.numel() != y.shape[1] + 1:
        raise ValueError(f"csr_add_: row_ptr needs {y.shape[1] + 1} entries, got {row_ptr.numel()}")
    if not y.is_contiguous():
        raise ValueError("csr_add_: y must be contiguous")
    m = y.shape[0]
    if m == 0 or values.numel() == 0:
        return y
    x = x.contiguous()
    bm = 16 if m >= 16 else triton.next_power_of_2(m)
    _csr_add_kernel[(y.shape[1], triton.cdiv(m, bm))](
        y, x, row_ptr.contiguous(), col.contiguous(), values.contiguous(), m, x.stride(0), y.stride(0),
        BM=bm, BNNZ=32)
    return y


def intq_outliers_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         row_ptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bits: int,
                         group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "intq_outliers" linear: integer kernel into a float32 output, the outlier pass on top, then
    the activation dtype (one rounding, as the reference's dense weight has)."""
    in_features = x.shape[-1]
    y = intq_linear(x, qweight, scales, zeros, bits, group_size, bias, out_dtype=torch.float32)
    y2 = y.reshape(-1, y.shape[-1])
    csr_add_(y2, x.reshape(-1, in_features), row_ptr, col, values)
    return y2.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

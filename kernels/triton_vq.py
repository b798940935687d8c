"""Triton codebook-lookup GEMV for the "vq" format (NoWag-VQ): the weight is never decoded to memory.

    y[m, o] = r[o] * sum_s sum_t codebook[q[o, s], t] * c[s*d + t] * x[m, s*d + t]  (+ bias[o])

Each program takes a block of output rows and one input row, walks the subvectors in blocks, unpacks
their ``b*d``-bit indices (kernels/triton_intq.unpack_codes, the same bitstream layout), gathers the
centroids from the fp16 codebook (K*d*2 bytes: 48 KiB at K=4096, d=6, so it stays in cache) and
multiply-accumulates in float32. Batches above GEMV_MAX_ROWS go to the torch path (dequantize once,
then a dense GEMM), where the decode is amortized over the batch.

Reference: ``F.linear(x, VQLinear.dequantize(x.dtype), bias)``; the kernel applies the norms on the
fly (as ``VQLinear.forward_otf`` does), so it matches the reference up to float rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import autotune_unless_interpreted
from .triton_intq import GEMV_MAX_ROWS, unpack_codes

__all__ = ["GEMV_MAX_ROWS", "vq_gemv"]


@autotune_unless_interpreted(
    configs=[triton.Config({"BN": bn, "BS": bs}, num_warps=w)
             for bn, bs, w in ((16, 64, 4), (32, 64, 4), (32, 128, 8), (64, 32, 4), (64, 64, 8))],
    key=["N", "K", "IDX_BITS", "D"],
)
@triton.jit
def _vq_gemv_kernel(x_ptr, qc_ptr, cb_ptr, r_ptr, c_ptr, b_ptr, y_ptr, N, K, n_sub, n_words,
                    stride_xm, stride_qc, stride_ym,
                    IDX_BITS: tl.constexpr, D: tl.constexpr, STRADDLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BN: tl.constexpr, BS: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for s0 in range(0, n_sub, BS):
        rs = s0 + tl.arange(0, BS)
        s_mask = rs < n_sub
        idx = unpack_codes(qc_ptr, stride_qc, n_words, rn, rs, n_mask, s_mask, IDX_BITS, STRADDLE)
        for t in tl.static_range(D):
            cols = rs * D + t
            c_mask = s_mask & (cols < K)  # the last subvector may run past the inputs (padding)
            xc = tl.load(x_ptr + m * stride_xm + cols, mask=c_mask, other=0.0).to(tl.float32) \
                * tl.load(c_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
            w = tl.load(cb_ptr + idx * D + t, mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * xc[None, :], axis=1)
    acc = acc * tl.load(r_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def vq_gemv(x: torch.Tensor, qcodes: torch.Tensor, codebook: torch.Tensor, row_norms: torch.Tensor,
            col_norms: torch.Tensor, index_bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (diag(r) · W̄ · diag(c)).T + bias`` for ``x [..., in]`` with at most GEMV_MAX_ROWS rows."""
    k = col_norms.numel()
    d = codebook.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"vq_gemv: x has {x.shape[-1]} features, the weight takes {k}")
    x2 = x.reshape(-1, k).contiguous()
    m, n_out = x2.shape[0], qcodes.shape[0]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"vq_gemv: at most {GEMV_MAX_ROWS} rows, got {m} (use the dense path for GEMM)")
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    has_bias = bias is not None
    qcodes, codebook = qcodes.contiguous(), codebook.contiguous()
    grid = lambda meta: (triton.cdiv(n_out, meta["BN"]), m)  # noqa: E731
    blocks = {} if isinstance(_vq_gemv_kernel, triton.runtime.Autotuner) else {"BN": 16, "BS": 16}
    _vq_gemv_kernel[grid](x2, qcodes, codebook, row_norms.contiguous(), col_norms.contiguous(),
                          bias.contiguous() if has_bias else row_norms, y, n_out, k, -(-k // d), qcodes.shape[1],
                          x2.stride(0), qcodes.stride(0), y.stride(0), IDX_BITS=index_bits, D=d,
                          STRADDLE=32 % index_bits != 0, HAS_BIAS=has_bias, **blocks)
    return y.reshape(*x.shape[:-1], n_out)

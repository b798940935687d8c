"""Triton kernels for the "intq" format (RTN / GPTQ / the integer part of GWQ): fused dequant-GEMM
and a batch-1 GEMV, both reading the packed codes directly (no dense weight is ever written).

The layout is kernels/intpack.py's: each output row is a little-endian bitstream of ``bits``-bit codes
in int32 words, so input ``k`` of row ``n`` starts at bit ``k * bits``. Widths dividing 32 (2, 4, 8)
never straddle a word; other widths (3, 5, 6, 7) may, and then the code is taken from a 64-bit window
over two words (``STRADDLE``).

Three kernels, chosen by ``intq_linear``:

* batch <= GEMV_MAX_ROWS, widths dividing 32 with whole-word power-of-two groups (W4 g64/g128, W2, W8):
  ``_gemv_aligned_kernel`` loads each word once, splits it with shifts, and loads a scale and zero-point
  per group, not per weight (decode is memory- and load-bound: this is the path W4 decoding takes);
* other small batches (W3, odd groups): ``_gemv_kernel``, one gathered word per code;
* larger batches: ``_gemm_kernel``, dequantized tiles into ``tl.dot``.

Reference: ``F.linear(x, QuantLinear.dequantize(x.dtype), bias)``. Accumulation is in float32. The GEMM
and the generic GEMV round the weight tile to the activation dtype before the product, as the
reference's dense weight is; the aligned GEMV multiplies the float32 weight (a difference of at most
one half-precision rounding per weight in fp16/bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import autotune_unless_interpreted

# Batches up to this many rows take the GEMV kernel (one program per output block and input row):
# decode is memory-bound, and tl.dot needs tiles of at least 16 rows.
GEMV_MAX_ROWS = 8


@triton.jit
def unpack_codes(qw_ptr, stride_row, n_words, rows, ks, row_mask, k_mask,
                 BITS: tl.constexpr, STRADDLE: tl.constexpr):
    """Codes ``[len(rows), len(ks)]`` (int32) of row-packed ``BITS``-bit bitstreams."""
    bitpos = ks * BITS
    word = bitpos // 32
    off = (bitpos % 32).to(tl.uint32)
    mask = row_mask[:, None] & k_mask[None, :]
    ptrs = qw_ptr + rows[:, None] * stride_row + word[None, :]
    # Read the words as unsigned: an arithmetic shift would drag the sign bit into the code.
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    if STRADDLE:
        hi_mask = mask & ((word + 1) < n_words)[None, :]
        hi = tl.load(ptrs + 1, mask=hi_mask, other=0).to(tl.uint32, bitcast=True)
        window = lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)
        codes = (window >> off[None, :].to(tl.uint64)) & ((1 << BITS) - 1)
    else:
        codes = (lo >> off[None, :]) & ((1 << BITS) - 1)
    return codes.to(tl.int32)


@triton.jit
def dequant_tile(qw_ptr, s_ptr, z_ptr, stride_qw, stride_s, n_words, rows, ks, row_mask, k_mask,
                 BITS: tl.constexpr, GROUP: tl.constexpr, STRADDLE: tl.constexpr):
    """Weight tile ``[len(rows), len(ks)]`` in float32: (code - zero) * scale of each element's group."""
    codes = unpack_codes(qw_ptr, stride_qw, n_words, rows, ks, row_mask, k_mask, BITS, STRADDLE)
    mask = row_mask[:, None] & k_mask[None, :]
    g_off = rows[:, None] * stride_s + (ks // GROUP)[None, :]
    scale = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) - zero) * scale


@autotune_unless_interpreted(
    configs=[triton.Config({"BN": bn, "BK": bk}, num_warps=w)
             for bn, bk, w in ((8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8), (64, 128, 8))],
    key=["N", "K", "BITS"],
)
@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, n_words,
                 stride_xm, stride_qw, stride_s, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, STRADDLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 W_DTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = tl.load(x_ptr + m * stride_xm + rk, mask=k_mask, other=0.0)
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, stride_qw, stride_s, n_words, rn, rk, n_mask, k_mask,
                         BITS, GROUP, STRADDLE)
        # Round the weight to the activation dtype as the reference's dense weight is, then
        # multiply-accumulate in float32.
        acc += tl.sum(w.to(W_DTYPE).to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@autotune_unless_interpreted(
    configs=[triton.Config({"BN": bn, "GPT": gpt}, num_warps=w, num_stages=s)
             for bn, gpt, w, s in ((8, 2, 4, 3), (16, 1, 4, 3), (16, 2, 4, 3), (16, 4, 8, 3), (32, 1, 4, 3),
                                   (32, 2, 8, 3), (64, 1, 8, 2), (8, 4, 4, 4))],
    key=["N", "K", "BITS", "GROUP"],
)
@triton.jit
def _gemv_aligned_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K,
                         stride_xm, stride_qw, stride_s, stride_ym,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BN: tl.constexpr, GPT: tl.constexpr):
    """Batch-1 GEMV for widths dividing 32 and groups of whole words (the common W4/W2/W8 case): each
    int32 word is loaded once and split into its 32 / BITS codes with shifts, and each tile covers GPT
    whole groups, so a scale and zero-point are loaded once per group instead of once per weight."""
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // PER  # words per group
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
    acc = tl.zeros((BN,), dtype=tl.float32)
    n_groups = K // GROUP
    for g0 in range(0, n_groups, GPT):
        rg = g0 + tl.arange(0, GPT)
        g_mask = rg < n_groups
        mask2 = n_mask[:, None] & g_mask[None, :]
        rw = g0 * WPG + tl.arange(0, GPT * WPG)
        w_mask = n_mask[:, None] & (rw < n_groups * WPG)[None, :]
        words = tl.load(qw_ptr + rn[:, None] * stride_qw + rw[None, :], mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, GPT*WPG, PER]
        codes = tl.reshape(codes, (BN, GPT, GROUP)).to(tl.float32)  # input k = word * PER + j, in order
        g_off = rn[:, None] * stride_s + rg[None, :]
        scale = tl.load(s_ptr + g_off, mask=mask2, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g_off, mask=mask2, other=0.0).to(tl.float32)
        rk = rg[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        x = tl.load(x_ptr + m * stride_xm + rk, mask=g_mask[:, None], other=0.0).to(tl.float32)  # [GPT, GROUP]
        w = (codes - zero[:, :, None]) * scale[:, :, None]
        acc += tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _aligned(bits: int, group_size: int) -> bool:
    """Whether the word-aligned GEMV applies: whole codes per word, whole words per group, and a
    power-of-two group (Triton block shapes are powers of two)."""
    return 32 % bits == 0 and group_size % (32 // bits) == 0 and group_size & (group_size - 1) == 0 \
        and 32 // bits <= group_size <= 1024


@autotune_unless_interpreted(
    configs=[triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                                      (32, 128, 64, 4, 3), (64, 128, 32, 8, 3), (16, 128, 128, 8, 2))],
    key=["M", "N", "K", "BITS"],
)
@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, n_words,
                 stride_xm, stride_qw, stride_s, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, STRADDLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 W_DTYPE: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, stride_qw, stride_s, n_words, rn, rk, n_mask, k_mask,
                         BITS, GROUP, STRADDLE)
        if IEEE:  # float32 activations: no TF32 rounding, to match torch's float32 matmul
            acc += tl.dot(x, tl.trans(w.to(W_DTYPE)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(W_DTYPE)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def intq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bits: int, group_size: int, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ dequant(qweight, scales, zeros).T + bias`` for ``x [..., in]``; the output has ``x``'s dtype
    unless ``out_dtype`` says otherwise (float32 lets a second pass add to it without rounding twice)."""
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"intq_linear: activations must be float32/float16/bfloat16, got {x.dtype}")
    n_out = qweight.shape[0]
    n_groups = scales.shape[1]
    k = n_groups * group_size
    if x.shape[-1] != k:
        raise ValueError(f"intq_linear: x has {x.shape[-1]} features, the weight takes {k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else scales  # any pointer; never read without HAS_BIAS
    common = dict(BITS=bits, GROUP=group_size, STRADDLE=32 % bits != 0, HAS_BIAS=has_bias,
                  W_DTYPE=_TL_DTYPES[x.dtype])
    args = (x2, qweight, scales, zeros, b, y)
    if m <= GEMV_MAX_ROWS and _aligned(bits, group_size):
        grid = lambda meta: (triton.cdiv(n_out, meta["BN"]), m)  # noqa: E731
        _gemv_aligned_kernel[grid](x2, qweight, scales, zeros, b, y, n_out, k, x2.stride(0), qweight.stride(0),
                                   scales.stride(0), y.stride(0), BITS=bits, GROUP=group_size, HAS_BIAS=has_bias,
                                   **_fixed(_gemv_aligned_kernel, BN=16, GPT=2))
    elif m <= GEMV_MAX_ROWS:
        grid = lambda meta: (triton.cdiv(n_out, meta["BN"]), m)  # noqa: E731
        _gemv_kernel[grid](*args, n_out, k, qweight.shape[1], x2.stride(0), qweight.stride(0),
                           scales.stride(0), y.stride(0), **common, **_fixed(_gemv_kernel, BN=16, BK=64))
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n_out, meta["BN"]))  # noqa: E731
        _gemm_kernel[grid](*args, m, n_out, k, qweight.shape[1], x2.stride(0), qweight.stride(0),
                           scales.stride(0), y.stride(0), IEEE=x.dtype == torch.float32, **common,
                           **_fixed(_gemm_kernel, BM=16, BN=32, BK=32))
    return y.reshape(*x.shape[:-1], n_out)


def _fixed(kernel, **blocks: int) -> dict[str, int]:
    """Block sizes to pass explicitly: none when the autotuner picks them (GPU), ``blocks`` otherwise."""
    return {} if isinstance(kernel, triton.runtime.Autotuner) else blocks

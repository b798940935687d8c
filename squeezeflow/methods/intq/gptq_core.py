"""GPTQ (Frantar et al., 2022): one linear's weight quantized column by column, each rounding error
compensated on the columns not yet quantized, weighted by the layer's input Hessian H = XᵀX.

The loss is the output error tr((W - Ŵ) H (W - Ŵ)ᵀ). Quantizing column j to q leaves an error that
the remaining columns absorb through the inverse Hessian: with U the upper Cholesky factor of H⁻¹,
err = (w_j - q_j) / U_jj and W[:, k] -= err · U_jk for k > j (the OBS update restricted to the
columns not yet fixed). Updates are applied lazily per block of columns: inside a block column by
column, onto the rest of the matrix once per block as one matmul.

Grid: the asymmetric min-max group-wise grid of `rtn.quantize_groupwise`, with the same conventions
(range widened to include 0, scale rounded to fp16 before the codes are chosen, zero = round(-min /
scale)), so the codes, scales and zeros pack exactly as RTN's do and `rtn.dequantize_groupwise`
reproduces Ŵ. When the grid is fitted:
- groups, act_order=False: over the group's current (error-updated) weights when its first column
  is reached (GPTQ's default, `static_groups=False`). A group never straddles a lazy block (the block
  size is rounded up to a multiple of the group), so "current" includes every update made so far;
- groups, act_order=True or static_groups=True: from the weights before any update, in the original
  column groups ("static groups", llm-compressor's only mode), so groups stay contiguous in the
  original order whatever the processing order;
- group_size=None (or in_features): once per output row over the whole row, before any update.
`sym=True` uses the symmetric grid (zero = 2^(b-1), scale = 2·max|w| / (2^b - 1)), and `mse_clip=True`
shrinks the range by the factor in 1.00, 0.99, ..., 0.80 that minimises the group's Σ|w - q|^clip_norm:
2 (squared error, the default here and QUAD's) or 2.4 (the GPTQ reference code's and llm-compressor's MSE
observer, which weighs the large errors clipping creates more; the gptq-…-mse presets use it).

Kept positions (`keep`: outliers stored separately at full precision, as GWQ and QUAD do) are
excluded from their group's min/max, so one huge outlier does not stretch the grid; their codes are
valid but meaningless, and Ŵ holds the value to store for them. Two ways to treat them:
- keep_absorbs=False (default): Ŵ holds their exact original value. They are "quantized" to that
  value: no rounding error of their own, but the compensation earlier columns pushed onto them is
  undone, and that difference is passed on to the later columns like any other error (dropping it
  instead would leave the loss uncompensated and the proxy loss wrong);
- keep_absorbs=True (SpQR): Ŵ holds their current, error-updated value, so they absorb the
  compensation and their error is exactly zero. Lower output error (on a 64×256 layer at 3 bits with
  correlated inputs: 1-3% lower with 1% random kept positions, about 19% lower with 32 whole kept
  columns), but the stored outlier values must then be taken from Ŵ, not from W.
Dead inputs (H_jj = 0: the input is always zero) get H_jj = 1 and weight 0, which the grid holds
exactly (a kept position there keeps its value).

Any element-wise format (`gptq_elementwise`): the same loop with a caller's column quantizer in place of
the grid, e.g. RF8 or FP8 e4m3 against a per-row exponent or scale fixed from the original weights
(methods/gg/float8.py). The quantizer must be fixed up front: nothing is fitted inside the loop.

Numerics: damping `damp · mean(diag H)` is added to the diagonal (multiplied by 10, up to 4 times,
while the Cholesky factorization fails; damp=0 retries from 1e-4). The factorization runs in fp64, in
place (one [in, in] fp64 matrix), the column loop in fp32.
stats["proxy_loss"] is Σ_j Σ_rows (w_j - q_j)² / U_jj², which equals tr((W - Ŵ) H_d (W - Ŵ)ᵀ) for the
damped Hessian H_d (in H's own units: sum or mean over tokens).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...errors import BadInput

_SHRINKS = [1.0 - 0.01 * k for k in range(21)]   # mse_clip candidates: 1.00 down to 0.80
_DAMP_RETRIES = 4
_SLAB = 1024   # rows of H copied at a time (the only temporaries beside the fp64 Hessian)
_NARROW_SLAB = 1 << 22   # elements per step of the in-place fp64 -> fp32 narrowing (16 MiB of buffer)


@dataclass
class GPTQResult:
    codes: torch.Tensor    # uint8 [out, in], original column order
    scales: torch.Tensor   # fp16 [out, in / g]
    zeros: torch.Tensor    # fp16 [out, in / g], integers
    w_hat: torch.Tensor    # fp32 [out, in]: dequantized weight; at kept positions the value to store
    perm: torch.Tensor | None   # processing order (act_order), else None
    stats: dict = field(default_factory=dict)  # seconds, damp (relative, as used), proxy_loss


def fit_grid(w: torch.Tensor, valid: torch.Tensor | None, bits: int, sym: bool = False,
             mse_clip: bool = False, clip_norm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32 holding an fp16 value) and zero (fp32 integer) per row of w [rows, n], fitted on the
    positions where `valid` is true. Without a mask, sym and mse_clip it is exactly rtn's grid."""
    qmax = 2 ** bits - 1
    if valid is None:
        lo, hi = w.amin(-1), w.amax(-1)
    else:  # a row with nothing valid gets lo = hi = 0 (after the clamps below)
        lo = torch.where(valid, w, math.inf).amin(-1)
        hi = torch.where(valid, w, -math.inf).amax(-1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)   # keep 0 exactly representable, as RTN does
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    if not mse_clip:
        return _scale_zero(lo, hi, bits, sym)
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_zero = torch.empty_like(lo), torch.empty_like(lo)
    for p in _SHRINKS:
        scale, zero = _scale_zero(lo * p, hi * p, bits, sym)
        err = (_fake_quant(w, scale[:, None], zero[:, None], qmax) - w)
        err = err.pow(2) if clip_norm == 2.0 else err.abs().pow(clip_norm)   # pow(2) keeps old bytes exactly
        err = (err if valid is None else err * valid).sum(-1)
        better = err < best_err   # strict: ties keep the wider range (p = 1 comes first)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** bits - 1
    # Same expression as rtn.quantize_groupwise: round to fp16 first, so the codes are chosen against
    # the scale the packed layer will really use.
    scale = ((hi - lo) / qmax).clamp(min=1e-8).half().clamp(min=torch.finfo(torch.float16).tiny).float()
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax)


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return (_codes(w, scale, zero, qmax) - zero) * scale   # the same arithmetic as rtn.dequantize_groupwise


def _inverse_cholesky(build: Callable[[], torch.Tensor], damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ in fp32 with λ = damp · mean(diag H), raising damp ×10 on failure;
    `build()` returns a fresh fp64 H, symmetric bit for bit (`_hessian64`), each try factoring its own.

    In fp64 and in place: one [in, in] fp64 matrix (an 8B down_proj's is 1.6 GiB), whose storage ends up
    holding the fp32 result too (`_narrow_in_place`).
    LAPACK works in column-major order, and a row-major matrix handed to torch.linalg is first copied; its
    transposed view is column-major and, the matrix being symmetric, holds the same values, so the
    factorization, the inverse and the second factorization overwrite it with the very results (bytes) the
    copying calls give."""
    tried = []
    for _ in range(_DAMP_RETRIES + 1):
        tried.append(damp)
        A = build().mT   # column-major, the same values
        mean_diag = A.diagonal().mean()
        A.add_(0.0)   # -0.0 off the diagonal becomes 0.0, as in `H + λ·I`
        A.diagonal().add_(damp * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return _narrow_in_place(A), damp
        del A
        damp = max(10 * damp, 1e-4)
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with damping {tried[-1]:g} × "
                       f"mean(diag H) (tried {', '.join(f'{d:g}' for d in tried)})")


def _narrow_in_place(A: torch.Tensor) -> torch.Tensor:
    """A's values in fp32 (as `A.float()` rounds them, same strides) written into the first half of A's own
    storage, which A then no longer owns: no second [in, in] allocation. Element k of the storage is read at
    byte 8k and written at byte 4k, so a slab copied in ascending order through a small buffer never
    overwrites a value not yet read."""
    n = A.numel()
    if A.storage_offset() or A.untyped_storage().nbytes() != 8 * n or not (A.is_contiguous() or A.mT.is_contiguous()):
        return A.float()   # not a whole fp64 storage of its own: nothing to reuse
    storage = A.untyped_storage()
    src = torch.empty(0, dtype=A.dtype, device=A.device).set_(storage, A.storage_offset(), (n,), (1,))
    dst = torch.empty(0, dtype=torch.float32, device=A.device).set_(storage, 0, (n,), (1,))
    for k in range(0, n, _NARROW_SLAB):
        dst[k:k + _NARROW_SLAB] = src[k:k + _NARROW_SLAB].float()
    return dst.as_strided(A.shape, A.stride())


def _hessian64(H: torch.Tensor, device: torch.device, order: torch.Tensor | None, dead: torch.Tensor) -> torch.Tensor:
    """fp64 copy of H [in, in] on `device`, rows and columns in `order`, with H_jj = 1 at dead inputs (their
    weights multiply nothing; the unit diagonal keeps H invertible without coupling them to other columns),
    and its upper triangle mirrored from the lower one: the factorization reads the lower triangle, and a
    sum XᵀX is not always symmetric to the last bit. Built a slab of rows at a time, so nothing but the result
    is [in, in]."""
    n = H.shape[0]
    out = torch.empty(n, n, dtype=torch.float64, device=device)
    for r in range(0, n, _SLAB):
        rows = slice(r, min(r + _SLAB, n))
        out[rows] = H[order[rows]][:, order] if order is not None else H[rows]
    is_dead = (dead if order is None else dead[order]).to(device)
    out[is_dead, is_dead] = 1.0
    for r in range(0, n, _SLAB):   # upper triangle := transposed lower triangle, slab by slab
        e = min(r + _SLAB, n)
        out[r:e, e:] = out[e:, r:e].mT
        block = out[r:e, r:e]
        block.copy_(block.tril() + block.tril(-1).mT)
    return out


def _dead_and_order(H: torch.Tensor, act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dead inputs: H_jj = 0, the input is always zero; the processing order, largest diag(H) first with
    dead inputs counted as 1, or None). Read from the diagonal alone, so no [in, in] copy is made here."""
    diag = H.diagonal().double()
    dead = diag == 0
    return dead, (_act_order(torch.where(dead, 1.0, diag)) if act_order else None)


def _check_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    in_f = W.shape[1]
    if H.shape != (in_f, in_f):
        raise BadInput(f"Hessian shape {tuple(H.shape)} does not match the weight's {in_f} inputs")
    if not (torch.isfinite(H).all() and torch.isfinite(W).all()):
        raise RuntimeError("GPTQ: the weight or the Hessian holds NaN or inf (overflowing statistics?)")


def _act_order(diag: torch.Tensor) -> torch.Tensor:
    """Largest diag(H) first: the most sensitive inputs are quantized before errors pile up."""
    return torch.argsort(diag, descending=True, stable=True)


def _compensated_columns(W: torch.Tensor, Hinv: torch.Tensor, block_size: int,
                         quantize: Callable[[torch.Tensor, int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's lazy-batch column loop over W [out, n] (processing order; updated in place) with Hinv the
    upper Cholesky factor of H⁻¹. `quantize(W1, i, j)` returns the value column j (= i-th of the current
    block) ends with, given the block's current weights W1 [out, block] (so a grid can be fitted on the
    columns ahead of it). Returns (those values [out, n], Σ_j err_j² per row: the proxy loss); the values
    are written over W, a block at a time once its columns are no longer read (no second [out, n] matrix)."""
    out_f, n = W.shape
    losses = torch.zeros(out_f, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1, Q1 = torch.empty_like(W1), torch.empty_like(W1)
        for i in range(i2 - i1):
            q = quantize(W1, i, i1 + i)
            Q1[:, i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            losses += err.pow(2)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)   # the block's errors, onto the columns after it
        W[:, i1:i2] = Q1
    return W, losses


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, keep: torch.Tensor | None = None,
                  sym: bool = False, mse_clip: bool = False, keep_absorbs: bool = False,
                  static_groups: bool = False, clip_norm: float = 2.0) -> GPTQResult:
    """Quantize W [out, in] with GPTQ against H = XᵀX [in, in] (see the module docstring)."""
    t0 = time.perf_counter()
    out_f, in_f = W.shape
    if not 2 <= bits <= 8:
        raise BadInput(f"bits must be between 2 and 8, got {bits}")
    g = group_size or in_f
    if in_f % g:
        raise BadInput(f"group size {g} does not divide in_features {in_f}")
    if keep is not None and keep.shape != W.shape:
        raise BadInput(f"keep mask shape {tuple(keep.shape)} does not match the weight's {tuple(W.shape)}")
    _check_inputs(W, H)
    qmax = 2 ** bits - 1
    dev = W.device
    dead, perm = _dead_and_order(H, act_order)
    # First, while nothing else of this call is alive: the fp64 Hessian is its largest temporary.
    Hinv, damp_used = _inverse_cholesky(lambda: _hessian64(H, dev, perm, dead), damp)
    dead = dead.to(dev)
    W_orig = W.float()
    keep = torch.zeros(out_f, in_f, dtype=torch.bool, device=dev) if keep is None else keep.to(dev, torch.bool)
    W = W_orig.clone()
    W[:, dead] = torch.where(keep[:, dead], W[:, dead], 0.0)   # kept values stay exact even there

    # Grids fitted before any update: per channel (one group per row: nothing is updated before its
    # first column anyway), or the static groups act_order needs.
    n_groups = in_f // g
    static = g == in_f or act_order or static_groups
    if static:
        s, z = fit_grid(W.reshape(-1, g), ~keep.reshape(-1, g), bits, sym, mse_clip, clip_norm)
        scales, zeros = s.reshape(out_f, n_groups), z.reshape(out_f, n_groups)
    else:
        scales = torch.empty(out_f, n_groups, device=dev)
        zeros = torch.empty(out_f, n_groups, device=dev)

    if perm is not None:
        perm = perm.to(dev)
        W, keep_p, W_ref = W[:, perm], keep[:, perm], W_orig[:, perm]
        group_of = (perm // g).tolist()
    else:
        keep_p, W_ref = keep, W_orig
        group_of = [j // g for j in range(in_f)]

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=dev)   # the grid's integers, held exactly

    def quantize(W1: torch.Tensor, i: int, j: int) -> torch.Tensor:
        if not static and j % g == 0:
            s, z = fit_grid(W1[:, i:i + g], ~keep_p[:, j:j + g], bits, sym, mse_clip, clip_norm)
            scales[:, j // g], zeros[:, j // g] = s, z
        w = W1[:, i]
        s, z = scales[:, group_of[j]], zeros[:, group_of[j]]
        codes[:, j] = c = _codes(w, s, z, qmax)
        return torch.where(keep_p[:, j], w if keep_absorbs else W_ref[:, j], (c - z) * s)

    if not static:   # a group must not straddle two lazy blocks, or its "current" weights would be stale
        block_size = -(-block_size // g) * g
    Q, losses = _compensated_columns(W, Hinv, block_size, quantize)

    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
    stats = {"seconds": time.perf_counter() - t0, "damp": damp_used, "proxy_loss": float(losses.sum())}
    return GPTQResult(codes, scales.half(), zeros.half(), Q, perm, stats)


def gptq_elementwise(W: torch.Tensor, H: torch.Tensor,
                     quantize_column: Callable[[torch.Tensor, int], torch.Tensor], damp: float = 0.01,
                     block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, dict]:
    """GPTQ on W [out, in] against H = XᵀX with any element-wise quantizer in place of the integer grid:
    `quantize_column(w [out] fp32, j) -> [out]` gives the representable values for the current (error-
    updated) weights of column j (original column index, also under act_order). Every parameter of the
    quantizer (a row's scale, exponent...) must be fixed before the call. Dead inputs' weights are set to 0
    first. Returns (Ŵ fp32 [out, in] in the original column order, stats: seconds, damp, proxy_loss)."""
    t0 = time.perf_counter()
    _check_inputs(W, H)
    dead, perm = _dead_and_order(H, act_order)
    Hinv, damp_used = _inverse_cholesky(lambda: _hessian64(H, W.device, perm, dead), damp)
    W = W.float().clone()
    W[:, dead.to(W.device)] = 0.0
    order = torch.arange(W.shape[1], device=W.device) if perm is None else perm.to(W.device)
    index = order.tolist()
    Q, losses = _compensated_columns(W[:, order], Hinv, block_size,
                                     lambda W1, i, j: quantize_column(W1[:, i], index[j]))
    w_hat = torch.empty_like(Q)
    w_hat[:, order] = Q
    stats = {"seconds": time.perf_counter() - t0, "damp": damp_used, "proxy_loss": float(losses.sum())}
    return w_hat, stats

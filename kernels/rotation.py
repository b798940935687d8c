"""Structured orthogonal rotations: R = diag(s) · (A ⊗ H), with H the normalized Hadamard matrix of
the largest power-of-two order h that divides n, A a seeded random orthogonal m × m matrix (m = n / h;
QR of a Gaussian) and s random signs. Where n is a power of two, A = [1] and R is a randomized
Hadamard transform (QuaRot's choice); SmolLM2's 576 = 9 · 64 and 1536 = 3 · 512 mix 9 (or 3) blocks
of Hadamard-rotated coordinates through A.

Only the factors (A: m × m fp32, s: n signs) are stored; applying R to a row vector x costs one small
h × h matmul and one m × m one: reading x as an m × h matrix X (row-major), x·(A ⊗ H) = Aᵀ X H.
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=32)   # built once per (order, dtype): every online rotation reuses it
def hadamard(h: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of order h (a power of two): H Hᵀ = I."""
    if h < 1 or h & (h - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {h}")
    H = torch.ones(1, 1, dtype=dtype, device="cpu")   # built and cached on the host; users move it
    while H.shape[0] < h:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(h)).requires_grad_(False)


def split_order(n: int) -> tuple[int, int]:
    """(m, h): n = m · h with h the largest power of two dividing n."""
    h = n & -n
    return n // h, h


def random_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of a seeded rotation of order n: (A fp64 [m, m] orthogonal, signs fp64 [n]). A format
    that stores them in fp32 must fuse the fp32-rounded A into its weights (orthogonal to ~1e-7)."""
    m, _ = split_order(n)
    g = torch.Generator().manual_seed(seed)
    # Drawn on the host (a host generator cannot draw on a device): the same rotation on every device.
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64, device="cpu").double() * 2 - 1
    A = torch.ones(1, 1, dtype=torch.float64, device="cpu")
    if m > 1:
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64, device="cpu"))
        A = (q * torch.sign(torch.diagonal(r))).contiguous()  # the sign fix makes Q Haar-distributed and unique
    return A, signs


def dense(A: torch.Tensor, signs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n × n matrix R = diag(s) (A ⊗ H) of the factors (for fusing into weights offline)."""
    n = signs.numel()
    m, h = split_order(n)
    if A.shape != (m, m):
        raise ValueError(f"rotation factor A has shape {tuple(A.shape)}, expected {(m, m)} for order {n}")
    return signs.to(dtype)[:, None] * torch.kron(A.to(dtype).contiguous(), hadamard(h, dtype))


def apply(x: torch.Tensor, A: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x · R for x [..., n], without building R: (Aᵀ · X · H) with X = (x ⊙ s) viewed as [m, h]."""
    n = signs.numel()
    m, h = split_order(n)
    X = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], m, h)
    X = X @ hadamard(h, x.dtype).to(x.device)
    X = torch.einsum("km,...kh->...mh", A.to(x.dtype), X) if m > 1 else X
    return X.reshape(x.shape)

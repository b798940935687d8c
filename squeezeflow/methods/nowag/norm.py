"""NoWag's normalization, shared by NoWag-P and NoWag-VQ (research/seeds-nowag-gwq.md §A).

Columns first, then rows of the column-scaled matrix:
    c_j = ‖W[:, j]‖₂ + 1e-5,   W′ = W / c
    r_i = ‖W′[i, :]‖₂ + 1e-5,  W̄ = W′ / r
so W = diag(r) · W̄ · diag(c). The normalized matrix has unit-ish rows and columns, which puts every
weight on one scale before the activation importance h_j = E[x_j²] weighs it.
"""
from __future__ import annotations

import torch

EPS = 1e-5


def normalize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W̄, r, c) of w [out, in], all fp32; r [out], c [in]."""
    w = w.float()
    c = w.norm(dim=0) + EPS
    w_col = w / c
    r = w_col.norm(dim=1) + EPS
    return w_col / r.unsqueeze(1), r, c


def denormalize(w_bar: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """diag(r) · W̄ · diag(c) in fp32."""
    return w_bar.float() * r.float().unsqueeze(1) * c.float().unsqueeze(0)


def importance(w_bar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NoWag's per-weight score W̄_ij² · h_j (the pruning score; the VQ objective's weights)."""
    return w_bar.square() * h.float().unsqueeze(0)

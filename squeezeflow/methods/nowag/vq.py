"""NoWag-VQ: vector quantization of the normalized weight with activation-weighted k-means
(research/seeds-nowag-gwq.md §A.5, design/METHODS.md "NoWag").

For one linear W [out, in] with h_j = E[x_j²] over the calibration inputs:

1. Normalize (norm.py): W = diag(r) · W̄ · diag(c). r and c are rounded to fp16 first and W̄ is taken
   as W / (r₁₆ c₁₆), so the stored norms are the ones the codebook was fitted for.
2. Cut W̄ into subvectors of d consecutive inputs of a row (the input dim padded to a multiple of d with
   the row mean and importance 0) and fit one codebook of K = 2^(bits·d) centroids per matrix by
   weighted k-means (kmeans.py): the objective is Σ_ij h_j (W̄_ij − Ŵ̄_ij)².
3. Round the codebook to fp16, then assign every subvector to its nearest fp16 centroid, so the packed
   layer (kernels/vq_linear.py, format "vq") computes exactly what `dequantize` returns:
   Ŵ = diag(r₁₆) · codebook₁₆[codes] · diag(c₁₆), cropped to `in` columns.

Layer-wise: needs only the dense model's h (the "hdiag" statistic), so blocks compress independently.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from ...config import Spec
from ...errors import BadInput
from ..base import CompressedLinear, WeightMethod
from ..registry import register
from .kmeans import matrix_subvectors, weighted_kmeans
from .norm import denormalize, normalize

_FP16_MAX = 65504.0


class NoWagVQConfig(Spec):
    """NoWag-VQ: weighted k-means over d-dimensional subvectors of the normalized weight, one codebook of
    K = 2^(bits·d) centroids per matrix, importance h_j = E[x_j²] as the per-coordinate weight."""

    method: Literal["nowag-vq"] = "nowag-vq"
    bits: int = Field(2, ge=1, le=4, description="Bits per weight of the codes: K = 2^(bits*d)")
    d: int = Field(6, ge=1, le=16, description="Subvector length (consecutive inputs of a row)")
    max_iter: int = Field(100, ge=1, le=1000, description="Lloyd iterations at most (stops early when stable)")
    init: Literal["kmeans++", "kmeans++-clip"] = Field("kmeans++", description="Seeding: D² sampling, or the original code's clipped variant")
    seed: int = 0

    @field_validator("d")
    @classmethod
    def _codebook_size(cls, d: int, info) -> int:
        bits = info.data.get("bits", 2)
        if bits * d > 16:
            raise ValueError(f"bits*d = {bits * d} > 16: a codebook of 2^{bits * d} centroids is too large (K <= 65536)")
        return d


_PRESET = re.compile(r"nowag-vq(\d)(?:d(\d+))?")
# Subvector length by bits when a preset does not name one: K = 4096 centroids (12-bit indices).
_DEFAULT_D = {1: 12, 2: 6, 3: 4, 4: 3}


def parse_preset(name: str) -> list | None:
    """`nowag-vq<bits>[d<dim>]`: nowag-vq2 = 2 bits, d = 6, K = 4096."""
    if not (m := _PRESET.fullmatch(name)):
        return None
    bits = int(m.group(1))
    d = int(m.group(2)) if m.group(2) else _DEFAULT_D.get(bits, 1)
    return [NoWagVQConfig(bits=bits, d=d)]


@register(NoWagVQConfig, presets=parse_preset, examples=("nowag-vq2", "nowag-vq3"))
class NoWagVQ(WeightMethod):
    statistics = ("hdiag",)
    config: NoWagVQConfig

    @property
    def k(self) -> int:
        return 2 ** (self.config.bits * self.config.d)

    def check(self, linear_shapes):
        cfg = self.config
        if cfg.bits * cfg.d > 16:
            raise BadInput(f"nowag-vq: bits*d = {cfg.bits * cfg.d} > 16; codes are at most 16-bit (K <= 65536), "
                           f"choose fewer bits or a smaller d")
        # Any shape works: the input dim is padded to a multiple of d, and a matrix with at most K distinct
        # subvectors is stored losslessly (its codebook then costs more than the layer did, but is exact).

    def compress_linear(self, name, weight, stats):
        cfg = self.config
        if weight.dim() != 2:
            raise BadInput(f"nowag-vq: {name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        h = stats.get("hdiag")
        if h is None:
            raise BadInput(f"nowag-vq: {name}: the 'hdiag' statistic is missing")
        h = h.float().reshape(-1)
        if h.shape != (in_f,):
            raise BadInput(f"nowag-vq: {name}: hdiag has {h.numel()} entries, the weight {in_f} inputs")
        if not (torch.isfinite(h).all() and (h >= 0).all()):
            raise BadInput(f"nowag-vq: {name}: hdiag must be finite and non-negative")
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise BadInput(f"nowag-vq: {name}: the weight holds NaN or inf")

        _, r, c = normalize(w)
        if r.max() > _FP16_MAX or c.max() > _FP16_MAX:
            raise BadInput(f"nowag-vq: {name}: a row or column norm exceeds the fp16 range")
        r16, c16 = r.half(), c.half()
        w_bar = w / r16.float().unsqueeze(1) / c16.float().unsqueeze(0)

        points, weights, groups = matrix_subvectors(w_bar, h, cfg.d)
        # snap: the codebook is stored in fp16, and the final assignment is to the fp16 centroids.
        result = weighted_kmeans(points, self.k, weights, groups, max_iter=cfg.max_iter, init=cfg.init,
                                 seed=cfg.seed, snap=lambda c: c.half().float())
        codebook = result.centroids.half()
        codes = result.assignments.view(out_f, -1)

        w_bar_hat = codebook.float()[codes].reshape(out_f, -1)[:, :in_f]
        hw = h.double().unsqueeze(0)
        err = float(((w_bar.double() - w_bar_hat.double()).square() * hw).sum())
        ref = float((w_bar.double().square() * hw).sum())
        metrics = {"vq_iterations": result.iterations, "vq_converged": result.converged,
                   "vq_lossless": result.lossless, "vq_codes_used": int(torch.unique(codes).numel()),
                   "vq_codebook_size": self.k, "vq_normalized_rel_err": err / ref if ref > 0 else 0.0}
        code_dtype = torch.int16 if self.k <= 2 ** 15 else torch.int32
        return CompressedLinear("vq", {"bits": cfg.bits, "d": cfg.d, "k": self.k},
                                {"codes": codes.to(code_dtype), "codebook": codebook, "row_norms": r16,
                                 "col_norms": c16},
                                metrics=metrics)

    def dequantize(self, c):
        codes = c.tensors["codes"].long()
        codebook, r, col = c.tensors["codebook"], c.tensors["row_norms"], c.tensors["col_norms"]
        w_bar_hat = codebook.float()[codes].reshape(codes.shape[0], -1)[:, :col.numel()]
        return denormalize(w_bar_hat, r, col)

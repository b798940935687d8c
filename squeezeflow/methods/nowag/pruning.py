"""Weight pruning methods: NoWag-P, Wanda and magnitude. One mask API, three scores.

A pruning method scores every weight and keeps the best ones, either
- unstructured: `sparsity` (the fraction REMOVED) over the whole matrix, or within each output row
  (Wanda's comparison group), or
- N:M: the top N of every M consecutive inputs of a row (2:4 is what sparse tensor cores run).
Kept weights are unchanged (stored in fp16, the deployment dtype), pruned ones are zero. Packed as
the "sparse" (bitmask + values) or "nm" (values + in-group indices) formats of kernels/sparse_linear.py,
so the bytes on disk really shrink.

Scores (h_j = E[x_j²] over calibration tokens of the linear's input, from the dense model):
- NoWag-P: W̄_ij² · h_j with W̄ the column-then-row normalized weight (norm.py), ranked over the
  whole matrix (the paper's global top-k per matrix);
- Wanda: |W_ij| · ‖X_j‖ (‖X_j‖ ∝ sqrt(h_j)), ranked within each output row as in the Wanda paper;
- magnitude: |W_ij| over the whole matrix.
Ties are broken by position (stable sort), so masks are deterministic.
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from ...config import Spec
from ...errors import BadInput
from ..base import CompressedLinear, WeightMethod
from ..registry import register
from .norm import importance, normalize


class PruneConfig(Spec):
    """Weight pruning: `sparsity` is the fraction of weights REMOVED from each matrix (unstructured), or
    `n_m` = (N, M) keeps N of every M consecutive inputs of a row (semi-structured, e.g. 2:4)."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of weights removed (unstructured)")
    n_m: tuple[int, int] | None = Field(None, description="Keep N of every M consecutive inputs, e.g. [2, 4]")

    @field_validator("n_m")
    @classmethod
    def _n_m(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[0] < v[1] <= 256):
            raise ValueError(f"n_m must be (N, M) with 0 < N < M <= 256, got {list(v)}")
        return v

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.n_m[0] / self.n_m[1] if self.n_m else self.sparsity


class NoWagPConfig(PruneConfig):
    """NoWag-P: prune by the normalized score W̄²·h (column then row normalization, h = E[x²])."""

    method: Literal["nowag-p"] = "nowag-p"


class WandaConfig(PruneConfig):
    """Wanda: prune by |W|·‖X_j‖ compared within each output row (unstructured) or each N:M group."""

    method: Literal["wanda"] = "wanda"


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: |W| over the whole matrix (unstructured) or each N:M group; no statistics."""

    method: Literal["magnitude"] = "magnitude"


def presets_of(config_cls: type[PruneConfig]):
    """The preset parser of one pruning method: `<method>[-p]<percent removed>` or `<method>[-p]<N>:<M>`
    (nowag-p50, wanda-p2:4)."""
    pattern = re.compile(re.escape(config_cls.model_fields["method"].default) + r"(?:-p)?(?:(\d{1,2})|(\d+):(\d+))")

    def parse(name: str) -> list | None:
        if not (m := pattern.fullmatch(name)):
            return None
        kwargs = {"sparsity": int(m.group(1)) / 100} if m.group(1) else {"n_m": (int(m.group(2)), int(m.group(3)))}
        return [config_cls(**kwargs)]

    return parse


def topk_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest entries of a 1-D score (ties: earlier position wins)."""
    order = torch.argsort(score, descending=True, stable=True)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[order[:keep]] = True
    return mask


def prune_mask(score: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Which weights of score [out, in] survive: N:M groups along the input dim, else the top
    (1 − sparsity) fraction per row (`per_row`) or over the whole matrix."""
    out_f, in_f = score.shape
    if n_m is not None:
        n, m = n_m
        groups = score.reshape(out_f, in_f // m, m)
        # Stable descending order inside each group, so equal scores keep the earlier input.
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(out_f, in_f)
    if per_row:
        keep = in_f - int(round(sparsity * in_f))
        order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :keep]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
    keep = score.numel() - int(round(sparsity * score.numel()))
    return topk_mask(score.flatten(), keep).reshape(out_f, in_f)


class PruneMethod(WeightMethod):
    """Shared by every pruning method: check, mask, pack fields. Subclasses define `score`."""

    per_row: ClassVar[bool] = False
    config: PruneConfig

    def check(self, linear_shapes):
        if self.config.n_m is None:
            return
        n, m = self.config.n_m
        bad = sorted({in_f for _, (_, in_f) in linear_shapes.items() if in_f % m})
        if bad:
            raise BadInput(f"{n}:{m} pruning needs in_features divisible by {m}; got {', '.join(map(str, bad))}")

    def score(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def compress_linear(self, name, weight, stats):
        cfg = self.config
        mask = prune_mask(self.score(weight.float(), stats), cfg.sparsity, cfg.n_m, self.per_row)
        values = weight.to(torch.float16)
        metrics = {"sparsity": float(1.0 - mask.float().mean())}
        if cfg.n_m is not None:
            n, m = cfg.n_m
            return CompressedLinear("nm", {"n": n, "m": m}, {"mask": mask, "weight": values}, metrics=metrics)
        return CompressedLinear("sparse", {"nnz": int(mask.sum())}, {"mask": mask, "weight": values}, metrics=metrics)

    def dequantize(self, c):
        return torch.where(c.tensors["mask"], c.tensors["weight"].float(), 0.0)


def _hdiag(stats: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    if "hdiag" not in stats:
        raise ValueError(f"{method} needs the 'hdiag' statistic (E[x²] of the linear's inputs)")
    return stats["hdiag"].float()


@register(NoWagPConfig, presets=presets_of(NoWagPConfig), examples=("nowag-p50", "nowag-p2:4", "nowag-p4:8"))
class NoWagP(PruneMethod):
    statistics = ("hdiag",)

    def score(self, weight, stats):
        w_bar, _, _ = normalize(weight)
        return importance(w_bar, _hdiag(stats, self.name))


@register(WandaConfig, presets=presets_of(WandaConfig), examples=("wanda-p50", "wanda-p2:4"))
class Wanda(PruneMethod):
    statistics = ("hdiag",)
    per_row = True

    def score(self, weight, stats):
        return weight.abs() * _hdiag(stats, self.name).sqrt().unsqueeze(0)


@register(MagnitudeConfig, presets=presets_of(MagnitudeConfig), examples=("magnitude-p50",))
class Magnitude(PruneMethod):

    def score(self, weight, stats):
        return weight.abs()

"""GWQ: gradient-aware weight quantization (research/seeds-nowag-gwq.md §B; METHODS.md holds our
decisions, since no reference code exists).

Per weight matrix: score every weight, keep the top `outlier_frac` in fp16 as a sparse CSR matrix, and
quantize the rest group-wise with the outliers excluded from their groups' min/max. Base quantizer RTN
(per-block schedule: statistics from the dense model, one task per block) or GPTQ (sequential, the outliers
treated as exactly representable: zero error, as SpQR does). Packed as "intq_outliers": the integer
format of RTN/GPTQ, with each outlier's code set to its group's zero-point (it dequantizes to 0), plus
the outliers added back: y = dequant(Wq)·x + W_outlier·x.

Scores (the ablation METHODS.md asks for; g_b the gradient of window b's next-token loss):
  abs_grad  |Σ_b g_b|      (default: GWQ's first-order saliency)
  taylor    |Σ_b g_b ⊙ w|
  fisher    Σ_b g_b²
  hessian   w² · h_j       (the Hessian-diagonal view of SpQR/OBS, h_j = E[x_j²])
  magnitude |w|
  random    uniform, seeded per (seed, layer name)
Gradients come from the statistics engine as the statistic "gradients:<n_grad>".
"""
from __future__ import annotations

import hashlib
import re
from typing import Literal

import torch
from pydantic import Field

from .base import CompressedLinear, WeightMethod, check_group_size
from .intq.gptq_core import fit_grid, gptq_quantize
from .intq.rtn import IntGridConfig, dequantize_groupwise, preset_group_size
from .nowag.pruning import topk_mask
from .registry import register

GRADIENT_SCORES = ("abs_grad", "taylor", "fisher")


class GWQConfig(IntGridConfig):
    """GWQ: the top `outlier_frac` most salient weights of each matrix stay fp16 (sparse, CSR), the rest
    is group-wise integer (RTN, or GPTQ treating the outliers as exact). Saliency from the gradients of
    the next-token loss on `n_grad` calibration windows (abs_grad = |Σg|), or an ablation score."""

    method: Literal["gwq"] = "gwq"
    outlier_frac: float = Field(0.01, ge=0.0, le=0.5, description="Fraction of each matrix kept in fp16")
    score: Literal["abs_grad", "taylor", "fisher", "hessian", "magnitude", "random"] = Field(
        "abs_grad", description="Outlier selection: |Σg|, |Σg·w|, Σg², w²·h, |w|, or random (seeded)")
    n_grad: int = Field(8, ge=1, le=4096, description="Calibration windows for the gradients")
    base: Literal["rtn", "gptq"] = Field("rtn", description="Quantizer for the non-outliers")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening (base=gptq)")
    seed: int = Field(0, description="Seed of the random selection (score=random)")


_PRESET = re.compile(r"gwq-w(\d+)(?:g(\d+|c))?(-gptq)?(?:-(abs_grad|taylor|fisher|hessian|magnitude|random))?"
                     r"(?:-n(\d+))?(?:-o(\d+(?:\.\d+)?))?")


def parse_preset(name: str) -> list | None:
    """`gwq-w<bits>g<group>[-gptq][-<score>][-n<grad windows>][-o<outlier %>]`: gwq-w3g64 = RTN base, |Σg|
    saliency on 8 windows, 1% fp16 outliers."""
    if not (m := _PRESET.fullmatch(name)):
        return None
    kwargs = {"bits": int(m.group(1)), "group_size": preset_group_size(m.group(2)),
              "base": "gptq" if m.group(3) else "rtn"}
    if m.group(4):
        kwargs["score"] = m.group(4)
    if m.group(5):
        kwargs["n_grad"] = int(m.group(5))
    if m.group(6):
        kwargs["outlier_frac"] = float(m.group(6)) / 100
    return [GWQConfig(**kwargs)]


def quantize_groupwise_excluding(w: torch.Tensor, bits: int, group_size: int, exclude: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN's asymmetric min-max grid with the `exclude`d positions left out of each group's range
    (identical to rtn.quantize_groupwise when nothing is excluded). Codes uint8, scales/zeros fp16."""
    out_f, in_f = w.shape
    groups = w.float().reshape(-1, group_size)
    scale, zero = fit_grid(groups, ~exclude.reshape(-1, group_size), bits)
    codes = torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)
    shape = (out_f, in_f // group_size)
    return codes.reshape(out_f, in_f).to(torch.uint8), scale.half().reshape(shape), zero.half().reshape(shape)


@register(GWQConfig, presets=parse_preset, examples=("gwq-w3g64", "gwq-w3g64-gptq", "gwq-w3g64-fisher-n32-o2"))
class GWQ(WeightMethod):
    config: GWQConfig

    def __init__(self, config: GWQConfig):
        super().__init__(config)
        self.gradients = f"gradients:{config.n_grad}" if config.score in GRADIENT_SCORES else None
        dense = (self.gradients,) if self.gradients else ()   # hdiag is always collected
        # RTN base: per block on dense statistics. GPTQ base: sequential, XᵀX collected through the
        # already-quantized blocks; the saliency still comes from the dense model.
        if config.base == "rtn":
            self.schedule, self.statistics = "per-block", dense
        else:
            self.schedule, self.statistics, self.dense_statistics = "sequential", ("xtx",), dense

    def check(self, linear_shapes):
        check_group_size(self.config.group_size, linear_shapes)

    def saliency(self, name: str, w: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        score = self.config.score
        if score in GRADIENT_SCORES:
            key = f"{self.gradients}.{'sq_sum' if score == 'fisher' else 'abs_sum'}"
            if key not in stats:
                raise ValueError(f"GWQ score {score!r} needs the statistic {key!r} for {name}")
            g = stats[key].float()
            return g * w.abs() if score == "taylor" else g
        if score == "hessian":
            return w.square() * stats["hdiag"].float().unsqueeze(0)
        if score == "magnitude":
            return w.abs()
        seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{name}".encode()).digest()[:8], "little")
        # Drawn by a host generator on the host (it cannot draw on a device), then moved: the same on every device.
        return torch.rand(w.shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(w.device)

    def compress_linear(self, name, weight, stats):
        cfg = self.config
        w = weight.float()
        group = cfg.group_size or w.shape[1]
        keep = topk_mask(self.saliency(name, w, stats).flatten(), round(cfg.outlier_frac * w.numel())).reshape(w.shape)
        metrics = {"outliers": int(keep.sum())}
        if cfg.base == "rtn":
            codes, scales, zeros = quantize_groupwise_excluding(w, cfg.bits, group, keep)
        else:
            r = gptq_quantize(w, stats["xtx"], cfg.bits, group, damp=cfg.damp, keep=keep)
            codes, scales, zeros = r.codes, r.scales, r.zeros
            metrics.update({f"gptq_{k}": v for k, v in r.stats.items() if k != "seconds"})
        # An outlier's code is its group's zero-point: the integer part adds exactly 0 there.
        zero_codes = zeros.float().repeat_interleave(group, dim=1).to(codes.dtype)
        codes = torch.where(keep, zero_codes, codes)
        return CompressedLinear("intq_outliers", {"bits": cfg.bits, "group_size": group, "nnz": int(keep.sum())},
                                {"codes": codes, "scales": scales, "zeros": zeros, "keep": keep,
                                 "outlier_values": w[keep].half()}, metrics=metrics)

    def dequantize(self, c):
        t = c.tensors
        w = dequantize_groupwise(t["codes"], t["scales"], t["zeros"], c.params["group_size"])
        w[t["keep"]] += t["outlier_values"].float()
        return w

"""GWQ: gradient-aware weight quantization (research/seeds-nowag-gwq.md §B; METHODS.md holds our
decisions, since no reference code exists).

Per weight matrix: score every weight, keep the top `outlier_frac` in fp16 as a sparse CSR matrix, and
quantize the rest group-wise with the outliers excluded from their groups' min/max. Base quantizer RTN
(layer-wise: statistics from the dense model, one task per block) or GPTQ (sequential, the outliers
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

import torch

from ..config import GWQConfig
from .base import CompressedLinear, Method, check_group_size
from .gptq_core import fit_grid, gptq_quantize
from .prune import topk_mask
from .rtn import dequantize_groupwise

GRADIENT_SCORES = ("abs_grad", "taylor", "fisher")


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


class GWQ(Method):
    name = "gwq"
    config: GWQConfig

    def __init__(self, config: GWQConfig):
        super().__init__(config)
        self.gradients = f"gradients:{config.n_grad}" if config.score in GRADIENT_SCORES else None
        dense = (self.gradients,) if self.gradients else ()   # hdiag is always collected
        # RTN base: layer-wise on dense statistics. GPTQ base: sequential, XᵀX collected through the
        # already-quantized blocks; the saliency still comes from the dense model.
        self.layerwise = config.base == "rtn"
        self.requires = dense if self.layerwise else ("xtx",)
        self.dense_requires = () if self.layerwise else dense

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
        return torch.rand(w.shape, generator=torch.Generator().manual_seed(seed))

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

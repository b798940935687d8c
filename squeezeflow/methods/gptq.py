"""GPTQ as a pipeline method: the integer grid of RTN, chosen column by column with second-order error
compensation (squeezeflow.methods.gptq_core). Sequential: the flow runs it block by block on activations
that went through the already-quantized blocks (pipeline.compress_sequential), collecting each linear's
XᵀX ("xtx") on the fly. Packs into the same `intq` format as RTN, so one loader serves both.

`keep_mask` is the hook for methods that hold some weights exactly (GWQ outliers, QUAD): override it to
return a bool mask; those positions get zero error, are excluded from their group's range, and must be
stored by the subclass's own format.
"""
from __future__ import annotations

import torch

from ..config import GPTQConfig
from .base import CompressedLinear, Method, check_group_size
from .gptq_core import gptq_quantize
from .rtn import dequantize_groupwise


class GPTQ(Method):
    name = "gptq"
    requires = ("xtx",)
    layerwise = False
    config: GPTQConfig

    def check(self, linear_shapes):
        check_group_size(self.config.group_size, linear_shapes)

    def keep_mask(self, name: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def compress_linear(self, name, weight, stats):
        cfg = self.config
        group = cfg.group_size or weight.shape[1]
        result = gptq_quantize(weight.float(), stats["xtx"], cfg.bits, group, damp=cfg.damp, act_order=cfg.act_order,
                               block_size=cfg.block_size, keep=self.keep_mask(name, weight, stats), sym=cfg.sym,
                               mse_clip=cfg.mse_clip, clip_norm=cfg.clip_norm or 2.0,
                               static_groups=cfg.static_groups)
        metrics = {k: v for k, v in result.stats.items() if k != "seconds"}  # timings would break determinism
        return CompressedLinear("intq", {"bits": cfg.bits, "group_size": group},
                                {"codes": result.codes, "scales": result.scales, "zeros": result.zeros},
                                metrics={f"gptq_{k}": v for k, v in metrics.items()})

    def dequantize(self, c):
        return dequantize_groupwise(c.tensors["codes"], c.tensors["scales"], c.tensors["zeros"], c.params["group_size"])

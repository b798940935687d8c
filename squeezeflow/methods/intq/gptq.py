"""GPTQ as a weight method: the integer grid of RTN, chosen column by column with second-order error
compensation (gptq_core). Schedule "sequential": the trunk runs it block by block on activations that
went through the already-quantized blocks, collecting each linear's XᵀX ("xtx") on the fly. Packs into
the same `intq` format as RTN, so one loader serves both.

`keep_mask` is the hook for methods that hold some weights exactly (GWQ outliers, QUAD): override it to
return a bool mask; those positions get zero error, are excluded from their group's range, and must be
stored by the subclass's own format.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from ..base import CompressedLinear, WeightMethod, check_group_size
from ..registry import register
from .gptq_core import gptq_quantize
from .rtn import IntGridConfig, dequantize_groupwise, preset_group_size


class GPTQConfig(IntGridConfig):
    """GPTQ: sequential, block by block, second-order error compensation with XᵀX of each linear's
    inputs as seen through the already-quantized blocks."""

    method: Literal["gptq"] = "gptq"
    damp: float = Field(0.01, gt=0, le=1, description="Dampening, as a fraction of mean diag(XᵀX)")
    act_order: bool = Field(False, description="Quantize columns in order of decreasing XᵀX diagonal")
    static_groups: bool = Field(False, description="Fit every group's grid on the original weights up front "
                                "(llm-compressor's way) instead of on the error-updated ones when reached")
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block")
    sym: bool = Field(False, description="Symmetric grid (zero point fixed at 2^(bits-1))")
    mse_clip: bool = Field(False, description="Search a per-group clipping of the min/max range")
    # Left out of dumps (and so of cache keys) while unset, so adding it kept every older key valid.
    clip_norm: float | None = Field(None, ge=1.0, le=4.0, exclude_if=lambda v: v is None,
                                    description="Exponent p of the clip search's error Σ|w - q|^p (mse_clip); "
                                    "unset = 2 (squared error). The -mse presets use 2.4, as the GPTQ reference "
                                    "code and llm-compressor's MSE observer do")


_PRESET = re.compile(r"gptq-w(\d+)(?:g(\d+|c))?(-sym)?(-act)?(-static)?(-mse)?")


def parse_preset(name: str) -> list | None:
    """`gptq-w<bits>[g<group>|gc][-sym][-act][-static][-mse]`: the symmetric grid (exported as a symmetric
    compressed-tensors checkpoint, vLLM's Marlin layout), act-order, grids fitted up front, and a per-group
    clip search with the error norm p = 2.4."""
    if not (m := _PRESET.fullmatch(name)):
        return None
    kwargs = {"bits": int(m.group(1)), "group_size": preset_group_size(m.group(2))}
    if m.group(3):
        kwargs["sym"] = True
    if m.group(4):
        kwargs["act_order"] = True
    if m.group(5):
        kwargs["static_groups"] = True
    if m.group(6):
        kwargs["mse_clip"] = True
        kwargs["clip_norm"] = 2.4
    return [GPTQConfig(**kwargs)]


@register(GPTQConfig, presets=parse_preset, examples=("gptq-w3g64", "gptq-w4g64-act", "gptq-w4g64-sym"))
class GPTQ(WeightMethod):
    schedule = "sequential"
    statistics = ("xtx",)
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

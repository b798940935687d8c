"""RTN: round-to-nearest, group-wise asymmetric min-max. The baseline every method must beat.

For each group of `group_size` consecutive inputs of a row: scale s = (max - min) / (2^b - 1), zero
z = round(-min / s), q = clamp(round(w / s) + z, 0, 2^b - 1), w_hat = (q - z) * s. The scale is rounded
to fp16 *before* the codes are chosen, so the packed layer computes exactly the weight RTN picked.

`sym=True` (presets `rtn-w<b>g<g>-sym`) is the symmetric grid of gptq_core: max = max|w|, min = -max,
zero fixed at 2^(b-1). With zero points all equal to 2^(b-1), `squeezeflow export` writes a symmetric
compressed-tensors checkpoint (no zero-point tensors), the layout vLLM's Marlin kernels serve.
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from ...config import Spec
from ..base import CompressedLinear, WeightMethod, check_group_size
from ..registry import register


class IntGridConfig(Spec):
    """Group-wise integer grid shared by RTN and GPTQ (packed as the `intq` format)."""

    bits: int = Field(4, description="Bits per weight, 2..8")
    group_size: int | None = Field(64, description="Inputs per group; None = one group per output channel")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"group_size must be positive or null (per-channel), got {v}")
        return v


class RTNConfig(IntGridConfig):
    """Round-to-nearest, group-wise min-max (asymmetric, or symmetric with `sym`)."""

    method: Literal["rtn"] = "rtn"
    # Left out of dumps (and so of cache keys) while unset, so adding it kept every older key valid.
    sym: bool = Field(False, exclude_if=lambda v: not v,
                      description="Symmetric grid (zero point fixed at 2^(bits-1), range ±max|w|)")


def preset_group_size(group: str | None) -> int | None:
    """A preset's `g<group>` part: `gc` or none means per output channel (None)."""
    return None if group in (None, "c") else int(group)


_PRESET = re.compile(r"rtn-w(\d+)(?:g(\d+|c))?(-sym)?")


def parse_preset(name: str) -> list | None:
    """`rtn-w<bits>[g<group>|gc][-sym]`: rtn-w4g64; no group or `gc` is per output channel; `-sym` the
    symmetric grid."""
    if m := _PRESET.fullmatch(name):
        kwargs = {"bits": int(m.group(1)), "group_size": preset_group_size(m.group(2))}
        if m.group(3):
            kwargs["sym"] = True
        return [RTNConfig(**kwargs)]
    return None


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int, sym: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantization of w [out, in] in groups along the input dim (asymmetric, or symmetric).

    Returns codes uint8 [out, in], scales fp16 [out, in/g], zeros fp16 [out, in/g] (integers)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    qmax = 2 ** bits - 1
    lo = g.amin(-1).clamp(max=0.0)   # include 0 so an all-positive/negative group keeps an exact zero
    hi = g.amax(-1).clamp(min=0.0)
    if sym:   # gptq_core.fit_grid's symmetric grid, expression for expression
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = ((hi - lo) / qmax).clamp(min=1e-8).half().clamp(min=torch.finfo(torch.float16).tiny)
    s = scale.float()
    zero = torch.full_like(s, 2 ** (bits - 1)) if sym else torch.round(-lo / s).clamp(0, qmax)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return q.reshape(out_f, in_f).to(torch.uint8), scale, zero.half()


def dequantize_groupwise(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = codes.shape
    q = codes.float().reshape(out_f, in_f // group_size, group_size)
    return ((q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(out_f, in_f)


@register(RTNConfig, presets=parse_preset, examples=("rtn-w4g64", "rtn-w4g64-sym", "rtn-w3g64", "rtn-w8gc"))
class RTN(WeightMethod):
    config: RTNConfig

    def check(self, linear_shapes):
        check_group_size(self.config.group_size, linear_shapes)

    def compress_linear(self, name, weight, stats):
        group = self.config.group_size or weight.shape[1]
        codes, scales, zeros = quantize_groupwise(weight, self.config.bits, group, sym=self.config.sym)
        return CompressedLinear("intq", {"bits": self.config.bits, "group_size": group},
                                {"codes": codes, "scales": scales, "zeros": zeros})

    def dequantize(self, c):
        return dequantize_groupwise(c.tensors["codes"], c.tensors["scales"], c.tensors["zeros"], c.params["group_size"])

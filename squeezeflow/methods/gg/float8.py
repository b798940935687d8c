"""8-bit float weight formats: RF8 (residual floating point, kernels/rf8_linear.py) and FP8 e4m3 with a
per-row scale (kernels/fp8_linear.py), its baseline.

Two encoders per format, one packed format and loader:
- default: every weight rounded on its own; per-block schedule, no statistics;
- `gptq: true` (recipes rf8-gptq, fp8-e4m3-gptq): the row's exponent bias / scale is fixed from the
  original weight, then the codes are chosen column by column with GPTQ's error compensation against
  XᵀX (gptq_core.gptq_elementwise). Sequential like GPTQ: XᵀX is collected on activations through the
  already-compressed blocks.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ...config import Spec
from ...kernels import fp8_linear, rf8_linear
from ..base import CompressedLinear, WeightMethod
from ..intq.gptq_core import gptq_elementwise
from ..registry import register


class Float8Config(Spec):
    """Encoder options shared by the 8-bit float formats. Unset fields are left out of dumps (and so of
    cache keys): the plain rf8 / fp8-e4m3 recipes keep their keys."""

    gptq: bool | None = Field(None, exclude_if=lambda v: v is None,
                              description="Choose the codes GPTQ's way: column by column, each rounding error "
                              "compensated on the later columns through XᵀX (sequential, like gptq); unset = "
                              "round every weight on its own. Same packed format either way")
    damp: float | None = Field(None, gt=0, le=1, exclude_if=lambda v: v is None,
                               description="GPTQ dampening, as a fraction of mean diag(XᵀX); unset = 0.01")
    act_order: bool | None = Field(None, exclude_if=lambda v: v is None,
                                   description="GPTQ: process columns by decreasing XᵀX diagonal; unset = off")

    @model_validator(mode="after")
    def _gptq_options(self):
        if not self.gptq and (self.damp is not None or self.act_order is not None):
            raise ValueError("damp and act_order are options of the GPTQ encoder: set gptq: true too")
        return self


class RF8Config(Float8Config):
    """RF8: every weight as sign · (2^e1 + s2 · 2^e2) in exactly 8 bits, plus an int8 exponent bias per row
    (kernels/rf8_linear.py); no statistics unless gptq is set."""

    method: Literal["rf8"] = "rf8"


class FP8Config(Float8Config):
    """FP8 e4m3 (torch.float8_e4m3fn) weights with an fp16 scale per output row; no statistics unless gptq
    is set."""

    method: Literal["fp8"] = "fp8"


def presets_of(config_cls: type[Float8Config], prefix: str):
    """The presets of one format: `<prefix>` rounds every weight on its own, `<prefix>-gptq` chooses the
    codes with GPTQ's error compensation (rf8, rf8-gptq; fp8-e4m3, fp8-e4m3-gptq)."""
    def parse(name: str) -> list | None:
        if name == prefix:
            return [config_cls()]
        if name == prefix + "-gptq":
            return [config_cls(gptq=True)]
        return None

    return parse


class Float8Method(WeightMethod):
    """One 8-bit float format: `encode(w[, row])` and `decode(codes, row)` come from its kernel module,
    `row_param` is the per-row field (exponent bias or scale) the default encoder would choose."""

    kernel = None          # rf8_linear or fp8_linear
    row_field: str = ""    # name of the per-row field in the packed format
    row_param = None       # the kernel's per-row choice from a weight: row_exp_bias or row_scales

    def __init__(self, config):
        super().__init__(config)
        if config.gptq:   # XᵀX through the already-compressed blocks, as GPTQ
            self.schedule, self.statistics = "sequential", ("xtx",)

    def compress_linear(self, name, weight, stats):
        if not self.config.gptq:
            codes, row = self.kernel.encode(weight)
            return CompressedLinear(self.kernel.FORMAT_NAME, {}, {"codes": codes, self.row_field: row})
        row = self.row_param(weight)   # from the original weight: the loop's updates must not move it
        codes, gptq_stats = self.gptq_codes(weight, stats["xtx"], row)
        metrics = {f"gptq_{k}": v for k, v in gptq_stats.items() if k != "seconds"}  # timings are not deterministic
        return CompressedLinear(self.kernel.FORMAT_NAME, {}, {"codes": codes, self.row_field: row}, metrics=metrics)

    def gptq_codes(self, weight: torch.Tensor, xtx: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(codes, GPTQ stats) from GPTQ with a column quantizer that encodes against the fixed `row`. The
        codes are the ones chosen in the loop: re-encoding Ŵ gives the same values, but not always the same
        bytes, since RF8 holds some values under two codes (1.5·2^k = 2^(k+1)·(1 − 1/4))."""
        chosen: dict[int, torch.Tensor] = {}

        def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
            c, _ = self.kernel.encode(w[:, None], row)
            chosen[j] = c
            return self.kernel.decode(c, row)[:, 0]

        cfg = self.config
        w_hat, stats = gptq_elementwise(weight.float(), xtx, quantize_column,
                                        damp=0.01 if cfg.damp is None else cfg.damp, act_order=bool(cfg.act_order))
        codes = torch.cat([chosen[j] for j in range(weight.shape[1])], dim=1)   # original column order
        # Every code must compute exactly the weight the compensation assumed.
        if not torch.equal(self.kernel.decode(codes, row), w_hat):
            raise AssertionError(f"{self.name} GPTQ: the codes do not decode to the compensated weights")
        return codes, stats

    def dequantize(self, c):
        return self.kernel.decode(c.tensors["codes"], c.tensors[self.row_field])


@register(RF8Config, presets=presets_of(RF8Config, "rf8"), examples=("rf8", "rf8-gptq"))
class RF8(Float8Method):
    config: RF8Config
    kernel = rf8_linear
    row_field = "exp_bias"
    row_param = staticmethod(rf8_linear.row_exp_bias)


@register(FP8Config, presets=presets_of(FP8Config, "fp8-e4m3"), examples=("fp8-e4m3", "fp8-e4m3-gptq"))
class FP8(Float8Method):
    config: FP8Config
    kernel = fp8_linear
    row_field = "scales"
    row_param = staticmethod(fp8_linear.row_scales)

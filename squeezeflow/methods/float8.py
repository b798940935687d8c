"""8-bit float weight formats as layer-wise methods, no statistics: RF8 (residual floating point,
kernels/rf8_linear.py) and FP8 e4m3 with a per-row scale (kernels/fp8_linear.py), its baseline."""
from __future__ import annotations

from ..config import FP8Config, RF8Config
from ..kernels import fp8_linear, rf8_linear
from .base import CompressedLinear, Method


class RF8(Method):
    name = "rf8"
    config: RF8Config

    def compress_linear(self, name, weight, stats):
        codes, exp_bias = rf8_linear.encode(weight)
        return CompressedLinear("rf8", {}, {"codes": codes, "exp_bias": exp_bias})

    def dequantize(self, c):
        return rf8_linear.decode(c.tensors["codes"], c.tensors["exp_bias"])


class FP8(Method):
    name = "fp8"
    config: FP8Config

    def compress_linear(self, name, weight, stats):
        codes, scales = fp8_linear.encode(weight)
        return CompressedLinear("fp8", {}, {"codes": codes, "scales": scales})

    def dequantize(self, c):
        return fp8_linear.decode(c.tensors["codes"], c.tensors["scales"])

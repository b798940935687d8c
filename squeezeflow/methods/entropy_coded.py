"""Exp-Golomb storage around a method with integer codes (recipes `<base>-eg`: rtn-w4g64-eg,
gptq-w3g64-eg, rf8-eg). The base method runs exactly as on its own (same statistics, same sequential or
layer-wise schedule, same codes); only the storage changes: the pack stage writes the "eg" format
(kernels/eg_linear.py), whose stream length is computed here so the quantization_config can size the
loader's buffers."""
from __future__ import annotations

from ..config import EGConfig
from ..kernels.eg_linear import CODE_FIELD, stream_params
from .base import CompressedLinear, Method


class EntropyCoded(Method):
    name = "eg"
    config: EGConfig

    def __init__(self, config: EGConfig):
        from . import get_method   # the registry imports this module

        super().__init__(config)
        self.base = get_method(config.base)
        self.requires = self.base.requires
        self.dense_requires = self.base.dense_requires
        self.layerwise = self.base.layerwise

    def check(self, linear_shapes):
        self.base.check(linear_shapes)

    def resolve(self, model_config):
        base = self.base.resolve(model_config)
        return self.config if base == self.config.base else self.config.model_copy(update={"base": base})

    def compress_linear(self, name, weight, stats):
        c = self.base.compress_linear(name, weight, stats)
        if c.format not in CODE_FIELD:
            raise ValueError(f"exp-Golomb storage wraps formats {sorted(CODE_FIELD)}, the base method wrote {c.format!r}")
        params = {"inner": c.format, **c.params, **stream_params(c.tensors["codes"], self.config.chunk)}
        bits = 8 * params["stream_bytes"] / c.tensors["codes"].numel()
        return CompressedLinear("eg", params, c.tensors, c.bias, {**c.metrics, "eg_bits_per_code": round(bits, 6)})

    def dequantize(self, c):
        inner = {k: v for k, v in c.params.items() if k not in ("inner", "stream_bytes", "n_symbols", "chunk")}
        return self.base.dequantize(CompressedLinear(c.params["inner"], inner, c.tensors, c.bias))

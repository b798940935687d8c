"""Exp-Golomb storage around a method with integer codes (recipes `<base>-eg`: rtn-w4g64-eg,
gptq-w3g64-eg, rf8-eg). The base method runs exactly as on its own (same statistics, same sequential or
per-block schedule, same codes); only the storage changes: the pack stage writes the "eg" format
(kernels/eg_linear.py), whose stream length is computed here so the quantization_config can size the
loader's buffers."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from ...config import Spec
from ...errors import BadInput
from ...kernels.eg_linear import CODE_FIELD, stream_params
from ..base import CompressedLinear, WeightMethod
from ..intq import GPTQConfig, RTNConfig
from ..registry import get_method, register
from .float8 import RF8Config


class EGConfig(Spec):
    """Exp-Golomb (k = 0) storage of a base method's integer codes, ranked by frequency per layer
    (kernels/eg_linear.py); the base method runs unchanged."""

    method: Literal["eg"] = "eg"
    base: Annotated[Union[RTNConfig, GPTQConfig, RF8Config], Field(discriminator="method")]
    chunk: int = Field(4096, ge=1, le=2**20, description="Codewords between two sync offsets of the stream")


def parse_preset(name: str) -> list | None:
    """`<rtn|gptq|rf8 preset>-eg`: that preset's codes stored exp-Golomb coded (rtn-w4g64-eg, rf8-eg)."""
    if not name.endswith("-eg"):
        return None
    from ...recipes import preset   # the base is any preset: parse it with the whole preset grammar

    base = preset(name[:-3]).methods
    if len(base) != 1 or base[0].method not in ("rtn", "gptq", "rf8"):
        raise BadInput(f"recipe {name!r}: exp-Golomb storage (-eg) wraps rtn, gptq or rf8 codes, not {name[:-3]!r}")
    return [EGConfig(base=base[0])]


@register(EGConfig, presets=parse_preset, examples=("rtn-w4g64-eg", "rf8-eg"))
class EntropyCoded(WeightMethod):
    config: EGConfig

    def __init__(self, config: EGConfig):
        super().__init__(config)
        self.base = get_method(config.base)
        self.statistics = self.base.statistics
        self.dense_statistics = self.base.dense_statistics
        self.schedule = self.base.schedule

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

"""RTN: round-to-nearest, group-wise asymmetric min-max. The baseline every method must beat.

For each group of `group_size` consecutive inputs of a row: scale s = (max - min) / (2^b - 1), zero
z = round(-min / s), q = clamp(round(w / s) + z, 0, 2^b - 1), w_hat = (q - z) * s. The scale is rounded
to fp16 *before* the codes are chosen, so the packed layer computes exactly the weight RTN picked.
"""
from __future__ import annotations

import torch

from ..config import RTNConfig
from .base import CompressedLinear, Method, check_group_size


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of w [out, in] in groups along the input dim.

    Returns codes uint8 [out, in], scales fp16 [out, in/g], zeros fp16 [out, in/g] (integers)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    qmax = 2 ** bits - 1
    lo = g.amin(-1).clamp(max=0.0)   # include 0 so an all-positive/negative group keeps an exact zero
    hi = g.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8).half().clamp(min=torch.finfo(torch.float16).tiny)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, qmax)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return q.reshape(out_f, in_f).to(torch.uint8), scale, zero.half()


def dequantize_groupwise(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = codes.shape
    q = codes.float().reshape(out_f, in_f // group_size, group_size)
    return ((q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(out_f, in_f)


class RTN(Method):
    name = "rtn"
    requires = ()
    config: RTNConfig

    def check(self, linear_shapes):
        check_group_size(self.config.group_size, linear_shapes)

    def compress_linear(self, name, weight, stats):
        group = self.config.group_size or weight.shape[1]
        codes, scales, zeros = quantize_groupwise(weight, self.config.bits, group)
        return CompressedLinear("intq", {"bits": self.config.bits, "group_size": group},
                                {"codes": codes, "scales": scales, "zeros": zeros})

    def dequantize(self, c):
        return dequantize_groupwise(c.tensors["codes"], c.tensors["scales"], c.tensors["zeros"], c.params["group_size"])

"""FP8Linear: the "fp8" packed format, torch.float8_e4m3fn weights with one fp16 scale per output row.

The baseline RF8 is compared with at the same 8 bits per weight (METHODS.md, Generalized-Gaussian coding).

Stored fields of a module (safetensors ``<module>.<field>``):

* ``codes`` float8_e4m3fn ``[out, in]`` (safetensors dtype F8_E4M3)
* ``scales`` float16 ``[out]``: the row's largest |w| / 448 (e4m3's largest finite value), rounded to
  fp16 *before* the codes are chosen, so the stored pair computes exactly the weight the encoder picked.
* ``bias`` float32 ``[out]``, only when the layer has a bias.

W[o, i] = float(codes[o, i]) · scales[o], in float32. Cost: 8 + 16 / in bits per weight.
`encode(w, scales)` takes scales fixed beforehand (the GPTQ encoder, recipe `fp8-e4m3-gptq`, fixes them
from the original weights; error-updated weights beyond ±448 · scale saturate); same format either way.
"""

from __future__ import annotations


import torch

from .packed_linear import PackedLinear, ParameterlessFormat

FORMAT_NAME = "fp8"
E4M3_MAX = 448.0


def _checked(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"fp8 encodes a 2-D weight [out, in], got shape {tuple(w.shape)}")
    x = w.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("fp8 cannot encode NaN or infinite weights")
    return x


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """The encoder's default scale per row, fp16 [out]: the row's largest |w| / 448."""
    tiny = torch.finfo(torch.float16).tiny
    return (_checked(w).abs().amax(1) / E4M3_MAX).clamp(min=tiny).half()


def encode(w: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [out, in], scales fp16 [out]) for a weight [out, in]; round to nearest even.
    Given `scales` [out] (rounded to fp16) are used as is, e.g. fixed from the original weights while
    GPTQ updates them; weights beyond ±448 · scale then saturate."""
    x = _checked(w)
    if scales is None:
        scales = row_scales(x)
    elif tuple(scales.shape) != (x.shape[0],):
        raise ValueError(f"fp8 scales must have shape ({x.shape[0]},), got {tuple(scales.shape)}")
    scales = scales.to(x.device, torch.float16)
    # The fp16 rounding of the scale may push amax / scale a little past 448: clamp into range.
    q = (x / scales.float().unsqueeze(1)).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.to(torch.float32) * scales.to(torch.float32).unsqueeze(1)).to(dtype)


class FP8Linear(ParameterlessFormat, PackedLinear):
    """Linear layer with float8_e4m3fn weights and a per-row fp16 scale."""

    format_name = FORMAT_NAME
    vllm = ("not-served", "per-row e4m3 weights match compressed-tensors' FP8 W8A16 per-channel scheme (vLLM's "
            "FP8 Marlin path), but export does not write that form yet; dequantize to dense until it does")
    packed_fields = ("codes", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16, device=device))
        self._register_bias(bias, device)

    @staticmethod
    def pack_fields(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if codes.dim() != 2 or codes.dtype != torch.float8_e4m3fn:
            raise ValueError(f"fp8 codes must be float8_e4m3fn [out, in], got {codes.dtype} {tuple(codes.shape)}")
        if tuple(scales.shape) != (codes.shape[0],) or not scales.dtype.is_floating_point:
            raise ValueError(f"fp8 scales must be float [{codes.shape[0]}], got {scales.dtype} {tuple(scales.shape)}")
        fields = {"codes": codes.contiguous(), "scales": scales.detach().to(torch.float16).contiguous()}
        if bias is not None:
            if tuple(bias.shape) != (codes.shape[0],):
                raise ValueError(f"bias must have shape ({codes.shape[0]},), got {tuple(bias.shape)}")
            fields["bias"] = bias.detach().to(torch.float32).contiguous()
        return fields

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decode(self.codes, self.scales, dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format=fp8"

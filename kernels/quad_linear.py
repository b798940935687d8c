"""QuadLinear: the "quad" packed format (QUAD / QuaRot): int weights, symmetric per output channel, with
the first `outlier_cols` input columns kept in fp16, per-token activation fake-quant, and an optional
online input rotation.

Stored fields (safetensors ``<module>.<field>``):
* ``qweight`` int32 ``[out, ceil((in - r) * bits / 32)]``: codes q in [0, 2**bits) of the main columns
  (inputs r .. in-1), rows packed by :func:`squeezeflow.kernels.intpack.pack_rows`; the weight is
  (q - 2**(bits-1)) · scale, zero point implicit (symmetric grid).
* ``scales`` float16 ``[out, 1]``.
* ``w_outlier`` float16 ``[out, r]`` (r = outlier_cols > 0 only): the weight of the outlier inputs.
* ``rot_a`` float32 ``[m, m]`` and ``rot_signs`` float32 ``[in]`` (rotate = true only): the factors of
  the online rotation R = diag(s)(A ⊗ H) (kernels/rotation.py) applied to the input first; the stored
  weight already includes R, so in exact arithmetic the rotation changes nothing but the outliers the
  activation quantizer sees.
* ``bias`` float32 ``[out]`` when the layer has one.

Forward, for input x: x ← x·R (if rotate); x_o, x_m = x[..., :r], x[..., r:]; x_m ← per-token symmetric
fake-quant to `act_bits` with the range clipped to `act_clip` · max|x_m| (act_bits = 16: none); then
y = x_m W_mainᵀ + x_o W_outlierᵀ + b. The fake-quant is written as a straight-through estimator, so the
same module trains (QUAD's PEFT) and infers. The real model keeps its KV cache in fp16/fp32: only the
inputs of the linear layers are quantized.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from . import rotation
from .intpack import pack_rows, packed_width, unpack_rows_int
from .packed_linear import PackedLinear

FORMAT_NAME = "quad"
_PARAM_KEYS = frozenset({"bits", "outlier_cols", "act_bits", "act_clip", "rotate"})


def fake_quant_per_token(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Symmetric per-token (last dim) fake quantization with a straight-through gradient."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = (x.detach().abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    return x + (q - x).detach()


class QuadLinear(PackedLinear):
    format_name = FORMAT_NAME
    vllm = ("not-served", "QUAD's online rotation and W4A4 activations have no vLLM path; serve with "
            "transformers + import squeezeflow, or dequantize to a dense checkpoint first")
    packed_fields = ("qweight", "scales", "w_outlier")

    def __init__(self, in_features: int, out_features: int, bits: int, outlier_cols: int, act_bits: int,
                 act_clip: float, rotate: bool, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        check_params({"bits": bits, "outlier_cols": outlier_cols, "act_bits": act_bits, "act_clip": act_clip,
                      "rotate": rotate})
        if outlier_cols >= in_features:
            raise ValueError(f"outlier_cols ({outlier_cols}) must be smaller than in_features ({in_features})")
        super().__init__(in_features, out_features, dtype)
        self.bits, self.outlier_cols, self.act_bits, self.act_clip, self.rotate = bits, outlier_cols, act_bits, act_clip, rotate
        main = in_features - outlier_cols
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(main, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, 1, dtype=torch.float16, device=device))
        self.register_buffer("w_outlier", torch.zeros(out_features, outlier_cols, dtype=torch.float16, device=device))
        if rotate:
            m, _ = rotation.split_order(in_features)
            self.register_buffer("rot_a", torch.eye(m, dtype=torch.float32, device=device))
            self.register_buffer("rot_signs", torch.ones(in_features, dtype=torch.float32, device=device))
        self._register_bias(bias, device)

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        check_params(params)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], in_features: int, out_features: int, bias: bool,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> QuadLinear:
        check_params(params)
        return cls(in_features, out_features, int(params["bits"]), int(params["outlier_cols"]), int(params["act_bits"]),
                   float(params["act_clip"]), bool(params["rotate"]), bias, dtype, device)

    @staticmethod
    def pack_fields(codes: torch.Tensor, scales: torch.Tensor, bits: int, outlier_cols: int, act_bits: int,
                    act_clip: float, rotate: bool, w_outlier: torch.Tensor | None = None,
                    rot_a: torch.Tensor | None = None, rot_signs: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Fields of one layer from the main columns' codes [out, in - r] (0 .. 2^bits - 1) and scales [out, 1]."""
        check_params({"bits": bits, "outlier_cols": outlier_cols, "act_bits": act_bits, "act_clip": act_clip, "rotate": rotate})
        out_f, main = codes.shape
        if scales.shape != (out_f, 1):
            raise ValueError(f"scales must have shape {(out_f, 1)}, got {tuple(scales.shape)}")
        w_outlier = torch.zeros(out_f, 0) if w_outlier is None else w_outlier
        if w_outlier.shape != (out_f, outlier_cols):
            raise ValueError(f"w_outlier must have shape {(out_f, outlier_cols)}, got {tuple(w_outlier.shape)}")
        fields = {"qweight": pack_rows(codes, bits), "scales": scales.detach().to(torch.float16).contiguous(),
                  "w_outlier": w_outlier.detach().to(torch.float16).contiguous()}
        if rotate:
            if rot_a is None or rot_signs is None or rot_signs.numel() != main + outlier_cols:
                raise ValueError("rotate=true needs rot_a and rot_signs for every input")
            fields["rot_a"] = rot_a.detach().float().contiguous()
            fields["rot_signs"] = rot_signs.detach().float().contiguous()
        if bias is not None:
            fields["bias"] = bias.detach().float().contiguous()
        return fields

    def dequantize_main(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The integer part of the weight [out, in - r] (differentiable in `scales`)."""
        codes = unpack_rows_int(self.qweight, self.bits, self.in_features - self.outlier_cols).float()
        return ((codes - 2 ** (self.bits - 1)) * self.scales.float()).to(dtype or self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] in the rotated input basis (what x·R multiplies)."""
        dtype = dtype or self.dtype
        return torch.cat([self.w_outlier.to(dtype), self.dequantize_main(dtype)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            x = rotation.apply(x, self.rot_a, self.rot_signs)
        r = self.outlier_cols
        x_main = fake_quant_per_token(x[..., r:], self.act_bits, self.act_clip)
        weight = self._weight(x.dtype)
        y = F.linear(x_main, weight[:, r:], None if self.bias is None else self.bias.to(x.dtype))
        return y + F.linear(x[..., :r], weight[:, :r]) if r else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"outlier_cols={self.outlier_cols}, act_bits={self.act_bits}, act_clip={self.act_clip}, "
                f"rotate={self.rotate}, format={self.format_name}")


def check_params(params: Mapping[str, Any]) -> None:
    keys = set(params) - {"format"}
    if keys != _PARAM_KEYS:
        raise ValueError(f"format {FORMAT_NAME!r} takes parameters {sorted(_PARAM_KEYS)}; "
                         f"missing {sorted(_PARAM_KEYS - keys)}, unknown {sorted(keys - _PARAM_KEYS)}")
    bits, r, a, clip = params["bits"], params["outlier_cols"], params["act_bits"], params["act_clip"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"format {FORMAT_NAME!r}: bits must be an int in [2, 8], got {bits!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"format {FORMAT_NAME!r}: outlier_cols must be a non-negative int, got {r!r}")
    if a not in (4, 6, 8, 16):
        raise ValueError(f"format {FORMAT_NAME!r}: act_bits must be 4, 6, 8 or 16 (no quantization), got {a!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise ValueError(f"format {FORMAT_NAME!r}: act_clip must be in (0, 1], got {clip!r}")
    if not isinstance(params["rotate"], bool):
        raise ValueError(f"format {FORMAT_NAME!r}: rotate must be true or false, got {params['rotate']!r}")

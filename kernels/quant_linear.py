"""QuantLinear: the "intq" packed format, group-wise asymmetric integer weights.

Stored fields of a module (saved to safetensors as ``<module>.<field>``):

* ``qweight`` int32 ``[out, ceil(in * bits / 32)]``: the codes ``q[o, i]`` in ``[0, 2**bits)``, each
  row packed by :func:`squeezeflow.kernels.intpack.pack_rows`.
* ``scales`` float16 ``[out, in // group_size]``.
* ``zeros`` float16 ``[out, in // group_size]``: integer zero-points (fp16 holds every integer a
  code can take exactly, so the zero-point is exact while sharing the scales' dtype).
* ``bias`` float32 ``[out]``, only when the layer has a bias.

Groups are ``group_size`` consecutive input columns of one output row; ``group_size == in``
means one group per output channel. The weight is

    W[o, i] = (q[o, i] - zeros[o, i // group_size]) * scales[o, i // group_size]

computed in float32, then cast to the dtype of the activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .fast_unpack import unpack_rows_fast
from .intpack import pack_rows, packed_width
from .packed_linear import PackedLinear
from .triton_dispatch import use_triton

FORMAT_NAME = "intq"
_PARAM_KEYS = frozenset({"bits", "group_size"})
MIN_BITS, MAX_BITS = 2, 8  # integer weight grids; intpack itself packs 1..16


class QuantLinear(PackedLinear):
    """Linear layer whose weight is stored as packed group-wise asymmetric integer codes.

    ``dtype`` is the dtype :meth:`dequantize` returns by default (the model's compute dtype);
    :meth:`forward` always computes in the dtype of its input.

    Set ``cache_dequantized = True`` to keep the dequantized weight after the first forward. That
    trades memory (a dense weight per layer) for speed, e.g. for evaluation loops; the cache is
    rebuilt automatically when a buffer is replaced or modified in place, and
    :meth:`invalidate_cache` drops it explicitly.
    """

    format_name = FORMAT_NAME
    triton_kernel = True
    compressed_tensors = "pack-quantized"
    vllm = ("served", "export --format compressed-tensors (pack-quantized) -> vLLM's compressed-tensors WNA16 "
            "scheme, 4 and 8 bits only: symmetric grids (the -sym presets) take the Marlin GPTQ kernels "
            "(sm80+; group -1/32/64/128, in_features a multiple of 128, out_features of 64; else another WNA16 "
            "kernel or a refusal), asymmetric "
            "ones need --zero-points packed; 2/3-bit grids are not served")
    packed_fields = ("qweight", "scales", "zeros")

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _check_shape_params(in_features, out_features, bits, group_size)
        super().__init__(in_features, out_features, dtype)
        self.bits = bits
        self.group_size = group_size
        n_groups = in_features // group_size
        # Explicit dtypes on every buffer: the HF loader builds this module under a default-dtype
        # context and keeps each checkpoint tensor in the dtype of the buffer it lands in.
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self._register_bias(bias, device)

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        """Validate a quantization_config entry such as ``{"format": "intq", "bits": 4, "group_size": 64}``."""
        check_params(params)

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """Build an empty module from a quantization_config entry such as ``{"bits": 4, "group_size": 64}``."""
        check_params(params)
        return cls(in_features, out_features, int(params["bits"]), int(params["group_size"]), bias, dtype, device)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """Build a module from unpacked codes ``[out, in]`` and per-group ``scales``/``zeros`` ``[out, in // group_size]``."""
        fields = cls.pack_fields(codes, scales, zeros, bits, group_size, bias)
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype, codes.device)
        for name, tensor in fields.items():
            # pack_fields may hand back the caller's own fp16 tensors; the module owns copies.
            setattr(module, name, tensor.clone())
        return module

    @staticmethod
    def pack_fields(
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors this format stores for one layer, keyed by field name (``qweight``, ``scales``, ...)."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be [out_features, in_features], got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        _check_shape_params(in_features, out_features, bits, group_size)
        group_shape = (out_features, in_features // group_size)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != group_shape:
                raise ValueError(f"{name} must have shape {group_shape} for group_size {group_size}, got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float tensor (stored as float16), got {t.dtype}")
        zeros16 = zeros.to(torch.float16)
        # The format promises integer zero-points; a fractional one would silently change the
        # weights when another implementation (e.g. a GPU kernel) rounds it.
        if not torch.equal(zeros16, zeros16.round()):
            raise ValueError("zeros must hold integer zero-points")
        fields = {
            "qweight": pack_rows(codes, bits),
            "scales": scales.detach().to(torch.float16).contiguous(),
            "zeros": zeros16.detach().contiguous(),
        }
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            fields["bias"] = bias.detach().to(torch.float32).contiguous()
        return fields

    # ---- compute ------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]``, computed in float32 and returned in ``dtype`` (default ``self.dtype``)."""
        # Byte-wise unpack (kernels/fast_unpack.py) and in-place arithmetic on the one float32 buffer: the
        # same values as (codes - zeros) * scales, with a fraction of the CPU memory traffic.
        codes = unpack_rows_fast(self.qweight, self.bits, self.in_features)
        n_groups = self.in_features // self.group_size
        weight = codes.to(torch.float32).view(self.out_features, n_groups, self.group_size)
        weight.sub_(self.zeros.to(torch.float32).unsqueeze(-1)).mul_(self.scales.to(torch.float32).unsqueeze(-1))
        return weight.view(self.out_features, self.in_features).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On CUDA the fused Triton dequant-GEMM/GEMV reads the packed codes directly (kernels/triton_intq.py);
        # an opted-in dequantized cache means the caller prefers the dense weight, so it keeps the torch path.
        if not self.cache_dequantized and use_triton(x):
            from .triton_intq import intq_linear

            return intq_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)
        return super().forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.format_name}"
        )


def check_params(params: Mapping[str, Any]) -> None:
    """Validate an "intq" quantization_config entry (the "format" key itself is allowed and ignored)."""
    keys = set(params) - {"format"}
    missing = _PARAM_KEYS - keys
    unknown = keys - _PARAM_KEYS
    if missing or unknown:
        raise ValueError(
            f"format {FORMAT_NAME!r} takes parameters {sorted(_PARAM_KEYS)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    bits, group_size = params["bits"], params["group_size"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"format {FORMAT_NAME!r}: bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"format {FORMAT_NAME!r}: group_size must be a positive int, got {group_size!r}")


def _check_shape_params(in_features: int, out_features: int, bits: int, group_size: int) -> None:
    check_params({"bits": bits, "group_size": group_size})
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
    if in_features % group_size:
        raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")

"""VQLinear: the "vq" packed format, a normalized weight vector-quantized with one codebook per matrix
(NoWag-VQ, squeezeflow/methods/nowag/vq.py).

quantization_config entry: ``{"format": "vq", "bits": b, "d": d, "k": K}`` with ``K == 2**(b*d)``
(``b*d`` in 1..16): subvectors of ``d`` consecutive inputs of a row, each stored as a ``b*d``-bit index
into a codebook of ``K`` centroids, i.e. ``b`` bits per weight before the codebook and norms.

Stored fields of a module (saved to safetensors as ``<module>.<field>``), with ``n_sub = ceil(in / d)``:

* ``qcodes`` int32 ``[out, ceil(n_sub * b * d / 32)]``: the centroid index ``q[o, s]`` in ``[0, K)`` of
  subvector ``s`` (inputs ``s*d .. s*d+d-1``) of row ``o``, each row packed at ``b*d`` bits per index by
  :func:`squeezeflow.kernels.intpack.pack_rows` (e.g. 12-bit indices for K = 4096).
* ``codebook`` float16 ``[K, d]``: the centroids, in normalized weight space.
* ``row_norms`` float16 ``[out]``: ``r``.
* ``col_norms`` float16 ``[in]``: ``c``.
* ``bias`` float32 ``[out]``, only when the layer has a bias.

The weight, computed in float32 and then cast to the dtype of the activations, is

    W̄[o, s*d + t] = codebook[q[o, s], t]         for s*d + t < in  (the padded tail is cropped)
    W[o, i]       = W̄[o, i] * r[o] * c[i]        (diag(r) · W̄ · diag(c))

``forward`` uses that dense weight (reference path). With ``denormalize_otf = True`` it applies the
norms on the fly instead, ``y = r ⊙ (W̄ (c ⊙ x)) + bias`` (:meth:`forward_otf`): the same function up to
float rounding, and only the normalized weight is ever materialized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .intpack import MAX_BITS, pack_rows, packed_width, unpack_rows_int
from .packed_linear import PackedLinear
from .triton_dispatch import use_triton

FORMAT_NAME = "vq"
_PARAM_KEYS = frozenset({"bits", "d", "k"})


class VQLinear(PackedLinear):
    """Linear layer whose weight is a vector-quantized normalized matrix with fp16 row/column norms.

    ``dtype`` is the dtype :meth:`dequantize` returns by default; :meth:`forward` computes in the dtype
    of its input. ``cache_dequantized = True`` keeps the decoded weight (the normalized one in the
    on-the-fly path) after the first forward.
    """

    format_name = FORMAT_NAME
    triton_kernel = True
    vllm = ("not-served", "NoWag-VQ codebooks have no vLLM kernel or compressed-tensors form; serve with "
            "transformers + import squeezeflow, or dequantize to a dense checkpoint first")
    packed_fields = ("qcodes", "codebook", "row_norms", "col_norms")

    qcodes: torch.Tensor
    codebook: torch.Tensor
    row_norms: torch.Tensor
    col_norms: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        d: int,
        k: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        check_params({"bits": bits, "d": d, "k": k})
        super().__init__(in_features, out_features, dtype)
        self.bits, self.d, self.k = bits, d, k
        self.index_bits = bits * d
        self.n_sub = -(-in_features // d)
        self.denormalize_otf = False
        self._otf_cache: torch.Tensor | None = None
        self._otf_key: tuple[Any, ...] | None = None
        self.register_buffer(
            "qcodes",
            torch.zeros(out_features, packed_width(self.n_sub, self.index_bits), dtype=torch.int32, device=device),
        )
        self.register_buffer("codebook", torch.zeros(k, d, dtype=torch.float16, device=device))
        self.register_buffer("row_norms", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("col_norms", torch.ones(in_features, dtype=torch.float16, device=device))
        self._register_bias(bias, device)

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        """Validate a quantization_config entry such as ``{"format": "vq", "bits": 2, "d": 6, "k": 4096}``."""
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
    ) -> VQLinear:
        check_params(params)
        return cls(in_features, out_features, int(params["bits"]), int(params["d"]), int(params["k"]), bias,
                   dtype, device)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        codebook: torch.Tensor,
        row_norms: torch.Tensor,
        col_norms: torch.Tensor,
        bits: int,
        d: int,
        k: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> VQLinear:
        """Build a module from unpacked indices ``[out, ceil(in / d)]`` and the other fields."""
        fields = cls.pack_fields(codes, codebook, row_norms, col_norms, bits, d, k, bias)
        module = cls(col_norms.numel(), codes.shape[0], bits, d, k, bias is not None, dtype, codes.device)
        for name, tensor in fields.items():
            setattr(module, name, tensor.clone())
        return module

    @staticmethod
    def pack_fields(
        codes: torch.Tensor,
        codebook: torch.Tensor,
        row_norms: torch.Tensor,
        col_norms: torch.Tensor,
        bits: int,
        d: int,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors this format stores for one layer: ``qcodes``, ``codebook``, ``row_norms``,
        ``col_norms`` (and ``bias`` when given). ``codes`` are the unpacked indices ``[out, ceil(in/d)]``;
        ``in`` is the length of ``col_norms``."""
        check_params({"bits": bits, "d": d, "k": k})
        if codes.dim() != 2:
            raise ValueError(f"codes must be [out_features, ceil(in_features / d)], got shape {tuple(codes.shape)}")
        if col_norms.dim() != 1 or col_norms.numel() == 0:
            raise ValueError(f"col_norms must be [in_features], got shape {tuple(col_norms.shape)}")
        out_features, in_features = codes.shape[0], col_norms.numel()
        n_sub = -(-in_features // d)
        if codes.shape[1] != n_sub:
            raise ValueError(f"codes must have ceil({in_features} / {d}) = {n_sub} columns, got {codes.shape[1]}")
        for name, t, shape in (("codebook", codebook, (k, d)), ("row_norms", row_norms, (out_features,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        for name, t in (("codebook", codebook), ("row_norms", row_norms), ("col_norms", col_norms)):
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float tensor (stored as float16), got {t.dtype}")
        fields = {
            "qcodes": pack_rows(codes, bits * d),
            "codebook": codebook.detach().to(torch.float16).contiguous(),
            "row_norms": row_norms.detach().to(torch.float16).contiguous(),
            "col_norms": col_norms.detach().to(torch.float16).contiguous(),
        }
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            fields["bias"] = bias.detach().to(torch.float32).contiguous()
        return fields

    # ---- compute ------------------------------------------------------------------------------

    def dequantize_normalized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The normalized weight W̄ ``[out, in]`` (codebook rows, padding cropped), in float32 then ``dtype``."""
        codes = unpack_rows_int(self.qcodes, self.index_bits, self.n_sub).long()
        w_bar = self.codebook.to(torch.float32)[codes].reshape(self.out_features, -1)[:, : self.in_features]
        return w_bar.to(dtype or torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight diag(r) · W̄ · diag(c) ``[out, in]`` (float32 math), in ``dtype`` (default self.dtype)."""
        w_bar = self.dequantize_normalized()
        r, c = self.row_norms.to(torch.float32), self.col_norms.to(torch.float32)
        weight = w_bar * r.unsqueeze(1) * c.unsqueeze(0)
        return weight.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode-sized batches on CUDA: the Triton codebook-lookup GEMV (kernels/triton_vq.py). Larger
        # batches amortize one dense decode over many rows, so they keep the torch path.
        if not self.cache_dequantized and use_triton(x):
            from .triton_vq import GEMV_MAX_ROWS, vq_gemv

            if x.numel() // self.in_features <= GEMV_MAX_ROWS:
                return vq_gemv(x, self.qcodes, self.codebook, self.row_norms, self.col_norms, self.index_bits,
                               self.bias)
        if self.denormalize_otf:
            return self.forward_otf(x)
        return super().forward(x)

    def forward_otf(self, x: torch.Tensor) -> torch.Tensor:
        """``r ⊙ (W̄ (c ⊙ x)) + bias``, in the dtype of ``x``, without the denormalized weight."""
        w_bar = self._normalized_weight(x.dtype)
        y = F.linear(x * self.col_norms.to(x.dtype), w_bar) * self.row_norms.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _normalized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_dequantized:
            self._otf_cache = self._otf_key = None
            return self.dequantize_normalized(dtype)
        key = self._buffer_key(dtype)
        if self._otf_cache is None or not _same_key(self._otf_key, key):
            self._otf_cache = self.dequantize_normalized(dtype)
            self._otf_key = key
        return self._otf_cache

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        self._otf_cache = None
        self._otf_key = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, d={self.d}, "
            f"k={self.k}, bias={self.bias is not None}, format={self.format_name}"
        )


def _same_key(old: tuple[Any, ...] | None, new: tuple[Any, ...]) -> bool:
    if old is None:
        return False
    (old_refs, old_versions, old_dtype), (new_refs, new_versions, new_dtype) = old, new
    same = all(o() is not None and o() is n() for o, n in zip(old_refs, new_refs))
    return same and old_versions == new_versions and old_dtype == new_dtype


def check_params(params: Mapping[str, Any]) -> None:
    """Validate a "vq" quantization_config entry (the "format" key itself is allowed and ignored)."""
    keys = set(params) - {"format"}
    missing = _PARAM_KEYS - keys
    unknown = keys - _PARAM_KEYS
    if missing or unknown:
        raise ValueError(
            f"format {FORMAT_NAME!r} takes parameters {sorted(_PARAM_KEYS)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    for key in ("bits", "d", "k"):
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"format {FORMAT_NAME!r}: {key} must be a positive int, got {v!r}")
    bits, d, k = params["bits"], params["d"], params["k"]
    if bits * d > MAX_BITS:
        raise ValueError(f"format {FORMAT_NAME!r}: bits*d = {bits * d} exceeds {MAX_BITS}-bit indices")
    if k != 2 ** (bits * d):
        raise ValueError(f"format {FORMAT_NAME!r}: k must be 2**(bits*d) = {2 ** (bits * d)}, got {k}")

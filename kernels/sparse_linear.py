"""Sparse packed formats for pruned linears: "sparse" (unstructured) and "nm" (N:M semi-structured).

Both store only the kept weights plus where they sit; a pruned matrix never travels as a dense matrix
with zeros. The reference forward decodes the dense weight (optionally cached, see PackedLinear) and
runs F.linear; GPU paths (torch's semi-structured 2:4) build on the same fields.

"sparse": unstructured bitmask, for any sparsity pattern.

* ``mask`` int32 ``[out, ceil(in / 32)]``: one bit per weight, 1 = kept, each row packed as a
  little-endian bitstream by :func:`squeezeflow.kernels.intpack.pack_rows` at 1 bit.
* ``values`` float16 ``[nnz]``: the kept weights in row-major order (row by row, ascending input).
* ``bias`` float32 ``[out]``, only when the layer has a bias.
* parameter ``nnz``: the number of kept weights (fixes the shape of ``values``).

Cost: 16 · (1 − sparsity) + 1 bits per weight, e.g. 9 at 50%.

"nm": N of every M consecutive inputs of a row kept (e.g. 2:4, 4:8).

* ``values`` float16 ``[out, in / M * N]``: the kept weights, group by group, ascending position.
* ``indices`` int32 ``[out, ceil(in / M * N * b / 32)]`` with b = max(1, ceil(log2 M)): each kept
  weight's position inside its group of M (0..M-1, strictly increasing within a group), packed per
  row by ``pack_rows`` at b bits.
* ``bias`` as above. Parameters ``n`` and ``m``.

Cost: (N / M) · (16 + b) bits per weight, e.g. 9 at 2:4 and 9.5 at 4:8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .intpack import pack_rows, packed_width, unpack_rows_int
from .packed_linear import PackedLinear
from .semi_structured import semi_structured_reason, to_semi_structured
from .triton_dispatch import kernel_mode


def _check_keys(format_name: str, params: Mapping[str, Any], keys: frozenset[str]) -> None:
    given = set(params) - {"format"}
    if given != keys:
        raise ValueError(f"format {format_name!r} takes parameters {sorted(keys)}; "
                         f"missing {sorted(keys - given)}, unknown {sorted(given - keys)}")
    for k in keys:
        v = params[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"format {format_name!r}: {k} must be a non-negative int, got {v!r}")


def _bias_field(bias: torch.Tensor | None, out_features: int) -> dict[str, torch.Tensor]:
    if bias is None:
        return {}
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return {"bias": bias.detach().to(torch.float32).contiguous()}


def _check_mask(mask: torch.Tensor, weight: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor shaped like weight {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


class SparseLinear(PackedLinear):
    """Unstructured sparse linear: 1-bit keep mask per weight + the kept values in fp16."""

    format_name = "sparse"
    compressed_tensors = "dense"
    vllm = ("served-dense", "export --format compressed-tensors writes dense weights with zeros: vLLM serves "
            "an ordinary dense model (no sparse kernel for unstructured sparsity)")
    packed_fields = ("mask", "values")
    _KEYS = frozenset({"nnz"})

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must lie in [0, {in_features * out_features}], got {nnz}")
        self.nnz = nnz
        self.register_buffer("mask", torch.zeros(out_features, packed_width(in_features, 1), dtype=torch.int32, device=device))
        self.register_buffer("values", torch.zeros(nnz, dtype=torch.float16, device=device))
        self._register_bias(bias, device)

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        _check_keys("sparse", params, SparseLinear._KEYS)

    @classmethod
    def from_params(cls, params, in_features, out_features, bias, dtype=torch.float32, device=None) -> SparseLinear:
        cls.check_params(params)
        return cls(in_features, out_features, int(params["nnz"]), bias, dtype, device)

    @staticmethod
    def pack_fields(mask: torch.Tensor, weight: torch.Tensor, nnz: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode a pruned weight: ``mask`` bool [out, in] (True = kept), ``weight`` [out, in] (values
        at pruned positions are ignored)."""
        _check_mask(mask, weight)
        if int(mask.sum()) != nnz:
            raise ValueError(f"mask keeps {int(mask.sum())} weights but nnz = {nnz}")
        return {"mask": pack_rows(mask.to(torch.uint8), 1),
                "values": weight[mask].detach().to(torch.float16).contiguous(),
                **_bias_field(bias, weight.shape[0])}

    def keep_mask(self) -> torch.Tensor:
        return unpack_rows_int(self.mask, 1, self.in_features).bool()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.values.device)
        weight[self.keep_mask()] = self.values.to(torch.float32)
        return weight.to(dtype or self.dtype)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={1 - self.nnz / total:.3f}, bias={self.bias is not None}, format=sparse")


def index_bits(m: int) -> int:
    """Bits per in-group index for groups of m inputs."""
    return max(1, math.ceil(math.log2(m)))


class NMLinear(PackedLinear):
    """N:M semi-structured sparse linear: N kept weights per M consecutive inputs, fp16 values plus
    their in-group positions."""

    format_name = "nm"
    compressed_tensors = "dense"
    vllm = ("served-dense", "export writes dense weights with zeros: vLLM serves a dense model; its 2:4 sparse "
            "kernels need compressed-tensors' sparse-24 layout, which export does not write")
    packed_fields = ("values", "indices")
    _KEYS = frozenset({"n", "m"})

    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        _check_nm(in_features, n, m)
        super().__init__(in_features, out_features, dtype)
        self.n, self.m = n, m
        self._semi: tuple | None = None  # (buffer key, semi-structured weight) on the 2:4 GPU path
        kept = in_features // m * n
        self.register_buffer("values", torch.zeros(out_features, kept, dtype=torch.float16, device=device))
        self.register_buffer("indices", torch.zeros(out_features, packed_width(kept, index_bits(m)),
                                                    dtype=torch.int32, device=device))
        self._register_bias(bias, device)

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        _check_keys("nm", params, NMLinear._KEYS)
        if not 0 < params["n"] < params["m"] <= 256:
            raise ValueError(f"format 'nm' needs 0 < n < m <= 256, got n={params['n']}, m={params['m']}")

    @classmethod
    def from_params(cls, params, in_features, out_features, bias, dtype=torch.float32, device=None) -> NMLinear:
        cls.check_params(params)
        return cls(in_features, out_features, int(params["n"]), int(params["m"]), bias, dtype, device)

    @staticmethod
    def pack_fields(mask: torch.Tensor, weight: torch.Tensor, n: int, m: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode a pruned weight whose ``mask`` keeps exactly ``n`` of every ``m`` consecutive inputs."""
        _check_mask(mask, weight)
        out_f, in_f = mask.shape
        _check_nm(in_f, n, m)
        groups = mask.reshape(out_f, in_f // m, m)
        if not bool((groups.sum(-1) == n).all()):
            raise ValueError(f"mask does not keep exactly {n} of every {m} consecutive inputs")
        # Positions of the kept entries of each group, ascending: sort puts True (1) first when
        # descending, and a stable sort keeps the position order among them.
        pos = torch.argsort(groups.to(torch.uint8), dim=-1, descending=True, stable=True)[..., :n]
        pos = pos.sort(dim=-1).values
        values = torch.gather(weight.reshape(out_f, in_f // m, m), -1, pos)
        return {"values": values.reshape(out_f, -1).detach().to(torch.float16).contiguous(),
                "indices": pack_rows(pos.reshape(out_f, -1).to(torch.int32), index_bits(m)),
                **_bias_field(bias, out_f)}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        kept = self.in_features // self.m * self.n
        pos = unpack_rows_int(self.indices, index_bits(self.m), kept).to(torch.int64)
        pos = pos.view(self.out_features, self.in_features // self.m, self.n)
        weight = torch.zeros(self.out_features, self.in_features // self.m, self.m, dtype=torch.float32,
                             device=self.values.device)
        weight.scatter_(-1, pos, self.values.to(torch.float32).view_as(pos))
        return weight.view(self.out_features, self.in_features).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2:4 on a recent GPU in fp16/bf16: torch's semi-structured sparse GEMM (kernels/semi_structured.py).
        # The compressed weight is as small as the packed one, so it is always kept once built.
        if kernel_mode() != "torch" and semi_structured_reason(self.n, self.m, self.out_features,
                                                               self.in_features, x) is None:
            key = self._buffer_key(x.dtype)
            if self._semi is None or not _same_buffers(self._semi[0], key):
                self._semi = (key, to_semi_structured(self.dequantize(x.dtype)))
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._semi[1], bias)
        return super().forward(x)

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        self._semi = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, "
                f"bias={self.bias is not None}, format=nm")


def _same_buffers(old: tuple, new: tuple) -> bool:
    (old_refs, old_versions, old_dtype), (new_refs, new_versions, new_dtype) = old, new
    same = all(o() is not None and o() is n for o, n in zip(old_refs, (r() for r in new_refs)))
    return same and old_versions == new_versions and old_dtype == new_dtype


def _check_nm(in_features: int, n: int, m: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"in_features ({in_features}) must be a multiple of m ({m})")

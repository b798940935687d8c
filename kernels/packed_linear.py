"""PackedLinear: what every packed linear format shares.

A format stores its weight in some compressed set of buffers and knows how to decode it
(:meth:`dequantize`). This base class supplies the rest: ``forward`` (decode, then ``F.linear`` in the
dtype of the input), an opt-in cache of the decoded weight, and ``.to()`` semantics that move the
packed buffers between devices without re-rounding them (a dtype cast of the model changes the
layer's compute dtype, never its storage).

Subclasses set ``format_name`` and ``packed_fields`` (the buffer names whose change invalidates the
cache) and implement ``dequantize``, ``check_params``, ``from_params`` and ``pack_fields``
(see kernels/formats.py for that protocol).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinear(nn.Module):
    """Base of the packed linear formats. Set ``cache_dequantized = True`` to keep the decoded weight
    after the first forward: memory (one dense weight per layer) for speed, e.g. in evaluation loops.
    The cache is rebuilt when a packed buffer is replaced or modified in place; :meth:`invalidate_cache`
    drops it explicitly."""

    format_name: ClassVar[str]
    packed_fields: ClassVar[tuple[str, ...]]
    # What else can run this format, declared here so compatibility and export read the format registry
    # instead of keeping lists: a Triton kernel (CUDA) beside the torch reference, and the
    # compressed-tensors form `squeezeflow export` writes ("pack-quantized", "dense"), or None.
    triton_kernel: ClassVar[bool] = False
    compressed_tensors: ClassVar[str | None] = None
    # What vLLM can serve, on paper (not run on a GPU): (status, how). status is "served" (through the
    # compressed-tensors export), "served-dense" (the export is a dense checkpoint: vLLM serves it, with no
    # memory or speed gain) or "not-served". No default: every format states it (test_compatibility.py).
    vllm: ClassVar[tuple[str, str]]
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.cache_dequantized = False
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple[Any, ...] | None = None

    def _register_bias(self, bias: bool, device: torch.device | str | None) -> None:
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bias", None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` this layer computes with, in ``dtype`` (default ``self.dtype``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def invalidate_cache(self) -> None:
        """Drop the cached dequantized weight (it is rebuilt on the next forward if caching is on)."""
        self._cache = None
        self._cache_key = None

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_dequantized:
            if self._cache is not None:
                self.invalidate_cache()  # caching was switched off: release the memory
            return self.dequantize(dtype)
        key = self._buffer_key(dtype)
        if self._cache is None or not self._cache_key_matches(key):
            self._cache = self.dequantize(dtype)
            self._cache_key = key
        return self._cache

    def _buffer_key(self, dtype: torch.dtype) -> tuple[Any, ...]:
        # Weak references tell a replaced buffer apart from the original without keeping the old
        # one alive; the version counter catches in-place writes such as load_state_dict's copy_.
        buffers = tuple(getattr(self, name) for name in self.packed_fields)
        return tuple(weakref.ref(t) for t in buffers), tuple(t._version for t in buffers), dtype

    def _cache_key_matches(self, key: tuple[Any, ...]) -> bool:
        assert self._cache_key is not None
        old_refs, old_versions, old_dtype = self._cache_key
        new_refs, new_versions, new_dtype = key
        same_tensors = all(old() is not None and old() is new() for old, new in zip(old_refs, new_refs))
        return same_tensors and old_versions == new_versions and old_dtype == new_dtype

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to()/.cuda()/.half() move the buffers but not the plain-attribute cache; drop it so the
        # next forward dequantizes on the new device.
        self.invalidate_cache()

        # The buffers are the packed storage format, so a dtype cast of the model (model.to(bf16),
        # .half()) must not re-round them: follow the device change only, and take the new float
        # dtype as this layer's compute dtype instead.
        def move_only(t: torch.Tensor) -> torch.Tensor:
            converted = fn(t)
            if converted.dtype == t.dtype:
                return converted
            if t.is_floating_point() and converted.is_floating_point():
                self.dtype = converted.dtype
            return t.to(device=converted.device)

        return super()._apply(move_only, recurse)


class ParameterlessFormat:
    """Mixin for formats whose quantization_config entry carries no parameters (rf8, fp8): the layer's
    shape alone determines the module."""

    format_name: str

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        unknown = set(params) - {"format"}
        if unknown:
            raise ValueError(f"format {cls.format_name!r} takes no parameters; unknown {sorted(unknown)}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], in_features: int, out_features: int, bias: bool,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        cls.check_params(params)
        return cls(in_features, out_features, bias, dtype, device)


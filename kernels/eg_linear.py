"""EGLinear: the "eg" packed format, an exp-Golomb storage layer around an integer-code format.

It wraps a format whose weight is a matrix of integer codes in [0, 256) plus side fields: "intq"
(RTN/GPTQ grid indices, its packed ``qweight`` replaced) and "rf8" (its ``codes`` replaced). The codes
are ranked by frequency and exp-Golomb (k = 0) coded as one stream per layer (kernels/expgolomb.py);
every other field of the inner format is stored as that format stores it.

quantization_config entry, e.g.::

    {"format": "eg", "inner": "intq", "bits": 4, "group_size": 64,
     "stream_bytes": 52311, "n_symbols": 16, "chunk": 4096}

``stream_bytes`` and ``n_symbols`` fix the buffer shapes, so ``from_params`` can build the empty
module before the checkpoint arrives; the remaining keys are the inner format's parameters.

Stored fields (safetensors ``<module>.<field>``):

* ``stream`` uint8 ``[stream_bytes]``: the exp-Golomb codewords of the row-major codes, MSB first.
* ``symbols`` uint8 ``[n_symbols]``: the rank table (symbol of rank 0, 1, ...).
* ``offsets`` int32 ``[ceil(out · in / chunk)]``: bit position of every ``chunk``-th codeword (sync
  points that let the decoder run all chunks in lockstep).
* the inner format's other fields (``scales``, ``zeros`` for intq; ``exp_bias`` for rf8) and ``bias``.

The codes are decoded once, on the first use after loading (or after the stream changes), and kept
as uint8; the weight is then computed by the inner format's own dequantization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import expgolomb
from .packed_linear import PackedLinear

FORMAT_NAME = "eg"
# Inner format -> the packed field that holds its codes (replaced by the stream).
CODE_FIELD = {"intq": "qweight", "rf8": "codes"}
_OWN_KEYS = ("inner", "stream_bytes", "n_symbols", "chunk")


def _format_class(name: str):
    from .formats import format_class   # formats imports this module

    return format_class(name)


def split_params(params: Mapping[str, Any]) -> tuple[str, dict, dict]:
    """(inner format, this format's own params, the inner format's params)."""
    own = {k: params[k] for k in _OWN_KEYS if k in params}
    inner = {k: v for k, v in params.items() if k not in _OWN_KEYS and k != "format"}
    return own.get("inner"), own, inner


def check_params(params: Mapping[str, Any]) -> None:
    inner, own, inner_params = split_params(params)
    missing = [k for k in _OWN_KEYS if k not in own]
    if missing:
        raise ValueError(f"format {FORMAT_NAME!r} needs parameters {list(_OWN_KEYS)}; missing {missing}")
    if inner not in CODE_FIELD:
        raise ValueError(f"format {FORMAT_NAME!r}: inner must be one of {sorted(CODE_FIELD)}, got {inner!r}")
    for k, lo, hi in (("stream_bytes", 0, 2**28), ("n_symbols", 1, expgolomb.MAX_SYMBOLS), ("chunk", 1, 2**20)):
        v = own[k]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"format {FORMAT_NAME!r}: {k} must be an int in [{lo}, {hi}], got {v!r}")
    _format_class(inner).check_params(inner_params)


def stream_params(codes: torch.Tensor, chunk: int = expgolomb.CHUNK) -> dict:
    """The stream's own parameters for these codes (what the pack stage will write), without coding them."""
    return {"stream_bytes": math.ceil(expgolomb.encoded_bits(codes) / 8),
            "n_symbols": int(expgolomb.rank_table(codes).size), "chunk": chunk}


class EGLinear(PackedLinear):
    """A linear layer whose integer codes are stored exp-Golomb coded, decoded at first use."""

    format_name = FORMAT_NAME
    vllm = ("not-served", "exp-Golomb is a storage-only entropy code with no vLLM kernel; dequantize to a dense "
            "checkpoint first")
    packed_fields = ("stream", "symbols", "offsets")

    def __init__(self, in_features: int, out_features: int, inner: str, inner_params: Mapping[str, Any],
                 stream_bytes: int, n_symbols: int, chunk: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype)
        self.inner = inner
        self.inner_params = dict(inner_params)
        self.chunk = chunk
        template = _format_class(inner).from_params(self.inner_params, in_features, out_features, False, dtype, device)
        self.side_fields = tuple(name for name, _ in template.named_buffers(recurse=False)
                                 if name not in (CODE_FIELD[inner], "bias"))
        for name in self.side_fields:
            self.register_buffer(name, torch.zeros_like(getattr(template, name)))
        n_chunks = -(-in_features * out_features // chunk)
        self.register_buffer("stream", torch.zeros(stream_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("symbols", torch.zeros(n_symbols, dtype=torch.uint8, device=device))
        self.register_buffer("offsets", torch.zeros(n_chunks, dtype=torch.int32, device=device))
        self._register_bias(bias, device)
        # A change of the side fields (e.g. scales) must also invalidate the dequantized-weight cache.
        self.packed_fields = (*type(self).packed_fields, *self.side_fields)
        self._codes: torch.Tensor | None = None
        self._codes_key: tuple | None = None

    @staticmethod
    def check_params(params: Mapping[str, Any]) -> None:
        check_params(params)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], in_features: int, out_features: int, bias: bool,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> EGLinear:
        check_params(params)
        inner, own, inner_params = split_params(params)
        return cls(in_features, out_features, inner, inner_params, own["stream_bytes"], own["n_symbols"],
                   own["chunk"], bias, dtype, device)

    @staticmethod
    def pack_fields(codes: torch.Tensor, inner: str, stream_bytes: int, n_symbols: int, chunk: int,
                    bias: torch.Tensor | None = None, **rest: Any) -> dict[str, torch.Tensor]:
        """Encode one layer: the inner format's fields without its code field, plus the stream."""
        check_params({"inner": inner, "stream_bytes": stream_bytes, "n_symbols": n_symbols, "chunk": chunk,
                      **{k: v for k, v in rest.items() if not isinstance(v, torch.Tensor)}})
        fields = _format_class(inner).pack_fields(codes=codes, bias=bias, **rest)
        del fields[CODE_FIELD[inner]]
        stream, symbols, offsets = expgolomb.encode(codes, chunk=chunk)
        if stream.size != stream_bytes or symbols.size != n_symbols:
            raise ValueError(f"format {FORMAT_NAME!r}: the codes give a {stream.size}-byte stream of "
                             f"{symbols.size} symbols, the parameters say {stream_bytes} and {n_symbols}")
        return {**fields, "stream": torch.from_numpy(stream), "symbols": torch.from_numpy(symbols),
                "offsets": torch.from_numpy(offsets.astype(np.int32))}

    def decoded_codes(self) -> torch.Tensor:
        """The integer codes [out, in] (uint8), decoded from the stream once and cached."""
        key = (self.stream.data_ptr(), self.stream._version, self.symbols._version, self.offsets._version)
        if self._codes is None or self._codes_key != key:
            flat = expgolomb.decode(self.stream.cpu().numpy(), self.symbols.cpu().numpy(),
                                    self.offsets.cpu().numpy().astype(np.uint32),
                                    self.in_features * self.out_features, self.chunk)
            self._codes = torch.from_numpy(flat).reshape(self.out_features, self.in_features).to(self.stream.device)
            self._codes_key = key
        return self._codes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        cls = _format_class(self.inner)
        fields = cls.pack_fields(codes=self.decoded_codes(), **{k: getattr(self, k) for k in self.side_fields},
                                 **self.inner_params)
        module = cls.from_params(self.inner_params, self.in_features, self.out_features, False, self.dtype,
                                 self.stream.device)
        for name, t in fields.items():
            setattr(module, name, t)
        return module.dequantize(dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, inner={self.inner}, "
                f"stream_bytes={self.stream.numel()}, bias={self.bias is not None}, format=eg")

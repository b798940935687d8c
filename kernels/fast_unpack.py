"""Faster CPU unpacking of kernels/intpack.py bitstreams for code widths up to 8 bits.

Same result as :func:`kernels.intpack.unpack_rows_int` (the tests check equality), computed on bytes
instead of int32 words: on a little-endian machine the int32 words of a row, viewed as bytes, are the
row's bitstream in order (stream bit p is bit p % 8 of byte p // 8), so

* widths dividing 8 (1, 2, 4, 8): each byte holds 8 / bits whole codes, split with uint8 shifts and
  masks (a quarter of the memory traffic of int32 lanes);
* other widths (3, 5, 6, 7): a code starting at bit offset o <= 7 of byte j ends before bit 16, so it
  lies inside the 16-bit window byte[j] | byte[j+1] << 8; one gather of each code's window plus a
  shift and a mask decodes every code at once, instead of 32 strided passes.

Returns uint8 codes (int16 for the windowed widths); callers convert to float next.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch

from .intpack import packed_width, unpack_rows_int

MAX_FAST_BITS = 8


def unpack_rows_fast(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes ``[rows, n]`` of int32 ``words [rows, ceil(n * bits / 32)]``, in a small integer dtype."""
    if sys.byteorder != "little" or bits > MAX_FAST_BITS or words.dim() != 2 or words.dtype != torch.int32 \
            or words.shape[1] != packed_width(n, bits) or not words.is_contiguous() or n == 0 or words.shape[0] == 0:
        return unpack_rows_int(words, bits, n)  # validates and handles every other case
    rows = words.shape[0]
    data = words.view(torch.uint8)  # [rows, 4 * n_words]: the bitstream, byte by byte
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        out = torch.empty(rows, data.shape[1], per_byte, dtype=torch.uint8, device=words.device)
        for k in range(per_byte):
            torch.bitwise_and(data >> (k * bits) if k else data, mask, out=out[:, :, k])
        return out.view(rows, -1)[:, :n]
    idx, offset = _windows(bits, n, str(words.device))
    wide = data.to(torch.int16)
    # window[j] = byte[j] | byte[j + 1] << 8; int16 wraps for bytes >= 128 in the high half, but only the
    # low offset + bits <= 15 bits are ever kept.
    window = torch.empty_like(wide)
    torch.bitwise_or(wide[:, :-1], wide[:, 1:] << 8, out=window[:, :-1])
    window[:, -1] = wide[:, -1]
    codes = window.index_select(1, idx)
    return codes.bitwise_right_shift_(offset).bitwise_and_(mask)


@lru_cache(maxsize=64)
def _windows(bits: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device) * bits
    return start // 8, (start % 8).to(torch.int16)

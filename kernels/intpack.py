"""Exact bit-packing of unsigned integer codes into int32 words (packed format, "format_version": 1).

Layout
------
A code matrix ``codes[rows, n]`` with ``bits`` in 1..16 (every code ``0 <= c < 2**bits``) is packed
into ``words[rows, ceil(n * bits / 32)]`` of dtype int32. Rows are independent: each row is one
little-endian bitstream, and no row shares a word with another.

* Code ``j`` of a row occupies bits ``[j * bits, (j + 1) * bits)`` of that row's stream, least
  significant bit first.
* Stream bit ``p`` is bit ``p % 32`` (0 = least significant) of word ``p // 32``.
* A code may straddle two words (e.g. 3-bit code 10 uses bits 30, 31 of word 0 and bit 0 of word 1):
  its low bits sit at the top of the first word, its high bits at the bottom of the next.
* Bits past ``n * bits`` in a row's last word are zero.
* Words are stored as int32 only because safetensors and torch lack a general uint32; read them
  as the unsigned 32-bit pattern (the two's-complement bit pattern is the payload).

Consequently, for bits in {1, 2, 4, 8, 16} word ``k`` holds codes ``k*32/bits .. (k+1)*32/bits - 1`` with
code ``k*32/bits + i`` in bits ``[i * bits, (i + 1) * bits)``, and for any other width every 32
consecutive codes fill exactly ``bits`` words. Widths 1..8 serve integer weight codes and masks,
9..16 vector-quantization codebook indices (e.g. 12 bits for K = 4096).
"""

from __future__ import annotations

import torch

MIN_BITS = 1
MAX_BITS = 16
_WORD_BITS = 32
_U32_MASK = 0xFFFFFFFF


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words one row of ``n`` codes of ``bits`` bits packs into."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"row length must be >= 0, got {n}")
    return (n * bits + _WORD_BITS - 1) // _WORD_BITS


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes[rows, n]`` (integers in [0, 2**bits)) into int32 ``words[rows, ceil(n*bits/32)]``.

    Each row is an independent little-endian bitstream; see the module docstring for the layout.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [rows, n], got {_describe(codes)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    rows, n = codes.shape
    n_words = packed_width(n, bits)
    if codes.numel() == 0:
        return torch.zeros(rows, n_words, dtype=torch.int32, device=codes.device)
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got range [{lo}, {hi}]")

    word_idx, shift = _positions(n, bits, codes.device)
    # A code shifted into place spans at most 16 + 31 = 47 bits, so int64 holds it whole: the low 32
    # bits belong to its first word and anything above spills into the next word. Codes never
    # overlap, so adding the pieces equals OR-ing them.
    placed = codes.to(torch.int64) << shift
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)
    acc.index_add_(1, word_idx, placed & _U32_MASK)
    acc.index_add_(1, word_idx + 1, placed >> _WORD_BITS)
    return _u32_to_i32(acc[:, :n_words])


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_rows`: int32 ``words[rows, ceil(n*bits/32)]`` -> ``[rows, n]``,
    uint8 for widths up to 8 bits, int32 above."""
    codes = unpack_rows_int(words, bits, n)
    return codes.to(torch.uint8) if bits <= 8 else codes


def unpack_rows_int(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Like :func:`unpack_rows` but returns the codes as int32, skipping a narrowing copy.

    Dequantization converts the codes to float next anyway, so the uint8 step would only cost time.
    """
    _check_bits(bits)
    if not isinstance(words, torch.Tensor) or words.dim() != 2 or words.dtype != torch.int32:
        raise ValueError(f"words must be a 2-D int32 tensor [rows, n_words], got {_describe(words)}")
    n_words = packed_width(n, bits)
    if words.shape[1] != n_words:
        raise ValueError(
            f"{n} codes of {bits} bits pack into {n_words} words per row, but words has {words.shape[1]} columns"
        )
    rows = words.shape[0]
    mask = (1 << bits) - 1
    if n == 0 or rows == 0:
        return torch.zeros(rows, n, dtype=torch.int32, device=words.device)

    if _WORD_BITS % bits == 0:
        # Fast path for 1/2/4/8/16 bits: no code straddles a word, so each word expands into a fixed
        # number of codes with one broadcast shift in int32. The arithmetic shift drags the sign
        # bit down, but the mask keeps only the code's own bits.
        per_word = _WORD_BITS // bits
        shifts = torch.arange(0, _WORD_BITS, bits, dtype=torch.int32, device=words.device)
        codes = (words.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(rows, n_words * per_word)[:, :n]

    # General path (every other width): 32 consecutive codes fill exactly `bits` words, so view each
    # row as blocks of `bits` words. Inside a block, code k always starts at the same word and bit
    # offset, so one strided int32 operation per k decodes that code of every block at once; this
    # beats a per-code gather by about 8x on CPU.
    blocks = (n + _WORD_BITS - 1) // _WORD_BITS
    block_words = torch.nn.functional.pad(words, (0, blocks * bits - n_words)).reshape(rows, blocks, bits)
    codes = torch.empty(rows, blocks, _WORD_BITS, dtype=torch.int32, device=words.device)
    for k in range(_WORD_BITS):
        word, offset = divmod(k * bits, _WORD_BITS)
        low = block_words[:, :, word]
        if offset + bits <= _WORD_BITS:
            codes[:, :, k] = (low >> offset) & mask
        else:
            # Straddling code: mask away the sign bits the arithmetic shift dragged in (a logical
            # shift), then add the remaining high bits from the bottom of the next word. Masking the
            # next word first keeps the left shift far from int32 overflow.
            low_bits = _WORD_BITS - offset
            high = block_words[:, :, word + 1] & ((1 << (bits - low_bits)) - 1)
            codes[:, :, k] = ((low >> offset) & ((1 << low_bits) - 1)) | (high << low_bits)
    return codes.view(rows, blocks * _WORD_BITS)[:, :n]


def _positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset inside that word of each code's first bit."""
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def _u32_to_i32(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as the int32 with the same bit pattern."""
    # Explicit wrap rather than relying on an int64 -> int32 narrowing cast, whose overflow
    # behaviour torch does not document.
    return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__

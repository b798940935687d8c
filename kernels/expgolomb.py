"""Exp-Golomb (k = 0) coding of frequency-ranked integer codes (BackSlash's storage layer, notes §B.2).

Symbols (integer codes 0..255, e.g. RTN/GPTQ grid indices or RF8 bytes) are ranked by decreasing
frequency (ties: smaller symbol first); rank r is written as the exp-Golomb k = 0 codeword of v = r + 1:
L − 1 zero bits, then v's L binary digits (L = bit length of v), 2L − 1 bits in all. The most frequent
symbol costs 1 bit, the next two 3 bits, the next four 5 bits, ... The rank table (the symbols in rank
order) is stored next to the stream; the stream is MSB-first within each byte, zero-padded to a byte.

Both directions are vectorized (numpy, no per-symbol Python loop over the tensor):
* encode: bit lengths → cumulative offsets → one scatter per binary digit (≤ 9 passes for 256 symbols);
* decode: a prefix code is sequential, so the stream carries sync points: the bit offset of every
  `chunk`-th codeword (uint32, 32 / 4096 = 0.008 bits per symbol by default). All chunks are decoded in
  lockstep, one codeword per chunk per step: read the 32 bits at each chunk's position, the count of
  leading zeros z gives the codeword (2z + 1 bits, value = its top bits), then advance. `chunk` steps
  of a few numpy operations on n / chunk lanes, whatever the tensor size.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_SYMBOLS = 256


def _as_numpy(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    a = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    return a.reshape(-1)


def rank_table(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """The symbols present in `codes`, most frequent first (ties: smaller symbol first), as uint8."""
    a = _as_numpy(codes)
    if a.size and (a.min() < 0 or a.max() >= MAX_SYMBOLS):
        raise ValueError(f"exp-Golomb symbols must lie in [0, {MAX_SYMBOLS}), got [{a.min()}, {a.max()}]")
    counts = np.bincount(a.astype(np.int64), minlength=MAX_SYMBOLS)
    present = np.flatnonzero(counts)
    return present[np.lexsort((present, -counts[present]))].astype(np.uint8)


def code_lengths(ranks: np.ndarray) -> np.ndarray:
    """Bit length of each rank's codeword: 2·bitlen(r + 1) − 1."""
    _, L = np.frexp((ranks + 1).astype(np.float64))   # v = m·2^L, m in [0.5, 1): L = bit length, exact
    return 2 * L.astype(np.int64) - 1


CHUNK = 4096


def encode(codes: torch.Tensor | np.ndarray, symbols: np.ndarray | None = None,
           chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stream uint8, rank table uint8, sync offsets uint32) for the flattened `codes`.

    `symbols` fixes the rank table (default: ranked by frequency); offsets[c] is the bit position of
    codeword c·chunk."""
    a = _as_numpy(codes).astype(np.int64)
    symbols = rank_table(a) if symbols is None else np.asarray(symbols, dtype=np.uint8)
    rank_of = np.full(MAX_SYMBOLS, -1, dtype=np.int64)
    rank_of[symbols.astype(np.int64)] = np.arange(len(symbols))
    if a.size == 0:
        return np.zeros(0, np.uint8), symbols, np.zeros(0, np.uint32)
    if a.min() < 0 or a.max() >= MAX_SYMBOLS or (rank_of[a] < 0).any():
        raise ValueError("exp-Golomb encode: a symbol is missing from the rank table")
    v = rank_of[a] + 1
    L = (code_lengths(v - 1) + 1) // 2
    ends = np.cumsum(2 * L - 1)
    if ends[-1] >= 2**32:
        raise ValueError("exp-Golomb stream longer than 2^32 bits: split the tensor")
    first_digit = ends - L                  # the L − 1 leading zeros come first
    bits = np.zeros(int(ends[-1]), dtype=np.uint8)
    for j in range(int(L.max())):           # j-th binary digit of v, MSB first
        sel = L > j
        bits[first_digit[sel] + j] = (v[sel] >> (L[sel] - 1 - j)) & 1
    starts = ends - (2 * L - 1)
    return np.packbits(bits), symbols, starts[::chunk].astype(np.uint32)


def decode(stream, symbols, offsets, n: int, chunk: int = CHUNK) -> np.ndarray:
    """The `n` symbols of an exp-Golomb stream with sync `offsets` every `chunk` codewords, as uint8.
    ValueError when the stream, table or offsets do not fit together."""
    sym = _as_numpy(symbols).astype(np.uint8)
    offs = _as_numpy(offsets).astype(np.int64)
    if n == 0:
        return np.zeros(0, np.uint8)
    n_chunks = -(-n // chunk)
    if offs.size != n_chunks:
        raise ValueError(f"exp-Golomb: {n} symbols in chunks of {chunk} need {n_chunks} offsets, got {offs.size}")
    raw = _as_numpy(stream).astype(np.uint8)
    total_bits = 8 * raw.size
    if offs.min() < 0 or offs.max() >= max(total_bits, 1) or (np.diff(offs) < 0).any():
        raise ValueError(f"exp-Golomb offsets must increase inside the {total_bits}-bit stream")
    if offs.min() < 0 or offs.max() > total_bits or np.any(np.diff(offs) < 0):  # untrusted file: check first
        raise ValueError(f"exp-Golomb: sync offsets must be non-decreasing bit positions within the "
                         f"{total_bits}-bit stream, got [{offs.min()}, {offs.max()}]")
    buf = np.concatenate([raw, np.zeros(5, np.uint8)]).astype(np.int64)   # a 40-bit read never runs off
    pos = offs.copy()
    out = np.zeros((n_chunks, chunk), dtype=np.int64)
    for step in range(chunk):
        # Lanes that ran past the end (the last chunk's tail) keep reading the zero padding.
        byte, shift = np.minimum(pos >> 3, raw.size), pos & 7
        window = (buf[byte] << 32) | (buf[byte + 1] << 24) | (buf[byte + 2] << 16) | (buf[byte + 3] << 8) | buf[byte + 4]
        top = (window >> (8 - shift)) & 0xFFFFFFFF           # the 32 bits starting at pos
        _, bitlen = np.frexp(top.astype(np.float64))         # exact for integers < 2^53
        z = 32 - bitlen.astype(np.int64)                     # leading zeros; a valid codeword has z ≤ 15
        z = np.minimum(z, 15)
        out[:, step] = top >> (31 - 2 * z)                   # the 2z + 1 codeword bits = v
        pos = pos + 2 * z + 1
        if step == (n - 1) % chunk:
            end_of_last = int(pos[-1])                       # where the n-th codeword ends
    v = out.reshape(-1)[:n]
    ranks = v - 1
    # Zero bits past the end read as v = 0 (no codeword): a truncated stream cannot pass unnoticed.
    if end_of_last > total_bits or ranks.min() < 0:
        raise ValueError(f"exp-Golomb stream of {raw.size} bytes is too short for {n} symbols")
    if ranks.max() >= sym.size:
        raise ValueError(f"exp-Golomb stream names rank {int(ranks.max())} but the rank table has {sym.size} symbols")
    return sym[ranks]


def stream_len(stream) -> int:
    return int(_as_numpy(stream).size)


def encoded_bits(codes: torch.Tensor | np.ndarray) -> int:
    """Exact stream length in bits (before byte padding) without building the stream."""
    a = _as_numpy(codes).astype(np.int64)
    if a.size == 0:
        return 0
    symbols = rank_table(a)
    counts = np.bincount(a, minlength=MAX_SYMBOLS)[symbols.astype(np.int64)]
    return int((counts * code_lengths(np.arange(len(symbols)))).sum())

"""Bit-packing of integer codes: exact round trip and the documented layout."""

import pytest
import torch

from squeezeflow.kernels.intpack import pack_rows, packed_width, unpack_rows

# Lengths chosen so that bits * n is, and often is not, a multiple of 32 for every bit width.
ROW_LENGTHS = [1, 3, 7, 31, 32, 33, 64, 100, 257]


def _code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_round_trip_is_exact(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=gen).to(_code_dtype(bits))
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (5, -(-n * bits // 32)) == (5, packed_width(n, bits))
    out = unpack_rows(words, bits, n)
    assert out.dtype == _code_dtype(bits)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_extreme_codes_round_trip(bits: int) -> None:
    # All-ones codes set the sign bit of words, the case where int32 storage could go wrong.
    codes = torch.full((3, 97), 2**bits - 1, dtype=_code_dtype(bits))
    codes[1] = 0
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits, 97), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 7, 12, 16])
def test_layout_is_a_little_endian_bitstream_per_row(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (4, 45), generator=gen).to(_code_dtype(bits))
    words = pack_rows(codes, bits)
    for row_codes, row_words in zip(codes.tolist(), words.tolist()):
        stream = sum(code << (j * bits) for j, code in enumerate(row_codes))
        packed = sum((word & 0xFFFFFFFF) << (32 * k) for k, word in enumerate(row_words))
        assert packed == stream


def test_three_bit_code_straddles_words() -> None:
    codes = torch.zeros(1, 11, dtype=torch.uint8)
    codes[0, 10] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    words = pack_rows(codes, 3)
    assert words.tolist() == [[-(2**31) + 2**30, 1]]


def test_rejects_out_of_range_codes() -> None:
    codes = torch.tensor([[0, 1, 8]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_rows(codes, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_rows(torch.tensor([[-1, 0]]), 2)


@pytest.mark.parametrize("bits", [0, 17, 4.0, True])
def test_rejects_bad_bits(bits: object) -> None:
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack_rows(codes, bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        unpack_rows(torch.zeros(2, 1, dtype=torch.int32), bits, 8)  # type: ignore[arg-type]


def test_rejects_bad_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_rows(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_rows(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack_rows(torch.zeros(2, 1, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match="columns"):
        unpack_rows(torch.zeros(2, 2, dtype=torch.int32), 4, 8)


def test_empty_rows() -> None:
    codes = torch.zeros(3, 0, dtype=torch.uint8)
    words = pack_rows(codes, 5)
    assert words.shape == (3, 0)
    assert unpack_rows(words, 5, 0).shape == (3, 0)

"""kernels/fast_unpack.py (the CPU dequantization path) decodes exactly what kernels/intpack.py packs."""

import pytest
import torch

from squeezeflow.kernels.fast_unpack import unpack_rows_fast
from squeezeflow.kernels.intpack import pack_rows, unpack_rows_int
from squeezeflow.kernels.quant_linear import QuantLinear


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 37), (5, 96), (2, 301)])
def test_equals_reference_unpack(bits, rows, n):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(bits * n))
    words = pack_rows(codes, bits)
    fast = unpack_rows_fast(words, bits, n)
    assert fast.shape == (rows, n)
    assert torch.equal(fast.to(torch.int32), unpack_rows_int(words, bits, n))


def test_wide_codes_and_bad_input_use_the_reference():
    codes = torch.randint(0, 4096, (3, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_rows_fast(pack_rows(codes, 12), 12, 10), codes.to(torch.int32))
    with pytest.raises(ValueError, match="words"):
        unpack_rows_fast(torch.zeros(2, 3, dtype=torch.int32), 4, 10)


@pytest.mark.parametrize("bits", [3, 4])
def test_dequantize_is_bit_identical_to_the_formula(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (16, 128), generator=g)
    scales = torch.rand(16, 2, generator=g) * 0.1
    zeros = torch.randint(0, 2**bits, (16, 2), generator=g).float()
    module = QuantLinear.from_codes(codes, scales, zeros, bits, 64)
    s, z = module.scales.float().repeat_interleave(64, 1), module.zeros.float().repeat_interleave(64, 1)
    assert torch.equal(module.dequantize(), (codes.float() - z) * s)

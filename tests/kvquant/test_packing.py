"""Packing of 2/4/8-bit codes: lossless, and byte-for-byte the layout of the KV format spec."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodax.kvquant import packing

# One [B, KV, S, D] shape for every test of tests/kvquant: each new shape compiles again.
SHAPE = (2, 2, 64, 8)
SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True)


def pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """The spec, literally: byte i holds codes p*i + j in bits [j*b, (j+1)*b)."""
    p = 8 // bits
    out = np.zeros(codes.shape[:-1] + (codes.shape[-1] // p,), np.uint8)
    for i in range(out.shape[-1]):
        for j in range(p):
            out[..., i] |= (codes[..., p * i + j].astype(np.uint8) << (j * bits)).astype(np.uint8)
    return out


@SETTINGS
@given(bits=st.sampled_from(packing.PACK_BITS), seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_lossless_and_matches_the_spec(bits, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, SHAPE).astype(np.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == SHAPE[:-1] + (SHAPE[-1] * bits // 8,)
    np.testing.assert_array_equal(packed, pack_reference(codes, bits))
    np.testing.assert_array_equal(packing.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", packing.PACK_BITS)
def test_every_code_value_survives(bits):
    codes = np.resize(np.arange(2**bits, dtype=np.uint8), SHAPE)
    np.testing.assert_array_equal(packing.unpack(packing.pack(codes, bits), bits), codes)


def test_worked_bytes():
    codes = np.zeros(SHAPE, np.uint8)
    codes[0, 0, 0, :4] = [3, 2, 2, 1]
    assert int(packing.pack(codes, 2)[0, 0, 0, 0]) == 3 | 2 << 2 | 2 << 4 | 1 << 6
    codes[0, 0, 0, :2] = [5, 12]
    assert int(packing.pack(codes, 4)[0, 0, 0, 0]) == 5 | 12 << 4
    np.testing.assert_array_equal(packing.pack(codes, 8), codes)


def test_out_of_range_codes_do_not_corrupt_neighbours():
    codes = np.zeros(SHAPE, np.uint8)
    codes[0, 0, 0, 1] = 0xFF
    np.testing.assert_array_equal(packing.unpack(packing.pack(codes, 2), 2)[0, 0, 0, :4], [0, 3, 0, 0])


@pytest.mark.parametrize("bits", [0, 1, 3, 16, 4.0, True])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        packing.pack(np.zeros(8, np.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        packing.unpack(np.zeros(8, np.uint8), bits)


def test_bad_lengths_and_dtypes():
    with pytest.raises(ValueError, match="multiple of 4"):
        packing.pack(np.zeros((2, 6), np.uint8), 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        packing.packed_length(5, 4)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack(np.zeros(4, np.int32), 4)

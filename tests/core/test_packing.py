"""Bit packing: exact round trip for every width and length, the documented layout, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tqai.packing import pack_bits, packed_length, unpack_bits
from tqai.testing import make_array, xp_assert_equal
from tqai.testing.arrays import bits_and_codes


@given(case=bits_and_codes(max_len=300, min_len=1), rows=st.integers(1, 3))
def test_pack_bits_roundtrip(xp, case, rows):
    n_bits, codes = case
    codes = np.tile(codes, (rows, 1))
    x = make_array(xp, codes)
    packed = pack_bits(x, n_bits)
    assert tuple(packed.shape) == (rows, packed_length(codes.shape[-1], n_bits))
    xp_assert_equal(unpack_bits(packed, n_bits, codes.shape[-1]), x)


@pytest.mark.parametrize("n_bits", range(1, 9))
def test_pack_bits_matches_numpy_reference_layout(xp, n_bits):
    """Same bytes on every backend as a plain bit-stream construction on the host."""
    rng = np.random.default_rng(n_bits)
    codes = rng.integers(0, 2**n_bits, size=(3, 37), dtype=np.uint8)
    padded = np.pad(codes, ((0, 0), (0, 3)))  # 37 -> 40 codes, 5 groups of 8
    bits = (padded[..., None] >> np.arange(n_bits)) & 1  # LSB first per code
    expected = np.packbits(bits.reshape(3, -1), axis=-1, bitorder="little")
    got = pack_bits(make_array(xp, codes), n_bits)
    xp_assert_equal(got, make_array(xp, expected))


def test_pack_bits_documented_examples():
    assert pack_bits(np.array([1, 2, 3, 0, 1, 2, 3, 0], np.uint8), 2).tolist() == [57, 57]
    assert pack_bits(np.array([0xA, 0x5], np.uint8), 4).tolist() == [0x5A, 0, 0, 0]
    c = np.arange(8, dtype=np.uint8)
    assert pack_bits(c, 3).tolist() == [0b10001000, 0b11000110, 0b11111010]
    np.testing.assert_array_equal(pack_bits(c, 8), c)


def test_packed_length_is_true_bit_packing():
    assert packed_length(128, 3) == 48  # 3 bits per code, not a byte
    assert packed_length(64, 4) == 32
    assert packed_length(9, 2) == 4
    assert packed_length(0, 5) == 0


def test_pack_bits_bad_input():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        pack_bits(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError, match=r"codes must lie in"):
        pack_bits(np.array([-1], np.int16), 2)
    with pytest.raises(TypeError, match="codes must be an integer array"):
        pack_bits(np.array([1.0]), 2)
    with pytest.raises(ValueError, match=r"n_bits must be in 1\.\.8"):
        pack_bits(np.array([1], np.uint8), 9)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_bits(np.array(1, np.uint8), 2)


def test_unpack_bits_bad_input():
    with pytest.raises(TypeError, match="packed must be uint8"):
        unpack_bits(np.zeros(3, np.int32), 3, 8)
    with pytest.raises(ValueError, match="must have 3 bytes, got 4"):
        unpack_bits(np.zeros(4, np.uint8), 3, 8)

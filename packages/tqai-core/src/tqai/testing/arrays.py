"""Hypothesis helpers that generate host (numpy) data for tqai property tests.

Why it is shaped like this: every backend must see the same inputs, and hypothesis shrinks numpy
arrays well, so data is generated on the host with :mod:`hypothesis.extra.numpy` and moved to the
backend under test with :func:`tqai.testing.make_array`. The generators lean on the hard cases on
purpose: lengths that divide no block size (0 and 1 included), zero vectors unless excluded, and
values spread over several orders of magnitude.

With the function-scoped ``xp`` fixture, suppress ``HealthCheck.function_scoped_fixture`` (the
suite's profiles in tests/conftest.py do): the fixture only selects the backend. Example::

    @given(bits_and_codes(max_len=300))
    def test_pack_round_trip(xp, case):
        n_bits, codes = case
        x = make_array(xp, codes)
        xp_assert_equal(unpack_bits(pack_bits(x, n_bits), n_bits, codes.size), x)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "bits_and_codes",
    "codes_arrays",
    "float_vectors",
    "n_bits_values",
]


def n_bits_values(min_bits: int = 1, max_bits: int = 8) -> st.SearchStrategy[int]:
    """Code widths in bits (1 to 8 by default)."""
    return st.integers(min_bits, max_bits)


def codes_arrays(
    n_bits: int, max_len: int = 256, *, min_len: int = 0
) -> st.SearchStrategy[np.ndarray]:
    """1-D ``uint8`` arrays of valid ``n_bits``-bit codes (values in ``[0, 2**n_bits)``)."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    return hnp.arrays(
        np.uint8,
        st.integers(min_len, max_len),
        elements=st.integers(0, (1 << n_bits) - 1),
    )


def bits_and_codes(
    max_len: int = 256, *, min_len: int = 0, min_bits: int = 1, max_bits: int = 8
) -> st.SearchStrategy[tuple[int, np.ndarray]]:
    """Pairs ``(n_bits, codes)`` with codes valid for that width."""
    return n_bits_values(min_bits, max_bits).flatmap(
        lambda n: st.tuples(st.just(n), codes_arrays(n, max_len, min_len=min_len))
    )


def _replace_zero_rows(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    zero = ~np.any(x != 0, axis=-1)
    if np.any(zero):
        x[zero] = 0
        x[zero, 0] = 1
    return x


def float_vectors(
    d: int | st.SearchStrategy[int],
    *,
    min_rows: int = 1,
    max_rows: int = 8,
    dtype: Any = np.float32,
    max_abs: float = 1e3,
    allow_zero: bool = True,
) -> st.SearchStrategy[np.ndarray]:
    """2-D arrays of shape ``(rows, d)`` of finite floats with ``|x| <= max_abs``.

    Subnormals are excluded (backends differ in flushing them to zero). With
    ``allow_zero=False`` an all-zero row becomes the first basis vector, so every row has a norm.
    """
    dtype = np.dtype(dtype)
    dims = d if isinstance(d, st.SearchStrategy) else st.just(d)
    elements = st.floats(
        -max_abs,
        max_abs,
        width=8 * dtype.itemsize,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
    )
    shapes = st.tuples(st.integers(min_rows, max_rows), dims)
    arrays = hnp.arrays(dtype, shapes, elements=elements)
    return arrays if allow_zero else arrays.map(_replace_zero_rows)

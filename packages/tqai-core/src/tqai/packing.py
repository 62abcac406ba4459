"""True bit packing of b-bit codes, b = 1..8 (3-bit codes cost 3 bits, not a byte).

The layout, which every kernel reads:

- Codes along the last axis are taken in groups of 8 (the axis is zero-padded to a multiple of 8).
  A group of 8 codes of ``b`` bits is ``8 b`` bits, exactly ``b`` bytes, so every row of a packed
  array starts on a byte boundary and a row of ``n`` codes takes ``ceil(n / 8) * b`` bytes.
- Within a group the codes form one little-endian bit stream, least significant bit first: code
  ``i`` of the group occupies stream bits ``[b i, b i + b)``, and stream bit ``k`` is bit ``k % 8``
  of byte ``k // 8``. Equivalently, the group is the little-endian integer
  ``sum_i code_i << (b i)`` written in ``b`` bytes.
- Consequences kernels rely on: for b = 4 byte ``j`` holds codes ``2j`` (low nibble) and
  ``2j + 1`` (high nibble); for b = 2 byte ``j`` holds codes ``4j..4j+3`` from the low bits up;
  for b = 1 this is ``numpy.packbits(..., bitorder="little")``; for b = 8 it is the identity.

The implementations below are the reference (pure array API, any namespace); backend kernels must
match them bit for bit.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tqai import _xp
from tqai.codebooks import validate_n_bits

__all__ = ["pack_bits", "packed_length", "unpack_bits"]


def packed_length(n: int, n_bits: int) -> int:
    """Bytes taken by ``n`` codes of ``n_bits`` bits: ``ceil(n / 8) * n_bits``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return -(-n // 8) * validate_n_bits(n_bits)


def _bit_weights(count: int, like: Any, *, xp: ModuleType) -> Any:
    """``[1, 2, 4, ..., 2**(count-1)]`` as int32 in ``like``'s namespace and device."""
    import numpy as np

    return _xp.from_host(
        (1 << np.arange(count)).astype(np.int32), xp, dtype=xp.int32, device=_xp.device_of(like)
    )


def pack_bits(codes: Any, n_bits: int, *, xp: ModuleType | None = None) -> Any:
    """Pack integer codes in ``[0, 2**n_bits)`` along the last axis into uint8.

    Args:
        codes: ``(..., n)`` integer array (any integer dtype) with values in ``[0, 2**n_bits)``.
        n_bits: bits per code, 1..8.

    Returns:
        ``(..., ceil(n / 8) * n_bits)`` uint8 array in the layout of this module's docstring.

    Example:
        >>> import numpy as np
        >>> pack_bits(np.array([1, 2, 3, 0, 1, 2, 3, 0], dtype=np.uint8), 2)
        array([57, 57], dtype=uint8)
    """
    xp = _xp.namespace(codes, xp=xp)
    n_bits = validate_n_bits(n_bits)
    if codes.ndim < 1:
        raise ValueError("codes must have at least one dimension (the axis that is packed)")
    if not xp.isdtype(codes.dtype, "integral"):
        raise TypeError(f"codes must be an integer array, got dtype {codes.dtype}")
    codes = xp.astype(codes, xp.int32)
    if math.prod(codes.shape) and (xp.any(codes < 0) or xp.any(codes >= 2**n_bits)):
        raise ValueError(f"codes must lie in [0, {2**n_bits}) for n_bits={n_bits}")
    lead, n = tuple(codes.shape[:-1]), codes.shape[-1]
    groups = -(-n // 8)
    if groups * 8 != n:
        pad = xp.zeros((*lead, groups * 8 - n), dtype=xp.int32, device=_xp.device_of(codes))
        codes = xp.concat([codes, pad], axis=-1)
    if 8 % n_bits == 0:
        # Byte-aligned widths (1, 2, 4, 8): 8 / n_bits whole codes per byte, LSB first.
        per = 8 // n_bits
        fields = xp.reshape(xp.astype(codes, xp.uint8), (*lead, groups * n_bits, per))
        packed = fields[..., 0]
        for j in range(1, per):
            packed = packed | (fields[..., j] << (j * n_bits))
        return packed
    # bits[..., g, i, j] = bit j of code i of group g; the stream of a group is (i, j) row-major.
    weights = _bit_weights(n_bits, codes, xp=xp)
    bits = xp.reshape(codes, (*lead, groups, 8, 1)) // weights % 2
    stream = xp.reshape(bits, (*lead, groups, n_bits, 8))
    packed = xp.sum(stream * _bit_weights(8, codes, xp=xp), axis=-1, dtype=xp.int32)
    return xp.astype(xp.reshape(packed, (*lead, groups * n_bits)), xp.uint8)


def unpack_bits(packed: Any, n_bits: int, n: int, *, xp: ModuleType | None = None) -> Any:
    """Inverse of :func:`pack_bits`: ``(..., ceil(n / 8) * n_bits)`` uint8 -> ``(..., n)`` uint8.

    Args:
        packed: uint8 array produced by :func:`pack_bits` (or a kernel with the same layout).
        n_bits: bits per code, 1..8.
        n: number of codes per row (the packed row may hold up to 7 padding codes).
    """
    xp = _xp.namespace(packed, xp=xp)
    n_bits = validate_n_bits(n_bits)
    if packed.ndim < 1:
        raise ValueError("packed must have at least one dimension")
    if packed.dtype != xp.uint8:
        raise TypeError(f"packed must be uint8, got dtype {packed.dtype}")
    groups = -(-n // 8)
    if packed.shape[-1] != groups * n_bits:
        raise ValueError(
            f"packed rows of {n} codes at n_bits={n_bits} must have {groups * n_bits} bytes, "
            f"got {packed.shape[-1]}"
        )
    lead = tuple(packed.shape[:-1])
    if 8 % n_bits == 0:
        # Byte-aligned widths (1, 2, 4, 8): shift each byte's fields down, uint8 throughout.
        per = 8 // n_bits
        if per == 1:
            return packed[..., :n]
        fields = [(packed >> (j * n_bits)) & (2**n_bits - 1) for j in range(per)]
        codes = xp.reshape(xp.stack(fields, axis=-1), (*lead, groups * 8))
        return codes[..., :n]
    data = xp.reshape(xp.astype(packed, xp.int32), (*lead, groups, n_bits, 1))
    bits = data // _bit_weights(8, data, xp=xp) % 2
    per_code = xp.reshape(bits, (*lead, groups * 8, n_bits))
    codes = xp.sum(per_code * _bit_weights(n_bits, data, xp=xp), axis=-1, dtype=xp.int32)
    return xp.astype(codes[..., :n], xp.uint8)

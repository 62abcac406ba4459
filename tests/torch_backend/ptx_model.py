"""A model of the few PTX integer instructions the kernels' byte-permute lookups use, so the
CPU tests can run the lookup code instruction by instruction (Triton's interpreter cannot run
inline PTX)."""

from __future__ import annotations


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result is byte ``c[4k:4k+3] & 7`` of
    ``{b, a}``, or the replicated sign of that byte when ``c[4k+3]`` is set."""
    src, out = (b << 32) | a, 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * k)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX ``lop3.b32``: bit k of the result is bit ``(a_k << 2) | (b_k << 1) | c_k`` of the
    truth table ``lut``."""
    out = 0
    for bit in range(32):
        idx = ((a >> bit & 1) << 2) | ((b >> bit & 1) << 1) | (c >> bit & 1)
        out |= ((lut >> idx) & 1) << bit
    return out

"""PTX of the block decode kernel's byte-permute lookups (:mod:`.decode_attention`) as plain
Python strings (no triton import), so the CPU tests interpret them instruction by instruction,
and the table registers they read."""

from __future__ import annotations

import numpy as np

from tqai_torch.kernels.triton.decode_mma_ptx import table_words

__all__ = ["PRMT2", "PRMT4", "prmt_registers"]


# Byte-permute lookups (PTX ``prmt``): the fp16 table lives in registers as its low bytes and its
# high bytes, ``prmt`` picks 4 bytes at once by 4 nibble selectors, and two more ``prmt`` weave
# low and high bytes into fp16 pairs. No memory access and no address arithmetic per code.
#
# 4 bits: the Lloyd-Max codebook is symmetric, c[15 - j] = -c[j] (checked on the host, in fp16),
# so the table holds c[0..7] ($9, $10: low bytes; $11, $12: high bytes): code j reads entry
# (j & 7) ^ (7 if j & 8 else 0) and flips the sign bit when j & 8. $8: one packing group (8 codes).
def _prmt4_half(sel: str, pattern: str, first: int) -> str:
    """Four codes of :data:`PRMT4`: entries by the selectors ``sel``, the sign bytes of these
    codes (``pattern`` of ``se``, ``so``), fp16 pairs into outputs ``first .. first + 3``."""
    return f"""prmt.b32 lo, $9, $10, {sel};
prmt.b32 hi, $11, $12, {sel};
prmt.b32 sg, se, so, {pattern};
xor.b32 hi, hi, sg;
prmt.b32 r, lo, hi, 0x5140;
mov.b32 {{${first}, ${first + 1}}}, r;
prmt.b32 r, lo, hi, 0x7362;
mov.b32 {{${first + 2}, ${first + 3}}}, r;
"""


PRMT4 = (
    """{
.reg .b32 t, f, m, mh, lo, hi, se, so, sg, r;
shr.b32 t, $8, 3;
and.b32 t, t, 0x11111111;
mul.lo.u32 f, t, 7;
and.b32 m, $8, 0x77777777;
xor.b32 m, m, f;
shl.b32 se, t, 7;
and.b32 se, se, 0x80808080;
shl.b32 so, t, 3;
and.b32 so, so, 0x80808080;
"""
    + _prmt4_half("m", "0x5140", 0)
    + "shr.b32 mh, m, 16;\n"
    + _prmt4_half("mh", "0x7362", 4)
    + "}"
)
# 2 bits: the 4-entry table is one register of low bytes ($9) and one of high bytes ($10); even
# and odd codes of the group are spread into nibble selectors, looked up, and interleaved.
PRMT2 = """{
.reg .b32 x, y, le, he, lo, ho, e0, e1, o0, o1, r;
and.b32 x, $8, 0x3333;
shr.b32 y, $8, 2;
and.b32 y, y, 0x3333;
prmt.b32 le, $9, $9, x;
prmt.b32 he, $10, $10, x;
prmt.b32 lo, $9, $9, y;
prmt.b32 ho, $10, $10, y;
prmt.b32 e0, le, he, 0x5140;
prmt.b32 e1, le, he, 0x7362;
prmt.b32 o0, lo, ho, 0x5140;
prmt.b32 o1, lo, ho, 0x7362;
prmt.b32 r, e0, o0, 0x5410;
mov.b32 {$0, $1}, r;
prmt.b32 r, e0, o0, 0x7632;
mov.b32 {$2, $3}, r;
prmt.b32 r, e1, o1, 0x5410;
mov.b32 {$4, $5}, r;
prmt.b32 r, e1, o1, 0x7632;
mov.b32 {$6, $7}, r;
}"""


def prmt_registers(centroids: np.ndarray) -> tuple[int, int, int, int] | None:
    """The fp16 table of a 2- or 4-bit codebook as 4 int32 registers of bytes for the PRMT path
    (4 bits: low bytes of c[0..3], c[4..7], high bytes of c[0..3], c[4..7], valid only because
    c[15 - j] == -c[j] in fp16, checked here; 2 bits: low bytes, high bytes, 0, 0), or None."""
    c = np.asarray(centroids, dtype=np.float16)
    if c.size == 16 and np.array_equal(c[::-1], -c):
        lo, hi = table_words(c[:8])
        return lo[0], lo[1], hi[0], hi[1]
    if c.size == 4:
        lo, hi = table_words(c)
        return lo[0], hi[0], 0, 0
    return None

"""Decode-attention partials for K4/V2 at head_dim 128 with lookups straight into tensor-core
fragments (Gluon + PTX): the fast path of :mod:`.decode_attention`, which falls back to its own
block kernel for every other configuration and shares its combine kernel.

Reference: :func:`tqai.attention.compressed_attention` (the same parity tests cover this path).

Per program (one KV head, one split of the history) each warp walks its own tokens, 32 per step
(two tiles of 16), and keeps its own running max, sum and value accumulator in registers; the
warps merge once at the end through shared memory. Every tensor is a *per-thread* register
tensor (``(32 * W, 4)``, row = thread), so each lane loads exactly the packed words its
``mma.m16n8k16`` fragments need, and PTX does the rest:

* Scores ``S^T (16 tokens x 8 heads)``: A = key centroids (fp16), B = the rotated query. Lane
  ``(g, t) = (lane // 4, lane % 4)`` loads packing groups ``4 t .. 4 t + 3`` (one 16-byte load)
  of tokens ``g`` and ``g + 8``; byte permutes of a 16-entry table (low and high bytes, 8
  registers) turn each group of 8 four-bit codes into 4 fp16 pairs, which are A-fragment
  registers as they stand. The query fragments are then simply dims ``32 t .. 32 t + 31`` of
  head ``g``. Heads ``>= G`` are zero columns (G <= 8).
* Online softmax in base 2 per head (lanes ``t`` hold heads ``2 t, 2 t + 1``; the max reduces
  over the 8 lanes ``g`` by butterfly shuffles), ``p * ||v||`` to fp16 and transposed by
  ``movmatrix`` into the B fragment of the value product.
* Values ``O^T (16 dims x 8 heads) += V^T P^T``, 8 products for 128 dims: lane ``(g, t)`` loads
  the 32-bit word of dims ``16 g .. 16 g + 15`` of tokens ``2 t, 2 t + 1, 2 t + 8, 2 t + 9``;
  byte permutes of the 4-entry value table give fp16 pairs of two tokens, the A-fragment
  registers.

The query is rotated and scaled by a small kernel first (``tf32x3`` products, fp16 out). Scores
and values use fp16 operands with fp32 accumulation, as the block kernel does: the same parity
bounds hold. Served: TurboQuant_mse keys of 4 bits (any 16-entry codebook) and values of 2 bits,
fp16 norms, head_dim 128, at most 8 query heads per KV head, packed rows stored whole and
16-byte aligned; CUDA only (PTX; the interpreter runs the block kernel); Triton >= 3.6 (Gluon's
API moves between releases; older versions take the block kernel). Measurements and the
design history: ``benchmarks/NOTES.md`` (v9).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from tqai_torch.kernels.triton.decode_mma_ptx import (
    STEP_TOKENS,
    key_asm,
    lane_sum_asm,
    softmax_asm,
    table_words,
    value_asm,
)

__all__ = ["launch_mma_partials", "serves_mma"]

_KEY = gl.constexpr(key_asm(False))
_KEY_MASKED = gl.constexpr(key_asm(True))
_KEY_CONS = gl.constexpr("=f,=f,=f,=f" + ",r" * 32 + ",f,f,f,f")
_SOFTMAX = gl.constexpr(softmax_asm())
_SOFTMAX_CONS = gl.constexpr(",".join(["=f"] * 12 + ["=r"] * 8) + ",f" * 24)
_VALUE = gl.constexpr(value_asm(False))
_VALUE_RESCALED = gl.constexpr(value_asm(True))
_VALUE_RESCALED_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 12 + ",f" * 36)
_VALUE_CONS = gl.constexpr(",".join(["=f"] * 32) + ",r" * 12 + ",f" * 32)
_LANE_SUM = gl.constexpr(lane_sum_asm())


@gluon.jit
def _tile_loads(kp_row, vp_row, kn_row, vn_row, tok0, g, t, c, lo, stop, MASKED: gl.constexpr):
    """One tile's operands: key groups of tokens tok0 + g and tok0 + g + 8 (4 each), the value
    words of tokens tok0 + (2t, 2t+1, 2t+8, 2t+9), norms (kn_g, kn_g8, vn_g, vn_g8) in f32."""
    tk = tok0 + g
    kcols = (4 * t)[:, None] + c[None, :]
    vtok = tok0[:, None] + (2 * t)[:, None] + (c % 2)[None, :] + 8 * (c // 2)[None, :]
    ntok = tk[:, None] + 8 * (c % 2)[None, :]
    nptr = gl.where((c < 2)[None, :], kn_row + ntok, vn_row + ntok)
    if MASKED:
        ok_a = ((tk < stop) & (tk >= lo))[:, None]
        ok_b = ((tk + 8 < stop) & (tk + 8 >= lo))[:, None]
        ka = gl.load(kp_row + (tk * 16)[:, None] + kcols, mask=ok_a, other=0)
        kb = gl.load(kp_row + ((tk + 8) * 16)[:, None] + kcols, mask=ok_b, other=0)
        vw = gl.load(vp_row + vtok * 8 + g[:, None], mask=(vtok < stop) & (vtok >= lo), other=0)
        ok_n = (ntok < stop) & (ntok >= lo)
        nb = gl.load(nptr, mask=ok_n, other=0.0).to(gl.float32)
        nb = gl.where(ok_n | (c < 2)[None, :], nb, -1.0)
    else:
        ka = gl.load(kp_row + (tk * 16)[:, None] + kcols)
        kb = gl.load(kp_row + ((tk + 8) * 16)[:, None] + kcols)
        vw = gl.load(vp_row + vtok * 8 + g[:, None])
        nb = gl.load(nptr).to(gl.float32)
    return ka, kb, vw, nb


@gluon.jit
def _step(
    kp_row, vp_row, kn_row, vn_row, tok0, g, t, c, lo, stop,
    q0, q1, q2, q3, klo, khi, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7,
    MASKED: gl.constexpr,
):  # fmt: skip
    """32 tokens of one warp (tiles at tok0 and tok0 + 16) folded into its running state."""
    ka0, kb0, v0, nb0 = _tile_loads(kp_row, vp_row, kn_row, vn_row, tok0, g, t, c, lo, stop, MASKED)
    ka1, kb1, v1, nb1 = _tile_loads(
        kp_row, vp_row, kn_row, vn_row, tok0 + 16, g, t, c, lo, stop, MASKED
    )
    if MASKED:
        scores: gl.constexpr = _KEY_MASKED
    else:
        scores: gl.constexpr = _KEY
    x0 = gl.inline_asm_elementwise(
        scores, _KEY_CONS, [ka0, kb0, klo, khi, q0, q1, q2, q3, nb0],
        dtype=gl.float32, is_pure=True, pack=4,
    )  # fmt: skip
    x1 = gl.inline_asm_elementwise(
        scores, _KEY_CONS, [ka1, kb1, klo, khi, q0, q1, q2, q3, nb1],
        dtype=gl.float32, is_pure=True, pack=4,
    )  # fmt: skip
    m, l_sum, alpha, p0, p1 = gl.inline_asm_elementwise(
        _SOFTMAX, _SOFTMAX_CONS, [x0, x1, nb0, nb1, m, l_sum],
        dtype=(gl.float32, gl.float32, gl.float32, gl.int32, gl.int32), is_pure=True, pack=4,
    )  # fmt: skip
    a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
        _VALUE_RESCALED, _VALUE_RESCALED_CONS,
        [v0, vtab, p0, alpha, a0, a1, a2, a3, a4, a5, a6, a7],
        dtype=(gl.float32,) * 8, is_pure=True, pack=4,
    )  # fmt: skip
    a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
        _VALUE, _VALUE_CONS, [v1, vtab, p1, a0, a1, a2, a3, a4, a5, a6, a7],
        dtype=(gl.float32,) * 8, is_pure=True, pack=4,
    )  # fmt: skip
    return m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7


@gluon.jit
def _merge_column(buf, j: gl.constexpr, wts, W: gl.constexpr, ML: gl.constexpr):
    """Register ``j`` of every warp's ``(32, 4)`` block, as ``(W, 128)``, summed over the warps
    with their weights ``wts``: the merged column, ``(128,)``."""
    return gl.sum(buf.index(j).reshape([W, 128]).load(ML) * wts, axis=0)


@gluon.jit(do_not_specialize=["T", "split_len", "n_pre"])
def _mma_partials_kernel(
    qr_ptr,  # (B * Hkv * G, 128) fp16 rotated, scaled query rows, read as int32 pairs
    ws_ptr,  # float32 workspace: partials at m_off / l_off / acc_off (the combine's layout)
    m_off,
    l_off,
    acc_off,
    kp_ptr,  # packed key rows, 64 bytes each (16-byte aligned)
    kn_ptr,  # key norms, fp16, unit token stride
    vp_ptr,  # packed value rows, 32 bytes each
    vn_ptr,  # value norms, fp16
    ktab_ptr,  # (32, 8) int32: per lane, the key table's low bytes (4 words), high bytes (4)
    vtab_ptr,  # (32, 4) int32: per lane, the value table's low bytes, high bytes, 0, 0
    T,
    split_len,  # tokens per program, a multiple of 32 * W
    n_kv,
    rows_per_seq,
    bounds_ptr,  # (B, 2) int32 visible positions [from, until), read when HAS_BOUNDS
    n_pre,
    kp_sb,  # strides in bytes (packed rows) and elements (norms)
    kp_sh,
    kn_sb,
    kn_sh,
    vp_sb,
    vp_sh,
    vn_sb,
    vn_sh,
    G: gl.constexpr,
    W: gl.constexpr,
    HAS_BOUNDS: gl.constexpr,
):
    L: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [W, 1], [1, 0])
    bh = gl.program_id(0)
    split = gl.program_id(1)
    n_splits = gl.num_programs(1)
    b = bh // n_kv
    h = bh % n_kv
    bs = (b // rows_per_seq).to(gl.int64)  # offsets of big caches pass 2**31 bytes
    r = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, L))
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, L))
    lane = r % 32
    w = r // 32
    g = lane // 4
    t = lane % 4
    qrow = qr_ptr + (bh * G + g) * 64 + 16 * t
    qok = (g < G)[:, None]
    q0 = gl.load(qrow[:, None] + c[None, :], mask=qok, other=0)
    q1 = gl.load(qrow[:, None] + 4 + c[None, :], mask=qok, other=0)
    q2 = gl.load(qrow[:, None] + 8 + c[None, :], mask=qok, other=0)
    q3 = gl.load(qrow[:, None] + 12 + c[None, :], mask=qok, other=0)
    # tables per lane: distinct addresses keep them in ordinary registers (from a uniform load
    # the compiler would move them out of uniform registers before every byte permute)
    klo = gl.load(ktab_ptr + (lane * 8)[:, None] + c[None, :])
    khi = gl.load(ktab_ptr + (lane * 8 + 4)[:, None] + c[None, :])
    vtab = gl.load(vtab_ptr + (lane * 4)[:, None] + c[None, :])
    kp_row = (kp_ptr + bs * kp_sb + h * kp_sh).to(gl.pointer_type(gl.int32))
    vp_row = (vp_ptr + bs * vp_sb + h * vp_sh).to(gl.pointer_type(gl.int32))
    kn_row = kn_ptr + bs * kn_sb + h * kn_sh
    vn_row = vn_ptr + bs * vn_sb + h * vn_sh
    start = split * split_len
    stop = gl.minimum(start + split_len, T)
    lo = 0
    if HAS_BOUNDS:
        lo = gl.load(bounds_ptr + 2 * b) - n_pre
        stop = gl.minimum(stop, gl.load(bounds_ptr + 2 * b + 1) - n_pre)
    m = gl.full([32 * W, 4], -1.0e30, gl.float32, layout=L)
    l_sum = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a0 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a1 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a2 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a3 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a4 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a5 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a6 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    a7 = gl.zeros([32 * W, 4], gl.float32, layout=L)
    STEP: gl.constexpr = 32 * W
    # whole steps need no masks (no bounds); the rest of the split takes one masked step
    full_end = start
    if not HAS_BOUNDS:
        full_end = start + (stop - start) // STEP * STEP
    for it in range(start, full_end, STEP):
        m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _step(
            kp_row, vp_row, kn_row, vn_row, it + w * 32, g, t, c, lo, stop,
            q0, q1, q2, q3, klo, khi, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7, False,
        )  # fmt: skip
    for it in range(full_end, stop, STEP):
        m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7 = _step(
            kp_row, vp_row, kn_row, vn_row, it + w * 32, g, t, c, lo, stop,
            q0, q1, q2, q3, klo, khi, vtab, m, l_sum, a0, a1, a2, a3, a4, a5, a6, a7, True,
        )  # fmt: skip
    # merge the warps through shared memory; one partial per program
    l_lanes = gl.inline_asm_elementwise(
        _LANE_SUM, "=f,f", [l_sum], dtype=gl.float32, is_pure=True, pack=1
    )
    buf = gl.allocate_shared_memory(
        gl.float32, [10, 32 * W, 4], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    buf.index(0).store(a0)
    buf.index(1).store(a1)
    buf.index(2).store(a2)
    buf.index(3).store(a3)
    buf.index(4).store(a4)
    buf.index(5).store(a5)
    buf.index(6).store(a6)
    buf.index(7).store(a7)
    buf.index(8).store(m)
    buf.index(9).store(l_lanes)
    gl.thread_barrier()
    # column k of a warp's (32, 4) block: lane k // 4, register k % 4
    ML: gl.constexpr = gl.BlockedLayout([W, 1], [1, 32], [1, W], [1, 0])
    mw = buf.index(8).reshape([W, 128]).load(ML)
    m_tot = gl.max(mw, axis=0)
    wts = gl.exp2(mw - m_tot[None, :])
    col = gl.arange(0, 128, layout=gl.SliceLayout(0, ML))
    cl = col // 4
    cr = col % 4
    head = 2 * (cl % 4) + cr % 2
    real = head < G
    part = bh * n_splits + split
    once = (cl < 4) & (cr < 2) & real
    gl.store(ws_ptr + m_off + part * 16 + head, m_tot, mask=once)
    gl.store(ws_ptr + l_off + part * 16 + head, _merge_column(buf, 9, wts, W, ML), mask=once)
    out = ws_ptr + acc_off + (part * G + head) * 128 + 16 * (cl // 4) + 4 * (cr // 2)
    gl.store(out + 0, _merge_column(buf, 0, wts, W, ML), mask=real)
    gl.store(out + 1, _merge_column(buf, 1, wts, W, ML), mask=real)
    gl.store(out + 2, _merge_column(buf, 2, wts, W, ML), mask=real)
    gl.store(out + 3, _merge_column(buf, 3, wts, W, ML), mask=real)
    gl.store(out + 8, _merge_column(buf, 4, wts, W, ML), mask=real)
    gl.store(out + 9, _merge_column(buf, 5, wts, W, ML), mask=real)
    gl.store(out + 10, _merge_column(buf, 6, wts, W, ML), mask=real)
    gl.store(out + 11, _merge_column(buf, 7, wts, W, ML), mask=real)


@triton.jit
def _rotate_query_kernel(
    query_ptr, stride_qb, stride_qh, rot_ptr, out_ptr, n_kv, qscale,
    G: tl.constexpr, GP: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """Columns ``[CB j, CB j + CB)`` (j = program 1) of the query heads of one KV head rotated
    into the keys' domain and scaled, fp16 rows: one round of loads, one ``tf32x3`` product."""
    bh = tl.program_id(0)
    b = bh // n_kv
    h = bh % n_kv
    rows = tl.arange(0, GP)
    dims = tl.arange(0, 128)
    cols = tl.program_id(1) * CB + tl.arange(0, CB)
    q = tl.load(
        query_ptr + b * stride_qb + (h * G + rows[:, None]) * stride_qh + dims[None, :],
        mask=(rows < G)[:, None],
        other=0.0,
    ).to(tl.float32)
    rot = tl.load(rot_ptr + dims[:, None] * 128 + cols[None, :])
    q = tl.dot(q, rot, input_precision="tf32x3")
    tl.store(
        out_ptr + (bh * G + rows[:, None]) * 128 + cols[None, :],
        (q * qscale).to(tl.float16),
        mask=(rows < G)[:, None],
    )


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables(key_q: Any, value_q: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-lane table arrays of a quantizer pair on a device, built once: keys ``(32, 8)``
    (low bytes of the 16 fp16 centroids in 4 words, then high bytes), values ``(32, 4)``."""
    per_key = _TABLES.get(key_q)
    if per_key is None:
        per_key = _TABLES[key_q] = weakref.WeakKeyDictionary()
    per_value = per_key.get(value_q)
    if per_value is None:
        per_value = per_key[value_q] = {}
    found = per_value.get(device)
    if found is None:
        klo, khi = table_words(key_q.codebook.centroids)
        vlo, vhi = table_words(value_q.codebook.centroids)
        ktab = torch.tensor([klo + khi] * 32, dtype=torch.int32, device=device)
        vtab = torch.tensor([vlo + vhi + [0, 0]] * 32, dtype=torch.int32, device=device)
        found = per_value[device] = (ktab, vtab)
    return found


def _aligned(qt: Any, row_bytes: int) -> bool:
    p, n = qt.packed, qt.norms
    return (
        p.shape[-1] == row_bytes
        and p.stride(3) == 1
        and p.stride(2) == row_bytes
        and p.data_ptr() % 16 == 0
        and p.stride(0) % 16 == 0
        and p.stride(1) % 16 == 0
        and n.stride(2) == 1
    )


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume current
        return True
    return found >= (major, minor)


# Gluon's API moves between Triton releases; this path is built and tested with 3.6
_GLUON_OK = _triton_at_least(3, 6)


def serves_mma(query: torch.Tensor, keys: Any, values: Any, key_q: Any, value_q: Any) -> bool:
    """Whether this path serves the call (else the block kernel does): Triton >= 3.6, CUDA
    tensors, K4/V2, head_dim 128, at most 8 query heads per KV head, aligned whole rows."""
    g = query.shape[1] // keys.shape[1]
    return (
        _GLUON_OK
        and query.is_cuda
        and query.shape[-1] == 128
        and 1 <= g <= 8
        and key_q.spec.n_bits == 4
        and value_q.spec.n_bits == 2
        and _aligned(keys, 64)
        and _aligned(values, 32)
    )


def launch_mma_partials(
    query, keys, values, key_q, value_q, rot, qscale, *,
    rows_per_seq, bounds, n_pre, tokens_per_split, num_warps, sm_count, workspace,
):  # fmt: skip
    """Rotate the query and write the split partials; returns ``(ws, splits, m_off, l_off,
    acc_off)`` in the layout :func:`.decode_attention._combine_kernel` reads (16 rows of m and l
    per split, then G x 128 value-domain sums in dim order)."""
    b, hq, _, d = query.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    bh = b * n_kv
    device = query.device
    q_rot = torch.empty(bh * g, d, device=device, dtype=torch.float16)
    _rotate_query_kernel[(bh, 4)](
        query, query.stride(0), query.stride(1), rot, q_rot, n_kv, qscale, G=g, GP=16, CB=32
    )
    step = STEP_TOKENS * num_warps
    if tokens_per_split is None:  # a whole wave: 2 programs per SM for few heads, else 4
        want = max(1, (2 if bh < 32 else 4) * sm_count // bh)
        tokens_per_split = math.ceil(t / want)
    split_len = max(step, math.ceil(tokens_per_split / step) * step)
    splits = math.ceil(t / split_len)
    m_off, l_off, acc_off = 0, bh * splits * 16, 2 * bh * splits * 16
    ws = workspace(device, acc_off + bh * splits * g * d)
    ktab, vtab = _tables(key_q, value_q, device)
    kp, kn, vp, vn = keys.packed, keys.norms, values.packed, values.norms
    _mma_partials_kernel[(bh, splits)](
        q_rot.view(torch.int32), ws, m_off, l_off, acc_off, kp, kn, vp, vn, ktab, vtab,
        t, split_len, n_kv, rows_per_seq, query if bounds is None else bounds, n_pre,
        kp.stride(0), kp.stride(1), kn.stride(0), kn.stride(1),
        vp.stride(0), vp.stride(1), vn.stride(0), vn.stride(1),
        G=g, W=num_warps, HAS_BOUNDS=bounds is not None, num_warps=num_warps,
    )  # fmt: skip
    return ws, splits, m_off, l_off, acc_off

"""Fused decode attention over packed TurboQuant codes (Triton), flash-decoding style.

Reference: :func:`tqai.attention.compressed_attention` (the parity tests compare against it).

One query token per sequence. K4/V2, K4/V4 (one codebook) and K3/V2 at head_dim 128 with at
most 8 query heads per KV head take the fragment-lookup kernel of :mod:`.decode_partials_mma` (one
launch: history splits, segments and merge); everything else takes two launches, no other
device work per call:

1. ``_decode_attention_kernel`` (grid ``(B * Hkv, splits)``): each program rotates the query
   heads of its KV head into the keys' domain (times ``scale * log2(e)``), then walks its share
   of the packed history in blocks of ``BLOCK_N`` tokens. Packed rows are read as whole packing
   groups (8 codes of ``b`` bits are exactly ``b`` bytes: one uint8/16/32/64 load, three byte
   loads for 3 bits; code ``8 j + i`` is group ``j`` at shift ``b i``). Centroids come from
   byte permutes of a table held in registers (2 bits, symmetric 4-bit codebooks) or from
   gathers of a 2**b-entry fp16 table. Scores for all query heads of the group (padded to 16
   rows) are 8 tensor-core products, one per code position ``i`` of the packing groups: the
   centroids of code ``i`` against the rotated query's columns ``8 j + i`` (so the keys'
   centroids are never reordered into dim order); fp16 operands, fp32 accumulation. An online
   softmax runs in base 2, and ``p * ||v||`` times the values' centroids (dim order) is
   accumulated on the tensor cores in the values' rotated domain. The next block's packed
   groups and norms are loaded before the current block is decoded (software pipelining by
   hand).
2. ``_combine_kernel`` (grid ``(B * Hkv, D / 64)``): merges the splits by log-sum-exp, rotates
   the value sum back once (one small matmul with the value rotation), joins the full-precision
   segments (sinks before the history, recent window and staged tokens after it) in the same
   softmax, and writes the output in the query's dtype.

Numerics: scores and the value sum use fp16 operands on the tensor cores with fp32 accumulation
(query rounded to fp16 after rotation and scaling, centroids in fp16, ``p * ||v||`` in fp16);
the rotations, softmax and merge run in fp32 (the rotations as ``tf32x3`` products). The parity
tests bound the difference from the float32 reference accordingly.

Supported here: TurboQuant_mse keys and values with 1, 2, 3, 4 or 8 bits, fp16 norms, head dims
16..256, at most 16 query heads per KV head, every position visible or one visible range of
positions per sequence (``valid_from`` / ``valid_until``: a left-padded batch, or the causal rows
of a prefill chunk, :mod:`.prefill_attention`), no logit soft-capping. Everything else goes
through the reference (see :func:`supports`).

Host path: the rotation matrices (padded) and centroid tables are built once per quantizer pair
and device and cached; the split partials live in one float32 workspace per device that is
reused across calls (kernels on one stream run in order, so a later call's writes never race an
earlier call's reads; calls on several streams at once would need their own workspaces); the
context length and split length are run-time arguments, so decoding never recompiles as the
context grows. Measurements and the history of versions: ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from tqai_torch.kernels.triton.block_lookup_ptx import PRMT2, PRMT4, prmt_registers

try:  # Gluon (Triton >= 3.6): the fragment-lookup fast path for K4/V2, K4/V4, K3/V2 at head_dim 128
    from tqai_torch.kernels.triton.decode_partials_mma import launch_mma_decode, serves_mma
except ImportError:  # older Triton: the block kernel serves every configuration
    launch_mma_decode = serves_mma = None

__all__ = ["SUPPORTED_BITS", "decode_attention_triton", "group_layout", "supports"]

SUPPORTED_BITS = (1, 2, 3, 4, 8)
_LOG2E = 1.4426950408889634
_GP = 16  # query rows per program: the group padded for tl.dot


@triton.jit
def _group_rows(base_ptr, BITS: tl.constexpr):
    """A history's row base (a uint8 pointer) as a pointer to whole packing groups: 8 codes of
    BITS bits are exactly BITS bytes, read as one uint8/16/32/64 (3 bits: bytes, 3 per group)."""
    if BITS == 2:
        rows = base_ptr.to(tl.pointer_type(tl.uint16))
    elif BITS == 4:
        rows = base_ptr.to(tl.pointer_type(tl.uint32))
    elif BITS == 8:
        rows = base_ptr.to(tl.pointer_type(tl.uint64))
    else:
        rows = base_ptr
    return rows


@triton.jit
def _load_groups(
    row_ptr,  # (BLOCK_N,) pointers (from _group_rows) to each token's packed row
    valid,  # (BLOCK_N,) tokens in range
    BITS: tl.constexpr,
    WP: tl.constexpr,  # padded groups per row
    WR: tl.constexpr,  # real groups per row
):
    """The packing groups of a block of rows, ``(BLOCK_N, WP)``: each the little-endian integer
    ``sum_i code_i << (BITS i)`` of 8 codes (uint32; uint64 for 8 bits)."""
    units = tl.arange(0, WP)
    if WR == WP:  # noqa: SIM108 (a compile-time branch: no mask work for unpadded rows)
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (units < WR)[None, :]
    if BITS == 3:
        base = row_ptr[:, None] + units[None, :] * 3
        b0 = tl.load(base, mask=mask, other=0).to(tl.uint32)
        b1 = tl.load(base + 1, mask=mask, other=0).to(tl.uint32)
        b2 = tl.load(base + 2, mask=mask, other=0).to(tl.uint32)
        groups = b0 | (b1 << 8) | (b2 << 16)
    elif BITS == 8:
        groups = tl.load(row_ptr[:, None] + units[None, :], mask=mask, other=0)
    else:
        groups = tl.load(row_ptr[:, None] + units[None, :], mask=mask, other=0).to(tl.uint32)
    return groups


_PRMT4_ASM = tl.constexpr(PRMT4)
_PRMT2_ASM = tl.constexpr(PRMT2)


@triton.jit
def _codes8(
    groups,  # (BLOCK_N, WP) from _load_groups
    table_ptr,  # (2**BITS,) fp16 centroids (gather path)
    t0,  # table bytes in registers (PRMT path, see :mod:`.block_lookup_ptx`)
    t1,
    t2,
    t3,
    BITS: tl.constexpr,
    PRMT: tl.constexpr,
):
    """Centroids of the codes in ``groups`` as 8 fp16 tiles ``(BLOCK_N, WP)``: tile ``i`` holds
    code ``i`` of every group, i.e. dims ``8 j + i`` (no join or reshape: each tile feeds its own
    tensor-core product). Byte-permute lookups from registers (``PRMT``) or gathers."""
    if PRMT:
        if BITS == 4:
            o = tl.inline_asm_elementwise(
                _PRMT4_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [groups, t0, t1, t2, t3],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            o = tl.inline_asm_elementwise(
                _PRMT2_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [groups, t0, t1],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1,
            )  # fmt: skip
        return o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
    m = (1 << BITS) - 1
    c0 = tl.load(table_ptr + (groups & m).to(tl.int32))
    c1 = tl.load(table_ptr + ((groups >> BITS) & m).to(tl.int32))
    c2 = tl.load(table_ptr + ((groups >> (2 * BITS)) & m).to(tl.int32))
    c3 = tl.load(table_ptr + ((groups >> (3 * BITS)) & m).to(tl.int32))
    c4 = tl.load(table_ptr + ((groups >> (4 * BITS)) & m).to(tl.int32))
    c5 = tl.load(table_ptr + ((groups >> (5 * BITS)) & m).to(tl.int32))
    c6 = tl.load(table_ptr + ((groups >> (6 * BITS)) & m).to(tl.int32))
    c7 = tl.load(table_ptr + ((groups >> (7 * BITS)) & m).to(tl.int32))
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _centroids(
    groups,  # (BLOCK_N, WP) from _load_groups
    table_ptr,  # (2**BITS,) fp16 centroids (gather path)
    t0,  # table bytes in registers (PRMT path, see :mod:`.block_lookup_ptx`)
    t1,
    t2,
    t3,
    BITS: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRMT: tl.constexpr,
):
    """Centroids of the codes in ``groups``, ``(BLOCK_N, 8 * WP)`` fp16 in dim order (code
    ``8 j + i`` is group ``j`` at shift ``BITS i``): the tiles of :func:`_codes8` interleaved."""
    o0, o1, o2, o3, o4, o5, o6, o7 = _codes8(groups, table_ptr, t0, t1, t2, t3, BITS, PRMT)
    # join appends a minor axis: [a, b, c] below is code 4 a + 2 b + c
    even = tl.join(tl.join(o0, o4), tl.join(o2, o6))
    odd = tl.join(tl.join(o1, o5), tl.join(o3, o7))
    return tl.reshape(tl.join(even, odd), (BLOCK_N, 8 * WP))


@triton.jit(do_not_specialize=["T", "split_len"])
def _decode_attention_kernel(
    query_ptr,  # (B, Hq, 1, D)
    stride_qb,
    stride_qh,
    qscale,  # scale * log2(e)
    rot_ptr,  # (DP, 8 * KWP) float32: key rotation (columns in dim order), padding zero
    ws_ptr,  # float32 workspace: partials at m_off / l_off / acc_off
    m_off,
    l_off,
    acc_off,
    kp_ptr,  # (B, Hkv, T, LK) uint8 packed key codes (any strides on B, Hkv, T)
    kn_ptr,  # (B, Hkv, T) key norms, fp16
    vp_ptr,  # (B, Hkv, T, LV) uint8 packed value codes
    vn_ptr,  # (B, Hkv, T) value norms, fp16
    kt_ptr,  # (2**KB,) fp16 key centroids
    vt_ptr,  # (2**VB,) fp16 value centroids
    kt0,  # key table bytes for the PRMT path (int32 each; unused otherwise)
    kt1,
    kt2,
    kt3,
    vt0,  # value table bytes
    vt1,
    vt2,
    vt3,
    T,
    split_len,  # tokens per program, a multiple of BLOCK_N
    n_kv,
    rows_per_seq,  # query rows per sequence: history/segment index = row // rows_per_seq
    bounds_ptr,  # (B, 2) int32: each sequence's visible positions [from, until)
    n_pre,  # prefix tokens before the history (positions of history token t: n_pre + t)
    kp_sb,  # strides of the packed rows in bytes (B, Hkv) and in packing groups (T)
    kp_sh,
    kp_su,
    kn_sb,
    kn_sh,
    kn_st,
    vp_sb,
    vp_sh,
    vp_su,
    vn_sb,
    vn_sh,
    vn_st,
    KB: tl.constexpr,
    KWP: tl.constexpr,
    KWR: tl.constexpr,
    VB: tl.constexpr,
    VWP: tl.constexpr,
    VWR: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KPRMT: tl.constexpr,  # key lookups by byte permutes from registers (else gathers)
    VPRMT: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,  # bounds_ptr is read (else every position is visible)
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // n_kv  # the query row (a sequence, or one token of a prefill chunk)
    h = bh % n_kv
    # the sequence whose history it reads; 64-bit, as its offsets pass 2**31 bytes in big caches
    bs = (b // rows_per_seq).to(tl.int64)
    rows = tl.arange(0, GP)
    # The group's queries, scaled and rotated into the keys' domain, as 8 column tiles: tile i
    # holds rotated dims 8 j + i, the dims that code i of each packing group scores against.
    PDK: tl.constexpr = 8 * KWP
    q = tl.zeros((GP, PDK), tl.float32)
    for d0 in range(0, DP, 32):  # chunks of 32 dims: the rotation never sits in registers whole
        d_c = d0 + tl.arange(0, 32)
        q_c = tl.load(
            query_ptr + b * stride_qb + (h * G + rows[:, None]) * stride_qh + d_c[None, :],
            mask=(rows < G)[:, None] & (d_c < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        rot = tl.load(
            rot_ptr + d_c[:, None] * PDK + tl.arange(0, PDK)[None, :],
            mask=(d_c < D)[:, None],
            other=0.0,
        )
        q += tl.dot(q_c, rot, input_precision="tf32x3")
    q = (q * qscale).to(tl.float16)
    # column 8 j + i of q is [row, j, i // 4, i // 2 % 2, i % 2] here; split peels the last axis
    q_e, q_o = tl.split(tl.reshape(q, (GP, KWP, 2, 2, 2)))
    q_ee, q_eo = tl.split(q_e)
    q_oe, q_oo = tl.split(q_o)
    q0, q4 = tl.split(q_ee)  # i % 2 == 0, i // 2 % 2 == 0
    q2, q6 = tl.split(q_eo)
    q1, q5 = tl.split(q_oe)
    q3, q7 = tl.split(q_oo)
    kp_row = _group_rows(kp_ptr + bs * kp_sb + h * kp_sh, KB)
    vp_row = _group_rows(vp_ptr + bs * vp_sb + h * vp_sh, VB)
    kn_row = kn_ptr + bs * kn_sb + h * kn_sh
    vn_row = vn_ptr + bs * vn_sb + h * vn_sh
    start = split * split_len
    stop = tl.minimum(start + split_len, T)
    lo = 0  # visible history tokens: [lo, stop)
    if HAS_BOUNDS:
        lo = tl.load(bounds_ptr + 2 * b) - n_pre
        stop = tl.minimum(stop, tl.load(bounds_ptr + 2 * b + 1) - n_pre)
    m = tl.full((GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, 8 * VWP), tl.float32)
    # Software pipelining by hand: the packed groups and norms of block i + 1 are loaded before
    # block i is decoded, so their memory latency overlaps the lookups and dots.
    toks = start + tl.arange(0, BLOCK_N)
    valid = (toks < stop) & (toks >= lo)
    ku = _load_groups(kp_row + toks * kp_su, valid, KB, KWP, KWR)
    kn = tl.load(kn_row + toks * kn_st, mask=valid, other=0.0)
    vu = _load_groups(vp_row + toks * vp_su, valid, VB, VWP, VWR)
    vn = tl.load(vn_row + toks * vn_st, mask=valid, other=0.0)
    for _ in range(0, split_len, BLOCK_N):  # blocks past `stop` are fully masked (last split)
        toks_nx = toks + BLOCK_N
        valid_nx = (toks_nx < stop) & (toks_nx >= lo)
        ku_nx = _load_groups(kp_row + toks_nx * kp_su, valid_nx, KB, KWP, KWR)
        kn_nx = tl.load(kn_row + toks_nx * kn_st, mask=valid_nx, other=0.0)
        vu_nx = _load_groups(vp_row + toks_nx * vp_su, valid_nx, VB, VWP, VWR)
        vn_nx = tl.load(vn_row + toks_nx * vn_st, mask=valid_nx, other=0.0)
        k0, k1, k2, k3, k4, k5, k6, k7 = _codes8(ku, kt_ptr, kt0, kt1, kt2, kt3, KB, KPRMT)
        s = tl.dot(q0, tl.trans(k0))
        s = tl.dot(q1, tl.trans(k1), s)
        s = tl.dot(q2, tl.trans(k2), s)
        s = tl.dot(q3, tl.trans(k3), s)
        s = tl.dot(q4, tl.trans(k4), s)
        s = tl.dot(q5, tl.trans(k5), s)
        s = tl.dot(q6, tl.trans(k6), s)
        s = tl.dot(q7, tl.trans(k7), s)
        s = s * kn.to(tl.float32)[None, :]  # (GP, BLOCK_N), base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing visible
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        pv = (p * vn.to(tl.float32)[None, :]).to(tl.float16)
        v = _centroids(vu, vt_ptr, vt0, vt1, vt2, vt3, VB, VWP, BLOCK_N, VPRMT)
        acc = tl.dot(pv, v, acc * alpha[:, None])
        m = m_new
        toks, valid, ku, kn, vu, vn = toks_nx, valid_nx, ku_nx, kn_nx, vu_nx, vn_nx
    part = bh * n_splits + split
    tl.store(ws_ptr + m_off + part * GP + rows, m)
    tl.store(ws_ptr + l_off + part * GP + rows, l_sum)
    vcols = tl.arange(0, 8 * VWP)
    tl.store(
        ws_ptr + acc_off + (part * G + rows[:, None]) * (8 * VWP) + vcols[None, :],
        acc,
        mask=(rows < G)[:, None],
    )


@triton.jit
def _segment_stats(
    q, k_base, stride_t, n, lo, m, l_sum,
    D: tl.constexpr, DP: tl.constexpr, SEG_N: tl.constexpr,
):  # fmt: skip
    """Running max and normalizer ``(GR,)`` of the query rows ``q (GR, 1, DP)`` over the visible
    tokens ``[lo, n)`` of a full-precision segment (original domain; fp32 products)."""
    dims = tl.arange(0, DP)
    for t0 in range(0, n, SEG_N):
        toks = t0 + tl.arange(0, SEG_N)
        valid = (toks < n) & (toks >= lo)
        offs = toks[:, None] * stride_t + dims[None, :]
        k = tl.load(k_base + offs, mask=valid[:, None] & (dims < D)[None, :], other=0.0)
        s = tl.sum(q * k.to(tl.float32)[None, :, :], axis=2)  # (GR, SEG_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_sum = l_sum * tl.exp2(m - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m = m_new
    return m, l_sum


@triton.jit
def _segment_values(
    q, k_base, v_base, stride_kt, stride_vt, n, lo, m, acc, c0,
    D: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SEG_N: tl.constexpr,
):  # fmt: skip
    """``acc += sum_t 2^(s_t - m) v_t[c0 : c0 + DC]`` over the visible tokens ``[lo, n)`` of a
    segment (``q (GR, 1, DP)``, ``m`` its final max, ``acc (GR, DC)``; fp32 products)."""
    dims = tl.arange(0, DP)
    cols = c0 + tl.arange(0, DC)
    for t0 in range(0, n, SEG_N):
        toks = t0 + tl.arange(0, SEG_N)
        valid = (toks < n) & (toks >= lo)
        k = tl.load(
            k_base + toks[:, None] * stride_kt + dims[None, :],
            mask=valid[:, None] & (dims < D)[None, :],
            other=0.0,
        )
        s = tl.sum(q * k.to(tl.float32)[None, :, :], axis=2)
        p = tl.where(valid[None, :], tl.exp2(s - m[:, None]), 0.0)
        v = tl.load(
            v_base + toks[:, None] * stride_vt + cols[None, :],
            mask=valid[:, None] & (cols < D)[None, :],
            other=0.0,
        )
        acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit(do_not_specialize=["n_splits", "n_pre", "n_suf", "T"])
def _combine_kernel(
    ws_ptr,
    m_off,
    l_off,
    acc_off,
    n_splits,
    unrot_ptr,  # (PDV, DP) float32: value rotation in kernel-column order, padding zero
    query_ptr,  # (B, Hq, 1, D)
    stride_qb,
    stride_qh,
    qscale,
    pk_ptr,  # prefix keys/values (B, Hkv, n_pre, D), last stride 1
    pv_ptr,
    n_pre,
    pk_sb,
    pk_sh,
    pk_st,
    pv_sb,
    pv_sh,
    pv_st,
    sk_ptr,  # suffix keys/values (B, Hkv, n_suf, D), last stride 1
    sv_ptr,
    n_suf,
    sk_sb,
    sk_sh,
    sk_st,
    sv_sb,
    sv_sh,
    sv_st,
    out_ptr,  # (B, Hq, 1, D) contiguous, query dtype
    n_kv,
    rows_per_seq,
    bounds_ptr,  # (B, 2) int32 visible positions [from, until) (read when HAS_BOUNDS)
    T,  # history tokens (the suffix starts at position n_pre + T)
    G: tl.constexpr,
    GP: tl.constexpr,  # rows of the partials' m / l in the workspace
    GR: tl.constexpr,  # rows here: G padded to a power of two
    D: tl.constexpr,
    DP: tl.constexpr,
    DC: tl.constexpr,  # output columns per program
    PDV: tl.constexpr,
    PC: tl.constexpr,  # value-domain columns merged and unrotated at once
    SC: tl.constexpr,  # splits read at once
    SEG_N: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
):
    """Everything in fp32 FMAs over the group's real rows (no tensor cores: the work is small
    and latency-bound, and every load below is issued for many splits or tokens at once)."""
    bh = tl.program_id(0)
    b = bh // n_kv
    h = bh % n_kv
    rows = tl.arange(0, GR)
    row_ok = rows < G
    dims = tl.arange(0, DP)
    c = tl.program_id(1)  # one chunk of DC output columns per program
    cols = c * DC + tl.arange(0, DC)
    # 1. the history's softmax statistics over all splits (running max and rescaled sum: one
    # round of loads when the splits fit in SC)
    m_h = tl.full((GR,), float("-inf"), tl.float32)
    l_h = tl.zeros((GR,), tl.float32)
    for s0 in range(0, n_splits, SC):
        sp = s0 + tl.arange(0, SC)
        offs = (bh * n_splits + sp)[:, None] * GP + rows[None, :]
        ok = (sp < n_splits)[:, None]
        m_c = tl.load(ws_ptr + m_off + offs, mask=ok, other=float("-inf"))
        l_c = tl.load(ws_ptr + l_off + offs, mask=ok, other=0.0)
        m_new = tl.maximum(m_h, tl.max(m_c, axis=0))
        m_nu = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_h = l_h * tl.exp2(m_h - m_nu) + tl.sum(l_c * tl.exp2(m_c - m_nu[None, :]), axis=0)
        m_h = m_new
    m_use = tl.where(m_h == float("-inf"), 0.0, m_h)  # nothing visible in the history
    # 2. the history's value sum, PC rotated columns at a time, merged over the splits and
    # rotated back into this program's output columns
    out_h = tl.zeros((GR, DC), tl.float32)
    pcols = tl.arange(0, PC)
    for p0 in tl.static_range(0, PDV, PC):  # unrolled: the chunks' loads overlap
        acc_c = tl.zeros((GR, PC), tl.float32)
        for s0 in range(0, n_splits, SC):
            sp = s0 + tl.arange(0, SC)
            ok = sp < n_splits
            part = bh * n_splits + sp
            w = tl.exp2(
                tl.load(
                    ws_ptr + m_off + part[:, None] * GP + rows[None, :],
                    mask=ok[:, None],
                    other=float("-inf"),
                )
                - m_use
            )  # (SC, GR)
            acc_s = tl.load(
                ws_ptr + acc_off + ((part[:, None, None] * G + rows[None, :, None]) * PDV
                                    + p0 + pcols[None, None, :]),
                mask=ok[:, None, None] & row_ok[None, :, None],
                other=0.0,
            )  # fmt: skip
            acc_c += tl.sum(w[:, :, None] * acc_s, axis=0)
        unrot = tl.load(unrot_ptr + (p0 + pcols)[:, None] * DP + cols[None, :])  # (PC, DC)
        out_h += tl.sum(acc_c[:, :, None] * unrot[None, :, :], axis=1)
    # 3. softmax statistics of the full-precision segments (original domain)
    q = tl.load(
        query_ptr + b * stride_qb + (h * G + rows[:, None]) * stride_qh + dims[None, :],
        mask=row_ok[:, None] & (dims < D)[None, :],
        other=0.0,
    ).to(tl.float32)
    q = (q * qscale)[:, None, :]  # broadcast once, outside the loops below
    bs = b // rows_per_seq
    pk_base = pk_ptr + bs * pk_sb + h * pk_sh
    pv_base = pv_ptr + bs * pv_sb + h * pv_sh
    sk_base = sk_ptr + bs * sk_sb + h * sk_sh
    sv_base = sv_ptr + bs * sv_sb + h * sv_sh
    pre_lo = 0  # visible tokens of the prefix [pre_lo, pre_n) and of the suffix [suf_lo, suf_n)
    pre_n = n_pre
    suf_lo = 0
    suf_n = n_suf
    if HAS_BOUNDS:
        first = tl.load(bounds_ptr + 2 * b)
        until = tl.load(bounds_ptr + 2 * b + 1)
        pre_lo = first
        pre_n = tl.minimum(n_pre, until)
        suf_lo = first - n_pre - T
        suf_n = tl.minimum(n_suf, until - n_pre - T)
    m_g = tl.full((GR,), float("-inf"), tl.float32)
    l_g = tl.zeros((GR,), tl.float32)
    m_g, l_g = _segment_stats(q, pk_base, pk_st, pre_n, pre_lo, m_g, l_g, D, DP, SEG_N)
    m_g, l_g = _segment_stats(q, sk_base, sk_st, suf_n, suf_lo, m_g, l_g, D, DP, SEG_N)
    # 4. one softmax over both
    m_all = tl.maximum(m_h, m_g)
    w_h = tl.where(m_h == float("-inf"), 0.0, tl.exp2(m_h - m_all))
    w_g = tl.where(m_g == float("-inf"), 0.0, tl.exp2(m_g - m_all))
    total = l_h * w_h + l_g * w_g
    acc_g = tl.zeros((GR, DC), tl.float32)
    acc_g = _segment_values(
        q, pk_base, pv_base, pk_st, pv_st, pre_n, pre_lo, m_g, acc_g, c * DC, D, DP, DC, SEG_N
    )
    acc_g = _segment_values(
        q, sk_base, sv_base, sk_st, sv_st, suf_n, suf_lo, m_g, acc_g, c * DC, D, DP, DC, SEG_N
    )
    out = (out_h * w_h[:, None] + acc_g * w_g[:, None]) / total[:, None]
    tl.store(
        out_ptr + (b * n_kv * G + h * G + rows[:, None]) * D + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (cols < D)[None, :],
    )


def group_layout(n_bits: int, d: int, min_groups: int = 2) -> tuple[int, int]:
    """``(WP, WR)`` of packed rows of ``d`` codes: packing groups (8 codes, ``n_bits`` bytes) per
    row padded to a power of two of at least ``min_groups`` (the tensor cores need products over
    16 columns: ``8 * WP >= 16`` for values in dim order, ``WP >= 16`` for keys scored per code
    position), and real groups. Dims ``>= d`` are padding."""
    wr = -(-d // 8)
    return max(min_groups, triton.next_power_of_2(wr)), wr


def _padded(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), dtype=np.float64)
    out[: matrix.shape[0], : matrix.shape[1]] = matrix
    return out


@dataclass(frozen=True)
class _Constants:
    rot: torch.Tensor  # (DP, PDK) float32
    unrot: torch.Tensor  # (PDV, DP) float32
    k_table: torch.Tensor  # (2**bk,) fp16
    v_table: torch.Tensor  # (2**bv,) fp16
    k_layout: tuple[int, int]
    v_layout: tuple[int, int]
    dp: int
    k_regs: tuple[int, int, int, int] | None  # table bytes for the PRMT path, None: gathers
    v_regs: tuple[int, int, int, int] | None


_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SMS: dict[torch.device, int] = {}
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _constants(key_q: Any, value_q: Any, device: torch.device) -> _Constants:
    """Device constants of a quantizer pair, built once (the rotations and tables never change)."""
    per_key = _CONSTANTS.setdefault(key_q, weakref.WeakKeyDictionary())
    per_value = per_key.setdefault(value_q, {})
    found = per_value.get(device)
    if found is not None:
        return found
    d = key_q.spec.d
    dp = max(16, triton.next_power_of_2(d))
    k_layout = group_layout(key_q.spec.n_bits, d, min_groups=16)
    v_layout = group_layout(value_q.spec.n_bits, d)
    # rotate: q_rot = q @ Pi_K^T; unrotate: out = out_rot @ Pi_V (Rotation.matrix() is Pi)
    rot = _padded(key_q.rotation.matrix().T, dp, 8 * k_layout[0])
    unrot = _padded(value_q.rotation.matrix(), 8 * v_layout[0], dp)

    def dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    found = _Constants(
        rot=dev(rot, torch.float32),
        unrot=dev(unrot, torch.float32),
        k_table=dev(key_q.codebook.centroids, torch.float16),
        v_table=dev(value_q.codebook.centroids, torch.float16),
        k_layout=k_layout,
        v_layout=v_layout,
        dp=dp,
        k_regs=prmt_registers(key_q.codebook.centroids),
        v_regs=prmt_registers(value_q.codebook.centroids),
    )
    per_value[device] = found
    return found


def _check_aligned(qt: Any, name: str) -> None:
    """Packing groups are read whole (``n_bits`` bytes each): rows must start on them."""
    p, unit = qt.packed, qt.spec.n_bits
    if p.stride(-1) != 1:
        raise ValueError(f"{name}: packed rows must be contiguous (last stride 1)")
    if unit != 3 and (p.data_ptr() % unit or any(st % unit for st in p.stride()[:-1])):
        raise ValueError(
            f"{name}: packed rows must start on {unit}-byte packing groups (data pointer and "
            f"strides multiples of {unit}), got strides {tuple(p.stride())}"
        )


def _unit_stride(packed: torch.Tensor, n_bits: int) -> int:
    """The token stride of packed rows in the units the kernel reads them in (packing groups of
    ``n_bits`` bytes; bytes for 3 bits)."""
    return packed.stride(2) if n_bits == 3 else packed.stride(2) // n_bits


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    ws = _WORKSPACE.get(device)
    if ws is None or ws.numel() < numel:
        ws = torch.empty(max(numel, 1 << 16), device=device, dtype=torch.float32)
        _WORKSPACE[device] = ws
    return ws


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        if device.type == "cuda":
            _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # the Triton interpreter (CPU tensors)
            _SMS[device] = 4
    return _SMS[device]


def supports(key_quantizer: Any, value_quantizer: Any, head_dim: int) -> bool:
    """Whether the fused kernel serves this configuration (else use the reference)."""
    return (
        key_quantizer.spec.kind == "mse"
        and value_quantizer.spec.kind == "mse"
        and key_quantizer.spec.n_bits in SUPPORTED_BITS
        and value_quantizer.spec.n_bits in SUPPORTED_BITS
        and key_quantizer.spec.norm_dtype == "float16"
        and value_quantizer.spec.norm_dtype == "float16"
        and 16 <= head_dim <= 256
    )


def _segment_args(seg: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor) -> list:
    """Pointers, length and strides of a full-precision segment (a dummy when absent)."""
    if seg is None or not seg[0].shape[2]:
        return [like, like, 0, 0, 0, 0, 0, 0, 0]
    k, v = seg
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return [k, v, k.shape[2], *k.stride()[:3], *v.stride()[:3]]


def _bounds(
    valid_from: torch.Tensor | None, valid_until: torch.Tensor | None, b: int, device
) -> torch.Tensor | None:
    """``(B, 2)`` int32 visible position ranges ``[from, until)``, or None (all visible)."""
    if valid_from is None and valid_until is None:
        return None
    cols = []
    for name, value, default in (
        ("valid_from", valid_from, 0),
        ("valid_until", valid_until, 2**31 - 1),
    ):
        if value is None:
            cols.append(torch.full((b,), default, dtype=torch.int32, device=device))
            continue
        if tuple(value.shape) != (b,) or value.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a ({b},) integer tensor (a position per sequence), got "
                f"{tuple(value.shape)} {value.dtype}"
            )
        cols.append(value.to(device=device, dtype=torch.int32))
    return torch.stack(cols, dim=1).contiguous()


def _launch_blocks(
    query, keys, values, key_quantizer, value_quantizer, c, qscale, *, lookup, rows_per_seq,
    bounds, n_pre, block_n, tokens_per_split, num_warps,
):  # fmt: skip
    """The block kernel's split partials; returns ``(ws, splits, m_off, l_off, acc_off)``."""
    b, hq, _, d = query.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    device = query.device
    kwp, kwr = c.k_layout
    vwp, vwr = c.v_layout
    pdk, pdv = 8 * kwp, 8 * vwp
    bh = b * n_kv
    if block_n is None:  # measured on H100 (benchmarks/NOTES.md, v5 and v7 sweeps)
        block_n = 32 if max(pdk, pdv) > 128 else 128 if t * bh >= 16384 * 8 else 64
    # byte-permute lookups need PTX (not the interpreter) and a 2-bit or symmetric 4-bit table
    prmt = lookup == "auto" and device.type == "cuda"
    kprmt, vprmt = prmt and c.k_regs is not None, prmt and c.v_regs is not None
    k_regs = c.k_regs if kprmt else (0, 0, 0, 0)
    v_regs = c.v_regs if vprmt else (0, 0, 0, 0)
    if tokens_per_split is None:  # one whole wave of 2 programs per SM, >= 4 blocks each
        want = max(1, 2 * _sm_count(device) // bh)
        tokens_per_split = max(4 * block_n, math.ceil(t / want))
    split_len = max(block_n, math.ceil(tokens_per_split / block_n) * block_n)
    splits = math.ceil(t / split_len)
    m_off = 0
    l_off = bh * splits * _GP
    acc_off = 2 * bh * splits * _GP
    ws = _workspace(device, acc_off + bh * splits * g * pdv)
    kp, kn, vp, vn = keys.packed, keys.norms, values.packed, values.norms
    bounds_arg = query if bounds is None else bounds  # a dummy pointer when unused
    _decode_attention_kernel[(bh, splits)](
        query, query.stride(0), query.stride(1), qscale, c.rot,
        ws, m_off, l_off, acc_off,
        kp, kn, vp, vn, c.k_table, c.v_table, *k_regs, *v_regs,
        t, split_len, n_kv, rows_per_seq, bounds_arg, n_pre,
        kp.stride(0), kp.stride(1), _unit_stride(kp, key_quantizer.spec.n_bits),
        kn.stride(0), kn.stride(1), kn.stride(2),
        vp.stride(0), vp.stride(1), _unit_stride(vp, value_quantizer.spec.n_bits),
        vn.stride(0), vn.stride(1), vn.stride(2),
        KB=key_quantizer.spec.n_bits, KWP=kwp, KWR=kwr,
        VB=value_quantizer.spec.n_bits, VWP=vwp, VWR=vwr,
        G=g, GP=_GP, D=d, DP=c.dp, BLOCK_N=block_n, KPRMT=kprmt, VPRMT=vprmt,
        HAS_BOUNDS=bounds is not None, num_warps=num_warps,
    )  # fmt: skip
    return ws, splits, m_off, l_off, acc_off


def decode_attention_triton(
    query: torch.Tensor,
    keys: Any,
    values: Any,
    key_quantizer: Any,
    value_quantizer: Any,
    *,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    suffix: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int | None = None,
    tokens_per_split: int | None = None,
    num_warps: int | None = None,
    lookup: str = "auto",
    valid_from: torch.Tensor | None = None,
    valid_until: torch.Tensor | None = None,
    rows_per_seq: int = 1,
    partials: str = "auto",
) -> torch.Tensor:
    """Decode attention ``query (B, Hq, 1, D)`` over packed history + full-precision segments.

    Same inputs and output as :func:`tqai.attention.compressed_attention` with ``mask=None``
    (``keys`` / ``values`` must hold at least one token). ``block_n`` (tokens per step)
    defaults to 64 (128 once ``history tokens x B x Hkv >= 16384 x 8``; 32 for rows of more than
    128 kernel columns, for shared memory); ``tokens_per_split`` to at most one whole wave of
    two programs per SM (each at least ``4 * block_n`` tokens). ``lookup="gather"`` reads
    centroids from memory even where
    byte-permute lookups from registers serve (2 bits, symmetric 4-bit codebooks on CUDA).
    ``valid_from`` (``(B,)`` integers, optional): each sequence sees only the positions from
    ``valid_from[b]`` on (positions count the prefix, then the history, then the suffix): the
    left padding of a batch of prompts of different lengths, as the reference's mask
    ``position >= valid_from[b]``; ``valid_until`` (``(B,)``, optional) likewise hides the
    positions from ``valid_until[b]`` on (every sequence must see at least one position).
    ``rows_per_seq``: query rows per sequence of ``keys`` / ``values`` / the segments (``query``
    holds ``B * rows_per_seq`` rows; row ``r`` reads sequence ``r // rows_per_seq``): the tokens
    of a prefill chunk as rows of their own (:mod:`.prefill_attention`).
    ``partials``: which kernel reads the history: ``"mma"`` the fragment-lookup kernel of
    :mod:`.decode_partials_mma` (K4/V2, K4/V4 or K3/V2, head_dim 128, at most 8 query heads
    per KV head, CUDA; one launch that also takes the segments and merges), ``"blocks"`` the
    block kernel here and the combine (every configuration), ``"auto"`` the first that serves.
    ``block_n`` and ``lookup`` apply to the block kernel only; ``num_warps`` defaults to 8 for
    the former and 4 for the latter (measured on H100 and H200, benchmarks/NOTES.md).
    """
    b, hq, tq, d = query.shape
    if tq != 1:
        raise ValueError(f"query must hold one token per sequence (decode), got {tq}")
    if keys is None or keys.shape[2] == 0:
        raise ValueError("keys must hold a packed history of at least one token")
    if rows_per_seq < 1 or b != keys.shape[0] * rows_per_seq:
        raise ValueError(
            f"query rows ({b}) must be rows_per_seq ({rows_per_seq}) x the history's sequences "
            f"({keys.shape[0]})"
        )
    if not supports(key_quantizer, value_quantizer, d):
        raise ValueError(
            f"key_quantizer / value_quantizer ({key_quantizer.spec}, {value_quantizer.spec}) "
            "are not served by the fused kernel; check supports() first"
        )
    n_kv = keys.shape[1]
    if hq % n_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({n_kv})")
    g = hq // n_kv
    if g > _GP:
        raise ValueError(f"query heads per KV head must be <= {_GP}, got {g}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    t = keys.shape[2]
    bounds = _bounds(valid_from, valid_until, b, query.device)
    _check_aligned(keys, "keys")
    _check_aligned(values, "values")
    device = query.device
    if lookup not in ("auto", "gather"):
        raise ValueError(f"lookup must be 'auto' or 'gather', got {lookup!r}")
    if partials not in ("auto", "mma", "blocks"):
        raise ValueError(f"partials must be 'auto', 'mma' or 'blocks', got {partials!r}")
    mma = (
        partials != "blocks"
        and lookup == "auto"
        and serves_mma is not None
        and serves_mma(query, keys, values, key_quantizer, value_quantizer)
    )
    if partials == "mma" and not mma:
        raise ValueError(
            "partials='mma' needs CUDA tensors, Triton >= 3.6, 4-bit keys, 2-bit values, "
            "head_dim 128, at most 8 query heads per KV head and whole 16-byte-aligned packed "
            "rows; use 'auto' to fall back to the block kernel"
        )
    qscale = scale * _LOG2E
    out = torch.empty(b, hq, 1, d, device=device, dtype=query.dtype)
    if mma:  # one launch: partials, segments and merge
        launch_mma_decode(
            query, keys, values, key_quantizer, value_quantizer, qscale, out,
            _segment_args(prefix, query), _segment_args(suffix, query),
            rows_per_seq=rows_per_seq, bounds=bounds, tokens_per_split=tokens_per_split,
            num_warps=num_warps or 8, sm_count=_sm_count(device), workspace=_workspace,
        )  # fmt: skip
        return out
    c = _constants(key_quantizer, value_quantizer, device)
    n_pre = 0 if prefix is None else prefix[0].shape[2]
    ws, splits, m_off, l_off, acc_off = _launch_blocks(
        query, keys, values, key_quantizer, value_quantizer, c, qscale, lookup=lookup,
        rows_per_seq=rows_per_seq, bounds=bounds, n_pre=n_pre, block_n=block_n,
        tokens_per_split=tokens_per_split, num_warps=num_warps or 4,
    )  # fmt: skip
    # combine: DC output columns per program; FMA tiles of at most ~8K elements (64 per thread);
    # SC splits read at once (all of a batch-1 call's splits at G = 4: one round of loads)
    dc = min(c.dp, 64)
    pdv = 8 * c.v_layout[0]
    bh = b * n_kv
    bounds_arg = query if bounds is None else bounds  # a dummy pointer when unused
    gr = triton.next_power_of_2(g)
    pc = min(pdv, 32)
    sc = max(1, 8192 // (gr * pc))  # powers of two: gr, pc and dp are
    seg_n = max(1, min(16, 8192 // (gr * c.dp)))
    _combine_kernel[(bh, c.dp // dc)](
        ws, m_off, l_off, acc_off, splits, c.unrot,
        query, query.stride(0), query.stride(1), qscale,
        *_segment_args(prefix, query), *_segment_args(suffix, query),
        out, n_kv, rows_per_seq, bounds_arg, t,
        G=g, GP=_GP, GR=gr, D=d, DP=c.dp, DC=dc, PDV=pdv, PC=pc, SC=sc, SEG_N=seg_n,
        HAS_BOUNDS=bounds is not None,
    )  # fmt: skip
    return out

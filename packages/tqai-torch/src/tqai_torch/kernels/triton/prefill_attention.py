"""Chunked prefill attention over packed TurboQuant codes (Triton), flash-attention style: a
chunk's queries against the compressed history, the full-precision segments and the chunk
itself, causally.

Reference: :func:`tqai.attention.compressed_attention` with the causal mask of the chunk (the
parity tests compare against it).

One launch, ``_prefill_attention_kernel``, grid ``(ceil(C * G / BLOCK_M), B * Hkv)`` (the tiles
of one KV head launch together and share its history in L2). The ``C * G`` query rows of one
(sequence ``b``, KV head ``h``) are row ``r`` = (chunk token ``r // G``, query head
``h * G + r % G``), ``G`` query heads per KV head (GQA without repeating K/V); each program takes
``BLOCK_M`` consecutive rows (a tile) and:

1. rotates its rows' queries into the keys' rotated domain (times ``scale * log2(e)``, fp16),
2. walks the packed history once, in blocks of ``BLOCK_N`` tokens, with the decode kernel's
   helpers (:mod:`.decode_attention`: whole packing groups, byte-permute or gathered centroid
   lookups): scores ``q_rot @ centroids^T * ||k||`` on the tensor cores, online softmax in base
   2, ``acc += (p * ||v||) @ value centroids`` in the values' rotated domain. The next block's
   packed groups and norms are loaded before the current block is decoded. So each history
   block is read and looked up once per tile of ``BLOCK_M`` rows (the previous kernel: once per
   query token),
3. rotates the accumulator back once (``acc @ Pi_V``, as the weighted mean times the sum; the
   softmax rescaling is linear, so the later segments share the same accumulator, which saves
   a second ``BLOCK_M x D`` fp32 accumulator's registers during the history walk),
4. walks the full-precision sinks (prefix) and then the suffix (window + the chunk's own
   tokens) in blocks of ``BLOCK_N`` with the original-domain query, sharing the running max and
   sum; on the suffix each row sees the positions up to its own token (causal), blocks wholly
   visible to every row of the tile skip the mask and blocks past the tile's last token are
   never read,
5. divides by the softmax sum and stores the rows in the query's dtype.

The history is not split over programs (no combine step): parallelism comes from the row
tiles, so a program walks the whole history whatever the chunk, and a chunk of few rows leaves
most of the GPU idle. ``method="auto"`` sends chunks of few rows to the decode kernel with one
row per query token (:func:`_prefill_by_rows`, the previous implementation of this function,
whose time grows with the chunk instead), see :func:`prefill_attention_triton`.

Numerics: history scores and value sums use fp16 operands on the tensor cores with fp32
accumulation (query rounded to fp16 after rotation and scaling, centroids in fp16,
``p * ||v||`` in fp16), as the decode kernel; the query rotation is a ``tf32x3`` product (about
fp32) and the back-rotation an fp16 product with both operands split in two (about 22 bits,
:func:`_unrot_part`); the full-precision segments use the segments' own dtype as tensor-core
operands (fp16 or bf16: the query cast to it, ``p`` rounded to it; fp32 segments: tf32), fp32
accumulation; softmax in fp32.

Served: what :func:`.decode_attention.supports` accepts (TurboQuant_mse, 1/2/3/4/8 bits, fp16
norms, head dims 16..256), any GQA ratio, batch, history and chunk length, with plain causal
chunks only (the cache checks the mask, ``tqai_torch.cache._is_causal_chunk``); no visible
ranges (``valid_from`` / ``valid_until``), no logit soft-capping.

Checked: parity with the reference on the H100 (the GPU-marked tests, head dims 16-256) and on
the CPU under Triton's interpreter (no PTX there: the lookups gather; bf16 segments read as
float32, see the launcher); register use from sm_90 compiles. Speed: ``benchmarks/bench_prefill.py``
(H100: long chunks at 0.6-0.9x of SDPA over bf16, 15-21x the reference); ``benchmarks/NOTES.md``
has the numbers and what did not work (the 128-row, 8-warp setting at head dims <= 32).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from tqai.container import QuantizedTensor
from tqai_torch.kernels.triton.decode_attention import (
    _LOG2E,
    _centroids,
    _check_aligned,
    _constants,
    _group_rows,
    _load_groups,
    _unit_stride,
    decode_attention_triton,
    group_layout,
    supports,
)

__all__ = ["prefill_attention_triton"]

_BLOCK_MS = (16, 32, 64, 128)
_BLOCK_NS = (16, 32, 64, 128)
_WARPS = (1, 2, 4, 8)
_METHODS = ("auto", "tiled", "rows")
_OPTIONS = ("method", "block_m", "block_n", "num_warps", "lookup")
_ROWS_MAX_GROUP = 16  # query heads per KV head the decode kernel (the per-row path) takes
TILED_MIN_ROWS = 128
"""``method="auto"`` runs the tiled kernel when the chunk has at least this many query rows per
KV head (``C * G``: 32 tokens at 4 query heads per KV head), else the per-row decode path.
Measured on the H100 (``benchmarks/bench_prefill.py``, K4/V2, 32/8 heads x 128): at 64 rows the
per-row path took 688 us over a 32K history against the tiled kernel's 1425 us, but 599 us
against 418 us over 4K; at 256 rows the tiled kernel won at both (1463 vs 7916 us over 32K). The
switch sits between, where the longer history (the costlier case) favours the rows."""


@triton.jit
def _lookup(
    groups, table_ptr, t0, t1, t2, t3,
    BITS: tl.constexpr, WP: tl.constexpr, BLOCK_N: tl.constexpr, PRMT: tl.constexpr,
):  # fmt: skip
    """Centroids of ``groups`` (``(BLOCK_N, WP)`` packing groups) as ``(BLOCK_N, 8 * WP)`` fp16 in
    dim order: the decode module's byte-permute lookups (``PRMT``), else one gather of all the
    codes at once. (The decode module's gather path, 8 gathered tiles joined, fails to compile
    for sm_90 here: "Illegal shared layout" in TritonGPUOptimizeDotOperands with the Hopper
    products of this kernel, Triton 3.6.)"""
    if PRMT:
        cent = _centroids(groups, table_ptr, t0, t1, t2, t3, BITS, WP, BLOCK_N, PRMT)
    else:
        shift = tl.arange(0, 8).to(groups.dtype) * BITS
        codes = (groups[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
        cent = tl.reshape(tl.load(table_ptr + codes.to(tl.int32)), (BLOCK_N, 8 * WP))
    return cent


@triton.jit
def _unrot_part(out, a, unrot_ptr, k0, K: tl.constexpr, DP: tl.constexpr):
    """``out + a @ unrot[k0 : k0 + K]`` with fp16 operands split in two (``x = hi + lo / 2**11``,
    ``lo`` scaled to stay normal): ``hi @ u_hi + (hi @ u_lo + lo @ u_hi) / 2**11``, about 22
    bits, fp32 accumulation (``a``'s rows of magnitude about one)."""
    u = tl.load(unrot_ptr + (k0 + tl.arange(0, K))[:, None] * DP + tl.arange(0, DP)[None, :])
    u_hi = u.to(tl.float16)
    u_lo = ((u - u_hi.to(tl.float32)) * 2048.0).to(tl.float16)
    a_hi = a.to(tl.float16)
    a_lo = ((a - a_hi.to(tl.float32)) * 2048.0).to(tl.float16)
    small = tl.dot(a_lo, u_hi, tl.dot(a_hi, u_lo))
    return tl.dot(a_hi, u_hi, out + small * (1.0 / 2048.0))


@triton.jit
def _unrotate(acc, unrot_ptr, PDV: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr):
    """``acc @ unrot`` (``(BLOCK_M, PDV) @ (PDV, DP)``, see :func:`_unrot_part`) in products of
    at most 64 rows of ``unrot`` (``acc``'s columns split in halves at compile time), so that
    neither the matrix nor its split parts are ever held whole."""
    out = tl.zeros((BLOCK_M, DP), tl.float32)
    if PDV <= 64:
        out = _unrot_part(out, acc, unrot_ptr, 0, PDV, DP)
    else:
        H: tl.constexpr = PDV // 2
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, H)), (0, 2, 1)))
        if H <= 64:
            out = _unrot_part(out, a0, unrot_ptr, 0, H, DP)
            out = _unrot_part(out, a1, unrot_ptr, H, H, DP)
        else:  # PDV == 256: quarters
            Q: tl.constexpr = H // 2
            a00, a01 = tl.split(tl.permute(tl.reshape(a0, (BLOCK_M, 2, Q)), (0, 2, 1)))
            out = _unrot_part(out, a00, unrot_ptr, 0, Q, DP)
            out = _unrot_part(out, a01, unrot_ptr, Q, Q, DP)
            a10, a11 = tl.split(tl.permute(tl.reshape(a1, (BLOCK_M, 2, Q)), (0, 2, 1)))
            out = _unrot_part(out, a10, unrot_ptr, 2 * Q, Q, DP)
            out = _unrot_part(out, a11, unrot_ptr, 3 * Q, Q, DP)
    return out


@triton.jit
def _segment_block(
    q, acc, m, l_sum, k_base, v_base, k_st, v_st, j0, n_load, lim, qscale,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One block of a full-precision segment (positions ``j0 + [0, BLOCK_N)``, original domain)
    folded into the online softmax. Tokens ``>= n_load`` are not read; with ``MASKED`` row
    ``i`` sees only the tokens ``< lim[i]``, else every token of the block (which must then
    lie wholly below ``n_load``)."""
    toks = j0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, DP)
    ld = (toks < n_load)[:, None] & (dims < D)[None, :]
    k = tl.load(k_base + toks[:, None] * k_st + dims[None, :], mask=ld, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qscale  # (BLOCK_M, BLOCK_N), base 2
    if MASKED:
        s = tl.where(toks[None, :] < lim[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + toks[:, None] * v_st + dims[None, :], mask=ld, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_sum


@triton.jit(do_not_specialize=["T", "C", "n_pre", "n_suf"])
def _prefill_attention_kernel(
    query_ptr,  # (B, Hq, C, D), last stride 1
    stride_qb,
    stride_qh,
    stride_qc,
    qscale,  # scale * log2(e)
    rot_ptr,  # (DP, ROT_COLS) float32: key rotation in dim order, rows >= D zero
    unrot_ptr,  # (PDV, DP) float32: value rotation back, padding zero
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
    T,  # history tokens
    C,  # chunk tokens (the last C of the suffix)
    n_kv,
    kp_sb,  # strides of the packed rows in bytes (B, Hkv) and in packing groups (T; 3 bits: bytes)
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
    pk_ptr,  # prefix keys/values (B, Hkv, n_pre, D), last stride 1, the suffix's dtype
    pv_ptr,
    n_pre,
    pk_sb,
    pk_sh,
    pk_st,
    pv_sb,
    pv_sh,
    pv_st,
    sk_ptr,  # suffix keys/values (B, Hkv, n_suf, D), last stride 1: window, then the chunk
    sv_ptr,
    n_suf,
    sk_sb,
    sk_sh,
    sk_st,
    sv_sb,
    sv_sh,
    sv_st,
    out_ptr,  # (B, Hq, C, D) contiguous, query dtype
    ROT_COLS: tl.constexpr,  # columns of rot (>= 8 * KWP: the decode kernel pads its keys more)
    KB: tl.constexpr,
    KWP: tl.constexpr,
    KWR: tl.constexpr,
    VB: tl.constexpr,
    VWP: tl.constexpr,
    VWR: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KPRMT: tl.constexpr,  # key lookups by byte permutes from registers (else gathers)
    VPRMT: tl.constexpr,
):
    # the tiles of the most tokens (the most suffix to read) start first
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_kv
    h = bh % n_kv
    PDK: tl.constexpr = 8 * KWP
    PDV: tl.constexpr = 8 * VWP
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = C * G
    row_ok = r < n_rows
    tok = r // G  # the row's chunk token
    q_row = query_ptr + b * stride_qb + (h * G + r % G) * stride_qh + tok * stride_qc
    # 1. the queries, scaled and rotated into the keys' domain, 32 dims of the rotation at once
    q = tl.zeros((BLOCK_M, PDK), tl.float32)
    for d0 in range(0, DP, 32):
        dims = d0 + tl.arange(0, 32)
        q_c = tl.load(
            q_row[:, None] + dims[None, :],
            mask=row_ok[:, None] & (dims < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        rot = tl.load(
            rot_ptr + dims[:, None] * ROT_COLS + tl.arange(0, PDK)[None, :],
            mask=(dims < DP)[:, None],  # DP may be 16
            other=0.0,
        )
        q = tl.dot(q_c, rot, q, input_precision="tf32x3")
    q = (q * qscale).to(tl.float16)  # (BLOCK_M, PDK)
    # 2. the packed history, every token visible to every row
    kp_row = _group_rows(kp_ptr + b * kp_sb + h * kp_sh, KB)
    vp_row = _group_rows(vp_ptr + b * vp_sb + h * vp_sh, VB)
    kn_row = kn_ptr + b * kn_sb + h * kn_sh
    vn_row = vn_ptr + b * vn_sb + h * vn_sh
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, PDV), tl.float32)
    toks = tl.arange(0, BLOCK_N)
    valid = toks < T
    ku = _load_groups(kp_row + toks * kp_su, valid, KB, KWP, KWR)
    kn = tl.load(kn_row + toks * kn_st, mask=valid, other=0.0)
    vu = _load_groups(vp_row + toks * vp_su, valid, VB, VWP, VWR)
    vn = tl.load(vn_row + toks * vn_st, mask=valid, other=0.0)
    for _ in range(0, T, BLOCK_N):
        toks_nx = toks + BLOCK_N
        valid_nx = toks_nx < T
        ku_nx = _load_groups(kp_row + toks_nx * kp_su, valid_nx, KB, KWP, KWR)
        kn_nx = tl.load(kn_row + toks_nx * kn_st, mask=valid_nx, other=0.0)
        vu_nx = _load_groups(vp_row + toks_nx * vp_su, valid_nx, VB, VWP, VWR)
        vn_nx = tl.load(vn_row + toks_nx * vn_st, mask=valid_nx, other=0.0)
        k = _lookup(ku, kt_ptr, kt0, kt1, kt2, kt3, KB, KWP, BLOCK_N, KPRMT)
        s = tl.dot(q, tl.trans(k)) * kn.to(tl.float32)[None, :]  # (BLOCK_M, BLOCK_N), base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = _lookup(vu, vt_ptr, vt0, vt1, vt2, vt3, VB, VWP, BLOCK_N, VPRMT)
        pv = (p * vn.to(tl.float32)[None, :]).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(pv, v)
        m = m_new
        toks, valid, ku, kn, vu, vn = toks_nx, valid_nx, ku_nx, kn_nx, vu_nx, vn_nx
    # 3. back to the original domain (linear: the softmax rescaling commutes with it), as the
    # weighted mean (rows of magnitude about one) times the sum
    acc = (
        _unrotate(acc / l_sum[:, None], unrot_ptr, PDV, DP, BLOCK_M) * l_sum[:, None]
    )  # (BLOCK_M, DP)
    # 4. full-precision segments with the original-domain query in their dtype
    dims = tl.arange(0, DP)
    qo = tl.load(
        q_row[:, None] + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0
    ).to(sk_ptr.dtype.element_ty)
    pk_base = pk_ptr + b * pk_sb + h * pk_sh
    pv_base = pv_ptr + b * pv_sb + h * pv_sh
    everyone = tl.full((BLOCK_M,), 0, tl.int32) + n_pre  # sinks: all visible to every row
    for j0 in range(0, n_pre, BLOCK_N):  # (masked: the last block is partial)
        acc, m, l_sum = _segment_block(
            qo, acc, m, l_sum, pk_base, pv_base, pk_st, pv_st, j0, n_pre, everyone, qscale,
            D, DP, BLOCK_N, True,
        )  # fmt: skip
    sk_base = sk_ptr + b * sk_sb + h * sk_sh
    sv_base = sv_ptr + b * sv_sb + h * sv_sh
    w = n_suf - C  # full-precision window before the chunk's tokens
    first_tok = (tile * BLOCK_M) // G
    last_tok = (tl.minimum(tile * BLOCK_M + BLOCK_M, n_rows) - 1) // G
    # positions < w + first_tok + 1 are visible to every row of the tile
    open_end = ((w + first_tok + 1) // BLOCK_N) * BLOCK_N
    for j0 in range(0, open_end, BLOCK_N):
        acc, m, l_sum = _segment_block(
            qo, acc, m, l_sum, sk_base, sv_base, sk_st, sv_st, j0, n_suf, everyone, qscale,
            D, DP, BLOCK_N, False,  # whole blocks before every row's own token
        )  # fmt: skip
    lim = w + tok + 1  # row i sees suffix positions < lim[i]
    for j0 in range(open_end, w + last_tok + 1, BLOCK_N):
        acc, m, l_sum = _segment_block(
            qo, acc, m, l_sum, sk_base, sv_base, sk_st, sv_st, j0, n_suf, lim, qscale,
            D, DP, BLOCK_N, True,
        )  # fmt: skip
    # 5. normalize and store
    out = acc / l_sum[:, None]
    out_row = out_ptr + ((b * n_kv * G + h * G + r % G) * C + tok) * D
    tl.store(
        out_row[:, None] + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dims < D)[None, :],
    )


def _segment(
    seg: tuple[torch.Tensor, torch.Tensor] | None,
    name: str,
    shape: tuple[int, int, int],
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A full-precision segment checked (``(B, Hkv, n, D)`` keys and values) and made readable
    by the kernel (last stride 1, ``dtype``); None when absent or empty."""
    if seg is None:
        return None
    k, v = seg
    b, hkv, d = shape
    for part, t in (("keys", k), ("values", v)):
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, hkv, d):
            raise ValueError(
                f"{name} {part} must be (B={b}, Hkv={hkv}, n, D={d}), got {tuple(t.shape)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} {part} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{name} keys and values differ in length: {k.shape[2]} vs {v.shape[2]}")
    if not k.shape[2]:
        return None
    if dtype is None:
        dtype = k.dtype
    k, v = k.to(dtype), v.to(dtype)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return k, v


def prefill_attention_triton(
    query: torch.Tensor,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    key_quantizer: Any,
    value_quantizer: Any,
    *,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    suffix: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kernel_options: Any,
) -> torch.Tensor:
    """Causal attention of a chunk ``query (B, Hq, C, D)`` whose tokens are the last ``C`` of
    ``suffix``.

    Positions: ``prefix`` (sinks, ``(B, Hkv, P, D)``), then the packed history (``T >= 1``
    tokens), then ``suffix`` (``(B, Hkv, W + C, D)``: the full-precision window, then the
    chunk). Query ``c`` sees every position up to its own, ``P + T + W + c``. Same inputs and
    output as :func:`tqai.attention.compressed_attention` with that causal mask.

    ``kernel_options``:

    - ``method``: ``"tiled"`` (this module's kernel), ``"rows"`` (the decode kernel with one
      row per query token, :func:`_prefill_by_rows`: splits the history over programs, so it
      keeps the GPU busy when the chunk has few rows, but reads the history once per token) or
      ``"auto"`` (default): ``"tiled"`` when the chunk has at least :data:`TILED_MIN_ROWS`
      query rows per KV head (or not on CUDA, or more than 16 query heads per KV head), else
      ``"rows"`` (the switch measured on the H100, see :data:`TILED_MIN_ROWS`);
    - ``block_m`` (query rows per program: 16/32/64/128; default 128, 32 for rows of more than
      128 kernel columns, i.e. head dims above 128, 64 for head dims <= 32), ``block_n``
      (history and segment tokens per step: 16/32/64/128; default 64, 32 above 128 columns or
      at head dims <= 32), ``num_warps`` (1/2/4/8; default 8, 4 at head dims <= 32): chosen from
      register counts of sm_90 compiles (``benchmarks/NOTES.md``, session 4: no spills at d <=
      128, 24 bytes of stack at d = 256), not from timings. Head dims <= 32 refuse
      ``block_m > 64`` or ``num_warps > 4`` (wrong values measured on the H100);
    - ``lookup``: ``"auto"`` (byte-permute lookups where they serve, on CUDA) or ``"gather"``
      (centroids always read from memory).

    Anything else, such as a visible range (``valid_from`` / ``valid_until``), is refused:
    only plain causal chunks are served. ``"rows"`` takes ``lookup`` (and ``block_n`` /
    ``num_warps`` when given) and passes them to the decode kernel.

    Returns:
        ``(B, Hq, C, D)`` in ``query``'s dtype.
    """
    unknown = sorted(set(kernel_options) - set(_OPTIONS))
    if unknown:
        raise ValueError(
            f"kernel_options {unknown} not understood: the prefill kernel serves plain causal "
            f"chunks and takes only {list(_OPTIONS)}"
        )
    if query.dim() != 4:
        raise ValueError(f"query must be (B, Hq, C, D), got shape {tuple(query.shape)}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    b, hq, c, d = query.shape
    if keys is None or keys.shape[2] == 0:
        raise ValueError("keys must hold a packed history of at least one token")
    n_kv = keys.shape[1]
    if keys.shape[0] != b or tuple(values.shape[:3]) != tuple(keys.shape[:3]):
        raise ValueError(
            f"keys / values must be (B={b}, Hkv, T) alike, got {tuple(keys.shape[:3])} and "
            f"{tuple(values.shape[:3])}"
        )
    if not supports(key_quantizer, value_quantizer, d):
        raise ValueError(
            f"key_quantizer / value_quantizer ({key_quantizer.spec}, {value_quantizer.spec}) "
            f"with head dim {d} are not served by the fused kernel; check supports() first"
        )
    if hq % n_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({n_kv})")
    g = hq // n_kv
    n_suffix = 0 if suffix is None else suffix[0].shape[2]
    if suffix is None or n_suffix < c or c < 1:
        raise ValueError(
            f"suffix must end with the chunk's {c} tokens (window + chunk), got "
            f"{n_suffix} suffix tokens"
        )
    device = query.device
    cst = _constants(key_quantizer, value_quantizer, device)
    kb, vb = key_quantizer.spec.n_bits, value_quantizer.spec.n_bits
    # keys in dim order as the values: 8 * WP >= 16 columns (the decode kernel pads its key rows
    # to 16 groups for its per-code-position products; its rotation has those extra columns)
    kwp, kwr = group_layout(kb, d)
    vwp, vwr = cst.v_layout
    wide = max(8 * kwp, 8 * vwp) > 128
    # head dims <= 32: on the H100 the 128-row, 8-warp setting returned wrong values (relative
    # error ~1 at head_dim 16 and 32, Triton 3.6) while 64/32/4 matched the reference
    narrow = max(8 * kwp, 8 * vwp) <= 32
    method = kernel_options.get("method", "auto")
    block_m = kernel_options.get("block_m", 32 if wide else 64 if narrow else 128)
    block_n = kernel_options.get("block_n", 32 if wide or narrow else 64)
    num_warps = kernel_options.get("num_warps", 4 if narrow else 8)
    lookup = kernel_options.get("lookup", "auto")
    for name, value, allowed in (
        ("method", method, _METHODS),
        ("block_m", block_m, _BLOCK_MS),
        ("block_n", block_n, _BLOCK_NS),
        ("num_warps", num_warps, _WARPS),
        ("lookup", lookup, ("auto", "gather")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if narrow and (block_m > 64 or num_warps > 4):
        raise ValueError(
            f"head_dim {d}: block_m must be <= 64 and num_warps <= 4 (the wider settings "
            f"returned wrong values on the H100), got block_m={block_m}, num_warps={num_warps}"
        )
    grid = (math.ceil(c * g / block_m), b * n_kv)
    if method == "auto":
        few = device.type == "cuda" and c * g < TILED_MIN_ROWS
        method = "rows" if few and g <= _ROWS_MAX_GROUP else "tiled"
    if method == "rows":
        options = {k: kernel_options[k] for k in ("block_n", "num_warps") if k in kernel_options}
        return _prefill_by_rows(
            query, keys, values, key_quantizer, value_quantizer,
            scale=scale, prefix=prefix, suffix=suffix, lookup=lookup, **options,
        )  # fmt: skip
    seg_dtype = suffix[0].dtype
    if device.type == "cpu" and seg_dtype == torch.bfloat16:
        # Triton's interpreter (CPU tensors) multiplies bf16 dot operands wrongly (3.6: as raw
        # bits): there the segments are read as float32
        seg_dtype = torch.float32
    suffix = _segment(suffix, "suffix", (b, n_kv, d), seg_dtype)
    prefix = _segment(prefix, "prefix", (b, n_kv, d), seg_dtype)
    _check_aligned(keys, "keys")
    _check_aligned(values, "values")
    if query.stride(-1) != 1:
        query = query.contiguous()
    # byte-permute lookups need PTX (not the interpreter) and a 2-bit or symmetric 4-bit table
    prmt = lookup == "auto" and device.type == "cuda"
    kprmt, vprmt = prmt and cst.k_regs is not None, prmt and cst.v_regs is not None
    k_regs = cst.k_regs if kprmt else (0, 0, 0, 0)
    v_regs = cst.v_regs if vprmt else (0, 0, 0, 0)
    sk, sv = suffix
    pk, pv = prefix if prefix is not None else suffix  # a dummy of the right dtype when absent
    n_pre = 0 if prefix is None else pk.shape[2]
    kp, kn, vp, vn = keys.packed, keys.norms, values.packed, values.norms
    out = torch.empty(b, hq, c, d, device=device, dtype=query.dtype)
    _prefill_attention_kernel[grid](
        query, query.stride(0), query.stride(1), query.stride(2), scale * _LOG2E,
        cst.rot, cst.unrot,
        kp, kn, vp, vn, cst.k_table, cst.v_table, *k_regs, *v_regs,
        keys.shape[2], c, n_kv,
        kp.stride(0), kp.stride(1), _unit_stride(kp, kb),
        kn.stride(0), kn.stride(1), kn.stride(2),
        vp.stride(0), vp.stride(1), _unit_stride(vp, vb),
        vn.stride(0), vn.stride(1), vn.stride(2),
        pk, pv, n_pre, *pk.stride()[:3], *pv.stride()[:3],
        sk, sv, sk.shape[2], *sk.stride()[:3], *sv.stride()[:3],
        out,
        ROT_COLS=cst.rot.shape[1], KB=kb, KWP=kwp, KWR=kwr, VB=vb, VWP=vwp, VWR=vwr,
        G=g, D=d, DP=cst.dp, BLOCK_M=block_m, BLOCK_N=block_n, KPRMT=kprmt, VPRMT=vprmt,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def _prefill_by_rows(
    query: torch.Tensor,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    key_quantizer: Any,
    value_quantizer: Any,
    *,
    scale: float,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    suffix: tuple[torch.Tensor, torch.Tensor],
    **decode_options: Any,
) -> torch.Tensor:
    """The chunk through the decode kernel: the ``C`` tokens become ``C`` one-token query rows
    per sequence (``rows_per_seq=C``: row ``r`` reads sequence ``r // C``'s history, nothing
    copied), each row's visible range (``valid_until``) ending at its own position. The history
    is split over programs (the decode kernel's splits), but read once per query token."""
    b, _, c, _ = query.shape
    n_prefix = 0 if prefix is None else prefix[0].shape[2]
    first_own = n_prefix + keys.shape[2] + suffix[0].shape[2] - c  # position of token 0
    until = torch.arange(first_own + 1, first_own + c + 1, device=query.device)
    # (B, Hq, C, D) -> (B * C, Hq, 1, D): row b * C + i is token i of sequence b
    rows = query.transpose(1, 2).reshape(b * c, query.shape[1], 1, query.shape[3])
    out = decode_attention_triton(
        rows,
        keys,
        values,
        key_quantizer,
        value_quantizer,
        scale=scale,
        prefix=prefix,
        suffix=suffix,
        valid_until=until.repeat(b),
        rows_per_seq=c,
        **decode_options,
    )
    return out.reshape(b, c, query.shape[1], query.shape[3]).transpose(1, 2)

"""Fused decode attention over packed TurboQuant codes (Triton), flash-decoding style.

Reference: :func:`tqai.attention.compressed_attention` (the parity tests compare against it).

One query token per sequence. The history of every KV head is split across programs
(``grid = (batch * kv_heads, splits)``); each program walks its share in blocks of ``BLOCK_N``
tokens, unpacks the key codes of the block straight from the packed bytes (layout of
:mod:`tqai.packing`: for ``b`` in 1, 2, 4, 8 code ``i`` sits at bit ``(i b) % 8`` of byte
``i b / 8``), looks the centroids up, scores all the query heads of the group against them in the
rotated domain (``G`` rows, padded to 16 for ``tl.dot``), keeps an online softmax, and
accumulates the values' centroids times their norms in the values' rotated domain. A second
small pass (plain torch) merges the splits with the full-precision segments (sinks, window,
staged tokens) by log-sum-exp and rotates the result back once.

Supported here: TurboQuant_mse keys and values with 1, 2, 4 or 8 bits, no mask (every token
visible), no logit soft-capping. Everything else goes through the reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["SUPPORTED_BITS", "decode_attention_triton", "supports"]

SUPPORTED_BITS = (1, 2, 4, 8)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # (BH, GP, D) float32, rotated and scaled queries, rows >= G are zero
    kp_ptr,  # (BH, T, LK) uint8 packed key codes
    kn_ptr,  # (BH, T) key norms
    vp_ptr,  # (BH, T, LV) uint8 packed value codes
    vn_ptr,  # (BH, T) value norms
    kc_ptr,  # (2**BK,) float32 key centroids
    vc_ptr,  # (2**BV,) float32 value centroids
    m_ptr,  # (BH, S, GP) float32 out: running max
    l_ptr,  # (BH, S, GP) float32 out: normalizer
    acc_ptr,  # (BH, S, GP, D) float32 out: value sums (rotated domain)
    T,
    stride_kp_bh,
    stride_vp_bh,
    stride_kn_bh,
    stride_vn_bh,
    LK: tl.constexpr,
    LV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    D: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # tokens per program, a multiple of BLOCK_N
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + bh * GP * D + rows[:, None] * D + dims[None, :])
    k_byte = (dims * BK) // 8
    k_shift = (dims * BK) % 8
    v_byte = (dims * BV) // 8
    v_shift = (dims * BV) % 8
    start = split * SPLIT
    stop = tl.minimum(start + SPLIT, T)
    m = tl.full((GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for block in range(0, SPLIT, BLOCK_N):
        toks = start + block + tl.arange(0, BLOCK_N)
        valid = toks < stop
        kb = tl.load(
            kp_ptr + bh * stride_kp_bh + toks[:, None] * LK + k_byte[None, :],
            mask=valid[:, None],
            other=0,
        ).to(tl.int32)
        k_codes = (kb >> k_shift[None, :]) & ((1 << BK) - 1)
        k = tl.load(kc_ptr + k_codes)  # (BLOCK_N, D) centroids
        kn = tl.load(kn_ptr + bh * stride_kn_bh + toks, mask=valid, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * kn[None, :]  # (GP, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        vb = tl.load(
            vp_ptr + bh * stride_vp_bh + toks[:, None] * LV + v_byte[None, :],
            mask=valid[:, None],
            other=0,
        ).to(tl.int32)
        v_codes = (vb >> v_shift[None, :]) & ((1 << BV) - 1)
        vn = tl.load(vn_ptr + bh * stride_vn_bh + toks, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + v_codes) * vn[:, None]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    out = (bh * n_splits + split) * GP
    tl.store(m_ptr + out + rows, m)
    tl.store(l_ptr + out + rows, l_sum)
    tl.store(acc_ptr + (out + rows[:, None]) * D + dims[None, :], acc)


def supports(key_quantizer: Any, value_quantizer: Any, head_dim: int) -> bool:
    """Whether the fused kernel serves this configuration (else use the reference)."""
    return (
        key_quantizer.spec.kind == "mse"
        and value_quantizer.spec.kind == "mse"
        and key_quantizer.spec.n_bits in SUPPORTED_BITS
        and value_quantizer.spec.n_bits in SUPPORTED_BITS
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def _segment_state(q_rot: torch.Tensor, segments: list, key_q: Any, value_q: Any):
    """Scores and rotated values of the full-precision segments: (m, l, acc) per row."""
    k = torch.cat([s[0] for s in segments], 2).float()
    v = torch.cat([s[1] for s in segments], 2).float()
    k_rot = key_q.rotation.rotate(k)
    v_rot = value_q.rotation.rotate(v)
    scores = q_rot @ k_rot.transpose(-1, -2)  # (B, H, G, S)
    m = scores.amax(-1)
    p = torch.exp(scores - m[..., None])
    return m, p.sum(-1), p @ v_rot


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
    block_n: int = 32,
    tokens_per_split: int | None = None,
) -> torch.Tensor:
    """Decode attention ``query (B, Hq, 1, D)`` over packed history + full-precision segments.

    Same inputs and output as :func:`tqai.attention.compressed_attention` with ``mask=None``.
    ``tokens_per_split`` defaults to a split that gives every SM about four programs.
    """
    b, hq, tq, d = query.shape
    if tq != 1:
        raise ValueError(f"the fused decode kernel takes one query token, got {tq}")
    n_kv = keys.shape[1]
    g = hq // n_kv
    gp = max(16, triton.next_power_of_2(g))
    t = keys.shape[2]
    q = (query.float() * scale).reshape(b, n_kv, g, d)
    q_rot = key_quantizer.rotation.rotate(q)
    q_pad = torch.zeros(b * n_kv, gp, d, device=query.device, dtype=torch.float32)
    q_pad[:, :g] = q_rot.reshape(b * n_kv, g, d)
    if tokens_per_split is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        want = max(1, math.ceil(4 * sms / (b * n_kv)))
        tokens_per_split = math.ceil(t / want)
    tokens_per_split = max(block_n, math.ceil(tokens_per_split / block_n) * block_n)
    splits = max(1, math.ceil(t / tokens_per_split))
    m = torch.empty(b * n_kv, splits, gp, device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * n_kv, splits, gp, d, device=query.device, dtype=torch.float32)
    kp = keys.packed.reshape(b * n_kv, t, -1)
    vp = values.packed.reshape(b * n_kv, t, -1)
    kn = keys.norms.reshape(b * n_kv, t)
    vn = values.norms.reshape(b * n_kv, t)
    kc = key_quantizer.constant("centroids", q_pad)
    vc = value_quantizer.constant("centroids", q_pad)
    _decode_attention_kernel[(b * n_kv, splits)](
        q_pad, kp, kn, vp, vn, kc, vc, m, l_sum, acc,
        t,
        kp.stride(0), vp.stride(0), kn.stride(0), vn.stride(0),
        LK=kp.shape[-1], LV=vp.shape[-1], BK=key_quantizer.spec.n_bits,
        BV=value_quantizer.spec.n_bits, D=d, GP=gp, BLOCK_N=block_n, SPLIT=tokens_per_split,
    )  # fmt: skip
    m = m[..., :g].reshape(b, n_kv, splits, g)
    l_sum = l_sum[..., :g].reshape(b, n_kv, splits, g)
    acc = acc[..., :g, :].reshape(b, n_kv, splits, g, d)
    segments = [s for s in (prefix, suffix) if s is not None and s[0].shape[2]]
    if segments:
        m_s, l_s, acc_s = _segment_state(q_rot, segments, key_quantizer, value_quantizer)
        m = torch.cat([m, m_s[:, :, None]], 2)
        l_sum = torch.cat([l_sum, l_s[:, :, None]], 2)
        acc = torch.cat([acc, acc_s[:, :, None]], 2)
    m_all = m.amax(2, keepdim=True)
    w = torch.exp(m - m_all)  # empty splits have m = -inf and weigh 0
    total = (l_sum * w).sum(2)
    out_rot = (acc * w[..., None]).sum(2) / total[..., None]
    out = value_quantizer.rotation.unrotate(out_rot)
    return out.reshape(b, hq, 1, d).to(query.dtype)

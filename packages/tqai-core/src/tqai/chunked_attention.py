"""Exact softmax attention in blocks with an online softmax: memory O(chunk^2), not O(T^2).

Why it is shaped like this: plain attention materializes the ``(Tq, T)`` score matrix; at a
prefill of ``T`` tokens that is ``T^2`` floats per head, which dominates peak memory at long
context. Walking queries in blocks of ``query_chunk_size`` and keys in chunks of ``chunk_size``
with the FlashAttention recurrence (Dao et al. 2022, arXiv:2205.14135; the running max,
normalizer and accumulator of :class:`tqai.attention._OnlineSoftmax`, the one online softmax of
tqai) gives the same result with scores of one ``(query block, key chunk)`` tile at a time.
This is the reference: pure array API, float32 math, on any namespace (numpy, torch, mlx.core).
It is not fast: a fused kernel (torch SDPA / FlashAttention, ``mx.fast.scaled_dot_product_attention``)
does the same tiling in one launch and wins wherever it is available (benchmarks/bench_chunked.py).

Exactness: with one block and one chunk covering everything the operations are exactly those of
:func:`tqai.attention.attention_reference` (bitwise equal results); with smaller chunks the
result differs only by float rounding of the rescaled sums. Key chunks that the mask blocks
entirely (the causal upper triangle) are skipped: folding one in would multiply by exactly 1 and
add exactly 0, so skipping changes no bit.

Shapes: ``query (B, Hq, Tq, D)``, ``key``/``value`` ``(B, Hkv, T, D)`` with ``Hq`` a multiple of
``Hkv`` (GQA/MQA, never repeated in memory); boolean ``mask (B|1, 1|Hq, Tq, T)``, True = attend.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tqai import _xp
from tqai.attention import _capped, _group, _group_mask, _masked, _OnlineSoftmax

__all__ = ["chunked_attention"]


def _check_chunk(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def chunked_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    scale: float,
    mask: Any | None = None,
    softcap: float | None = None,
    chunk_size: int = 1024,
    query_chunk_size: int | None = None,
    xp: ModuleType | None = None,
) -> Any:
    """Softmax attention computed tile by tile with an online softmax (exact).

    Args:
        query: ``(B, Hq, Tq, D)`` floating queries.
        key, value: ``(B, Hkv, T, D)``.
        scale: softmax scale (usually ``1 / sqrt(D)``).
        mask: boolean ``(B|1, 1|Hq, Tq, T)``, True = attend, or None (attend to everything).
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before the mask.
        chunk_size: keys per online-softmax step.
        query_chunk_size: queries per block (default ``chunk_size``).

    Returns:
        ``(B, Hq, Tq, D)`` in ``query``'s dtype. Rows with every key masked give 0.

    Raises:
        ValueError: chunk sizes below 1, ``Hq`` not a multiple of ``Hkv``, or shapes that do not
            fit together.

    Example:
        >>> import numpy as np
        >>> q = k = v = np.ones((1, 2, 5, 4), np.float32)
        >>> chunked_attention(q, k, v, scale=0.5, chunk_size=2).shape
        (1, 2, 5, 4)
    """
    xp = _xp.namespace(query, xp=xp)
    chunk_size = _check_chunk(chunk_size, "chunk_size")
    q_chunk = _check_chunk(
        chunk_size if query_chunk_size is None else query_chunk_size, "query_chunk_size"
    )
    b, hq, tq, d = query.shape
    n_kv, t = key.shape[1], key.shape[2]
    if hq % n_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({n_kv})")
    if tuple(value.shape[:3]) != tuple(key.shape[:3]) or key.shape[3] != d:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must be (B, Hkv, T, D) with "
            f"the query's D={d}"
        )
    if mask is not None and (mask.shape[-2] != tq or mask.shape[-1] != t):
        raise ValueError(f"mask must be (B|1, 1|Hq, {tq}, {t}), got {tuple(mask.shape)}")
    blocks = []
    for q0 in range(0, tq, q_chunk):
        q1 = min(q0 + q_chunk, tq)
        q = _group(xp.astype(query[:, :, q0:q1, :], xp.float32), n_kv, xp) * scale
        block_mask = None if mask is None else _group_mask(mask[..., q0:q1, :], n_kv, hq, xp)
        state = _OnlineSoftmax((b, n_kv, q.shape[2]), xp, q)
        for k0 in range(0, t, chunk_size):
            k1 = min(k0 + chunk_size, t)
            if block_mask is not None and not bool(xp.any(block_mask[..., k0:k1])):
                continue
            scores = q @ xp.matrix_transpose(xp.astype(key[:, :, k0:k1, :], xp.float32))
            scores = _capped(scores, softcap, xp)
            if block_mask is not None:
                scores = _masked(scores, block_mask, k0, k1, xp)
            state.step(scores, {"v": xp.astype(value[:, :, k0:k1, :], xp.float32)})
        acc = state.accs.get("v")
        if acc is None:  # every key of the block is masked
            acc = xp.zeros((*state.l.shape, d), dtype=xp.float32, device=_xp.device_of(q))
        l_safe = xp.where(state.l > 0, state.l, xp.ones_like(state.l))
        out = acc / l_safe[..., None]
        blocks.append(xp.reshape(out, (b, hq, q1 - q0, d)))
    out = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=2)
    return xp.astype(out, query.dtype)

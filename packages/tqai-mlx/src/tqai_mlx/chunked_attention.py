"""Chunked attention for mlx-lm models (``tqai_mlx.patch(model, chunk_attention=True)``).

Why it is shaped like this: mlx-lm routes every attention call through
``mlx_lm.models.base.scaled_dot_product_attention``, which tqai-mlx already replaces with a
dispatcher while a model is patched (:mod:`tqai_mlx.patching`). The dispatcher routes by the
call's cache, so ``chunk_attention`` is a mark on the caches a patched model's ``make_cache()``
builds (``CHUNK_ATTR``, the chunk size): calls with a marked cache that do not read compressed
codes (sliding-window and skipped layers, the ``full`` strategy) are computed by
:func:`chunked_scaled_dot_product_attention`, the core's exact tile-by-tile online softmax
(:func:`tqai.chunked_attention.chunked_attention`) on ``mlx.core`` arrays. Calls reading codes
are chunked already (:func:`tqai.attention.compressed_attention`). Calls with attention-sink
logits or an additive (non-boolean) mask keep mlx's own attention.

Honest note: ``mx.fast.scaled_dot_product_attention`` is a fused kernel that already tiles
internally; a Python loop over chunks launches one small graph per tile and is slower wherever
that kernel runs. The chunked path is the reference, for memory-bounded runs and for tests.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from tqai.chunked_attention import chunked_attention

__all__ = ["CHUNK_ATTR", "boolean_mask", "chunked_scaled_dot_product_attention", "supports"]

CHUNK_ATTR = "_tqai_chunk_attention"


def supports(mask: Any, sinks: Any) -> bool:
    """Whether the chunked path serves a call with this mask and sinks (else mlx's own does)."""
    if sinks is not None:
        return False
    return mask is None or isinstance(mask, str) or mask.dtype == mx.bool_


def boolean_mask(mask: Any, tq: int, t: int) -> mx.array | None:
    """mlx-lm's ``None`` / ``"causal"`` / boolean mask as a 4-D boolean ``(.., Tq, T)`` mask."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        rows = mx.arange(tq)[:, None] + (t - tq)
        return (mx.arange(t)[None, :] <= rows)[None, None]
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[-2] != tq:
        mask = mx.broadcast_to(mask, (*mask.shape[:-2], tq, t))
    return mask


def chunked_scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Any,
    chunk_size: int,
) -> mx.array:
    """``queries (B, Hq, Tq, D)``, ``keys/values (B, Hkv, T, D)`` -> ``(B, Hq, Tq, D)``."""
    m = boolean_mask(mask, queries.shape[2], keys.shape[2])
    return chunked_attention(queries, keys, values, scale=scale, mask=m, chunk_size=chunk_size)

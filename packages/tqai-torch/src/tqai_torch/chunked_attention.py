"""Chunked attention for transformers models (``tqai.patch(model, chunk_attention=True)``).

Why it is shaped like this: the ``"tqai"`` attention implementation already serves every
attention call of a patched model. Calls that read a compressed layer are computed from the
codes, chunk by chunk (:func:`tqai.attention.compressed_attention`, whose full-precision
segments are chunked too). With ``chunk_attention=True`` the remaining calls, which would go to
the model's previous implementation (sliding-window and skipped layers, the ``full`` strategy, a
forward pass without a cache), go to :func:`chunked_attention_forward` instead: the core's
exact tile-by-tile online softmax (:func:`tqai.chunked_attention.chunked_attention`) in torch
ops, so no ``(Tq, T)`` score matrix is ever built. It is the reference, not a fused kernel:
where torch's SDPA has a memory-efficient or flash backend (CUDA), SDPA is faster at the same
memory (benchmarks/bench_chunked.py says by how much).

Example:
    >>> cache = tqai_torch.patch(model, chunk_attention=True, chunk_size=512)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from tqai.chunked_attention import chunked_attention

__all__ = ["CHUNK_ATTR", "chunked_attention_forward"]

CHUNK_ATTR = "_tqai_chunk_attention"
"""Attribute of the model config holding the chunk size while chunked attention is on."""


def chunked_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query (B, Hq, Tq, D)``, ``key/value (B, Hkv, T, D)``,
    returns ``(B, Tq, Hq, D)`` like sdpa. Masks as the ``"tqai"`` mask function builds them
    (boolean, True = attend) or additive; None means causal when ``module.is_causal``."""
    from tqai_torch.attention import _boolean_mask

    if dropout and module.training:
        raise ValueError("chunk_attention supports inference only (dropout > 0 in training mode)")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"chunk_attention does not support attention sinks ({type(module)})")
    tq, t = query.shape[2], key.shape[2]
    if attention_mask is None and not getattr(module, "is_causal", True):
        mask = None
    else:
        mask = _boolean_mask(attention_mask, tq, t, query.device)
        if mask.shape[-2] != tq:
            mask = mask.expand(*mask.shape[:-2], tq, t)
    chunk = getattr(module.config, CHUNK_ATTR)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = chunked_attention(
        query, key, value, scale=scale, mask=mask, softcap=kwargs.get("softcap"), chunk_size=chunk
    )
    return out.transpose(1, 2).contiguous(), None

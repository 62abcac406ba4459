"""The ``"tqai"`` attention implementation for transformers' ``AttentionInterface``.

Why it is shaped like this: transformers models call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)``
right after ``cache.update``. A :class:`tqai_torch.cache.TqaiLayer` tags the key tensor it
returns with itself; this function finds the tag and lets the layer compute attention from its
packed codes. Untagged calls (sliding-window layers, skipped layers, the ``full`` strategy, a
forward pass without a cache) go to the implementation the model had before it was patched, so a
patched model behaves exactly as before wherever tqai does not compress.

The mask function registered under the same name is transformers' sdpa mask with the causal skip
turned off, so the attention always receives an explicit boolean mask (True = attend).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["ATTN_IMPLEMENTATION", "register", "tqai_attention_forward"]

ATTN_IMPLEMENTATION = "tqai"
_FALLBACK_ATTR = "_tqai_fallback_attn"


def _boolean_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """A boolean ``(B|1, 1|H, Tq, kv)`` mask, True = attend, from any transformers mask form."""
    if mask is None:
        offset = kv_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + offset
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive mask: 0 keeps, min drops
    return mask[..., -kv_len:]


def tqai_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a tqai layer's packed codes; ``(B, Tq, Hq, D)`` like transformers' sdpa."""
    layer = getattr(key, "_tqai_layer", None)
    if layer is None:
        fallback = getattr(module.config, _FALLBACK_ATTR, "sdpa")
        return ALL_ATTENTION_FUNCTIONS[fallback](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("tqai attention does not support attention logit softcapping yet")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kv_len = layer.store.length
    mask = _boolean_mask(attention_mask, query.shape[2], kv_len, query.device)
    out = layer.attend(query, mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the ``"tqai"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, tqai_attention_forward)

    def tqai_mask(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)

    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tqai_mask)

"""The ``"tqai"`` attention implementation for transformers' ``AttentionInterface``.

Why it is shaped like this: transformers models call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)``
right after ``cache.update``. A :class:`tqai_torch.cache.TqaiLayer` tags the key tensor it
returns with itself; this function finds the tag and lets the layer compute attention from its
packed codes. Untagged calls (sliding-window layers, skipped layers, the ``full`` strategy, a
forward pass without a cache) go to the implementation the model had before it was patched, so a
patched model behaves exactly as before wherever tqai does not compress.

The mask function registered under the same name is transformers' sdpa mask with the causal skip
turned off for queries of several tokens, so those always receive an explicit boolean mask (True =
attend). A one-token query with nothing padded gets no mask (transformers' skip): every held
position is visible, so a decode step builds no mask and the cache never reads one back to the
host (a device-to-host copy per layer and step otherwise, which stalls the host's run-ahead).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tqai_torch.chunked_attention import CHUNK_ATTR, chunked_attention_forward

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


def _fallback(module: torch.nn.Module) -> tuple[Any, bool]:
    """The attention the model had before patching, and whether it takes an additive mask.

    A registered implementation (sdpa, flash, flex) is looked up by name; ``"eager"`` is the
    model's own ``eager_attention_forward``, which adds its mask to the scores.
    """
    name = getattr(module.config, _FALLBACK_ATTR, "sdpa")
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name], False
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(
            f"{type(module).__name__} used attention {name!r}, which tqai cannot call back"
        )
    return eager, True


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
    if layer is None and getattr(module.config, CHUNK_ATTR, None):
        return chunked_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if layer is None:
        fallback, additive = _fallback(module)
        if additive and attention_mask is not None and attention_mask.dtype == torch.bool:
            # Eager attention adds its mask; the "tqai" mask function builds sdpa's boolean one.
            blocked = torch.finfo(query.dtype).min
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, blocked
            )
        return fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kv_len = layer.store.length
    if attention_mask is None and query.shape[2] == 1:
        mask = None  # one query token, nothing padded: every held position is visible
    else:
        mask = _boolean_mask(attention_mask, query.shape[2], kv_len, query.device)
    out = layer.attend(query, mask, scale, softcap=kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def _query_length(args: tuple, kwargs: dict) -> int | None:
    """Query tokens of a mask-function call: ``q_length`` (newer transformers) or the length of
    ``cache_position`` (older releases), by keyword or as the second positional argument."""
    value = kwargs.get("q_length", kwargs.get("cache_position", args[1] if len(args) > 1 else None))
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else int(value)
    return value if isinstance(value, int) else None


def register() -> None:
    """Register the ``"tqai"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, tqai_attention_forward)

    def tqai_mask(*args: Any, **kwargs: Any) -> Any:
        if _query_length(args, kwargs) != 1:
            kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)

    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tqai_mask)

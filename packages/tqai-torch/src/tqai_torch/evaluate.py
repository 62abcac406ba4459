"""Perplexity through the cache: every scored token attends to history read from the cache.

A single forward pass over a window would compute attention from full-precision keys and values
and bypass the compressed cache entirely. So each window of ``context`` tokens is split: the
first ``prefix`` tokens are prefilled into the cache, then the rest is scored in chunks of
``chunk`` tokens, each chunk attending to everything before it as the cache holds it (packed
codes for tqai, exact tensors for the baseline). Only the continuation is scored, identically for
the baseline and every config, so the numbers are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tqai.named_configs import NAMED_CONFIGS
from tqai_torch.patching import patch, unpatch

__all__ = [
    "CacheConfig",
    "cache_keyword",
    "config_name",
    "parse_config",
    "perplexity",
    "windows",
]


@dataclass(frozen=True)
class CacheConfig:
    """A named cache configuration to evaluate (``None`` bits = the uncompressed baseline)."""

    bits_k: int | None = None
    bits_v: int | None = None
    use_qjl: bool = False
    residual_window: int = 0
    sink_tokens: int = 4
    rotation: str = "haar"
    hidden_bits: int | None = None
    ffn_bits: int | None = None
    label: str | None = None  # a named config's name (tqai.named_configs)

    @property
    def name(self) -> str:
        return config_name(self)

    def options(self) -> dict[str, Any]:
        return {
            "bits_k": self.bits_k,
            "bits_v": self.bits_v,
            "use_qjl": self.use_qjl,
            "residual_window": self.residual_window,
            "sink_tokens": self.sink_tokens,
            "rotation": self.rotation,
            "hidden_bits": self.hidden_bits,
            "ffn_bits": self.ffn_bits,
        }


def config_name(config: CacheConfig) -> str:
    """``"baseline"``, ``"K4/V2"``, ``"K4/V2+qjl"``, ``"K4/V2 residual128"``, ``"all8"``, ..."""
    if config.label is not None:
        return config.label
    if config.bits_k is None:
        return "baseline"
    name = f"K{config.bits_k}/V{config.bits_v}"
    if config.use_qjl:
        name += "+qjl"
    if config.residual_window:
        name += f" residual{config.residual_window}"
    if config.rotation != "haar":
        name += f" {config.rotation}"
    return name


def parse_config(text: str) -> CacheConfig:
    """Parse ``"baseline"``, a named config (``"kv+hidden8"``, ``"all6"``, ...; see
    :mod:`tqai.named_configs`) or ``K<b>/V<b>[+qjl][ residual<n>][ hadamard|rotor]``."""
    text = text.strip()
    if text == "baseline":
        return CacheConfig()
    if text in NAMED_CONFIGS:
        named = NAMED_CONFIGS[text]
        return CacheConfig(
            named.bits_k,
            named.bits_v,
            hidden_bits=named.hidden_bits,
            ffn_bits=named.ffn_bits,
            label=named.name,
        )
    parts = text.split()
    head = parts[0]
    use_qjl = head.endswith("+qjl")
    head = head.removesuffix("+qjl")
    try:
        k, v = head.split("/")
        if not (k.startswith("K") and v.startswith("V")):
            raise ValueError
        bits_k, bits_v = int(k[1:]), int(v[1:])
        window, rotation = 0, "haar"
        for extra in parts[1:]:
            if extra.startswith("residual"):
                window = int(extra.removeprefix("residual"))
            elif extra in ("haar", "hadamard", "rotor"):
                rotation = extra
            else:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"config must look like 'baseline', 'K4/V2', 'K4/V2+qjl' or 'K4/V2 residual128', "
            f"or be a named config ({', '.join(NAMED_CONFIGS)}), got {text!r}"
        ) from None
    return CacheConfig(bits_k, bits_v, use_qjl, window, rotation=rotation)


def windows(ids: torch.Tensor, context: int, count: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows of ``context`` tokens from 1-D ``ids``."""
    n = ids.numel() // context
    for i in range(n if count is None else min(n, count)):
        yield ids[i * context : (i + 1) * context]


def _cache_factory(model: Any, config: CacheConfig) -> Callable[[], Any]:
    if config.bits_k is None:
        from transformers import DynamicCache

        return lambda: DynamicCache(config=model.config)
    cache = patch(model, **config.options())
    first = [cache]

    def make() -> Any:
        from tqai_torch.patching import new_cache

        return first.pop() if first else new_cache(model)

    return make


def cache_keyword(model: Any) -> str:
    """``"cache"`` on transformers releases that renamed it, else ``"past_key_values"``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def perplexity(
    model: Any,
    ids: torch.Tensor,
    config: CacheConfig,
    *,
    context: int = 2048,
    prefix: int | None = None,
    chunk: int = 128,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
    on_window: Callable[[], None] | None = None,
    make_cache: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Perplexity of the continuation of each window, scored through the cache.

    Args:
        model: a transformers causal LM (patched here for tqai configs, unpatched at the end).
        ids: 1-D token ids of the text.
        config: the cache configuration (``CacheConfig()`` = uncompressed baseline).
        context: tokens per window (the BOS token, if given, is the first of them).
        prefix: tokens prefilled before scoring starts (default ``context // 2``).
        chunk: tokens scored per forward pass.
        max_windows: evaluate at most this many windows.
        bos_token_id: prepended to every window (Gemma needs it).
        on_window: called after each window (progress bars).
        make_cache: build the cache of each window instead (peers such as transformers'
            ``QuantizedCache``); ``config`` then only names the row.

    Returns:
        ``{"ppl", "nll", "tokens", "kv_bytes", "kv_bits_per_coord"}`` (cache bytes at the end of
        the last window; bits per coordinate of K and V together, everything counted).
    """
    prefix = context // 2 if prefix is None else prefix
    if not 0 < prefix < context:
        raise ValueError(f"prefix must be in 1..context-1 ({context - 1}), got {prefix}")
    keyword = cache_keyword(model)
    patched = make_cache is None and config.bits_k is not None
    make_cache = make_cache or _cache_factory(model, config)
    device = next(model.parameters()).device
    nll, tokens, kv_bytes, coords = 0.0, 0, 0, 0
    body = context - (bos_token_id is not None)
    try:
        for window in windows(ids, body, max_windows):
            if bos_token_id is not None:
                window = torch.cat([torch.tensor([bos_token_id]), window])
            window = window.to(device)[None]
            cache = make_cache()
            out = model(window[:, :prefix], **{keyword: cache}, use_cache=True)
            last = out.logits[:, -1:]
            for start in range(prefix, context, chunk):
                piece = window[:, start : start + chunk]
                step = model(piece, **{keyword: cache}, use_cache=True).logits
                # The logits predicting the piece: the one before it, then all but its last.
                logits = torch.cat([last, step[:, :-1]], 1)
                nll += torch.nn.functional.cross_entropy(
                    logits[0].float(), piece[0], reduction="sum"
                ).item()
                tokens += piece.shape[1]
                last = step[:, -1:]
            kv_bytes, coords = _cache_size(cache, model)
            if on_window is not None:
                on_window()
    finally:
        if patched:
            unpatch(model)
    return {
        "ppl": math.exp(nll / tokens),
        "nll": nll,
        "tokens": tokens,
        "kv_bytes": kv_bytes,
        "kv_bits_per_coord": 8 * kv_bytes / coords if coords else float("nan"),
    }


def _cache_size(cache: Any, model: Any) -> tuple[int, int]:
    """Bytes the cache holds and the number of K and V coordinates it represents."""
    from tqai_torch.cache import TqaiCache

    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    length = cache.get_seq_length()
    coords = 2 * text.num_hidden_layers * heads * head_dim * length
    if isinstance(cache, TqaiCache):
        return cache.nbytes(), coords
    held = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            value = getattr(layer, name, None)
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor):
                    held += t.numel() * t.element_size()
    return held, coords

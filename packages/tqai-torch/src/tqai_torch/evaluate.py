"""Perplexity through the cache: every scored token attends to history read from the cache.

A single forward pass over a window would compute attention from full-precision keys and values
and bypass the compressed cache entirely. So each window of ``context`` tokens is split: the
first ``prefix`` tokens are prefilled into the cache, then the rest is scored in chunks of
``chunk`` tokens, each chunk attending to everything before it as the cache holds it (packed
codes for tqai, exact tensors for the baseline). A tqai cache also compresses each chunk before
attention reads it (:meth:`tqai_torch.cache.TqaiCache.quantize_staged`), so the tokens of a chunk
see one another through the codes, as token-by-token decoding would. Only the continuation is
scored, identically for the baseline and every config, so the numbers are comparable.
"""

from __future__ import annotations

import inspect
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

    bits_k: float | None = None
    bits_v: float | None = None
    use_qjl: bool = False
    residual_window: int = 0
    sink_tokens: int = 4
    rotation: str = "haar"
    center_keys: bool = False
    center_values: bool = False
    balance_keys: bool = False
    hidden_bits: int | None = None
    ffn_bits: int | None = None
    layer_bits: tuple[tuple[float, float], ...] | None = None  # per layer (bits_k, bits_v)
    label: str | None = None  # a named config's name (tqai.named_configs), or a given row name

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
            "center_keys": self.center_keys,
            "center_values": self.center_values,
            "balance_keys": self.balance_keys,
            "hidden_bits": self.hidden_bits,
            "ffn_bits": self.ffn_bits,
            "layer_bits": None if self.layer_bits is None else [list(p) for p in self.layer_bits],
        }


_FLAGS = {
    "center": ("center_keys", "center_values"),
    "center-k": ("center_keys",),
    "center-v": ("center_values",),
    "balance": ("balance_keys",),
}


def _bits(b: float) -> str:
    return f"{b:g}"


def config_name(config: CacheConfig) -> str:
    """``"baseline"``, ``"K4/V2"``, ``"K4/V2+qjl"``, ``"K3.5/V2 center sinks4 residual32"``..."""
    if config.label is not None:
        return config.label
    if config.bits_k is None:
        return "baseline"
    name = f"K{_bits(config.bits_k)}/V{_bits(config.bits_v)}"
    if config.use_qjl:
        name += "+qjl"
    if config.center_keys and config.center_values:
        name += " center"
    elif config.center_keys or config.center_values:
        name += " center-k" if config.center_keys else " center-v"
    if config.balance_keys:
        name += " balance"
    if config.sink_tokens != CacheConfig.sink_tokens:
        name += f" sinks{config.sink_tokens}"
    if config.residual_window:
        name += f" residual{config.residual_window}"
    if config.rotation != "haar":
        name += f" {config.rotation}"
    return name


def parse_config(text: str) -> CacheConfig:
    """Parse ``"baseline"``, a named config (``"kv+hidden8"``, ``"all6"``, ...; see
    :mod:`tqai.named_configs`) or ``K<b>/V<b>[+qjl]`` followed by any of ``center``,
    ``center-k``, ``center-v``, ``balance``, ``sinks<n>``, ``residual<n>``,
    ``haar|hadamard|rotor`` (widths may be fractional: ``K3.5/V2.5``)."""
    text = text.strip()
    if text == "baseline":
        return CacheConfig()
    if text in NAMED_CONFIGS:
        named = NAMED_CONFIGS[text]
        return CacheConfig(  # as tqai.patch(model, config=NAME) runs it: its default window
            named.bits_k,
            named.bits_v,
            residual_window=_PATCH_WINDOW,
            hidden_bits=named.hidden_bits,
            ffn_bits=named.ffn_bits,
            label=named.name,
        )
    parts = text.split()
    head = parts[0]
    use_qjl = head.endswith("+qjl")
    head = head.removesuffix("+qjl")
    options: dict[str, Any] = {"use_qjl": use_qjl}
    try:
        k, v = head.split("/")
        if not (k.startswith("K") and v.startswith("V")):
            raise ValueError
        options["bits_k"], options["bits_v"] = (_number(k[1:]), _number(v[1:]))
        for extra in parts[1:]:
            if extra in _FLAGS:
                options.update(dict.fromkeys(_FLAGS[extra], True))
            elif extra.startswith("residual"):
                options["residual_window"] = int(extra.removeprefix("residual"))
            elif extra.startswith("sinks"):
                options["sink_tokens"] = int(extra.removeprefix("sinks"))
            elif extra in ("haar", "hadamard", "rotor"):
                options["rotation"] = extra
            else:
                raise ValueError
    except ValueError:
        raise ValueError(
            "config must look like 'baseline', 'K4/V2', 'K4/V2+qjl' or 'K3.5/V2 center balance "
            f"sinks4 residual32 hadamard', or be a named config ({', '.join(NAMED_CONFIGS)}), "
            f"got {text!r}"
        ) from None
    return CacheConfig(**options)


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


_PATCH_WINDOW = inspect.signature(patch).parameters["residual_window"].default


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
    decode_exact: bool = True,
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
        decode_exact: after the prefill, a tqai cache compresses each chunk before attention
            reads it (:meth:`TqaiCache.quantize_staged`), so a chunk's tokens see each other
            through the codes as in token-by-token decoding; False lets them see each other in
            full precision (flattering: like a recent window of up to ``chunk`` tokens).

    Returns:
        ``{"ppl", "nll", "tokens", "kv_bytes", "kv_bits_per_coord", "kv_bits_per_coord_16"}``
        (cache bytes held at the end of the last window; bits per coordinate of K and V together
        over the layers the cache compresses, everything they use counted, and the same with the
        full-precision tokens at 16 bits as a bfloat16 model holds them: see ``_cache_size``).
    """
    prefix = context // 2 if prefix is None else prefix
    if not 0 < prefix < context:
        raise ValueError(f"prefix must be in 1..context-1 ({context - 1}), got {prefix}")
    keyword = cache_keyword(model)
    patched = make_cache is None and config.bits_k is not None
    make_cache = make_cache or _cache_factory(model, config)
    device = next(model.parameters()).device
    nll, tokens, kv_bytes, bits, bits16 = 0.0, 0, 0, float("nan"), float("nan")
    body = context - (bos_token_id is not None)
    try:
        for window in windows(ids, body, max_windows):
            if bos_token_id is not None:
                window = torch.cat([torch.tensor([bos_token_id]), window])
            window = window.to(device)[None]
            cache = make_cache()
            out = model(window[:, :prefix], **{keyword: cache}, use_cache=True)
            last = out.logits[:, -1:]
            if decode_exact and hasattr(cache, "quantize_staged"):
                cache.quantize_staged()
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
            kv_bytes, bits, bits16 = _cache_size(cache, model)
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
        "kv_bits_per_coord": bits,
        "kv_bits_per_coord_16": bits16,
    }


def _cache_size(cache: Any, model: Any) -> tuple[int, float, float]:
    """Bytes the cache holds, bits per K/V coordinate of the layers it compresses, and the same
    bits with full-precision tokens counted at 16 bits (what a bfloat16/float16 model holds).

    For a tqai cache the bits count every byte the compressed layers use (codes, norms, sinks,
    window, fitted statistics; not spare buffer capacity) over the coordinates those layers
    represent; uncompressed (sliding-window, skipped) layers are left out, as they are exact.
    A peer cache with a ``bits_per_coord()`` method reports its own; any other cache is counted
    from the tensors it holds over every layer.
    """
    from tqai_torch.cache import TqaiCache

    text = model.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    length = cache.get_seq_length()
    if isinstance(cache, TqaiCache):
        other = segments = segment_values = 0
        for idx in cache.compressed_layers:
            for name, a in cache.layers[idx].store.state()[1].items():
                size = a.numel() * a.element_size()
                if name.startswith(("sinks.", "window.")):
                    segments += size
                    segment_values += a.numel()
                else:
                    other += size
        coords = 2 * len(cache.compressed_layers) * heads * head_dim * length
        return (
            cache.nbytes(),
            8 * (other + segments) / coords,
            8 * (other + 2 * segment_values) / coords,
        )
    held = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            value = getattr(layer, name, None)
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor):
                    held += t.numel() * t.element_size()
    if hasattr(cache, "bits_per_coord"):
        return held, cache.bits_per_coord(), cache.bits_per_coord()
    return held, 8 * held / (2 * text.num_hidden_layers * heads * head_dim * length), 16.0

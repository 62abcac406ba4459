"""What tqai needs to know about an mlx-lm model: its layers, their attention, their head sizes.

Why it is shaped like this: mlx-lm has no attention interface, only a convention. Every model
module imports ``scaled_dot_product_attention`` from ``mlx_lm.models.base`` by name and calls it
with the layer's cache; the model's ``make_cache()`` (when it has one) decides each layer's cache
type. So a layer is compressible when its cache is a plain ``KVCache`` and the attention module of
the layer lives in a Python module that holds that function: that is the call tqai reroutes. This
file only reads the model (nothing is changed here), so ``patch`` can refuse an unsupported model
before touching anything, and ``load_cache`` can tell whether a saved cache fits a model.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import mlx.nn as nn
from mlx_lm.models import base as _base
from mlx_lm.models.cache import KVCache

__all__ = [
    "LayerInfo",
    "attention_module",
    "base_caches",
    "describe",
    "is_routed",
    "model_layers",
    "original_sdpa",
]


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One attention layer's shape (``None`` where the model does not say)."""

    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None


def original_sdpa() -> Any:
    """mlx-lm's own ``scaled_dot_product_attention``, also while tqai's dispatcher is installed."""
    fn = _base.scaled_dot_product_attention
    return getattr(fn, "__wrapped__", fn) if getattr(fn, "_tqai_dispatch", False) else fn


def is_routed(fn: Any) -> bool:
    """Whether ``fn`` is mlx-lm's attention entry point (original or tqai's dispatcher)."""
    return fn is not None and (fn is original_sdpa() or getattr(fn, "_tqai_dispatch", False))


def model_layers(model: Any) -> list[Any]:
    """The model's transformer layers, or a ``ValueError`` saying why it is not an mlx-lm model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an mlx.nn.Module (an mlx-lm model), got {type(model).__name__}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list | tuple) or not layers:
        raise ValueError(
            f"unsupported model {type(model).__module__}.{type(model).__name__}: it has no "
            "`layers` list (mlx-lm models expose their transformer blocks as `model.layers`)"
        )
    return list(layers)


def base_caches(model: Any) -> list[Any]:
    """The caches mlx-lm builds for the unpatched model (``make_cache()`` or a KVCache a layer)."""
    make = getattr(model, "make_cache", None)
    # While patched, model.make_cache is tqai's; it carries the model's own (or None).
    make = getattr(make, "_tqai_original", make)
    if make is not None:
        return list(make())
    return [KVCache() for _ in model_layers(model)]


def _routes_attention(module: nn.Module) -> bool:
    py_module = sys.modules.get(type(module).__module__)
    return py_module is not None and is_routed(vars(py_module).get("scaled_dot_product_attention"))


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The submodule of ``layer`` whose code calls mlx-lm's ``scaled_dot_product_attention``.

    Candidates are the layer and its descendants whose class is defined in a Python module that
    imported that function; among them the one carrying head counts (``n_kv_heads`` or
    ``num_key_value_heads``) wins, else the first non-layer one.
    """
    candidates = [m for _, m in layer.named_modules() if _routes_attention(m)]
    for m in candidates:
        if any(hasattr(m, name) for name in ("n_kv_heads", "num_key_value_heads")):
            return m
    rest = [m for m in candidates if m is not layer]
    return rest[0] if rest else (candidates[0] if candidates else None)


def _int_attr(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _out_features(linear: Any) -> int | None:
    weight = getattr(linear, "weight", None)
    return None if weight is None else int(weight.shape[0])


def layer_info(attn: nn.Module | None, args: Any) -> LayerInfo:
    """Head counts and head size of an attention module (projections first, then model args)."""
    if attn is None:
        return LayerInfo(None, None, None)
    n_heads = _int_attr(attn, "n_heads", "num_heads", "num_attention_heads")
    n_kv = _int_attr(attn, "n_kv_heads", "num_key_value_heads") or n_heads
    head_dim = _int_attr(attn, "head_dim")
    if head_dim is None and n_kv:
        k_out = _out_features(getattr(attn, "k_proj", None))
        head_dim = k_out // n_kv if k_out and k_out % n_kv == 0 else None
    if head_dim is None:
        head_dim = _int_attr(args, "head_dim")
    if head_dim is None and n_heads:
        hidden = _int_attr(args, "hidden_size")
        head_dim = hidden // n_heads if hidden else None
    return LayerInfo(n_heads, n_kv, head_dim)


def describe(model: Any) -> dict[str, Any]:
    """A JSON-able fingerprint of the model's attention layout (what a saved cache depends on).

    ``{"model_type", "num_layers", "caches": [class name per layer], "layers": [LayerInfo dict or
    None per layer]}``.
    """
    layers = model_layers(model)
    args = getattr(model, "args", None)
    caches = base_caches(model)
    infos = []
    for layer, cache in zip(layers, caches, strict=False):
        attn = attention_module(layer) if type(cache) is KVCache else None
        infos.append(None if attn is None else asdict(layer_info(attn, args)))
    return {
        "model_type": str(getattr(model, "model_type", None) or getattr(args, "model_type", "")),
        "num_layers": len(layers),
        "caches": [type(c).__name__ for c in caches],
        "layers": infos,
    }

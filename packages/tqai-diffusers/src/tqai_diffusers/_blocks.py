"""Where the hooks go: the denoiser transformers of a pipeline and their self-attention layers.

Why it is shaped like this: the hooks must not know any one model. A diffusers pipeline holds its
denoisers as components (``transformer``, and ``transformer_2`` for the two experts of Wan 2.2);
each self-attention layer is an attention module (``AttentionModuleMixin``: ``WanAttention``,
``LTXAttention``, or the classic ``Attention`` with the standard processors) whose qualified
name the core's model adapter turns into a layer index (:mod:`tqai.pipeline.adapters`:
``blocks.{i}.attn1`` for WAN, ``transformer_blocks.{i}.attn1`` for LTX and other DiTs).
Cross-attention (``attn2``) reads the text, whose K/V do not change across denoising steps, and
is left alone.

Every standard processor computes keys as ``norm_k(to_k(x))`` (``to_k(x)`` when the module has no
``norm_k``) before RoPE, and values as ``to_v(x)``, each ``(B, T, H * D)``. Those two submodules
are where the K/V hooks sit, so the processor itself (and its attention backend) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tqai.registry import registry

__all__ = ["AttentionLayer", "attention_layers", "default_adapter", "transformers_of"]


@dataclass(frozen=True, slots=True)
class AttentionLayer:
    """One self-attention layer of a transformer.

    Attributes:
        name: qualified module name (``"blocks.3.attn1"``).
        index: layer index from the adapter.
        module: the attention module.
        key_module: the submodule whose output is the keys (``norm_k`` or ``to_k``).
        value_module: the submodule whose output is the values (``to_v``).
        head_dim: ``D``, so ``(B, T, H * D)`` splits into heads.
    """

    name: str
    index: int
    module: torch.nn.Module
    key_module: torch.nn.Module
    value_module: torch.nn.Module
    head_dim: int


def transformers_of(pipe_or_transformer: Any) -> list[torch.nn.Module]:
    """The denoiser transformers to hook: the module itself, or a pipeline's transformer(s).

    Raises:
        TypeError: neither a ``torch.nn.Module`` nor a pipeline with a transformer component.
    """
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [pipe_or_transformer]
    components = getattr(pipe_or_transformer, "components", None)
    if isinstance(components, dict):
        found = [
            module
            for name, module in components.items()
            if name.startswith("transformer") and isinstance(module, torch.nn.Module)
        ]
        if found:
            return found
    raise TypeError(
        "expected a diffusers pipeline with a 'transformer' component or a transformer "
        f"(torch.nn.Module), got {type(pipe_or_transformer).__name__}"
    )


def default_adapter(transformer: torch.nn.Module) -> str:
    """``"wan"`` for Wan transformers (``blocks.{i}.attn1``, split CFG), else ``"dit"``."""
    return "wan" if type(transformer).__name__.startswith("Wan") else "dit"


def _is_attention(module: torch.nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, AttentionModuleMixin | Attention)


def attention_layers(transformer: torch.nn.Module, adapter_name: str) -> list[AttentionLayer]:
    """The self-attention layers of ``transformer`` that the adapter numbers, in index order.

    Raises:
        ValueError: no layer matches (wrong adapter for this model), or a layer uses fused QKV
            projections (its ``to_v`` is never called; unfuse them first).
    """
    adapter = registry("tqai.adapters").get(adapter_name)()
    layers = []
    for name, module in transformer.named_modules():
        index = adapter.layer_index(name)
        if index is None or not _is_attention(module):
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        if getattr(module, "fused_projections", False):
            raise ValueError(
                f"{name} uses fused QKV projections, which tqai cannot hook; call "
                "transformer.unfuse_qkv_projections() before apply_tqai"
            )
        key_module = getattr(module, "norm_k", None) or getattr(module, "to_k", None)
        value_module = getattr(module, "to_v", None)
        heads = getattr(module, "heads", None)
        inner = getattr(module, "inner_dim", None)
        if key_module is None or value_module is None or not heads or not inner:
            raise ValueError(
                f"{name} ({type(module).__name__}) has no to_k/to_v projections with heads and "
                "inner_dim: not a standard diffusers attention module"
            )
        layers.append(AttentionLayer(name, index, module, key_module, value_module, inner // heads))
    if not layers:
        raise ValueError(
            f"{type(transformer).__name__} has no self-attention layer that the {adapter_name!r} "
            "adapter recognises; pass TqaiConfig(adapter=...) with one of 'wan' "
            "(blocks.{i}.attn1) or 'dit' (transformer_blocks.{i}.attn1)"
        )
    return sorted(layers, key=lambda layer: layer.index)

"""llm: decoder-only language models (transformers and mlx-lm), K/V appended token by token.

Facts the pipeline and the caches rely on:

- A step generates tokens: the prompt's K/V arrive once (prefill, ``T`` = prompt length), then
  each decode step appends ``T = 1`` new token per layer to a growing history. Nothing is
  recomputed, so strategies that predict a layer's tensor from the previous step (delta, delta2,
  window) or that need CFG pairs (cfg_sharing) do not apply and the pipeline refuses them.
- Attention layers are ``model.layers.{i}.self_attn`` in transformers (Llama, Mistral, Qwen2,
  Gemma, SmolLM2) and in mlx-lm alike.
- The config keys are transformers' (mlx-lm's ``ModelArgs`` use the same names):
  ``num_hidden_layers``, ``num_key_value_heads`` (grouped-query attention; absent means one K/V
  head per query head), ``head_dim`` (absent means ``hidden_size // num_attention_heads``), and
  ``layer_types`` (``"sliding_attention"`` / ``"full_attention"`` per layer in Gemma 2/3 and
  Qwen2-style configs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from tqai.pipeline.adapters._config import config_int

__all__ = ["LlmAdapter"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")


class LlmAdapter:
    """Decoder-only LLMs: decode steps append K/V; layers are ``model.layers.{i}.self_attn``.

    Example:
        >>> a = LlmAdapter()
        >>> a.layer_index("model.layers.7.self_attn"), a.layer_index("model.layers.7.mlp")
        (7, None)
        >>> cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        ...        "hidden_size": 576}
        >>> a.num_layers(cfg), a.kv_heads(cfg), a.head_dim(cfg)
        (30, 3, 64)
    """

    name: ClassVar[str] = "llm"
    step_semantics: ClassVar[str] = "decode"
    features: ClassVar[frozenset[str]] = frozenset({"appended_kv"})
    cfg_layout: ClassVar[str | None] = None

    def layer_index(self, module_name: str) -> int | None:
        """``i`` of ``...layers.{i}.self_attn``, else ``None``."""
        match = _LAYER.search(module_name)
        return int(match.group(1)) if match else None

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_hidden_layers", "n_layers", who=self.name)

    def kv_heads(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_key_value_heads", "num_attention_heads", who=self.name)

    def head_dim(self, config: Mapping[str, Any]) -> int:
        if config.get("head_dim") is not None:
            return config_int(config, "head_dim", who=self.name)
        hidden = config_int(config, "hidden_size", who=self.name)
        heads = config_int(config, "num_attention_heads", who=self.name)
        if hidden % heads:
            raise ValueError(
                f"llm adapter: hidden_size {hidden} is not a multiple of num_attention_heads "
                f"{heads}; the config needs an explicit head_dim"
            )
        return hidden // heads

    def sliding_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Indices of sliding-window layers (from ``layer_types``; none when absent)."""
        types = config.get("layer_types") or []
        return [i for i, kind in enumerate(types) if kind == "sliding_attention"]

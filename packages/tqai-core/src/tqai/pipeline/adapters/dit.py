"""dit: image/video diffusion transformers in diffusers, CFG batched (PixArt, DiT, SD3-style).

Facts the pipeline and the diffusers hooks rely on:

- A step is one denoising step: every step recomputes each layer's K/V over the *same* latent
  tokens, so step ``s`` is predictable from step ``s - 1`` (temporal strategies apply).
- Classifier-free guidance is batched: the pipeline concatenates the unconditional and the
  conditional latents into one ``2B`` batch (``torch.cat([latents] * 2)``), unconditional first.
- Self-attention modules are ``transformer_blocks.{i}.attn1`` (``BasicTransformerBlock``:
  PixArt, DiT) or ``transformer_blocks.{i}.attn`` (joint attention: SD3); ``attn2`` is
  cross-attention to the text, whose K/V do not change across steps.
- Config keys: ``num_layers``, ``num_attention_heads``, ``attention_head_dim``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from tqai.pipeline.adapters._config import config_int

__all__ = ["DitAdapter"]

_LAYER = re.compile(r"(?:^|\.)transformer_blocks\.(\d+)\.attn1?$")


class DitAdapter:
    """diffusers DiTs: K/V recomputed every denoising step, CFG batched as ``2B``.

    Example:
        >>> a = DitAdapter()
        >>> a.layer_index("transformer_blocks.3.attn1"), a.layer_index("transformer_blocks.3.attn2")
        (3, None)
        >>> a.num_layers({"num_layers": 28}), a.head_dim({"attention_head_dim": 72})
        (28, 72)
    """

    name: ClassVar[str] = "dit"
    step_semantics: ClassVar[str] = "denoise"
    features: ClassVar[frozenset[str]] = frozenset({"recomputed_kv", "cfg"})
    cfg_layout: ClassVar[str | None] = "batched"

    def layer_index(self, module_name: str) -> int | None:
        """``i`` of ``...transformer_blocks.{i}.attn1`` (or ``.attn``), else ``None``."""
        match = _LAYER.search(module_name)
        return int(match.group(1)) if match else None

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_layers", who=self.name)

    def kv_heads(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_attention_heads", who=self.name)

    def head_dim(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "attention_head_dim", who=self.name)

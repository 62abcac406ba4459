"""wan: Wan 2.x video transformers (diffusers ``WanTransformer3DModel``), CFG split.

Facts the pipeline and the diffusers hooks rely on:

- A step is one flow-matching denoising step; every step recomputes each block's self-attention
  K/V over the same video tokens (temporal strategies apply; the ``snr`` scorer's ``"flow"``
  schedule matches its sampler).
- Classifier-free guidance is split: ``WanPipeline`` calls the transformer twice per step, with
  the prompt and with the negative prompt, so ``cfg_sharing`` runs in ``mode="split"``.
- Self-attention modules are ``blocks.{i}.attn1``; ``attn2`` is cross-attention to the text.
- Config keys: ``num_layers`` (30 for 1.3B, 40 for 14B), ``num_attention_heads`` (12, 40),
  ``attention_head_dim`` (128), ``patch_size`` (``(1, 2, 2)``).
- Tokens are latent patches in raster order: the Wan 2.1 VAE compresses time 4x (keeping the
  first frame) and space 8x, and patches are ``patch_size``, so a ``num_frames x height x width``
  video has the token grid of :meth:`WanAdapter.token_grid` (the ``sheaf`` scorer's ``grid``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from tqai.pipeline.adapters._config import config_int

__all__ = ["WanAdapter"]

_LAYER = re.compile(r"(?:^|\.)blocks\.(\d+)\.attn1$")


class WanAdapter:
    """Wan 2.x video DiTs: K/V recomputed every step, CFG as two calls, 3-D token grid.

    Example:
        >>> a = WanAdapter()
        >>> a.layer_index("blocks.12.attn1"), a.layer_index("blocks.12.attn2")
        (12, None)
        >>> a.token_grid(num_frames=81, height=480, width=832)
        (21, 30, 52)
    """

    name: ClassVar[str] = "wan"
    step_semantics: ClassVar[str] = "denoise"
    features: ClassVar[frozenset[str]] = frozenset({"recomputed_kv", "cfg"})
    cfg_layout: ClassVar[str | None] = "split"

    def layer_index(self, module_name: str) -> int | None:
        """``i`` of ``...blocks.{i}.attn1``, else ``None``."""
        match = _LAYER.search(module_name)
        return int(match.group(1)) if match else None

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_layers", who=self.name)

    def kv_heads(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "num_attention_heads", who=self.name)

    def head_dim(self, config: Mapping[str, Any]) -> int:
        return config_int(config, "attention_head_dim", who=self.name)

    def token_grid(
        self,
        *,
        num_frames: int,
        height: int,
        width: int,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        vae_scale: tuple[int, int, int] = (4, 8, 8),
    ) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the latent token grid of a video (``T`` = product).

        Args:
            num_frames, height, width: the video's size in pixels and frames (Wan wants
                ``num_frames = 4k + 1``).
            patch_size: the transformer's ``(t, h, w)`` patch (config ``patch_size``).
            vae_scale: the VAE's ``(time, height, width)`` compression (Wan 2.1: 4, 8, 8).
        """
        st, sh, sw = vae_scale
        latent = ((num_frames - 1) // st + 1, height // sh, width // sw)
        grid = tuple(n // p for n, p in zip(latent, patch_size, strict=True))
        if any(g < 1 for g in grid):
            raise ValueError(f"wan adapter: video {num_frames}x{height}x{width} has no tokens")
        return grid  # type: ignore[return-value]

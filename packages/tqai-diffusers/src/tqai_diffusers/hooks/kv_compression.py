"""K/V compression hook: every self-attention layer's keys and values pass through TurboQuant.

Why it is shaped like this: a DiT recomputes every layer's K/V at every denoising step, so there
is no cache to replace, but the same tensors recur step after step and branch after branch. The
hook sits on the submodule that produces the keys (``norm_k``, or ``to_k`` without one) and on
``to_v`` (see :mod:`tqai_diffusers._blocks`), reshapes the ``(B, T, H * D)`` output to the
pipeline's ``(B, H, T, D)`` and returns the pipeline's reconstruction, so attention runs on what
the compressed representation holds. The math is the core's: :mod:`tqai.pipeline` with its
strategies (plain TurboQuant; delta, DiTFastAttn arXiv:2406.08552; delta2, QuantSparse
arXiv:2509.23681; cfg_sharing; tiered) and monitors. Keys are compressed before RoPE, like
pre-RoPE key quantization in LLM caches.

This is a quality/compression path: the reference quantizer adds work, so by itself it does
not make a step faster (attention-output reuse, :mod:`tqai_diffusers.hooks.attention_reuse`,
is the path that skips work).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from tqai_diffusers.hooks._state import ContextStates, TqaiStats

__all__ = ["_TQAI_KV_HOOK", "KVCompressionHook"]

_TQAI_KV_HOOK = "tqai_kv"


class KVCompressionHook(ModelHook):
    """Replaces a K or V projection's output by its compressed reconstruction.

    Args:
        states: the transformer's shared :class:`~tqai_diffusers.hooks._state.ContextStates`.
        stats: the transformer's live :class:`~tqai_diffusers.hooks._state.TqaiStats`.
        layer: the attention layer index.
        stream: ``"k"`` or ``"v"``.
        head_dim: ``D``; the output's last axis is ``H * D``.
    """

    _is_stateful = True

    def __init__(
        self, states: ContextStates, stats: TqaiStats, *, layer: int, stream: str, head_dim: int
    ) -> None:
        super().__init__()
        self.states = states
        self.stats = stats
        self.layer = layer
        self.stream = stream
        self.head_dim = head_dim

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """``(B, T, H * D)`` -> compressed reconstruction of the same shape and dtype."""
        context, state = self.states.get()
        if state.pipeline is None:
            return output
        if output.ndim != 3 or output.shape[-1] % self.head_dim:
            raise ValueError(
                f"tqai K/V hook (layer {self.layer}, {self.stream}): expected a (B, T, H * "
                f"{self.head_dim}) projection output, got shape {tuple(output.shape)}"
            )
        b, t, c = output.shape
        heads = c // self.head_dim
        x = output.reshape(b, t, heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        step = state.next_step((context, self.layer, self.stream))
        result = state.pipeline.compress(x, layer=self.layer, stream=self.stream, step=step)
        self.stats.record_kv(context, self.layer, self.stream, step, result)
        return result.reconstruction.transpose(1, 2).reshape(b, t, c)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.states.reset()
        return module


def _apply_kv_compression_hook(
    module: torch.nn.Module,
    states: ContextStates,
    stats: TqaiStats,
    *,
    layer: int,
    stream: str,
    head_dim: int,
) -> None:
    """Register a :class:`KVCompressionHook` named ``_TQAI_KV_HOOK`` on ``module``."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = KVCompressionHook(states, stats, layer=layer, stream=stream, head_dim=head_dim)
    registry.register_hook(hook, _TQAI_KV_HOOK)

"""Attention-output reuse (strategy ``"window"``): skip a layer's attention while its input holds.

DiTFastAttn (Yuan et al., "DiTFastAttn: Attention Compression for Diffusion Transformer Models",
NeurIPS 2024, arXiv:2406.08552) observes that a DiT layer's attention output changes little
between neighbouring denoising steps and shares it across timesteps. This hook makes the
decision at run time, before any attention work, with the core's window test
(:func:`tqai.pipeline.strategies.window.similar_rows`): the layer's input ``hidden_states``
``(B, T, C)`` is compared, per batch row, with the input of the step at which the layer last
computed its output; if every row's cosine similarity reaches ``threshold`` and the output has
been reused fewer than ``max_reuse`` steps in a row, the stored output is returned and the
layer's projections and attention are skipped. Otherwise the layer runs and its input and output
become the new reference (comparing against the last *computed* step, not the previous one, so
slow drift cannot hide behind many small steps).

The whole call is reused or recomputed (all batch rows together): a ``2B`` CFG batch (LTX) is
reused only when both halves qualify. State is kept per cache context (``cond``/``uncond``) and
costs, per hooked layer and context, one stored input and one stored output.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from tqai.pipeline.strategies.window import similar_rows
from tqai_diffusers.hooks._state import ContextStates, TqaiStats, _Reuse

__all__ = ["_TQAI_WINDOW_HOOK", "AttentionReuseHook"]

_TQAI_WINDOW_HOOK = "tqai_window"


class AttentionReuseHook(ModelHook):
    """Returns a self-attention layer's stored output while its input stays similar.

    Args:
        states: the transformer's shared :class:`~tqai_diffusers.hooks._state.ContextStates`.
        stats: the transformer's live :class:`~tqai_diffusers.hooks._state.TqaiStats`.
        layer: the attention layer index.
        threshold: cosine similarity in ``[-1, 1]`` at or above which the output is reused.
        max_reuse: most consecutive reuses before the layer is recomputed (``None``: no limit).
    """

    _is_stateful = True

    def __init__(
        self,
        states: ContextStates,
        stats: TqaiStats,
        *,
        layer: int,
        threshold: float,
        max_reuse: int | None,
    ) -> None:
        super().__init__()
        self.states = states
        self.stats = stats
        self.layer = layer
        self.threshold = threshold
        self.max_reuse = max_reuse

    def _reusable(self, slot: _Reuse | None, hidden: torch.Tensor) -> bool:
        if slot is None or slot.reference.shape != hidden.shape:
            return False
        if self.max_reuse is not None and slot.age >= self.max_reuse:
            return False
        return bool(torch.all(similar_rows(hidden, slot.reference, threshold=self.threshold)))

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        context, state = self.states.get()
        slot = state.reuse.get(self.layer)
        if self._reusable(slot, hidden):
            slot.age += 1
            self.stats.record_attention(context, self.layer, reused=True)
            return slot.output
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.reuse[self.layer] = _Reuse(reference=hidden, output=output)
        self.stats.record_attention(context, self.layer, reused=False)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.states.reset()
        return module


def _apply_attention_reuse_hook(
    module: torch.nn.Module,
    states: ContextStates,
    stats: TqaiStats,
    *,
    layer: int,
    threshold: float,
    max_reuse: int | None,
) -> None:
    """Register an :class:`AttentionReuseHook` named ``_TQAI_WINDOW_HOOK`` on ``module``."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = AttentionReuseHook(states, stats, layer=layer, threshold=threshold, max_reuse=max_reuse)
    registry.register_hook(hook, _TQAI_WINDOW_HOOK)

"""State shared by the tqai hooks of one transformer: per-generation state and live statistics.

Why it is shaped like this: diffusers hands stateful hooks a denoising-call context through
``StateManager`` objects (``transformer.cache_context("cond")`` / ``"uncond"`` in WAN, one
``"cond_uncond"`` batch in LTX) and resets them through ``reset_state`` at the end of every
pipeline call (``maybe_free_model_hooks``). The tqai hooks keep one compression pipeline per
context, so delta/delta2 predict the conditional pass from the conditional pass of the previous
step, never from the other CFG branch. ``cfg_sharing`` in split mode is the exception: it pairs
the two branches, so it runs one pipeline shared by every context. A call made outside any
``cache_context`` (a transformer called directly) uses the context ``"default"``.

:class:`TqaiStats` is not reset between generations (a pipeline resets its hooks before it
returns, so per-generation state is gone by then); it accumulates until :meth:`TqaiStats.clear`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from diffusers.hooks.hooks import StateManager

from tqai.pipeline import CompressionResult, build_pipeline

__all__ = ["DEFAULT_CONTEXT", "ContextStates", "GenerationState", "TqaiStats"]

DEFAULT_CONTEXT = "default"
_SHARED = "shared"


@dataclass
class TqaiStats:
    """What the hooks of one transformer did, summed over generations until :meth:`clear`.

    Attributes:
        kv_calls: compressed K/V tensors per ``(context, layer, stream)``.
        order_counts: per ``(context, layer, stream, step)``, the number of vectors coded at
            each prediction order (delta/delta2: ``(full, order 1[, order 2])``), summed over
            generations; empty for strategies that report none.
        partner_modes: per ``(context, layer, stream)``, cfg_sharing's ``(full, residual)``
            counts of the partner vectors coded (summed; only the partner's context appears).
        bits, coords: bits stored and coordinates compressed, over all K/V calls.
        attention: per ``(context, layer)``, ``[computed, reused]`` attention calls (window).
    """

    kv_calls: Counter = field(default_factory=Counter)
    order_counts: dict[tuple[str, int, str, int], list[int]] = field(default_factory=dict)
    partner_modes: dict[tuple[str, int, str], list[int]] = field(default_factory=dict)
    bits: int = 0
    coords: int = 0
    attention: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def record_kv(
        self, context: str, layer: int, stream: str, step: int, result: CompressionResult
    ) -> None:
        """Add one compressed K or V tensor."""
        self.kv_calls[(context, layer, stream)] += 1
        self.bits += result.bits
        self.coords += result.n_coords
        for name, table, key in (
            ("order_counts", self.order_counts, (context, layer, stream, step)),
            ("partner_modes", self.partner_modes, (context, layer, stream)),
        ):
            counts = result.info.get(name)
            if counts is not None:
                total = table.setdefault(key, [0] * len(counts))
                for i, count in enumerate(counts):
                    total[i] += count

    def record_attention(self, context: str, layer: int, *, reused: bool) -> None:
        """Add one attention call of a window-hooked layer (computed or reused)."""
        self.attention.setdefault((context, layer), [0, 0])[int(reused)] += 1

    @property
    def bits_per_coord(self) -> float:
        """Average stored bits per K/V coordinate (``nan`` before any call)."""
        return self.bits / self.coords if self.coords else float("nan")

    @property
    def reuse_fraction(self) -> float:
        """Fraction of window-hooked attention calls that reused an output (``nan`` if none)."""
        computed = sum(c for c, _ in self.attention.values())
        reused = sum(r for _, r in self.attention.values())
        total = computed + reused
        return reused / total if total else float("nan")

    def clear(self) -> None:
        """Forget everything recorded."""
        self.kv_calls.clear()
        self.order_counts.clear()
        self.partner_modes.clear()
        self.bits = self.coords = 0
        self.attention.clear()


@dataclass
class _Reuse:
    """A window-hooked layer's last computed attention: its input, output and reuse age."""

    reference: Any
    output: Any
    age: int = 0


class GenerationState:
    """Everything one context of one generation remembers (built lazily, dropped on reset).

    Args:
        pipeline_config: the :mod:`tqai.pipeline` config of the K/V hooks, or ``None``.
    """

    def __init__(self, pipeline_config: dict[str, Any] | None) -> None:
        self.pipeline = None if pipeline_config is None else build_pipeline(pipeline_config)
        self.steps: Counter = Counter()
        self.reuse: dict[int, _Reuse] = {}

    def next_step(self, key: tuple[Any, ...]) -> int:
        """The step index of this call for ``key`` (0 on its first call)."""
        step = self.steps[key]
        self.steps[key] = step + 1
        return step

    def reset(self) -> None:
        if self.pipeline is not None:
            self.pipeline.reset()
        self.steps.clear()
        self.reuse.clear()


class ContextStates(StateManager):
    """One :class:`GenerationState` per diffusers cache context (shared: one for all).

    A ``StateManager`` so that diffusers' ``cache_context`` reaches it through the hooks that
    hold it (``diffusers.hooks.hooks._set_cache_context`` looks for ``StateManager`` values).

    Args:
        pipeline_config: passed to every :class:`GenerationState`.
        shared: one state for every context (``cfg_sharing`` in split mode pairs the branches).
    """

    def __init__(self, pipeline_config: dict[str, Any] | None, *, shared: bool = False) -> None:
        super().__init__(GenerationState, (pipeline_config,))
        self.pipeline_config = pipeline_config
        self.shared = shared
        self._current: str | None = None
        self._states: dict[str, GenerationState] = {}

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self._current = None if context is None else context.name

    def get(self) -> tuple[str, GenerationState]:
        """``(context name, its state)`` for the call in progress."""
        context = self._current or DEFAULT_CONTEXT
        key = _SHARED if self.shared else context
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = GenerationState(self.pipeline_config)
        return context, state

    def reset(self, *args: Any, **kwargs: Any) -> None:
        for state in self._states.values():
            state.reset()
        self._states.clear()
        self._current = None
        super().reset()

    @property
    def contexts(self) -> tuple[str, ...]:
        """Names of the states alive now (empty right after a reset)."""
        return tuple(self._states)

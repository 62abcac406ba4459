"""The four plugin protocols of the compression pipeline and the result every strategy returns.

Why it is shaped like this: the same pipeline serves two very different streams, and the call
signatures are chosen so that one plugin works for both.

- **LLM KV caches** (tqai-torch, tqai-mlx): a layer's keys and values arrive as ``(B, H, T, D)``
  (batch, KV heads, tokens, head dim). At prefill ``T`` is the prompt length; at each decode step
  ``T`` is the number of new tokens (usually 1) and the history only grows.
- **Video DiTs** (tqai-diffusers): every denoising step recomputes the *same* layer's K/V over the
  *same* ``T = frames x height x width`` latent tokens, so step ``s`` can be predicted from step
  ``s - 1`` (DiTFastAttn, Yuan et al., arXiv:2406.08552). With classifier-free guidance the
  conditional and unconditional passes give two nearly equal tensors per step, either batched
  (batch ``2B``: unconditional half first, then conditional, as diffusers concatenates them) or
  as two separate calls.

Every method takes the array first and the call context as keyword-only arguments:

- ``layer``: the attention layer index (the adapter's numbering); ``None`` for a lone tensor.
- ``step``: the decode step (LLM) or the denoising step, 0 being the first and noisiest (DiT).
  :class:`~tqai.pipeline.pipeline.CompressionPipeline` counts calls per ``(layer, stream)`` when
  the caller passes no step.
- ``stream``: ``"k"`` or ``"v"``; ``None`` for a lone tensor.

Stateful plugins keep their state per ``(layer, stream)`` key (and start afresh for a key whose
tensor shape changed); ``reset()`` forgets all of it, e.g. between two generations.

Arrays may come from any array-API namespace (numpy, torch, mlx.core, array-api-strict); plugins
resolve it with :func:`tqai._xp.namespace` and never convert to numpy on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

from tqai.container import QuantizedTensor, QuantizerSpec

__all__ = [
    "FEATURES",
    "CompressionResult",
    "ModelAdapter",
    "Monitor",
    "Quantizer",
    "QuantizerSource",
    "Scorer",
    "Strategy",
]

FEATURES: Mapping[str, str] = MappingProxyType(
    {
        "appended_kv": "each step appends new tokens' K/V to a growing history (LLM decode)",
        "recomputed_kv": "each step recomputes a layer's K/V over the same tokens (DiT denoising)",
        "cfg": "classifier-free guidance runs a conditional and an unconditional pass per step",
    }
)
"""Model-family facts an adapter can state and a strategy can require, with their meaning."""


@runtime_checkable
class Quantizer(Protocol):
    """What a strategy needs from a quantizer: ``tqai.quantizers.TurboQuantMSE`` and kin.

    Attributes:
        spec: the :class:`~tqai.container.QuantizerSpec` (kind, ``d``, ``n_bits``, rotation...).
    """

    spec: QuantizerSpec

    def quantize(self, x: Any, *, xp: Any = None) -> QuantizedTensor:
        """Quantize ``(..., d)`` floating vectors into a :class:`QuantizedTensor`."""
        ...

    def dequantize(self, qt: QuantizedTensor, *, dtype: Any = None, xp: Any = None) -> Any:
        """Reconstruct ``qt.shape + (d,)`` vectors (in ``dtype``, default the original dtype)."""
        ...


@runtime_checkable
class QuantizerSource(Protocol):
    """Hands strategies a quantizer for any vector size and bit width (see ``QuantizerBank``)."""

    def get(self, d: int, n_bits: int) -> Quantizer:
        """The quantizer for ``d``-vectors at ``n_bits`` bits per coordinate (built once)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class CompressionResult:
    """What a strategy returns: the reconstruction the model sees and the bits it cost.

    Attributes:
        reconstruction: the decompressed tensor, ``x``'s shape, dtype and namespace.
        bits: every bit stored for this call: packed codes, norms and QJL bits of the payload,
            plus the strategy's side information (routing masks, prediction modes, reuse
            flags). A reused tensor costs only its flags.
        n_coords: coordinates of ``x`` (``prod(x.shape)``), the denominator of
            :attr:`bits_per_coord`.
        n_bits: the base bit width the strategy was given (after any monitor adjustment).
        payload: the :class:`~tqai.container.QuantizedTensor` objects actually stored.
        info: strategy-specific facts for logs and tests, e.g. ``{"high_tokens": 12}`` or
            ``{"order_counts": (3, 0, 61)}``; plain Python values only.
    """

    reconstruction: Any = field(repr=False)
    bits: int
    n_coords: int
    n_bits: int
    payload: tuple[QuantizedTensor, ...] = field(default=(), repr=False)
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bits_per_coord(self) -> float:
        """Average stored bits per coordinate of ``x`` (everything counted)."""
        return self.bits / self.n_coords if self.n_coords else math.nan


@runtime_checkable
class Scorer(Protocol):
    """Per-token importance: which tokens deserve bits.

    Scores are finite, non-negative and ordered "more important first"; strategies use them to
    rank tokens jointly over the whole tensor (all batch rows, heads and tokens), so a scorer
    whose scores are comparable across heads (e.g. calibrated per-head weights) moves bits
    between heads. A scorer may keep running statistics per ``(layer, stream)``.

    Optional class attribute: ``description`` (one line, shown in docs and logs).
    """

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """Rate every token of ``x``.

        Args:
            x: ``(..., T, D)`` floating array, typically ``(B, H, T, D)``.
            layer, step, stream: call context (see the module docstring).

        Returns:
            ``x.shape[:-1]`` float32 array (float64 for float64 input) in ``x``'s namespace.
        """
        ...

    def reset(self) -> None:
        """Forget all running state."""
        ...


@runtime_checkable
class Strategy(Protocol):
    """How to compress one tensor with the core quantizers, given token scores.

    Optional class attributes read by the pipeline:

    - ``needs_scores: ClassVar[bool]`` (default False): the strategy ranks tokens, so the
      pipeline refuses a config without a scorer.
    - ``requires: ClassVar[frozenset[str]]`` (default empty): :data:`FEATURES` the model must
      have, e.g. ``{"recomputed_kv"}`` for strategies that predict step ``s`` from ``s - 1``;
      the pipeline refuses an adapter that lacks them.
    - ``per_token: bool`` (default False): every batch row and head of a token is stored at one
      width, and a result with several payloads lists the tokens each holds in
      ``info["token_index"]`` (payload ``i`` has shape ``(..., len(token_index[i]))``). The LLM
      KV caches store only such strategies (``tiered`` with ``rank="token"``).
    - ``cache_kwargs: ClassVar[Mapping[str, Any]]`` (default none): keyword arguments an LLM
      cache passes when it builds the strategy from a name (``tiered``: ``{"rank": "token"}``).
    """

    def compress(
        self,
        x: Any,
        scores: Any,
        quantizers: QuantizerSource,
        *,
        n_bits: int,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> CompressionResult:
        """Compress ``x`` and report the reconstruction and every bit spent.

        Args:
            x: ``(..., T, D)`` floating array, typically ``(B, H, T, D)``.
            scores: ``x.shape[:-1]`` float array from the scorer, or ``None`` without one.
            quantizers: source of quantizers (``quantizers.get(D, bits)``).
            n_bits: base bit width for this call (1..8), after monitor adjustment.
            layer, step, stream: call context (see the module docstring).

        Returns:
            A :class:`CompressionResult` whose reconstruction matches ``x`` in shape, dtype
            and namespace.
        """
        ...

    def reset(self) -> None:
        """Forget all state (reference tensors of earlier steps, pending CFG halves)."""
        ...


@runtime_checkable
class Monitor(Protocol):
    """Runtime feedback: watches each compressed tensor and moves the next call's bit width.

    The pipeline calls ``adjust`` before a strategy runs (with what was observed so far) and
    ``observe`` after it, so a monitor reacts from the next step on.
    """

    def observe(
        self,
        x: Any,
        result: CompressionResult,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
        queries: Any = None,
    ) -> None:
        """Record one compressed tensor.

        Args:
            x: the original ``(..., T, D)`` tensor.
            result: what the strategy returned for it.
            queries: optional ``(B, Hq, Tq, D)`` queries of the same layer (``Hq`` a multiple
                of ``H`` under grouped-query attention), for monitors that look at attention.
            layer, step, stream: call context (see the module docstring).
        """
        ...

    def adjust(self, n_bits: int, *, layer: int | None = None, stream: str | None = None) -> int:
        """Return the bit width to use for the next tensor of ``(layer, stream)`` (1..8)."""
        ...

    def reset(self) -> None:
        """Forget all observations."""
        ...


@runtime_checkable
class ModelAdapter(Protocol):
    """Facts about a model family that the pipeline and the integrations rely on.

    Attributes:
        name: the adapter's plugin name (``"llm"``, ``"dit"``, ``"wan"``).
        step_semantics: ``"decode"`` (a step generates tokens; K/V are appended) or
            ``"denoise"`` (a step is one denoising step; K/V are recomputed).
        features: the :data:`FEATURES` the family has.
        cfg_layout: ``"batched"`` (one call with batch ``2B``, unconditional half first),
            ``"split"`` (two calls per step) or ``None`` (no classifier-free guidance).
    """

    name: ClassVar[str]
    step_semantics: ClassVar[str]
    features: ClassVar[frozenset[str]]
    cfg_layout: ClassVar[str | None]

    def layer_index(self, module_name: str) -> int | None:
        """The attention layer index of a module's qualified name, or ``None`` if not one."""
        ...

    def num_layers(self, config: Mapping[str, Any]) -> int:
        """Attention layers of a model, from its config (a ``to_dict()`` of the HF config)."""
        ...

    def kv_heads(self, config: Mapping[str, Any]) -> int:
        """K/V heads per layer (the ``H`` of ``(B, H, T, D)``)."""
        ...

    def head_dim(self, config: Mapping[str, Any]) -> int:
        """The ``D`` of ``(B, H, T, D)``."""
        ...

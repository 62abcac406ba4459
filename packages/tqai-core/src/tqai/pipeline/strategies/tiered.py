"""tiered: score-routed dual bit widths (the top fraction of tokens at high bits, the rest low).

Mixed-precision KV caches keep important tokens at more bits than the rest (e.g. MiKV, Yang et
al., arXiv:2402.18096; ZipCache, He et al., arXiv:2405.14256). Here importance comes from any
scorer and the two tiers are TurboQuant quantizers of different widths. Tokens are ranked
*jointly over the whole tensor* (every batch row, head and token), so a scorer whose scores are
comparable across heads (``fisher_static``) moves bits between heads as well as tokens.

Every token costs its tier's codes and norm, and each token also costs one routing bit (which
tier it went to), so the reported bits are what a cache holding the payload and the mask stores.
With the default widths ``n_bits + 1`` and ``n_bits - 1`` on half of the tokens each, the average
equals ``n_bits`` plus the mask. Because the distortion of a quantizer falls convexly with its
width (about ``4^-b``), splitting the bits this way only pays off when the scores single out the
tokens that carry the error: with TurboQuant that means high-norm tokens.

Two ranking modes:

- ``rank="joint"`` (default; what diffusion models use, whose K/V are recomputed over the same
  tokens every step): the top ``fraction`` of all ``B * H * T`` vectors of the call go high.
- ``rank="token"`` (what the LLM caches use; they set it): one width per *token*, shared by
  every batch row and head, so a cache can keep each width's tokens as one packed
  ``(B, H, T_w)`` history. The routing rule, per ``(layer, stream)``:

  1. a token's score is the scorer's ``(..., T)`` scores averaged over every axis but ``T``
     (batch rows and heads);
  2. token ``t`` is compared with the scores of the ``horizon`` tokens before it (earlier calls
     included): it goes high when fewer than ``f_t * (n_prev + 1)`` of them score higher,
     ``n_prev`` being how many there are;
  3. ``f_t = clip(fraction + (fraction * seen - high) / settle, 0, 1)``: a budget feedback that
     repays tokens owed to (or taken from) the high tier within about ``settle`` tokens, so the
     routed share stays at ``fraction`` even when scores drift (e.g. grow along the sequence).

  The route of a token depends only on the tokens before it and on itself, so committing a
  chunk at once routes it exactly as committing it token by token (given the same scores).
  Each token costs one routing bit per stream (its width flag), not one per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.codebooks import validate_n_bits
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult, QuantizerSource

__all__ = ["RANKS", "TieredStrategy"]

RANKS: tuple[str, ...] = ("joint", "token")
"""Ranking modes: all vectors of a call jointly, or one width per token (LLM caches)."""


class TieredStrategy:
    """Top ``fraction`` of tokens (by score) at ``high_bits``, the rest at ``low_bits``.

    Args:
        fraction: share of tokens in the high tier, in ``[0, 1]`` (rounded to whole tokens).
        high_bits: width of the high tier; ``None`` means ``n_bits + 1`` (at most 8).
        low_bits: width of the low tier; ``None`` means ``n_bits - 1`` (at least 1).
        rank: ``"joint"`` or ``"token"`` (see the module docstring).
        horizon: ``rank="token"``: earlier tokens a token's score is ranked against (>= 1).
        settle: ``rank="token"``: tokens over which a budget deviation is repaid (>= 1).

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.bank import QuantizerBank
        >>> x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        >>> res = TieredStrategy(fraction=0.25).compress(
        ...     x, np.arange(4.0), QuantizerBank(), n_bits=3)
        >>> res.info["high_tokens"], [qt.spec.n_bits for qt in res.payload]
        (1, [4, 2])
    """

    name: ClassVar[str] = "tiered"
    description: ClassVar[str] = "top fraction of tokens by score at high bits, the rest at low"
    needs_scores: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset()
    #: What an LLM cache builds it with (tqai.kvstore.build_cache_pipeline): one width per token.
    cache_kwargs: ClassVar[Mapping[str, Any]] = MappingProxyType({"rank": "token"})

    def __init__(
        self,
        *,
        fraction: float = 0.5,
        high_bits: int | None = None,
        low_bits: int | None = None,
        rank: str = "joint",
        horizon: int = 256,
        settle: int = 64,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if high_bits is not None:
            validate_n_bits(high_bits, name="high_bits")
        if low_bits is not None:
            validate_n_bits(low_bits, name="low_bits")
        if high_bits is not None and low_bits is not None and high_bits < low_bits:
            raise ValueError(f"high_bits ({high_bits}) must be >= low_bits ({low_bits})")
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(map(repr, RANKS))}, got {rank!r}")
        for name, value in (("horizon", horizon), ("settle", settle)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.fraction = float(fraction)
        self.high_bits = high_bits
        self.low_bits = low_bits
        self.rank = rank
        self.horizon = horizon
        self.settle = settle
        # rank="token": per (layer, stream), the last `horizon` token scores, tokens seen, high
        self._history: dict[tuple[Any, Any], tuple[np.ndarray, int, int]] = {}

    @property
    def per_token(self) -> bool:
        """True when every batch row and head stores a token at the same width (``"token"``)."""
        return self.rank == "token"

    def widths(self, n_bits: int) -> tuple[int, int]:
        """``(high, low)`` bit widths for base width ``n_bits``."""
        high = min(n_bits + 1, 8) if self.high_bits is None else self.high_bits
        low = max(n_bits - 1, 1) if self.low_bits is None else self.low_bits
        return max(high, low), low

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
        """Route tokens by score to two widths; see :class:`~tqai.pipeline.protocols.Strategy`."""
        _ops.check_tokens(x, "tiered")
        if scores is None:
            raise ValueError("tiered routes tokens by score: pass the scorer's scores")
        if self.per_token:
            return self._compress_tokens(x, scores, quantizers, n_bits, (layer, stream))
        xp = _xp.namespace(x)
        lead, d = tuple(x.shape[:-1]), x.shape[-1]
        n = math.prod(lead)
        flat = xp.reshape(x, (n, d))
        high, low = self.widths(n_bits)
        k = round(self.fraction * n)
        if high == low or k in (0, n):
            width = high if k == n else low
            qt, rec = _ops.roundtrip(quantizers.get(d, width), flat, xp=xp)
            return _ops.result(
                x,
                rec,
                (qt,),
                side_bits=0,
                n_bits=n_bits,
                xp=xp,
                high_tokens=n if width == high else 0,
                high_bits=high,
                low_bits=low,
            )
        ranking = xp.reshape(xp.astype(xp.broadcast_to(scores, lead), xp.float32), (n,))
        order = xp.argsort(-ranking, axis=-1)
        qt_high, rec_high = _ops.quantize_rows(quantizers.get(d, high), flat, order[:k], k, xp=xp)
        qt_low, rec_low = _ops.quantize_rows(quantizers.get(d, low), flat, order[k:], n - k, xp=xp)
        rec = _ops.merge_rows([rec_high, rec_low], order, xp=xp)
        return _ops.result(
            x,
            rec,
            (qt_high, qt_low),
            side_bits=n,
            n_bits=n_bits,
            xp=xp,
            high_tokens=k,
            high_bits=high,
            low_bits=low,
        )

    def route(self, token_scores: Any, key: tuple[Any, Any] = (None, None)) -> np.ndarray:
        """``rank="token"`` routing of ``(T,)`` token scores: a boolean ``(T,)`` host array,
        True = high tier (the rule of the module docstring; updates the state of ``key``)."""
        s = np.asarray(token_scores, dtype=np.float64).reshape(-1)
        past, seen, high = self._history.get(key, (np.zeros(0), 0, 0))
        h = self.horizon
        both = np.concatenate([past, s])
        n, p = s.shape[0], past.shape[0]
        # Scores above token t among the (at most h) scores just before it.
        pad = np.concatenate([np.full(h, -np.inf), both])
        before = np.lib.stride_tricks.sliding_window_view(pad, h)[p : p + n]
        above = np.sum(before > s[:, None], axis=1)
        counts = np.minimum(np.arange(p, p + n), h)
        routed = np.zeros(n, dtype=bool)
        for t in range(n):
            share = min(max(self.fraction + (self.fraction * seen - high) / self.settle, 0.0), 1.0)
            routed[t] = above[t] < share * (counts[t] + 1)
            seen += 1
            high += int(routed[t])
        self._history[key] = (both[-h:], seen, high)
        return routed

    def _compress_tokens(
        self, x: Any, scores: Any, quantizers: QuantizerSource, n_bits: int, key: tuple
    ) -> CompressionResult:
        xp = _xp.namespace(x)
        lead, t, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
        token_scores = xp.astype(xp.broadcast_to(scores, (*lead, t)), xp.float32)
        token_scores = xp.reshape(token_scores, (-1, t))
        token_scores = _xp.to_host(xp.mean(token_scores, axis=0))
        high, low = self.widths(n_bits)
        routed = self.route(token_scores, key)
        if high == low:
            routed[:] = True
        index = (np.flatnonzero(routed), np.flatnonzero(~routed))
        payload, parts, kept = [], [], []
        device = _xp.device_of(x)
        for width, idx in zip((high, low), index, strict=True):
            if not idx.size:
                continue
            rows = xp.take(x, xp.asarray(idx, dtype=xp.int64, device=device), axis=-2)
            qt, rec = _ops.roundtrip(quantizers.get(d, width), rows, xp=xp)
            payload.append(qt)
            parts.append(rec)
            kept.append(tuple(int(i) for i in idx))
        order = np.concatenate([np.asarray(i, dtype=np.int64) for i in kept])
        rec = parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2)
        if len(parts) > 1:
            inverse = xp.asarray(np.argsort(order), dtype=xp.int64, device=device)
            rec = xp.take(rec, inverse, axis=-2)
        return _ops.result(
            x,
            rec,
            tuple(payload),
            side_bits=0 if high == low else t,
            n_bits=n_bits,
            xp=xp,
            high_tokens=int(routed.sum()),
            high_bits=high,
            low_bits=low,
            token_index=tuple(kept),
        )

    def reset(self) -> None:
        """Forget the routing state (``rank="token"``); the joint mode keeps none."""
        self._history.clear()

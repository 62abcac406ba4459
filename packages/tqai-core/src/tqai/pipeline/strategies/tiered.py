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
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from tqai import _xp
from tqai.codebooks import validate_n_bits
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult, QuantizerSource

__all__ = ["TieredStrategy"]


class TieredStrategy:
    """Top ``fraction`` of tokens (by score) at ``high_bits``, the rest at ``low_bits``.

    Args:
        fraction: share of tokens in the high tier, in ``[0, 1]`` (rounded to whole tokens).
        high_bits: width of the high tier; ``None`` means ``n_bits + 1`` (at most 8).
        low_bits: width of the low tier; ``None`` means ``n_bits - 1`` (at least 1).

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

    def __init__(
        self,
        *,
        fraction: float = 0.5,
        high_bits: int | None = None,
        low_bits: int | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if high_bits is not None:
            validate_n_bits(high_bits, name="high_bits")
        if low_bits is not None:
            validate_n_bits(low_bits, name="low_bits")
        if high_bits is not None and low_bits is not None and high_bits < low_bits:
            raise ValueError(f"high_bits ({high_bits}) must be >= low_bits ({low_bits})")
        self.fraction = float(fraction)
        self.high_bits = high_bits
        self.low_bits = low_bits

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

    def reset(self) -> None:
        """Stateless: nothing to forget."""

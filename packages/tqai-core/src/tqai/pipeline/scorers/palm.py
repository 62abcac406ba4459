"""palm: EMA novelty ("surprise") of each token against the running statistics of its stream.

A token is important when the stream did not expect it. Per ``(layer, stream)`` and per row of
the leading axes (per batch element and head of a ``(B, H, T, D)`` tensor) the scorer keeps an
exponential moving average of the channel means ``mu`` and channel variances ``var`` of the tokens
seen so far, and scores each new token by its squared standardized distance from them::

    score_i = sum_d (x_id - mu_d)^2 / (sum_d var_d + eps)

(a diagonal-covariance Mahalanobis surprise, normalized by the total variance so scores are
comparable across heads and steps: a typical token scores about 1). Scores are computed against
the statistics of *earlier* calls, then the statistics absorb the new tokens with weight
``momentum``::

    mu  <- (1 - momentum) * mu  + momentum * mean_T(x)
    var <- (1 - momentum) * var + momentum * mean_T((x - mu_old)^2)

so a pattern that keeps recurring stops being surprising (habituation), while an outlier that
the stream has not seen scores high. The first call of a key has no history and is scored
against its own token statistics.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops

__all__ = ["PalmScorer"]


class PalmScorer:
    """EMA novelty of each token against its stream's running channel statistics.

    Args:
        momentum: EMA weight of the newest call's statistics, in ``(0, 1]``.
        eps: added to the total variance (guards constant streams).

    Example:
        >>> import numpy as np
        >>> x = np.zeros((1, 1, 8, 4), dtype=np.float32)
        >>> scorer = PalmScorer()
        >>> _ = scorer.score(x + 1.0, layer=0, stream="k")     # the stream learns "all ones"
        >>> x[..., 3, :] = 5.0                                  # one unexpected token
        >>> s = scorer.score(x + 1.0, layer=0, stream="k")
        >>> int(np.argmax(s[0, 0]))
        3
    """

    name: ClassVar[str] = "palm"
    description: ClassVar[str] = "EMA novelty: standardized distance from running channel stats"

    def __init__(self, *, momentum: float = 0.1, eps: float = 1e-6) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self._stats: dict[tuple[Any, Any], tuple[Any, Any]] = {}

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., T, D) -> (..., T)`` novelty scores (see the module docstring)."""
        _ops.check_tokens(x, "palm")
        xp = _xp.namespace(x)
        xc = xp.astype(x, _ops.compute_dtype(x, xp))
        key = (layer, stream)
        batch_mean = xp.mean(xc, axis=-2, keepdims=True)
        stats = self._stats.get(key)
        if stats is None or tuple(stats[0].shape) != tuple(batch_mean.shape):
            centered = xc - batch_mean
            stats = (batch_mean, xp.mean(centered * centered, axis=-2, keepdims=True))
        mu, var = stats
        dev = xc - mu
        total_var = xp.sum(var, axis=-1) + self.eps  # (..., 1)
        scores = xp.sum(dev * dev, axis=-1) / total_var
        m = self.momentum
        new_var = (1 - m) * var + m * xp.mean(dev * dev, axis=-2, keepdims=True)
        self._stats[key] = ((1 - m) * mu + m * batch_mean, new_var)
        return scores

    def reset(self) -> None:
        """Forget the running statistics of every ``(layer, stream)``."""
        self._stats.clear()

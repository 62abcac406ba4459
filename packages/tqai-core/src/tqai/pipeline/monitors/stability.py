"""stability: raise the bit width of a layer whose attention entropy compression keeps shifting.

Attention is a softmax, so a small error in the keys can sharpen or flatten a distribution and
change what a head attends to; QuantSparse (arXiv:2509.23681) calls the compounded effect of
quantization noise on attention an "attention shift". The entropy of each query's attention
distribution is a one-number summary of its shape, and its change under compression is a cheap,
scale-free alarm. After every compressed key tensor the monitor measures::

    shift = mean_q |H(softmax(q K_hat^T / sqrt(D))) - H(softmax(q K^T / sqrt(D)))| / log(T)

(normalized by the largest possible entropy, ``log T``), keeps an exponential moving average per
layer, and adds bits while the average is high::

    n_bits' = n_bits + min(max_extra_bits, floor(ema / threshold))

The feedback closes the loop: more bits shrink the shift, the average decays and the width comes
back down. Queries are the layer's real queries when the caller passes them (grouped-query heads
are folded onto their K/V head). Otherwise ``num_queries`` seeded random probe directions stand
in for them, each scaled so that its logits over the original keys have unit standard deviation
(a moderately peaked attention, where the entropy responds to key errors; keys themselves would
make poor probes, since a key attends sharply to itself whatever the noise). Value tensors carry
no attention distribution and are not observed.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult

__all__ = ["StabilityMonitor", "attention_entropy"]


def attention_entropy(queries: Any, keys: Any, *, xp: ModuleType | None = None) -> Any:
    """Entropy (nats) of each query's softmax attention over ``keys``.

    Args:
        queries: ``(..., Q, D)`` floating array.
        keys: ``(..., T, D)`` floating array (leading axes broadcast with ``queries``).

    Returns:
        ``(..., Q)`` entropies in ``[0, log T]``, in the compute dtype.
    """
    xp = _xp.namespace(queries, keys, xp=xp)
    dtype = _ops.compute_dtype(keys, xp)
    q = xp.astype(queries, dtype)
    k = xp.astype(keys, dtype)
    logits = (q @ xp.matrix_transpose(k)) / math.sqrt(k.shape[-1])
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    weights = xp.exp(logits)
    total = xp.sum(weights, axis=-1, keepdims=True)
    p = weights / total
    # H = log(sum e^l) - sum p l  (with the max already subtracted, log-sum-exp is log(total)).
    return xp.log(total[..., 0]) - xp.sum(p * logits, axis=-1)


def _fold_queries(queries: Any, keys: Any, *, xp: ModuleType) -> Any:
    """Map ``(B, Hq, Tq, D)`` queries onto ``(B, H, G*Tq, D)`` for ``H`` K/V heads."""
    if queries.ndim != keys.ndim or queries.ndim < 3:
        raise ValueError(
            f"queries must be (..., Hq, Tq, D) like the keys {tuple(keys.shape)}, "
            f"got {tuple(queries.shape)}"
        )
    hq, h = queries.shape[-3], keys.shape[-3]
    if hq == h:
        return queries
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of the K/V heads ({h})")
    lead = tuple(queries.shape[:-3])
    tq, d = queries.shape[-2], queries.shape[-1]
    return xp.reshape(queries, (*lead, h, (hq // h) * tq, d))


class StabilityMonitor:
    """EMA of the compression-induced attention-entropy shift; adds bits while it is high.

    Args:
        threshold: normalized entropy shift worth one extra bit (> 0).
        momentum: EMA weight of the newest observation, in ``(0, 1]``.
        max_extra_bits: most bits added on top of the base width.
        num_queries: random probe queries used when the caller passes no queries.

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.protocols import CompressionResult
        >>> k = np.random.default_rng(0).standard_normal((1, 2, 32, 16)).astype(np.float32)
        >>> noisy = k + np.random.default_rng(1).standard_normal(k.shape).astype(np.float32)
        >>> res = CompressionResult(reconstruction=noisy, bits=0, n_coords=k.size, n_bits=2)
        >>> monitor = StabilityMonitor(threshold=0.01)
        >>> monitor.observe(k, res, layer=0, stream="k")
        >>> monitor.adjust(2, layer=0, stream="k") > 2
        True
    """

    name: ClassVar[str] = "stability"
    description: ClassVar[str] = "EMA of attention-entropy shift under compression; bits up"

    def __init__(
        self,
        *,
        threshold: float = 0.02,
        momentum: float = 0.2,
        max_extra_bits: int = 2,
        num_queries: int = 16,
    ) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if isinstance(max_extra_bits, bool) or not isinstance(max_extra_bits, int):
            raise ValueError(f"max_extra_bits must be an integer >= 0, got {max_extra_bits!r}")
        if max_extra_bits < 0 or num_queries < 1:
            raise ValueError("max_extra_bits must be >= 0 and num_queries >= 1")
        self.threshold = float(threshold)
        self.momentum = float(momentum)
        self.max_extra_bits = max_extra_bits
        self.num_queries = int(num_queries)
        self.ema: dict[Any, float] = {}
        self._constants = _xp.HostConstants()

    def shift(self, keys: Any, reconstruction: Any, queries: Any = None) -> float:
        """Normalized mean entropy shift of attention over ``keys`` vs ``reconstruction``."""
        xp = _xp.namespace(keys)
        t = keys.shape[-2]
        if t < 2:
            return 0.0
        if queries is None:
            queries = self._probes(keys, xp=xp)
        else:
            queries = _fold_queries(queries, keys, xp=xp)
        before = attention_entropy(queries, keys, xp=xp)
        after = attention_entropy(queries, reconstruction, xp=xp)
        return float(xp.mean(xp.abs(after - before))) / math.log(t)

    def _probes(self, keys: Any, *, xp: ModuleType) -> Any:
        """``(..., num_queries, D)`` seeded probes with unit-std logits over ``keys``."""
        d = keys.shape[-1]
        host = np.random.default_rng([d, self.num_queries, 0x57AB]).standard_normal(
            (self.num_queries, d)
        )
        k = xp.astype(keys, _ops.compute_dtype(keys, xp))
        probes = self._constants.get(f"probes{d}", host, k, xp)
        logits = (probes @ xp.matrix_transpose(k)) / math.sqrt(d)  # (..., Q, T)
        centred = logits - xp.mean(logits, axis=-1, keepdims=True)
        std = xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True))
        std = xp.where(std > 0, std, xp.ones_like(std))
        return probes / std

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
        """Fold the entropy shift of one compressed key tensor into the layer's average."""
        if stream not in (None, "k"):
            return
        _ops.check_tokens(x, "stability")
        value = self.shift(x, result.reconstruction, queries)
        old = self.ema.get(layer)
        m = self.momentum
        self.ema[layer] = value if old is None else (1 - m) * old + m * value

    def adjust(self, n_bits: int, *, layer: int | None = None, stream: str | None = None) -> int:
        """``n_bits`` plus one bit per ``threshold`` of average shift (capped), at most 8."""
        extra = min(self.max_extra_bits, int(self.ema.get(layer, 0.0) / self.threshold))
        return min(8, n_bits + extra)

    def reset(self) -> None:
        """Forget every layer's average."""
        self.ema.clear()

"""Closed-loop temporal prediction with per-vector fallback: the engine of delta and delta2.

Why it is shaped like this: in a video DiT every denoising step recomputes a layer's K/V over the
same tokens, and successive steps are close (DiTFastAttn, Yuan et al., arXiv:2406.08552), so a
tensor is cheaper to code as a residual from a prediction built out of earlier steps. TurboQuant
stores each vector's norm and quantizes its direction, so its error scales with the norm of what
it quantizes: a residual ten times smaller than the vector costs the same bits and leaves a
hundred times less squared error.

Predictions of order ``m`` from the reconstructions ``r_{t-1}, r_{t-2}`` of earlier steps::

    order 0 (full):    p = 0
    order 1 (delta):   p = r_{t-1}
    order 2 (delta2):  p = 2 r_{t-1} - r_{t-2}        (linear extrapolation)

The predictions use *reconstructions*, not the original tensors (closed loop), so the decoder can
form them too and errors never accumulate from step to step. With ``fallback=True`` each vector
picks the available order with the smallest residual norm (ties go to the higher order, i.e. the
chain ``2 -> 1 -> full`` falls back only when the prediction is strictly worse), and the choice
costs ``ceil(log2(orders + 1))`` bits per vector. The first step of a layer (or a step whose
shape differs from the previous one) has no history and is coded in full at no extra cost.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult, QuantizerSource

__all__ = ["PredictiveStrategy"]


class PredictiveStrategy:
    """Code each tensor as the residual of a prediction of order up to ``max_order``.

    Subclasses set ``max_order`` (1 for delta, 2 for delta2) and ``name``.

    Args:
        fallback: pick the best order per vector (costs mode bits); ``False`` always uses the
            highest order the history allows and stores no side information.
    """

    name: ClassVar[str]
    max_order: ClassVar[int]
    needs_scores: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"recomputed_kv"})

    def __init__(self, *, fallback: bool = True) -> None:
        self.fallback = bool(fallback)
        self._history: dict[tuple[Any, Any], tuple[tuple[int, ...], str, list[Any]]] = {}

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
        """Code ``x`` from earlier steps of ``(layer, stream)``; scores are not used."""
        _ops.check_tokens(x, self.name)
        xp = _xp.namespace(x)
        shape, dtype = tuple(x.shape), str(x.dtype)
        n, d = math.prod(shape[:-1]), shape[-1]
        flat = xp.reshape(xp.astype(x, _ops.compute_dtype(x, xp)), (n, d))
        key = (layer, stream)
        kept = self._history.get(key)
        history = kept[2] if kept is not None and kept[:2] == (shape, dtype) else []
        orders = min(len(history), self.max_order)
        quantizer = quantizers.get(d, n_bits)
        counts = [0] * (self.max_order + 1)
        side_bits = 0
        if orders == 0:
            qt, rec = _ops.roundtrip(quantizer, flat, xp=xp)
            counts[0] = n
        else:
            predictions = [history[-1]]
            if orders >= 2:
                predictions.append(2 * history[-1] - history[-2])
            if self.fallback:
                pred, mode = _ops.best_prediction(flat, predictions, xp=xp)
                counts = [
                    _ops.count_true(mode == m, xp=xp) if m <= orders else 0
                    for m in range(self.max_order + 1)
                ]
                side_bits = n * _ops.mode_bits(orders + 1)
            else:
                pred = predictions[-1]
                counts[orders] = n
            qt, rec_residual = _ops.roundtrip(quantizer, flat - pred, xp=xp)
            rec = pred + rec_residual
        self._history[key] = (shape, dtype, [*history, rec][-self.max_order :])
        return _ops.result(
            x, rec, (qt,), side_bits=side_bits, n_bits=n_bits, xp=xp, order_counts=tuple(counts)
        )

    def reset(self) -> None:
        """Forget the reconstructions of earlier steps."""
        self._history.clear()

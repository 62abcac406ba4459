"""lyapunov: move the bit width with the finite-time divergence rate of successive states.

The finite-time Lyapunov exponent of a trajectory measures whether nearby states separate or
converge: ``lambda = log(||delta_t|| / ||delta_{t-1}||)`` per step. Applied to the sequence of
states a layer produces (one tensor per step, per ``(layer, stream)``), with ``delta_t`` the
change since the previous step::

    lambda_t = log(||x_t - x_{t-1}|| / ||x_{t-1} - x_{t-2}||)

A positive exponent means the stream is accelerating away (early denoising, a topic change in
decoding): predictions from earlier steps degrade and compression errors are amplified by what
follows, so bits go up. A negative exponent means the stream is settling (late denoising), where
errors are damped and predictions are good, so bits may go down. The monitor keeps an
exponential moving average per ``(layer, stream)`` and moves the width by one bit::

    n_bits' = n_bits + 1   if ema >  raise_above
    n_bits' = n_bits - 1   if ema <  lower_below   (lower_below=None: never lower)

The exponent is computed from the original tensors (the trajectory of the model, not of the
codec). A key whose tensor shape changes (LLM decode with a growing ``T``) starts afresh.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult

__all__ = ["LyapunovMonitor"]

_TINY = 1e-30


class LyapunovMonitor:
    """EMA of the finite-time divergence rate of successive states; one bit up or down.

    Args:
        raise_above: average exponent (nats per step) above which one bit is added.
        lower_below: average exponent below which one bit is removed; ``None`` never lowers.
        momentum: EMA weight of the newest exponent, in ``(0, 1]``.

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.protocols import CompressionResult
        >>> base = np.ones((4, 8), dtype=np.float32)
        >>> monitor = LyapunovMonitor()
        >>> for t in range(5):                     # the steps grow 2x each time: diverging
        ...     x = base + 2.0**t
        ...     res = CompressionResult(reconstruction=x, bits=0, n_coords=32, n_bits=3)
        ...     monitor.observe(x, res, layer=0, stream="k")
        >>> round(monitor.rate(layer=0, stream="k"), 3), monitor.adjust(3, layer=0, stream="k")
        (0.693, 4)
    """

    name: ClassVar[str] = "lyapunov"
    description: ClassVar[str] = "finite-time divergence rate of successive states; bits up/down"

    def __init__(
        self,
        *,
        raise_above: float = 0.05,
        lower_below: float | None = -0.05,
        momentum: float = 0.3,
    ) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if lower_below is not None and lower_below > raise_above:
            raise ValueError(f"lower_below ({lower_below}) must be <= raise_above ({raise_above})")
        self.raise_above = float(raise_above)
        self.lower_below = None if lower_below is None else float(lower_below)
        self.momentum = float(momentum)
        self._state: dict[tuple[Any, Any], tuple[tuple[int, ...], Any, float | None]] = {}
        self._ema: dict[tuple[Any, Any], float] = {}

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
        """Fold the divergence rate of ``x`` against the previous states into the average."""
        _ops.check_tokens(x, "lyapunov")
        xp = _xp.namespace(x)
        key = (layer, stream)
        xc = xp.astype(x, _ops.compute_dtype(x, xp))
        shape = tuple(x.shape)
        kept = self._state.get(key)
        if kept is None or kept[0] != shape:
            self._state[key] = (shape, xc, None)
            self._ema.pop(key, None)
            return
        _, previous, last_distance = kept
        diff = xc - previous
        distance = math.sqrt(float(xp.sum(diff * diff)))
        if last_distance is not None and last_distance > _TINY and distance > _TINY:
            rate = math.log(distance / last_distance)
            old = self._ema.get(key)
            m = self.momentum
            self._ema[key] = rate if old is None else (1 - m) * old + m * rate
        self._state[key] = (shape, xc, distance)

    def rate(self, *, layer: int | None = None, stream: str | None = None) -> float:
        """The averaged exponent of ``(layer, stream)`` (0 before two changes were seen)."""
        return self._ema.get((layer, stream), 0.0)

    def adjust(self, n_bits: int, *, layer: int | None = None, stream: str | None = None) -> int:
        """``n_bits`` plus one when diverging, minus one when converging (within 1..8)."""
        rate = self.rate(layer=layer, stream=stream)
        if rate > self.raise_above:
            return min(8, n_bits + 1)
        if self.lower_below is not None and rate < self.lower_below:
            return max(1, n_bits - 1)
        return n_bits

    def reset(self) -> None:
        """Forget every trajectory."""
        self._state.clear()
        self._ema.clear()

"""window: reuse the previous step's output where it is still similar enough (step-wise reuse).

DiTFastAttn (Yuan et al., arXiv:2406.08552) shows that a DiT layer's attention output at one
denoising step is often nearly the same as at the previous step and can be reused instead of
recomputed ("attention sharing across timesteps"); diffusers' pyramid attention broadcast and
first-block cache apply the same idea with fixed windows or residual thresholds. This strategy
makes the decision per row of the leading axes (per batch element and head of a ``(B, H, T, D)``
tensor) by cosine similarity::

    reuse row r  iff  cos(x_r, ref_r) >= threshold  and  it was reused < max_reuse steps in a row

where ``ref_r`` is the tensor at the row's last *recompute* (not the previous step), so slow drift
cannot hide behind many small steps. A reused row returns the stored reconstruction and costs no
codes; a recomputed row is quantized afresh and becomes the new reference. Each row costs one
reuse flag. Applied to K/V it reuses compressed K/V; applied by a hook to attention outputs it is
the DiTFastAttn reuse itself.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.protocols import CompressionResult, QuantizerSource

__all__ = ["WindowStrategy", "similar_rows"]


def similar_rows(x: Any, reference: Any, *, threshold: float, xp: Any = None) -> Any:
    """Which rows of ``x`` are still similar enough to ``reference`` to reuse (the window test).

    Args:
        x: ``(R, ...)`` floating array: ``R`` rows (e.g. batch elements or ``(batch, head)``
            pairs flattened), each flattened to one vector.
        reference: the array the rows were last recomputed from, ``x``'s shape and namespace.
        threshold: cosine similarity in ``[-1, 1]`` at or above which a row counts as similar.

    Returns:
        ``(R,)`` boolean array: ``cos(x_r, reference_r) >= threshold`` (two zero rows are
        identical). Used by :class:`WindowStrategy` and by hooks that reuse a layer's
        attention output without recomputing it (tqai-diffusers).
    """
    xp = _xp.namespace(x, reference, xp=xp)
    if tuple(x.shape) != tuple(reference.shape):
        raise ValueError(
            f"x and reference must have equal shapes, got {tuple(x.shape)} and "
            f"{tuple(reference.shape)}"
        )
    dtype = _ops.compute_dtype(x, xp)
    a, b = xp.astype(x, dtype), xp.astype(reference, dtype)
    return _ops.flat_cosine(a, b, lead=1, xp=xp) >= threshold


class WindowStrategy:
    """Reuse each row's previous reconstruction while it stays similar; recompute otherwise.

    Args:
        threshold: cosine similarity to the row's reference at or above which the row is
            reused, in ``[-1, 1]``.
        max_reuse: most consecutive steps a row may be reused before it is recomputed
            (``None``: no limit).

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.bank import QuantizerBank
        >>> x = np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)
        >>> w, bank = WindowStrategy(threshold=0.99), QuantizerBank()
        >>> _ = w.compress(x, None, bank, n_bits=3, layer=0, stream="k")
        >>> y = x.copy()
        >>> y[1] = -y[1]                                  # row 1 changed, row 0 did not
        >>> w.compress(y, None, bank, n_bits=3, layer=0, stream="k").info["reused_rows"]
        1
    """

    name: ClassVar[str] = "window"
    description: ClassVar[str] = "reuse the previous step per row while cosine >= threshold"
    needs_scores: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset({"recomputed_kv"})

    def __init__(self, *, threshold: float = 0.97, max_reuse: int | None = 3) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        if max_reuse is not None and (
            isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1
        ):
            raise ValueError(f"max_reuse must be None or an integer >= 1, got {max_reuse!r}")
        self.threshold = float(threshold)
        self.max_reuse = max_reuse
        self._state: dict[tuple[Any, Any], tuple[tuple[int, ...], str, Any, Any, Any]] = {}

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
        """Reuse or recompute each row of ``x``; scores are not used."""
        _ops.check_tokens(x, "window")
        xp = _xp.namespace(x)
        shape, dtype = tuple(x.shape), str(x.dtype)
        rows = math.prod(shape[:-2])
        t, d = shape[-2], shape[-1]
        x3 = xp.reshape(xp.astype(x, _ops.compute_dtype(x, xp)), (rows, t, d))
        quantizer = quantizers.get(d, n_bits)
        key = (layer, stream)
        state = self._state.get(key)
        if state is None or state[:2] != (shape, dtype):
            qt, rec = _ops.roundtrip(quantizer, x3, xp=xp)
            age = xp.zeros((rows,), dtype=xp.int32, device=_xp.device_of(x3))
            self._state[key] = (shape, dtype, x3, rec, age)
            return _ops.result(
                x, rec, (qt,), side_bits=0, n_bits=n_bits, xp=xp, reused_rows=0, rows=rows
            )
        _, _, ref, previous, age = state
        reuse = similar_rows(x3, ref, threshold=self.threshold, xp=xp)
        if self.max_reuse is not None:
            reuse = reuse & (age < self.max_reuse)
        n_reused = _ops.count_true(reuse, xp=xp)
        n_fresh = rows - n_reused
        order = xp.argsort(xp.astype(reuse, xp.int32), axis=-1)  # recomputed rows first
        qt, rec_fresh = _ops.quantize_rows(quantizer, x3, order[:n_fresh], n_fresh, xp=xp)
        kept = _ops.gather_rows(previous, order[n_fresh:], xp=xp)
        rec = _ops.merge_rows([rec_fresh, kept], order, xp=xp)
        flag = reuse[:, None, None]
        one = xp.ones_like(age)
        self._state[key] = (
            shape,
            dtype,
            xp.where(flag, ref, x3),
            rec,
            xp.where(reuse, age + one, xp.zeros_like(age)),
        )
        return _ops.result(
            x, rec, (qt,), side_bits=rows, n_bits=n_bits, xp=xp, reused_rows=n_reused, rows=rows
        )

    def reset(self) -> None:
        """Forget every row's reference and reconstruction."""
        self._state.clear()

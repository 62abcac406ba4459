"""Array helpers shared by the pipeline plugins (private; pure array API).

Why it is shaped like this: strategies store different subsets of a tensor's vectors at different
bit widths. The array API has no scatter and mlx has no ``nonzero``, so every partition here is
done with one ``argsort`` of a routing key and ``take``: the rows of each part are gathered with
``take``, quantized, and put back with the inverse permutation (``argsort`` of the order). Only
the sizes of the parts cross to the host (one ``int`` each), never the data.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tqai._xp import device_of
from tqai.container import QuantizedTensor
from tqai.pipeline.protocols import CompressionResult, Quantizer

__all__ = [
    "best_prediction",
    "check_tokens",
    "compute_dtype",
    "count_true",
    "flat_cosine",
    "gather_rows",
    "merge_rows",
    "mode_bits",
    "payload_bits",
    "quantize_rows",
    "result",
    "roundtrip",
    "token_energy",
]


def best_prediction(flat: Any, predictions: list[Any], *, xp: ModuleType) -> tuple[Any, Any]:
    """Per row of ``flat``, the candidate prediction with the smallest residual.

    Args:
        flat: ``(N, D)`` vectors to code.
        predictions: candidates ``(N, D)`` of orders 1, 2, ...; order 0 is the zero vector
            (code in full). Ties go to the higher order.

    Returns:
        ``(prediction (N, D), chosen order (N,) int32)``.
    """
    best = xp.sum(flat * flat, axis=-1)
    mode = xp.zeros(best.shape, dtype=xp.int32, device=device_of(flat))
    pred = xp.zeros_like(flat)
    for order, candidate in enumerate(predictions, start=1):
        diff = flat - candidate
        norm = xp.sum(diff * diff, axis=-1)
        better = norm <= best
        best = xp.where(better, norm, best)
        tag = xp.full(best.shape, order, dtype=xp.int32, device=device_of(flat))
        mode = xp.where(better, tag, mode)
        pred = xp.where(better[:, None], candidate, pred)
    return pred, mode


def check_tokens(x: Any, who: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty ``(..., T, D)`` array."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2 or math.prod(shape) == 0:
        raise ValueError(f"{who} needs a non-empty (..., T, D) array of tokens, got shape {shape}")


def compute_dtype(x: Any, xp: ModuleType) -> Any:
    """float64 for float64 input, float32 otherwise (half precision is upcast for the math)."""
    return xp.float64 if x.dtype == xp.float64 else xp.float32


def token_energy(x: Any, *, xp: ModuleType) -> Any:
    """``mean(x**2)`` over the last axis in the compute dtype: ``(..., T, D) -> (..., T)``."""
    xc = xp.astype(x, compute_dtype(x, xp))
    return xp.mean(xc * xc, axis=-1)


def flat_cosine(a: Any, b: Any, *, lead: int, xp: ModuleType, eps: float = 1e-12) -> Any:
    """Cosine similarity of ``a`` and ``b`` per row of their first ``lead`` axes.

    ``a`` and ``b`` have equal shapes; everything after the first ``lead`` axes is flattened.
    Two zero rows count as identical (similarity 1).
    """
    rows = tuple(a.shape[:lead])
    a2 = xp.reshape(a, (*rows, -1))
    b2 = xp.reshape(b, (*rows, -1))
    dot = xp.sum(a2 * b2, axis=-1)
    na = xp.sqrt(xp.sum(a2 * a2, axis=-1))
    nb = xp.sqrt(xp.sum(b2 * b2, axis=-1))
    both_zero = (na <= eps) & (nb <= eps)
    cos = dot / xp.maximum(na * nb, xp.full((), eps, dtype=dot.dtype, device=device_of(dot)))
    return xp.where(both_zero, xp.ones_like(cos), cos)


def count_true(mask: Any, *, xp: ModuleType) -> int:
    """Number of true entries of a boolean array, as a Python int."""
    return int(xp.sum(xp.astype(mask, xp.int32)))


def gather_rows(x2d: Any, index: Any, *, xp: ModuleType) -> Any:
    """``x2d[index]`` along axis 0 (``index`` a 1-D integer array)."""
    return xp.take(x2d, xp.astype(index, xp.int64), axis=0)


def merge_rows(parts: list[Any], order: Any, *, xp: ModuleType) -> Any:
    """Undo a partition: ``parts`` hold the rows ``order[:n0]``, ``order[n0:n0+n1]``, ...

    Returns the rows in their original positions (``order`` is a permutation of
    ``range(sum(len(p) for p in parts))``).
    """
    stacked = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    inverse = xp.argsort(order, axis=-1)
    return gather_rows(stacked, inverse, xp=xp)


def roundtrip(quantizer: Quantizer, x: Any, *, xp: ModuleType) -> tuple[QuantizedTensor, Any]:
    """Quantize ``x`` and dequantize it in the compute dtype: ``(payload, reconstruction)``."""
    qt = quantizer.quantize(x, xp=xp)
    return qt, quantizer.dequantize(qt, dtype=compute_dtype(x, xp), xp=xp)


def quantize_rows(
    quantizer: Quantizer, x2d: Any, index: Any, count: int, *, xp: ModuleType
) -> tuple[QuantizedTensor | None, Any]:
    """Quantize the ``count`` rows ``x2d[index]`` (along axis 0); an empty selection stores nothing.

    Returns:
        ``(payload or None, (count, ...) reconstruction in the compute dtype)``.
    """
    if count == 0:
        shape = (0, *tuple(x2d.shape[1:]))
        return None, xp.zeros(shape, dtype=compute_dtype(x2d, xp), device=device_of(x2d))
    return roundtrip(quantizer, gather_rows(x2d, index, xp=xp), xp=xp)


def payload_bits(payload: tuple[QuantizedTensor, ...]) -> int:
    """Bits really held by the payload arrays (codes, norms, QJL bits, residual norms)."""
    return sum(8 * qt.nbytes for qt in payload)


def mode_bits(n_modes: int) -> int:
    """Bits of a fixed-length code for one of ``n_modes`` choices (0 for a single choice)."""
    return math.ceil(math.log2(n_modes)) if n_modes > 1 else 0


def result(
    x: Any,
    reconstruction: Any,
    payload: tuple[QuantizedTensor | None, ...],
    *,
    side_bits: int,
    n_bits: int,
    xp: ModuleType,
    **info: Any,
) -> CompressionResult:
    """Build a :class:`CompressionResult`, casting the reconstruction back to ``x``'s dtype."""
    stored = tuple(qt for qt in payload if qt is not None)
    return CompressionResult(
        reconstruction=xp.astype(xp.reshape(reconstruction, tuple(x.shape)), x.dtype),
        bits=payload_bits(stored) + side_bits,
        n_coords=math.prod(x.shape),
        n_bits=n_bits,
        payload=stored,
        info=info,
    )

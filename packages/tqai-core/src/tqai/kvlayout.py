"""How one layer's keys or values are coded: centering, outlier-channel split, key balancing.

Three exact rewrites of attention let a cache spend its bits where they matter. The statistics
they need are taken once, from the tokens present when the history first receives tokens (the
prompt, sink tokens left out), and then stay fixed: every token of a layer is coded the same way
and nothing is ever re-encoded. Any fixed statistics keep attention exact; good ones only make
the coded vectors smaller.

- Centering. Keys are stored as ``k - mu_k`` and the history's scores get ``q . mu_k`` back
  (one dot product per query row); values are stored as ``v - mu_v`` and
  ``mu_v * (attention mass on the history)`` is added to the output. Both equal attention over
  the uncentered reconstructions ``mu + x_hat`` (softmax weights sum to one). Sink tokens are
  left out of the means: their keys sit far from the others (attention sinks, Xiao et al. 2023,
  arXiv:2309.17453) and would drag the means away from the bulk of the tokens.
- Outlier-channel split (TurboQuant, arXiv:2504.19874, Section 4.3). A fractional width such as
  3.5 bits splits each head's channels into two sets coded by independent TurboQuant instances:
  the ``round(frac * D)`` channels of largest energy at ``ceil(bits)`` bits, the rest at
  ``floor(bits)``, so the average is the requested width (plus one more norm per token). (The
  paper's example, 32 of 128 channels at 3 bits and 96 at 2, averages 2.25 bits, not the 2.5 it
  states; here the average is what the setting says.)
- Key balancing. ``q . k = (q / s) . (s * k)`` per channel. After the rotation the coding error
  of ``s * k`` is spread evenly over the channels, so the expected squared score error is
  proportional to ``(sum_c Q_c / s_c^2) (sum_c s_c^2 K_c)`` (``Q_c``, ``K_c``: mean squares of
  query and centered key channel ``c`` over the prompt), which Cauchy-Schwarz minimizes at
  ``s_c = (Q_c / K_c)^(1/4)``: the SmoothQuant migration (Xiao et al. 2022, arXiv:2211.10438)
  with the exponent this error model gives. Scales are normalized to geometric mean 1.

Long generations (the update rule). The statistics are fitted once and never updated: at the first
commit into the coded history (the prompt's tokens past the sinks, the recent window's included,
weighted by the prompt's attention where the store saw it; with a prompt no longer than sinks +
window, the tokens past the sinks when the window first overflows, unweighted). Every later token,
however far into the generation, is coded against the same mean, the same loud-channel split and
the same balancing scales. Why not refit: the codes of earlier tokens are relative to the
statistics they were coded with, the originals are gone, and re-coding would compound the error; a
refit would need per-segment statistics. What this costs: attention stays exact for any length (any
fixed statistics are), but a token's coding error grows with what is coded, ``||k - mu_k||``: if
the text drifts away from the prompt, later tokens sit farther from the fitted mean (at worst
centering then codes them worse than no centering would), and a channel that becomes loud only
later is coded at the narrower width. The recent window and the sinks are not affected (full
precision). ``crop``, ``copy``, ``save``/``load`` keep the statistics as fitted (a cache cropped
below the tokens it was fitted from keeps them too).

Arrays: statistics are per batch row and KV head: means and scales ``(B, H, 1, D)`` float32,
channel lists ``(B, H, d_p)`` int64, channel maps ``(B, H, D, d_p)`` float32 (0/1 selections,
times ``s`` for coding keys and ``1 / s`` for reading them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tqai import _xp
from tqai.attention import CodedPart, _group
from tqai.codebooks import MAX_BITS
from tqai.container import ITEMSIZE, QuantizedTensor, dtype_name

__all__ = [
    "StreamCoding",
    "attention_weight_mass",
    "fit_stream",
    "split_widths",
    "validate_bits",
]

_SCALE_LIMIT = 64.0
_TINY = 1e-12
_WEIGHT_QUERIES = 16


def validate_bits(bits: object, *, name: str, low: int = 1) -> int | float:
    """``bits`` as an int, or a float strictly between two widths in ``low..8`` (a split).

    Raises:
        TypeError, ValueError: naming ``name`` and the allowed values.
    """
    if isinstance(bits, bool) or not isinstance(bits, int | float):
        raise TypeError(f"{name} must be a number of bits in {low}..{MAX_BITS}, got {bits!r}")
    if not math.isfinite(bits) or not low <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in {low}..{MAX_BITS} (fractions allowed), got {bits}")
    return int(bits) if float(bits).is_integer() else float(bits)


def split_widths(bits: int | float, d: int, *, name: str = "bits") -> list[tuple[int, int]]:
    """``[(channels, bits)]`` of the parts a width codes ``d`` channels with (largest first).

    An integer width is one part; a fractional width ``b`` puts ``round(frac(b) * d)`` channels
    at ``ceil(b)`` bits and the rest at ``floor(b)``. Each part needs at least 2 channels.

    Raises:
        ValueError: the fraction leaves a part with fewer than 2 channels of ``d``.
    """
    low = math.floor(bits)
    if bits == low:
        return [(d, int(bits))]
    high = round((bits - low) * d)
    if high < 2 or d - high < 2:
        raise ValueError(
            f"{name}={bits} on head_dim {d} puts {high} channel(s) at {low + 1} bits and "
            f"{d - high} at {low}; each set needs at least 2 channels: use a fraction between "
            f"{2 / d:.3g} and {1 - 2 / d:.3g}"
        )
    return [(high, low + 1), (d - high, low)]


@dataclass(frozen=True, slots=True)
class StreamCoding:
    """How one stream (keys or values) of one layer is coded; see the module docstring.

    Attributes:
        quantizers: one per part, ``spec.d`` = the part's channel count.
        channels: per part, the ``(B, H, d_p)`` int64 channel indices (sorted), or None for a
            single part holding all channels in order.
        mean: ``(B, H, 1, D)`` float32 subtracted before coding, or None.
        scale: ``(B, H, 1, D)`` float32 key balancing scales ``s`` (coded ``s * (k - mu)``,
            read with ``q / s``), or None.
    """

    quantizers: tuple[Any, ...]
    channels: tuple[Any | None, ...]
    mean: Any | None = None
    scale: Any | None = None

    @property
    def dim(self) -> int:
        """``D``, the channels of the stream (all parts together)."""
        return sum(q.spec.d for q in self.quantizers)

    def _maps(self, inverse: bool, xp: ModuleType) -> list[Any | None]:
        """Per part, ``(B, H, D, d_p)`` maps: selection times ``s`` (``1 / s`` if ``inverse``)."""
        maps = []
        for ch in self.channels:
            if ch is None and self.scale is None:
                maps.append(None)
                continue
            rows = xp.arange(self.dim, device=_xp.device_of(self.scale if ch is None else ch))
            cols = rows[None, :] if ch is None else ch[..., None, :]
            select = xp.astype(cols == rows[:, None], xp.float32)
            if self.scale is not None:
                s = xp.matrix_transpose(self.scale)  # (B, H, D, 1): row c scaled by s_c
                select = select * (1.0 / s if inverse else s)
            maps.append(select)
        return maps

    def encode(self, x: Any, *, xp: ModuleType) -> list[QuantizedTensor]:
        """Code ``(B, H, T, D)`` vectors: one compressed tensor per part."""
        y = xp.astype(x, xp.float32)
        if self.mean is not None:
            y = y - self.mean
        maps = self._maps(False, xp)
        return [
            q.quantize(y if m is None else y @ m, xp=xp)
            for q, m in zip(self.quantizers, maps, strict=True)
        ]

    def parts(self, codes: Sequence[QuantizedTensor], *, xp: ModuleType) -> tuple[CodedPart, ...]:
        """The parts as attention reads them: key maps carry ``1 / s``, value maps are selections."""
        maps = self._maps(True, xp)
        return tuple(
            CodedPart(c, q, m) for c, q, m in zip(codes, self.quantizers, maps, strict=True)
        )

    def decode(self, codes: Sequence[QuantizedTensor], *, xp: ModuleType) -> Any:
        """``(B, H, T, D)`` float32 reconstructions from the parts' codes."""
        out = None
        for c, q, m in zip(codes, self.quantizers, self._maps(True, xp), strict=True):
            part = q.dequantize(c, dtype=xp.float32, xp=xp)
            if m is not None:
                part = part @ xp.matrix_transpose(m)
            out = part if out is None else out + part
        return out if self.mean is None else out + self.mean

    def arrays(self) -> dict[str, Any]:
        """The statistics by name (for saving): ``mean``, ``scale``, ``channels<p>``."""
        named = {"mean": self.mean, "scale": self.scale}
        named.update({f"channels{p}": ch for p, ch in enumerate(self.channels)})
        return {k: v for k, v in named.items() if v is not None}

    @classmethod
    def from_arrays(cls, quantizers: Sequence[Any], arrays: dict[str, Any]) -> StreamCoding:
        channels = tuple(arrays.get(f"channels{p}") for p in range(len(quantizers)))
        return cls(tuple(quantizers), channels, arrays.get("mean"), arrays.get("scale"))

    def map_batch(self, fn: Callable[[Any], Any]) -> StreamCoding:
        """A coding whose statistics went through ``fn`` along the batch axis."""
        return StreamCoding(
            self.quantizers,
            tuple(None if ch is None else fn(ch) for ch in self.channels),
            None if self.mean is None else fn(self.mean),
            None if self.scale is None else fn(self.scale),
        )

    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * ITEMSIZE[dtype_name(a)] for a in self.arrays().values())


def attention_weight_mass(query: Any, keys: Any, *, scale: float, xp: ModuleType) -> Any:
    """``(B, Hkv, T)``: per token, the sum over the prompt's last queries of its squared causal
    attention weight (``sum_j p_ij^2``), queries grouped under their KV head.

    ``query (B, Hq, T, D)`` and ``keys (B, Hkv, T, D)`` are the prompt's, row ``t`` of one
    matching token ``t`` of the other. Only the last 16 queries are used (memory
    ``O(B * Hq * 16 * T)``), as a sample of how later queries attend.
    """
    _, hq, t, _ = query.shape
    h = keys.shape[1]
    n = min(_WEIGHT_QUERIES, t)
    q = _group(xp.astype(query[:, :, t - n :, :], xp.float32) * scale, h, xp)
    scores = q @ xp.matrix_transpose(xp.astype(keys, xp.float32))  # (B, H, G*n, T)
    rows = xp.arange(t - n, t, device=_xp.device_of(q))
    cols = xp.arange(t, device=_xp.device_of(q))
    causal = cols[None, :] <= rows[:, None]  # (n, T)
    causal = xp.reshape(xp.broadcast_to(causal[None, ...], (hq // h, n, t)), ((hq // h) * n, t))
    scores = xp.where(causal, scores, xp.full_like(scores, -math.inf))
    p = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    p = p / xp.sum(p, axis=-1, keepdims=True)
    return xp.sum(p * p, axis=2)


def fit_stream(
    x: Any,
    bits: int | float,
    make_quantizer: Callable[[int, int, int], Any],
    *,
    center: bool,
    weights: Any | None = None,
    query_sq: Any | None = None,
    xp: ModuleType,
) -> StreamCoding:
    """Fit the coding of one stream from the prompt's vectors.

    Args:
        x: ``(B, H, T, D)`` vectors the statistics come from (sinks excluded by the caller).
        bits: the stream's width (fractional: an outlier-channel split, see :func:`split_widths`).
        make_quantizer: ``(d_p, bits_p, part) -> quantizer``.
        center: subtract a per-head mean: the plain mean, or with ``weights`` the mean weighted
            by them.
        weights: ``(B, H, T)`` non-negative token weights (:func:`attention_weight_mass`): the
            mean that minimizes ``sum_t w_t ||x_t - mu||^2``, the attention-weighted coding
            error, since TurboQuant's error grows with the coded vector's norm.
        query_sq: ``(B, H, 1, D)`` mean squares of the queries reading this stream (grouped
            under their KV head): balance keys against them. None: no balancing.
    """
    y = xp.astype(x, xp.float32)
    d = y.shape[-1]
    mean = None
    if center and weights is not None:
        w = xp.astype(weights, xp.float32)[..., None]  # (B, H, T, 1)
        total = xp.sum(w, axis=2, keepdims=True)
        weighted = xp.sum(w * y, axis=2, keepdims=True) / xp.where(total > 0, total, 1.0)
        mean = xp.where(total > 0, weighted, xp.mean(y, axis=2, keepdims=True))
    elif center:
        mean = xp.mean(y, axis=2, keepdims=True)
    if mean is not None:
        y = y - mean
    scale = None
    if query_sq is not None:
        key_sq = xp.mean(y * y, axis=2, keepdims=True)
        ratio = (xp.astype(query_sq, xp.float32) + _TINY) / (key_sq + _TINY)
        log_s = xp.log(ratio) / 4
        log_s = log_s - xp.mean(log_s, axis=-1, keepdims=True)
        limit = math.log(_SCALE_LIMIT)
        scale = xp.exp(xp.clip(log_s, -limit, limit))
        y = y * scale
    widths = split_widths(bits, d)
    quantizers = tuple(make_quantizer(n, b, p) for p, (n, b) in enumerate(widths))
    if len(widths) == 1:
        return StreamCoding(quantizers, (None,), mean, scale)
    energy = xp.mean(y * y, axis=2)  # (B, H, D)
    order = xp.argsort(-energy, axis=-1, stable=True)
    high = widths[0][0]
    channels = (
        xp.sort(order[..., :high], axis=-1),
        xp.sort(order[..., high:], axis=-1),
    )
    channels = tuple(xp.astype(ch, xp.int64) for ch in channels)
    return StreamCoding(quantizers, channels, mean, scale)

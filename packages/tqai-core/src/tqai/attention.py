"""Attention read directly from TurboQuant codes: the reference for every fused kernel.

Because a rotation ``Pi`` is orthogonal, ``q . k = (Pi q) . (Pi k)``: the scores of a query
against compressed keys come from the rotated query and the keys' centroids times their norms,
``||k|| (Pi_K q) . c[idx_k]``, and the value sum can be taken in the values' rotated domain and
rotated back once at the end (TurboQuant, arXiv:2504.19874, Section 4; SPEC.md "The cache").
The history is walked in chunks with an online softmax (the FlashAttention recurrence, Dao et al.
2022, arXiv:2205.14135), so the extra memory is O(chunk) and no full-precision copy of the
history ever exists. TurboQuant_prod keys and values are supported as well: the QJL part of a
score is ``sqrt(pi/2)/m * gamma * (S Pi q) . sign_bits``, computed from the sketched query.

Full-precision segments (attention-sink tokens before the history and a recent window after it)
join the same softmax in the original domain (no rotation needed), with an accumulator of their
own that is added after the history's is rotated back.

Shapes: ``query (B, Hq, Tq, D)``; compressed tensors have leading shape ``(B, Hkv, T)``;
full-precision segments ``(B, Hkv, S, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA: each
group of ``Hq / Hkv`` query heads shares one KV head, never repeated in memory). The mask is
boolean ``(B | 1, 1 | Hq, Tq, S + T + W)`` with True meaning "attend" (transformers' sdpa mask
convention) or None; columns follow time order: prefix, history, suffix. Output
``(B, Hq, Tq, D)`` in the query's dtype; the math runs in float32.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tqai import _xp
from tqai.container import QuantizedTensor
from tqai.packing import unpack_bits
from tqai.quantizers import TurboQuantMSE, TurboQuantProd

__all__ = [
    "attention_reference",
    "compressed_attention",
    "compressed_attention_multi",
    "slice_tokens",
]

Quantizer = TurboQuantMSE | TurboQuantProd


def slice_tokens(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """The tokens ``[start, stop)`` of a compressed tensor of leading shape ``(..., T)`` (views)."""
    arrays = {
        name: (a[..., start:stop, :] if a.ndim == len(qt.shape) + 1 else a[..., start:stop])
        for name, a in qt.arrays().items()
    }
    shape = (*qt.shape[:-1], max(0, min(stop, qt.shape[-1]) - start))
    return QuantizedTensor(spec=qt.spec, shape=shape, dtype=qt.dtype, **arrays)


def _group(x: Any, n_kv: int, xp: ModuleType) -> Any:
    """``(B, Hq, T, X) -> (B, Hkv, G * T, X)``: query heads grouped under their KV head."""
    b, hq, t, last = x.shape
    return xp.reshape(x, (b, n_kv, (hq // n_kv) * t, last))


def _group_mask(mask: Any, n_kv: int, hq: int, xp: ModuleType) -> Any:
    """Boolean ``(B|1, 1|Hq, Tq, K) -> (B|1, Hkv|1, G*Tq | Tq-broadcastable, K)``."""
    b, h, tq, k = mask.shape
    g = hq // n_kv
    if h == 1:
        mask = xp.reshape(mask, (b, 1, 1, tq, k))
        mask = xp.broadcast_to(mask, (b, 1, g, tq, k))
        return xp.reshape(mask, (b, 1, g * tq, k))
    return xp.reshape(mask, (b, n_kv, g * tq, k))


class _OnlineSoftmax:
    """Running max ``m``, normalizer ``l`` and accumulators of the FlashAttention recurrence."""

    def __init__(self, rows_shape: tuple[int, ...], xp: ModuleType, like: Any) -> None:
        device = _xp.device_of(like)
        self.xp = xp
        self.m = xp.full(rows_shape, -math.inf, dtype=xp.float32, device=device)
        self.l = xp.zeros(rows_shape, dtype=xp.float32, device=device)
        self.accs: dict[str, Any] = {}

    def step(self, scores: Any, values: dict[str, Any]) -> None:
        """Fold in a chunk: ``scores (..., R, C)``, ``values[name] (..., C, X)``."""
        xp = self.xp
        m_new = xp.maximum(self.m, xp.max(scores, axis=-1))
        # Rows with every score masked so far keep m = -inf; shift by 0 there to avoid inf - inf.
        shift = xp.where(xp.isfinite(m_new), m_new, xp.zeros_like(m_new))
        p = xp.exp(scores - shift[..., None])
        alpha = xp.exp(self.m - shift)
        self.l = self.l * alpha + xp.sum(p, axis=-1)
        # Every accumulator is rescaled, also those this chunk does not add to.
        self.accs = {name: acc * alpha[..., None] for name, acc in self.accs.items()}
        for name, v in values.items():
            contrib = p @ v
            acc = self.accs.get(name)
            self.accs[name] = contrib if acc is None else acc + contrib
        self.m = m_new


def _capped(scores: Any, softcap: float | None, xp: ModuleType) -> Any:
    return scores if softcap is None else xp.tanh(scores / softcap) * softcap


def _masked(scores: Any, mask: Any | None, start: int, stop: int, xp: ModuleType) -> Any:
    if mask is None:
        return scores
    return xp.where(mask[..., start:stop], scores, xp.full_like(scores, -math.inf))


def _key_scores(
    q_rot: Any, q_sketch: Any | None, keys: QuantizedTensor, quantizer: Quantizer, xp: ModuleType
) -> Any:
    """Scores ``(B, Hkv, R, C)`` of grouped rotated queries against a chunk of compressed keys."""
    spec = quantizer.spec
    norms = xp.astype(keys.norms, xp.float32)
    scores = None
    if spec.mse_bits:
        codes = unpack_bits(keys.packed, spec.mse_bits, spec.d, xp=xp)
        cent = quantizer.lookup_centroids(codes, norms, xp=xp)  # (B, Hkv, C, D): O(chunk)
        scores = q_rot @ xp.matrix_transpose(cent)
    if spec.kind == "prod":
        signs = xp.astype(unpack_bits(keys.qjl, 1, spec.qjl_dim, xp=xp), xp.float32) * 2 - 1
        gamma = xp.astype(keys.residual_norms, xp.float32)
        qjl = (q_sketch @ xp.matrix_transpose(signs)) * (
            gamma * (math.sqrt(math.pi / 2) / spec.qjl_dim)
        )[..., None, :]
        scores = qjl if scores is None else scores + qjl
    return scores * norms[..., None, :]


def _value_terms(values: QuantizedTensor, quantizer: Quantizer, xp: ModuleType) -> dict[str, Any]:
    """The chunk's values as the accumulators want them: rotated MSE part and QJL sign part."""
    spec = quantizer.spec
    norms = xp.astype(values.norms, xp.float32)
    terms = {}
    if spec.mse_bits:
        codes = unpack_bits(values.packed, spec.mse_bits, spec.d, xp=xp)
        terms["rot"] = quantizer.lookup_centroids(codes, norms, xp=xp) * norms[..., None]
    if spec.kind == "prod":
        signs = xp.astype(unpack_bits(values.qjl, 1, spec.qjl_dim, xp=xp), xp.float32) * 2 - 1
        gamma = xp.astype(values.residual_norms, xp.float32) * norms
        terms["sketch"] = signs * (gamma * (math.sqrt(math.pi / 2) / spec.qjl_dim))[..., None]
    return terms


def compressed_attention(
    query: Any,
    keys: QuantizedTensor | None,
    values: QuantizedTensor | None,
    key_quantizer: Quantizer,
    value_quantizer: Quantizer,
    *,
    scale: float,
    mask: Any | None = None,
    prefix: tuple[Any, Any] | None = None,
    suffix: tuple[Any, Any] | None = None,
    chunk_size: int = 1024,
    softcap: float | None = None,
    xp: ModuleType | None = None,
) -> Any:
    """Softmax attention of ``query`` over compressed keys/values, chunked, in rotated domains.

    Args:
        query: ``(B, Hq, Tq, D)`` floating queries.
        keys, values: compressed tensors of leading shape ``(B, Hkv, T)`` made by
            ``key_quantizer`` / ``value_quantizer``, or None when there is no compressed history
            yet (then ``prefix`` or ``suffix`` must hold tokens).
        key_quantizer, value_quantizer: the quantizers (their rotations and codebooks are used).
        scale: softmax scale (usually ``1 / sqrt(D)``).
        mask: boolean ``(B|1, 1|Hq, Tq, S+T+W)``, True = attend; None attends to everything.
        prefix: optional full-precision ``(keys, values)`` of shape ``(B, Hkv, S, D)`` placed
            before the history (attention sinks).
        suffix: optional full-precision ``(keys, values)`` ``(B, Hkv, W, D)`` after the history
            (recent window and tokens not yet compressed).
        chunk_size: history tokens per online-softmax step (extra memory is O(chunk)).
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before the mask
            (Gemma 2's attention logit soft-capping).

    Returns:
        ``(B, Hq, Tq, D)`` attention output in ``query``'s dtype.
    """
    histories = [] if keys is None else [(keys, values, key_quantizer, value_quantizer, None)]
    return compressed_attention_multi(
        query,
        histories,
        scale=scale,
        mask=mask,
        prefix=prefix,
        suffix=suffix,
        chunk_size=chunk_size,
        softcap=softcap,
        xp=xp,
    )


def attention_reference(
    query: Any,
    key: Any,
    value: Any,
    *,
    scale: float,
    mask: Any | None = None,
    softcap: float | None = None,
    xp: ModuleType | None = None,
) -> Any:
    """Plain softmax attention with GQA, float32 math: the uncompressed reference.

    Args:
        query: ``(B, Hq, Tq, D)``; key, value: ``(B, Hkv, T, D)``; mask: boolean
            ``(B|1, 1|Hq, Tq, T)`` (True = attend) or None.

    Returns:
        ``(B, Hq, Tq, D)`` in ``query``'s dtype. Rows with every key masked give 0.
    """
    xp = _xp.namespace(query, xp=xp)
    b, hq, tq, d = query.shape
    n_kv = key.shape[1]
    if hq % n_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({n_kv})")
    q = _group(xp.astype(query, xp.float32), n_kv, xp) * scale
    scores = _capped(q @ xp.matrix_transpose(xp.astype(key, xp.float32)), softcap, xp)
    if mask is not None:
        scores = _masked(scores, _group_mask(mask, n_kv, hq, xp), 0, key.shape[2], xp)
    state = _OnlineSoftmax((b, n_kv, q.shape[2]), xp, q)
    state.step(scores, {"v": xp.astype(value, xp.float32)})
    l_safe = xp.where(state.l > 0, state.l, xp.ones_like(state.l))
    out = state.accs["v"] / l_safe[..., None]
    return xp.astype(xp.reshape(out, (b, hq, tq, d)), query.dtype)


def compressed_attention_multi(
    query: Any,
    histories: list[
        tuple[QuantizedTensor, QuantizedTensor, Quantizer, Quantizer, list[int] | None]
    ],
    *,
    scale: float,
    mask: Any | None = None,
    prefix: tuple[Any, Any] | None = None,
    suffix: tuple[Any, Any] | None = None,
    chunk_size: int = 1024,
    softcap: float | None = None,
    xp: ModuleType | None = None,
) -> Any:
    """:func:`compressed_attention` over several compressed histories with their own quantizers.

    A cache whose tokens were compressed at different widths (a compression pipeline whose
    monitor moves the width between steps) keeps one packed history per quantizer; together they
    hold the history tokens ``0..T-1`` in some interleaving. Each history comes with the history
    positions of its tokens, which pick its mask columns (mask columns follow time order:
    prefix, history positions, suffix). Scores against each history are taken in its keys'
    rotated domain; values accumulate in one accumulator per history (in its values' rotated
    domain) plus one for the full-precision segments, all sharing one online softmax, and are
    rotated back once at the end.

    Args:
        histories: ``(keys, values, key_quantizer, value_quantizer, positions)`` per history;
            ``positions`` lists the history position of each of its tokens, or is None when the
            history's tokens follow those of the histories before it (one plain history).
        query, scale, mask, prefix, suffix, chunk_size, softcap, xp: as in
            :func:`compressed_attention` (the mask has ``S + T + W`` columns, ``T`` the total of
            all histories).

    Returns:
        ``(B, Hq, Tq, D)`` attention output in ``query``'s dtype.
    """
    xp = _xp.namespace(query, xp=xp)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, hq, tq, d = query.shape
    segments = [s[0] for s in (prefix, suffix) if s is not None]
    if not histories and not segments:
        raise ValueError("attention over an empty key sequence: no history and no segments")
    n_kv = histories[0][0].shape[1] if histories else segments[0].shape[1]
    if hq % n_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({n_kv})")
    q = _group(xp.astype(query, xp.float32), n_kv, xp) * scale  # (B, Hkv, G*Tq, D)
    if mask is not None:
        mask = _group_mask(mask, n_kv, hq, xp)
    state = _OnlineSoftmax((b, n_kv, q.shape[2]), xp, q)
    device = _xp.device_of(q)

    def full_segment(k: Any, v: Any, start: int) -> None:
        # In chunks too: a prefill's own tokens form a suffix as long as the query.
        for s in range(0, k.shape[2], chunk_size):
            e = min(s + chunk_size, k.shape[2])
            k_c, v_c = (
                xp.astype(k[:, :, s:e, :], xp.float32),
                xp.astype(v[:, :, s:e, :], xp.float32),
            )
            scores = _capped(q @ xp.matrix_transpose(k_c), softcap, xp)
            scores = _masked(scores, mask, start + s, start + e, xp)
            state.step(scores, {"full": v_c})

    column = 0
    if prefix is not None and prefix[0].shape[2]:
        full_segment(*prefix, column)
        column += prefix[0].shape[2]
    total = 0
    for i, (keys, values, key_q, value_q, positions) in enumerate(histories):
        q_rot = key_q.rotation.rotate(q, xp=xp)
        q_sketch = None
        if key_q.spec.kind == "prod":
            q_sketch = q_rot @ key_q.constant("sketch_t", q_rot, xp=xp)
        length = keys.shape[2]
        total += length
        for start in range(0, length, chunk_size):
            stop = min(start + chunk_size, length)
            scores = _key_scores(q_rot, q_sketch, slice_tokens(keys, start, stop), key_q, xp)
            scores = _capped(scores, softcap, xp)
            if mask is not None and positions is None:
                first = column + total - length
                scores = _masked(scores, mask, first + start, first + stop, xp)
            elif mask is not None:
                cols = [column + p for p in positions[start:stop]]
                index = xp.asarray(cols, dtype=xp.int64, device=device)
                chunk_mask = xp.take(mask, index, axis=-1)
                scores = xp.where(chunk_mask, scores, xp.full_like(scores, -math.inf))
            terms = _value_terms(slice_tokens(values, start, stop), value_q, xp)
            state.step(scores, {f"{name}{i}": t for name, t in terms.items()})
    column += total
    if suffix is not None and suffix[0].shape[2]:
        full_segment(*suffix, column)
    if not state.accs:
        raise ValueError("attention over an empty key sequence: no history and no segments")
    out = state.accs.get("full")
    for i, (_, _, _, value_q, _) in enumerate(histories):
        acc = state.accs.get(f"rot{i}")
        if f"sketch{i}" in state.accs:
            extra = state.accs[f"sketch{i}"] @ value_q.constant("sketch", q, xp=xp)
            acc = extra if acc is None else acc + extra
        if acc is not None:
            acc = value_q.rotation.unrotate(acc, xp=xp)
            out = acc if out is None else out + acc
    l_safe = xp.where(state.l > 0, state.l, xp.ones_like(state.l))
    out = out / l_safe[..., None]
    return xp.astype(xp.reshape(out, (b, hq, tq, d)), query.dtype)

"""Metal decode-attention kernel: one query token against the packed K/V history.

Mirrors the history loop of :func:`tqai.attention.compressed_attention` for a decode step (one
query token, no mask): scores ``||k|| (Pi_K q) . c_K[idx_k]`` from the rotated, pre-scaled query
and the key centroids (TurboQuant, arXiv:2504.19874, Section 4), an online softmax over the
tokens (FlashAttention's recurrence, arXiv:2205.14135), and the value sum
``sum_t p_t ||v_t|| c_V[idx_v,t]`` kept in the values' rotated domain. It returns the softmax
partial state ``(acc, m, l)`` of the history; :func:`decode_attention` folds in the
full-precision sinks, window and staged tokens with MLX ops and rotates back once.

Kernel layout: one SIMD group (32 threads) per (batch, KV head, query head of the group); lane
``i`` owns coordinates ``i, i + 32, ...`` of the query and of the accumulator, a ``simd_sum``
gives each score, and the history is read straight from the cache's growable buffers (no copy of
the used part), ``length`` telling how many tokens are valid. Extra memory: none beyond outputs.

The MLX-ops twin :func:`history_partials_ops` has the same inputs and outputs; ``impl="ops"``
runs the whole launcher with it, which is how this module is tested on machines without Metal.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx

from tqai.kvstore import KVStore
from tqai.packing import unpack_bits

__all__ = ["decode_attention", "decode_supported", "history_partials_ops"]

_MAX_HEAD_DIM = 256

_HEADER = """
inline uint tqai_code(const device uint8_t* row, uint j, uint bits) {
    uint bit = (j / 8) * 8 * bits + (j % 8) * bits;
    uint byte = bit / 8;
    uint shift = bit % 8;
    uint v = row[byte];
    if (shift + bits > 8) {
        v |= uint(row[byte + 1]) << 8;
    }
    return (v >> shift) & ((1u << bits) - 1u);
}
"""

_SOURCE = """
    constexpr uint PK = ((D + 7) / 8) * BITS_K;
    constexpr uint PV = ((D + 7) / 8) * BITS_V;
    uint lane = thread_position_in_grid.x;
    uint row = thread_position_in_grid.y;
    uint bh = row / G;
    uint capacity = k_norms_shape[2];
    uint T = uint(length[0]);
    const device float* qr = q + row * D;
    const device uint8_t* kp = k_packed + bh * capacity * PK;
    const device uint8_t* vp = v_packed + bh * capacity * PV;
    const device KN_T* kn = k_norms + bh * capacity;
    const device VN_T* vn = v_norms + bh * capacity;
    float qv[PER_LANE];
    float acc[PER_LANE];
    for (uint c = 0; c < PER_LANE; ++c) {
        uint j = lane + 32 * c;
        qv[c] = j < D ? qr[j] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    for (uint t = 0; t < T; ++t) {
        float partial = 0.0f;
        for (uint c = 0; c < PER_LANE; ++c) {
            uint j = lane + 32 * c;
            if (j < D) {
                partial += qv[c] * k_cent[tqai_code(kp + t * PK, j, BITS_K)];
            }
        }
        float s = simd_sum(partial) * float(kn[t]);
        float m_new = metal::max(m, s);
        float alpha = metal::exp(m - m_new);
        float p = metal::exp(s - m_new);
        l = l * alpha + p;
        float w = p * float(vn[t]);
        for (uint c = 0; c < PER_LANE; ++c) {
            uint j = lane + 32 * c;
            if (j < D) {
                acc[c] = acc[c] * alpha + w * v_cent[tqai_code(vp + t * PV, j, BITS_V)];
            }
        }
        m = m_new;
    }
    for (uint c = 0; c < PER_LANE; ++c) {
        uint j = lane + 32 * c;
        if (j < D) {
            acc_out[row * D + j] = acc[c];
        }
    }
    if (lane == 0) {
        m_out[row] = m;
        l_out[row] = l;
    }
"""


@functools.cache
def _kernel() -> Any:
    return mx.fast.metal_kernel(
        name="tqai_decode_attention",
        input_names=[
            "q",
            "k_packed",
            "k_norms",
            "v_packed",
            "v_norms",
            "k_cent",
            "v_cent",
            "length",
        ],
        output_names=["acc_out", "m_out", "l_out"],
        source=_SOURCE,
        header=_HEADER,
    )


def _history_partials_metal(
    q: mx.array,
    k_packed: mx.array,
    k_norms: mx.array,
    v_packed: mx.array,
    v_norms: mx.array,
    k_cent: mx.array,
    v_cent: mx.array,
    length: int,
    *,
    bits_k: int,
    bits_v: int,
) -> tuple[mx.array, mx.array, mx.array]:
    b, n_kv, g, d = q.shape
    rows = b * n_kv * g
    acc, m, denom = _kernel()(
        inputs=[q, k_packed, k_norms, v_packed, v_norms, k_cent, v_cent, mx.array([length])],
        template=[
            ("D", d),
            ("G", g),
            ("PER_LANE", math.ceil(d / 32)),
            ("BITS_K", bits_k),
            ("BITS_V", bits_v),
            ("KN_T", k_norms.dtype),
            ("VN_T", v_norms.dtype),
        ],
        grid=(32, rows, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(rows, d), (rows,), (rows,)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return acc.reshape(b, n_kv, g, d), m.reshape(b, n_kv, g), denom.reshape(b, n_kv, g)


def history_partials_ops(
    q: mx.array,
    k_packed: mx.array,
    k_norms: mx.array,
    v_packed: mx.array,
    v_norms: mx.array,
    k_cent: mx.array,
    v_cent: mx.array,
    length: int,
    *,
    bits_k: int,
    bits_v: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """The kernel's MLX-ops twin: softmax partial state of ``q`` over the packed history.

    Args:
        q: ``(B, Hkv, G, D)`` float32 queries, pre-scaled and rotated by the keys' rotation.
        k_packed, v_packed: ``(B, Hkv, capacity, ceil(D / 8) * bits)`` uint8 code buffers.
        k_norms, v_norms: ``(B, Hkv, capacity)`` norms (float16 or float32).
        k_cent, v_cent: ``(2**bits,)`` float32 centroids.
        length: tokens of the buffers that are valid.
        bits_k, bits_v: code widths.

    Returns:
        ``acc (B, Hkv, G, D)`` (unnormalized value sum, values' rotated domain), ``m`` and
        ``l`` ``(B, Hkv, G)`` (running max and normalizer), all float32.
    """
    d = q.shape[-1]
    k_codes = unpack_bits(k_packed[:, :, :length], bits_k, d)
    v_codes = unpack_bits(v_packed[:, :, :length], bits_v, d)
    keys = k_cent[k_codes.astype(mx.int32)] * k_norms[:, :, :length, None].astype(mx.float32)
    values = v_cent[v_codes.astype(mx.int32)] * v_norms[:, :, :length, None].astype(mx.float32)
    scores = q @ keys.swapaxes(-1, -2)
    m = scores.max(axis=-1)
    p = mx.exp(scores - m[..., None])
    return p @ values, m, p.sum(axis=-1)


def decode_supported(store: KVStore, queries: mx.array) -> bool:
    """Whether :func:`decode_attention` serves this step: one query, mse codes, ``D <= 256``."""
    kq, vq = store.key_quantizer, store.value_quantizer
    return (
        queries.shape[2] == 1
        and kq is not None
        and getattr(kq, "spec", None) is not None
        and kq.spec.kind == "mse"
        and vq.spec.kind == "mse"
        and kq.spec.d <= _MAX_HEAD_DIM
    )


def _segment(q_rot: mx.array, keys: mx.array, values: mx.array, store: KVStore):
    """Softmax partial state over full-precision tokens, rotated into the codes' domains."""
    k_rot = store.key_quantizer.rotation.rotate(keys.astype(mx.float32))
    v_rot = store.value_quantizer.rotation.rotate(values.astype(mx.float32))
    scores = q_rot @ k_rot.swapaxes(-1, -2)
    m = scores.max(axis=-1)
    p = mx.exp(scores - m[..., None])
    return p @ v_rot, m, p.sum(axis=-1)


def decode_attention(
    queries: mx.array, store: KVStore, *, scale: float, impl: str = "metal"
) -> mx.array:
    """Attention of one query token over everything ``store`` holds (nothing is committed).

    The same result as ``compressed_attention`` over the store's sinks, packed history and
    window plus staged tokens, without a mask (a decode step sees every earlier token).

    Args:
        queries: ``(B, Hq, 1, D)``; ``Hq`` a multiple of the store's KV heads.
        store: a :class:`~tqai.kvstore.KVStore` with TurboQuant_mse keys and values.
        scale: softmax scale.
        impl: ``"metal"`` (the kernel) or ``"ops"`` (:func:`history_partials_ops`).

    Returns:
        ``(B, Hq, 1, D)`` in ``queries``' dtype.
    """
    if impl not in ("metal", "ops"):
        raise ValueError(f"impl must be 'metal' or 'ops', got {impl!r}")
    if not decode_supported(store, queries):
        raise ValueError("decode_attention serves one query token over mse codes with D <= 256")
    b, hq, _, d = queries.shape
    kq, vq = store.key_quantizer, store.value_quantizer
    hist = store.keys.length
    suffix = [p for p in (store.window, store.pending) if p is not None]
    first = store.sinks or (suffix[0] if suffix else None)
    n_kv = store.keys.buffers["norms"].shape[1] if hist else first[0].shape[1]
    q = (queries.astype(mx.float32) * scale).reshape(b, n_kv, hq // n_kv, d)
    q_rot = kq.rotation.rotate(q)
    parts = []
    if store.sinks is not None:
        parts.append(_segment(q_rot, *store.sinks, store))
    if hist:
        kb, vb = store.keys.buffers, store.values.buffers
        partials = _history_partials_metal if impl == "metal" else history_partials_ops
        parts.append(
            partials(
                q_rot,
                kb["packed"],
                kb["norms"],
                vb["packed"],
                vb["norms"],
                kq.constant("centroids", q_rot),
                vq.constant("centroids", q_rot),
                hist,
                bits_k=kq.spec.n_bits,
                bits_v=vq.spec.n_bits,
            )
        )
    if suffix:
        keys = mx.concatenate([p[0] for p in suffix], axis=2)
        values = mx.concatenate([p[1] for p in suffix], axis=2)
        parts.append(_segment(q_rot, keys, values, store))
    if not parts:
        raise ValueError("attention over an empty key sequence: the store holds no tokens")
    top = functools.reduce(mx.maximum, [m for _, m, _ in parts])
    acc = sum(a * mx.exp(m - top)[..., None] for a, m, _ in parts)
    norm = sum(denom * mx.exp(m - top) for _, m, denom in parts)
    out = vq.rotation.unrotate(acc / norm[..., None])
    return out.reshape(b, hq, 1, d).astype(queries.dtype)

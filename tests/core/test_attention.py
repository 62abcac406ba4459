"""Attention from packed codes equals attention over the dequantized cache (every backend)."""

from __future__ import annotations

import numpy as np
import pytest

from tqai import TurboQuantMSE, TurboQuantProd
from tqai._xp import to_host
from tqai.attention import attention_reference, compressed_attention, slice_tokens
from tqai.testing import make_array

CASES = [
    # (B, Hq, Hkv, Tq, T, D, sinks, window)
    (1, 4, 4, 1, 37, 16, 0, 0),  # MHA decode, irregular length
    (2, 6, 2, 3, 50, 32, 4, 4),  # GQA, several queries, sinks and window
    (1, 8, 1, 1, 70, 24, 2, 0),  # MQA, odd head dim (non power of two Hadamard)
]


def _setup(case, kinds, rng):
    b, hq, hkv, tq, t, d, s, w = case
    q = rng.standard_normal((b, hq, tq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, t, d)).astype(np.float32) * 2
    v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
    mask = rng.random((b, 1, tq, t)) > 0.25
    mask[..., -1] = True  # every row attends to something
    cls = {"mse": TurboQuantMSE, "prod": TurboQuantProd}
    kq = cls[kinds[0]](d, 4, rotation="hadamard", seed=1, norm_dtype="float32")
    vq = cls[kinds[1]](d, 3, rotation="haar", seed=2, norm_dtype="float32")
    return q, k, v, mask, kq, vq, s, w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kinds", [("mse", "mse"), ("prod", "mse"), ("mse", "prod")])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_compressed_attention_matches_reference(xp, case, kinds, chunk_size):
    q, k, v, mask, kq, vq, s, w = _setup(case, kinds, np.random.default_rng(sum(case)))
    t = k.shape[2]
    keys = kq.quantize(make_array(xp, k[:, :, s : t - w]))
    values = vq.quantize(make_array(xp, v[:, :, s : t - w]))
    # Reference: plain attention over sinks + dequantized history + window.
    k_hat = np.concatenate([k[:, :, :s], to_host(kq.dequantize(keys)), k[:, :, t - w :]], 2)
    v_hat = np.concatenate([v[:, :, :s], to_host(vq.dequantize(values)), v[:, :, t - w :]], 2)
    scale = k.shape[-1] ** -0.5
    expected = attention_reference(q, k_hat, v_hat, scale=scale, mask=mask)
    out = compressed_attention(
        make_array(xp, q),
        keys,
        values,
        kq,
        vq,
        scale=scale,
        mask=make_array(xp, mask),
        prefix=(make_array(xp, k[:, :, :s]), make_array(xp, v[:, :, :s])),
        suffix=(make_array(xp, k[:, :, t - w :]), make_array(xp, v[:, :, t - w :])),
        chunk_size=chunk_size,
    )
    np.testing.assert_allclose(to_host(out), expected, atol=2e-5, rtol=1e-4)


def test_reference_matches_naive_softmax():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 2, 8))
    k = rng.standard_normal((1, 2, 5, 8))
    v = rng.standard_normal((1, 2, 5, 8))
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    s = q @ kk.swapaxes(-1, -2) * 0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    naive = (p / p.sum(-1, keepdims=True)) @ vv
    out = attention_reference(q.astype(np.float32), k, v, scale=0.5)
    np.testing.assert_allclose(out, naive, atol=1e-5)


def test_fully_masked_rows_give_zeros_not_nan():
    rng = np.random.default_rng(1)
    q, k, v, mask, kq, vq, _, _ = _setup(CASES[1], ("mse", "mse"), rng)
    mask[0, 0, 1, :] = False
    out = compressed_attention(
        q, kq.quantize(k), vq.quantize(v), kq, vq, scale=0.2, mask=mask, chunk_size=8
    )
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, :, 1], 0)


def test_slice_tokens_views():
    q = TurboQuantProd(16, 3)
    qt = q.quantize(np.ones((2, 3, 10, 16), np.float32))
    part = slice_tokens(qt, 2, 7)
    assert part.shape == (2, 3, 5)
    part.validate()


def test_compressed_attention_bad_input():
    q = np.ones((1, 3, 1, 8), np.float32)
    kq = TurboQuantMSE(8, 2)
    kv = kq.quantize(np.ones((1, 2, 4, 8), np.float32))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        compressed_attention(q, kv, kv, kq, kq, scale=1.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        compressed_attention(
            np.ones((1, 2, 1, 8), np.float32), kv, kv, kq, kq, scale=1.0, chunk_size=0
        )

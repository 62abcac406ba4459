"""Chunked attention with the online softmax: exact, and memory that grows with the chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tqai._xp import to_host
from tqai.attention import attention_reference
from tqai.chunked_attention import chunked_attention
from tqai.testing import make_array, xp_assert_close, xp_assert_equal


def _inputs(b=2, hq=6, hkv=2, tq=37, t=37, d=24, seed=0, causal=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, tq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, t, d)).astype(np.float32) * 2
    v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
    if causal:
        mask = np.tril(np.ones((tq, t), bool), k=t - tq)[None, None]
        mask = np.broadcast_to(mask, (b, 1, tq, t)).copy()
        if b > 1:
            mask[1, :, :, :3] = False  # left padding in the second row of the batch
    else:
        mask = None
    return q, k, v, mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_attention_one_chunk_is_bitwise_the_reference(xp, causal, softcap):
    q, k, v, mask = _inputs(causal=causal)
    args = [make_array(xp, a) for a in (q, k, v)]
    m = None if mask is None else make_array(xp, mask)
    ref = attention_reference(*args, scale=0.2, mask=m, softcap=softcap)
    out = chunked_attention(*args, scale=0.2, mask=m, softcap=softcap, chunk_size=q.shape[2])
    xp_assert_equal(out, ref)


@pytest.mark.parametrize(
    ("tq", "t", "chunk", "q_chunk"),
    [(37, 37, 5, None), (37, 37, 8, 3), (1, 50, 7, None), (4, 29, 1, 2), (29, 29, 64, 64)],
)
def test_chunked_attention_matches_reference(xp, tq, t, chunk, q_chunk):
    q, k, v, mask = _inputs(tq=tq, t=t, seed=tq + t)
    args = [make_array(xp, a) for a in (q, k, v)]
    m = make_array(xp, mask)
    ref = attention_reference(*args, scale=0.2, mask=m)
    out = chunked_attention(*args, scale=0.2, mask=m, chunk_size=chunk, query_chunk_size=q_chunk)
    # Only the order of float32 sums changes: a few ulps of the outputs (|out| <= max |v| ~ 4).
    xp_assert_close(out, ref, rtol=0, atol=2e-6)


def test_fully_masked_rows_give_zero():
    q, k, v, mask = _inputs(tq=4, t=10, causal=True)
    mask[0, :, 1] = False
    out = chunked_attention(q, k, v, scale=0.2, mask=mask, chunk_size=3, query_chunk_size=2)
    assert np.all(out[0, :, 1] == 0)
    np.testing.assert_allclose(
        out, attention_reference(q, k, v, scale=0.2, mask=mask), rtol=0, atol=2e-6
    )


def test_bad_arguments_are_refused():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        chunked_attention(q, k, v, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="query_chunk_size must be an integer >= 1"):
        chunked_attention(q, k, v, scale=1.0, query_chunk_size=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        chunked_attention(q[:, :5], k, v, scale=1.0)
    with pytest.raises(ValueError, match="mask must be"):
        chunked_attention(q, k, v, scale=1.0, mask=mask[..., :-1])
    with pytest.raises(ValueError, match="must be \\(B, Hkv, T, D\\)"):
        chunked_attention(q, k, v[:, :, :-1], scale=1.0)


def _peak_bytes(fn, *args, **kwargs) -> int:
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_grows_with_the_chunk_not_the_context_squared():
    """numpy reports its buffers to tracemalloc: the reference's peak grows ~4x per doubling of
    the context (the T x T scores), the chunked one's ~2x (inputs and output only)."""
    peaks = {}
    for t in (512, 1024):
        q, k, v, mask = _inputs(b=1, hq=2, hkv=1, tq=t, t=t, d=16, causal=True)
        peaks["ref", t] = _peak_bytes(attention_reference, q, k, v, scale=0.25, mask=mask)
        peaks["chunked", t] = _peak_bytes(
            chunked_attention, q, k, v, scale=0.25, mask=mask, chunk_size=64
        )
        inputs = sum(a.nbytes for a in (q, k, v, mask))
        assert peaks["chunked", t] < inputs + 2 * q.nbytes + 64 * 64 * 2 * 4 * 8, peaks
    assert peaks["ref", 1024] / peaks["ref", 512] > 3.5, peaks
    assert peaks["chunked", 1024] / peaks["chunked", 512] < 2.5, peaks
    assert peaks["chunked", 1024] * 5 < peaks["ref", 1024], peaks
    # And a bigger chunk costs more memory at the same context.
    q, k, v, mask = _inputs(b=1, hq=2, hkv=1, tq=1024, t=1024, d=16, causal=True)
    big = _peak_bytes(chunked_attention, q, k, v, scale=0.25, mask=mask, chunk_size=256)
    assert big > peaks["chunked", 1024]
    assert to_host(q).shape == (1, 2, 1024, 16)

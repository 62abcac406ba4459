"""KVStore: sinks + packed history + window, staged tokens, crop, batch maps, bytes held."""

from __future__ import annotations

import numpy as np
import pytest

from tqai._xp import to_host
from tqai.attention import attention_reference
from tqai.kvstore import KVCacheConfig, KVStore
from tqai.testing import make_array


def _run(store: KVStore, xp, steps, rng, hq=4, d=32):
    ks, vs = [], []
    out = ref = None
    for t in steps:
        k = rng.standard_normal((2, 2, t, d)).astype(np.float32)
        v = rng.standard_normal((2, 2, t, d)).astype(np.float32)
        q = rng.standard_normal((2, hq, t, d)).astype(np.float32)
        ks.append(k)
        vs.append(v)
        store.update(make_array(xp, k), make_array(xp, v))
        k_hat, v_hat = (to_host(a) for a in store.dequantize())
        out = to_host(store.attend(make_array(xp, q), scale=d**-0.5, mask=None))
        ref = attention_reference(q, k_hat, v_hat, scale=d**-0.5)
        np.testing.assert_allclose(out, ref, atol=3e-5, rtol=1e-4)
    exact = attention_reference(q, np.concatenate(ks, 2), np.concatenate(vs, 2), scale=d**-0.5)
    return out, exact


@pytest.mark.parametrize(
    ("strategy", "sinks", "window"),
    [("compressed", 4, 0), ("compressed", 0, 0), ("compressed", 2, 5), ("residual", 4, 0)],
)
def test_store_attention_equals_dequantized_attention(xp, strategy, sinks, window):
    config = KVCacheConfig(
        bits_k=4,
        bits_v=3,
        sink_tokens=sinks,
        residual_window=window,
        strategy=strategy,
        norm_dtype="float32",
        chunk_size=16,
    )
    store = KVStore(config)
    _run(store, xp, [7, 1, 1, 40, 1], np.random.default_rng(0))
    assert store.length == 50
    assert store.sink_length == min(sinks, 50)
    assert store.window_length == min(config.window, 50 - store.sink_length)
    assert store.history_length == 50 - store.sink_length - store.window_length
    assert store.pending_length == 0  # nothing stays staged after attend


def test_sinks_and_window_are_the_stores_own_arrays(xp):
    """A long prompt's sink and window tokens are copies: changing the caller's arrays after
    the commit changes nothing the store holds (in torch and numpy a slice would be a view,
    keeping the whole prompt in full precision alive)."""
    rng = np.random.default_rng(3)
    k_host = rng.standard_normal((1, 2, 100, 16)).astype(np.float32)
    v_host = rng.standard_normal((1, 2, 100, 16)).astype(np.float32)
    config = KVCacheConfig(
        bits_k=4, bits_v=4, sink_tokens=4, residual_window=8, norm_dtype="float32"
    )
    store = KVStore(config)
    k, v = make_array(xp, k_host), make_array(xp, v_host)
    store.update(k, v)
    store.commit()
    try:
        k[...] = 0.0
        v[...] = 0.0
    except (TypeError, ValueError):  # a library without in-place writes cannot alias either
        pass
    held = [to_host(a) for a in (*store.sinks, *store.window)]
    np.testing.assert_array_equal(held[0], k_host[:, :, :4])
    np.testing.assert_array_equal(held[1], v_host[:, :, :4])
    np.testing.assert_array_equal(held[2], k_host[:, :, -store.window_length :])
    np.testing.assert_array_equal(held[3], v_host[:, :, -store.window_length :])


def test_eight_bits_is_close_to_exact():
    store = KVStore(KVCacheConfig(bits_k=8, bits_v=8, norm_dtype="float32"))
    out, exact = _run(store, np, [30, 1, 1], np.random.default_rng(1))
    assert np.max(np.abs(out - exact)) < 1e-2


def test_nbytes_counts_codes_and_full_precision_parts():
    store = KVStore(KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=4))
    k = np.zeros((1, 2, 300, 64), np.float32)
    store.update(k, k)
    store.commit()
    parts = store.nbytes()
    assert parts["sinks"] == 2 * 1 * 2 * 4 * 64 * 4
    # 296 tokens in buffers of capacity 304 (the first growth, to a multiple of 16 tokens):
    # K 32 + 2, V 16 + 2 bytes per vector
    assert parts["codes"] == 2 * store.keys.capacity * (32 + 2 + 16 + 2)
    assert store.keys.capacity == 304


def test_history_capacity_stays_a_multiple_of_16_tokens():
    """Prompt-sized and token-sized appends: the buffers' token capacity (hence their strides'
    divisibility, which GPU kernels are compiled for) is always a multiple of 16."""
    store = KVStore(KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=0, residual_window=0))
    rng = np.random.default_rng(3)
    seen = set()
    for new in (37, 1, 1, 200, *[1] * 150, 1000, 3):
        k = rng.standard_normal((1, 2, new, 64)).astype(np.float32)
        store.update(k, k)
        store.commit()
        assert store.keys.length == store.values.length
        assert store.keys.capacity >= store.keys.length
        assert store.keys.capacity % 16 == 0
        assert store.values.capacity % 16 == 0
        seen.add(store.keys.capacity)
    assert len(seen) > 2  # it grew several times


def test_crop_and_map_batch():
    store = KVStore(KVCacheConfig(sink_tokens=2, residual_window=3))
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 1, 20, 16)).astype(np.float32)
    store.update(k, k)
    store.commit()
    full_k, _ = store.dequantize()
    store.crop(12)
    assert store.length == 12
    np.testing.assert_array_equal(store.dequantize()[0], full_k[:, :, :12])
    store.crop(1)
    assert (store.length, store.history_length, store.window_length) == (1, 0, 0)
    store2 = KVStore(KVCacheConfig(sink_tokens=2))
    store2.update(k, k)
    store2.map_batch(lambda a: a[np.array([2, 0])])
    np.testing.assert_array_equal(store2.dequantize()[0][0, :, :2], k[2, :, :2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits_k": 0}, "bits_k must be in 1..8"),
        ({"bits_v": 9}, "bits_v must be in 1..8"),
        ({"bits_k": 1, "use_qjl": True}, "bits_k must be in 2..8"),
        ({"strategy": "lossy"}, "strategy must be one of"),
        ({"sink_tokens": -1}, "sink_tokens must be an integer >= 0"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"norm_dtype": "int8"}, "norm_dtype must be one of"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCacheConfig(**kwargs)


class _InPlace:
    """A quantizer that writes its codes straight into the history (as the fused GPU encodes
    do), or declines to (``write=False``: the store must then quantize and copy)."""

    def __init__(self, inner, write: bool = True) -> None:
        self.inner, self.write, self.calls = inner, write, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def quantize_into(self, x, arrays) -> bool:
        self.calls += 1
        if not self.write:
            return False
        for name, a in self.inner.quantize(x, xp=np).arrays().items():
            arrays[name][...] = a
        return True


@pytest.mark.parametrize("write", [True, False])
def test_in_place_encodes_hold_the_same_history(write):
    """Tokens leaving the window go straight into the packed history's buffers when the
    quantizer can write there; the history, its growth and attention are as with a copy."""
    config = KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=2, residual_window=5)
    plain, direct = KVStore(config), KVStore(config)
    _run(plain, np, [7, 1, 1, 150, 1, 1], np.random.default_rng(3))
    rng = np.random.default_rng(3)
    _run(direct, np, [7], rng)  # the store makes its quantizers at its first update
    direct_k = direct.key_quantizer = _InPlace(direct.key_quantizer, write)
    direct.value_quantizer = _InPlace(direct.value_quantizer, write)
    _run(direct, np, [1, 1, 150, 1, 1], rng)
    assert direct_k.calls == 4  # every commit to the history after the first (its buffers)
    for a, b in zip(plain.dequantize(), direct.dequantize(), strict=True):
        np.testing.assert_array_equal(a, b)
    for hist_a, hist_b in ((plain.keys, direct.keys), (plain.values, direct.values)):
        assert hist_a.length == hist_b.length
        assert hist_a.capacity == hist_b.capacity

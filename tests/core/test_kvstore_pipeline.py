"""KVStore with a compression pipeline: several packed histories (one per width) in time order."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tqai.attention import attention_reference
from tqai.kvstore import KVCacheConfig, KVStore, build_cache_pipeline
from tqai.pipeline import PipelineConfigError, build_pipeline


class _Alternating:
    name = "alternating"

    def __init__(self) -> None:
        self.n = 0

    def observe(self, x, result, *, layer=None, step=None, stream=None, queries=None) -> None:
        self.n += 1

    def adjust(self, n_bits, *, layer=None, stream=None) -> int:
        return n_bits + (self.n // 2) % 3

    def reset(self) -> None:
        self.n = 0


def _store() -> KVStore:
    pipe = build_pipeline({"monitor": _Alternating(), "bits_k": 3, "bits_v": 2})
    return KVStore(KVCacheConfig(bits_k=3, bits_v=2, sink_tokens=2, residual_window=3), pipe, 0)


def test_attention_over_several_widths_matches_the_reference_with_a_mask():
    rng = np.random.default_rng(0)
    store = _store()
    for t in (7, 1, 1, 2, 1, 1, 1, 3, 1):
        k, v = (rng.standard_normal((2, 2, t, 32)).astype(np.float32) for _ in range(2))
        store.update(k, v)
        q = rng.standard_normal((2, 4, t, 32)).astype(np.float32)
        keys, values = store.dequantize()
        n = keys.shape[2]
        mask = np.broadcast_to(np.tril(np.ones((t, n), bool), k=n - t), (2, 1, t, n)).copy()
        mask[1, :, :, 3] = False  # a hole inside the history
        ref = attention_reference(q, keys, values, scale=0.2, mask=mask)
        np.testing.assert_allclose(store.attend(q, scale=0.2, mask=mask), ref, atol=2e-5)
    widths = {spec[0].n_bits for spec in store.tiers}
    assert widths == {3, 4, 5}
    assert not store.keys.length
    assert sum(t.length for t in store.tiers.values()) == store.history_length == 13


def test_crop_copy_and_refused_state():
    rng = np.random.default_rng(1)
    store = _store()
    for t in (7, 1, 1, 2, 1, 1, 1):
        k = rng.standard_normal((1, 2, t, 32)).astype(np.float32)
        store.update(k, k)
    store.commit()
    full_k, _ = store.dequantize()
    twin = copy.deepcopy(store)
    store.crop(9)
    assert store.length == 9
    assert twin.length == 14
    np.testing.assert_array_equal(store.dequantize()[0], full_k[:, :, :9])
    np.testing.assert_array_equal(twin.dequantize()[0], full_k)
    with pytest.raises(ValueError, match="pipeline"):
        store.state()


def test_skipped_layer_and_none_run_the_plain_path():
    config = KVCacheConfig()
    pipe = build_cache_pipeline({"monitor": "stability", "skip_layers": [1]}, config, num_layers=2)
    assert KVStore(config, pipe, 1).pipeline is None
    assert KVStore(config, pipe, 0).pipeline is pipe
    assert build_cache_pipeline(None, config, num_layers=2) is None
    with pytest.raises(PipelineConfigError, match="'tiered' is not supported"):
        build_cache_pipeline({"scorer": "fisher", "strategy": "tiered"}, config, num_layers=2)

"""KVStore with a compression pipeline: several packed histories (one per width) in time order."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tqai.attention import attention_reference
from tqai.kvstore import KVCacheConfig, KVStore, build_cache_pipeline
from tqai.pipeline import PipelineConfigError, build_pipeline
from tqai.pipeline.strategies.tiered import TieredStrategy


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


def test_crop_and_copy():
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


def test_skipped_layer_and_none_run_the_plain_path():
    config = KVCacheConfig()
    pipe = build_cache_pipeline({"monitor": "stability", "skip_layers": [1]}, config, num_layers=2)
    assert KVStore(config, pipe, 1).pipeline is None
    assert KVStore(config, pipe, 0).pipeline is pipe
    assert build_cache_pipeline(None, config, num_layers=2) is None


@pytest.mark.parametrize("name", ["delta", "delta2", "window", "cfg_sharing"])
def test_diffusion_step_strategies_are_refused_saying_why_and_where(name):
    with pytest.raises(PipelineConfigError, match=r"diffusion-step strategy(.|\n)*tqai-diffusers"):
        build_cache_pipeline({"strategy": name}, KVCacheConfig(), num_layers=2)


def test_tiered_is_built_per_token_and_joint_ranking_is_refused():
    config = KVCacheConfig()
    pipe = build_cache_pipeline({"scorer": "fisher", "strategy": "tiered"}, config, num_layers=2)
    assert pipe.strategy.rank == "token"
    with pytest.raises(PipelineConfigError, match="one width shared by every batch row and head"):
        build_cache_pipeline(
            {"scorer": "fisher", "strategy": "tiered", "strategy_kwargs": {"rank": "joint"}},
            config,
            num_layers=2,
        )


# tiered: one width per token ---------------------------------------------------------------------

TIERED = {
    "scorer": "fisher",
    "strategy": "tiered",
    "strategy_kwargs": {"fraction": 0.25, "high_bits": 4, "low_bits": 2},
}


def _tiered_store(window: int = 3, **options) -> KVStore:
    config = KVCacheConfig(bits_k=3, bits_v=3, sink_tokens=2, residual_window=window, **options)
    return KVStore(config, build_cache_pipeline(TIERED, config, num_layers=1), 0)


def _heavy(rng, shape) -> np.ndarray:
    """Tokens with lognormal norms, so energy scores spread."""
    x = rng.standard_normal(shape).astype(np.float32)
    return x * np.exp(rng.standard_normal((*shape[:-1], 1))).astype(np.float32)


def _routed_widths(store: KVStore, stream: int) -> np.ndarray:
    """Per history position, the width its key (stream 0) or value (1) was stored at."""
    widths = np.zeros(store.history_length, dtype=int)
    for spec, tier in store.tiers.items():
        widths[tier.positions()] = spec[stream].n_bits
    return widths


def test_tiered_store_routes_the_set_fraction_and_attends_like_its_dequantized_tokens():
    rng = np.random.default_rng(3)
    store = _tiered_store()
    k, v = _heavy(rng, (2, 2, 300, 32)), _heavy(rng, (2, 2, 300, 32))
    q = rng.standard_normal((2, 4, 1, 32)).astype(np.float32)
    cuts = [0, 40, *range(41, 300)]  # a prefill, then token by token
    for first, last in zip(cuts, [*cuts[1:], 300], strict=True):
        store.update(k[:, :, first:last], v[:, :, first:last])
        store.attend(q, scale=0.2, mask=None)
    history = slice(2, 2 + store.history_length)
    for stream, x in ((0, k), (1, v)):
        widths = _routed_widths(store, stream)
        assert set(widths) == {2, 4}
        assert abs(np.mean(widths == 4) - 0.25) < 0.02
        # Routing is causal and chunk-invariant: the same scores routed in one call agree.
        energy = np.mean(x[:, :, history] ** 2, axis=(0, 1, 3))
        expected = TieredStrategy(fraction=0.25, rank="token").route(energy)
        np.testing.assert_array_equal(widths == 4, expected)
    # Reference: every history token dequantized at its routed width, sinks and window exact.
    bank = store.pipeline.quantizers
    ref_k, ref_v = k[:, :, : store.length].copy(), v[:, :, : store.length].copy()
    for ref, stream in ((ref_k, 0), (ref_v, 1)):
        for p, w in enumerate(_routed_widths(store, stream)):
            token = ref[:, :, 2 + p : 3 + p]
            ref[:, :, 2 + p : 3 + p] = bank.get(32, w).dequantize(bank.get(32, w).quantize(token))
    query = rng.standard_normal((2, 4, 1, 32)).astype(np.float32)
    out = store.attend(query, scale=0.2, mask=None)
    np.testing.assert_allclose(
        out, attention_reference(query, ref_k, ref_v, scale=0.2), atol=2e-5, rtol=1e-4
    )
    high_bits = sum(t.keys.nbytes() for s, t in store.tiers.items() if s[0].n_bits == 4)
    assert high_bits > 0


def test_tiered_store_scores_a_staged_chunk_as_decoding_would():
    """quantize_staged with several widths: a chunk's outputs equal step-by-step decoding."""
    rng = np.random.default_rng(4)
    k, v = _heavy(rng, (1, 2, 40, 16)), _heavy(rng, (1, 2, 40, 16))
    q = rng.standard_normal((1, 4, 40, 16)).astype(np.float32)
    chunked, stepped = _tiered_store(norm_dtype="float32"), _tiered_store(norm_dtype="float32")
    prompt = np.tril(np.ones((24, 24), bool))[None, None]
    for store in (chunked, stepped):
        store.update(k[:, :, :24], v[:, :, :24])
        store.attend(q[:, :, :24], scale=0.25, mask=prompt)
    chunked.quantize_staged = True
    chunked.update(k[:, :, 24:], v[:, :, 24:])
    mask = np.tril(np.ones((16, 40), bool), 24)[None, None]
    out = chunked.attend(q[:, :, 24:], scale=0.25, mask=mask)
    for i in range(16):
        stepped.update(k[:, :, 24 + i : 25 + i], v[:, :, 24 + i : 25 + i])
        step = stepped.attend(q[:, :, 24 + i : 25 + i], scale=0.25, mask=None)
        np.testing.assert_allclose(out[:, :, i : i + 1], step, atol=2e-5, rtol=1e-4)
    assert len(chunked.tiers) > 1
    for a, b in zip(chunked.dequantize(), stepped.dequantize(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pipeline_store_state_round_trip_and_refusals():
    rng = np.random.default_rng(5)
    store = _tiered_store()
    for t in (30, 1, 1, 5, 1):
        store.update(_heavy(rng, (1, 2, t, 32)), _heavy(rng, (1, 2, t, 32)))
    meta, arrays = store.state()
    assert arrays["tier_of"].dtype == np.uint8
    assert arrays["tier_of"].shape == (store.history_length,)
    assert len(meta["tiers"]) == len(store.tiers) > 1
    loaded = KVStore.from_state(store.config, meta, arrays, store.pipeline, 0)
    q = rng.standard_normal((1, 4, 3, 32)).astype(np.float32)
    for a, b in zip(loaded.dequantize(), store.dequantize(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        loaded.attend(q, scale=0.2, mask=None), store.attend(q, scale=0.2, mask=None)
    )
    with pytest.raises(ValueError, match="saved with a compression pipeline"):
        KVStore.from_state(store.config, meta, arrays, None, 0)
    other = build_pipeline({**TIERED, "quantizer_kwargs": {"seed": 9}, "adapter": "llm"})
    with pytest.raises(ValueError, match="this pipeline's quantizer for that width"):
        KVStore.from_state(store.config, meta, arrays, other, 0)

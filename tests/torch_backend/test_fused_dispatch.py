"""When the CUDA cache hands a decode step to the fused kernel (CPU-checkable decisions)."""

from __future__ import annotations

import torch

from tqai.kvstore import KVCacheConfig, KVStore
from tqai_torch.cache import _fused_inputs


def _store(kv_heads: int, tokens: int, **config) -> KVStore:
    store = KVStore(KVCacheConfig(bits_k=4, bits_v=2, **config))
    k = torch.randn(1, kv_heads, tokens, 64)
    store.update(k, torch.randn_like(k))
    store.commit()
    return store


def test_fused_inputs_are_the_kernel_arguments():
    inputs = _fused_inputs(_store(2, 20, sink_tokens=4), query_heads=8)
    assert inputs is not None
    assert set(inputs) == {"keys", "values", "prefix", "suffix", "key_quantizer", "value_quantizer"}
    assert inputs["keys"].shape == (1, 2, 16)


def test_no_fused_inputs_without_a_history_or_for_large_groups():
    assert _fused_inputs(_store(2, 3, sink_tokens=4), query_heads=8) is None  # sinks only
    assert _fused_inputs(_store(1, 20), query_heads=32) is None  # 32 query heads per KV head
    assert _fused_inputs(_store(2, 20), query_heads=5) is None  # not a multiple


def test_no_fused_inputs_for_stores_with_pipeline_tiers():
    from tqai.kvstore import build_cache_pipeline

    config = KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=0)
    pipe = build_cache_pipeline({"monitor": "stability"}, config, num_layers=1, head_dims=[64])
    store = KVStore(config, pipe, 0)
    k = torch.randn(1, 2, 20, 64)
    store.update(k, torch.randn_like(k))
    store.commit()
    assert store.tiers
    assert _fused_inputs(store, query_heads=4) is None


def _mask(starts: list[int], kv: int) -> torch.Tensor:
    return (torch.arange(kv)[None, :] >= torch.tensor(starts)[:, None])[:, None, None, :]


def test_left_padding_of_a_decode_mask():
    from tqai_torch.cache import _left_padding

    assert _left_padding(_mask([0, 0], 10)) is None  # everything visible
    assert _left_padding(_mask([0, 3, 9], 10)).tolist() == [0, 3, 9]
    # a (1, 1, 1, kv) mask of a batch-broadcast step, and per-head copies of the same rows
    assert _left_padding(_mask([2], 10)).tolist() == [2]
    assert _left_padding(_mask([1, 4], 10).expand(2, 3, 1, 10)).tolist() == [1, 4]
    holed = _mask([0, 2], 10).clone()
    holed[0, 0, 0, 5] = False  # a hidden position after a visible one: not left padding
    assert _left_padding(holed) is False
    assert _left_padding(_mask([0, 10], 10)) is False  # a sequence that sees nothing
    heads = _mask([1, 1], 10).expand(2, 2, 1, 10).clone()
    heads[1, 1, 0, 1] = False  # heads of one sequence that disagree
    assert _left_padding(heads) is False


def test_causal_chunk_mask():
    from tqai_torch.cache import _is_causal_chunk

    kv, tq = 12, 4
    rows = torch.arange(kv - tq, kv)[:, None]
    causal = (torch.arange(kv)[None, :] <= rows)[None, None]
    assert _is_causal_chunk(causal, kv)
    assert _is_causal_chunk(causal.expand(2, 3, tq, kv), kv)
    padded = causal.expand(2, 1, tq, kv).clone()
    padded[1, :, :, :3] = False  # left padding: not plain causal (the reference serves it)
    assert not _is_causal_chunk(padded, kv)
    assert not _is_causal_chunk(torch.ones(1, 1, tq, kv, dtype=torch.bool), kv)
    assert not _is_causal_chunk(None, kv)

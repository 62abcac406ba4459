"""The transformers cache on tiny random-weight models of every supported family."""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import FAMILIES, build, cache_kw

import tqai_torch
from tqai_torch import TqaiCache, TqaiLayer

pytestmark = pytest.mark.integration


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def _prompt(batch: int = 2, length: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 16)
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            pad_token_id=0,
            **cache_kw(cache),
            **kwargs,
        )


def test_eight_bits_generates_the_same_tokens(family):
    model = build(family)
    ids = _prompt()
    base = _generate(model, ids)
    cache = tqai_torch.patch(model, bits_k=8, bits_v=8)
    try:
        out = _generate(model, ids, cache)
    finally:
        tqai_torch.unpatch(model)
    assert torch.equal(out, base)
    assert cache.compressed_layers, "no layer was compressed"


def test_low_bits_diverge_boundedly(family):
    model = build(family)
    ids = _prompt(length=40)
    with torch.no_grad():
        base = model(ids).logits[:, -1]
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=0)
        model(ids[:, :-1], **cache_kw(cache))
        out = model(ids[:, -1:], **cache_kw(cache)).logits[:, -1]
    tqai_torch.unpatch(model)
    rel = ((out - base).norm() / base.norm()).item()
    assert 0 < rel < 0.5, rel


def test_compressed_equals_full_strategy_reference(family):
    """Attention from the packed codes matches dequantize-everything (same codes, same math)."""
    model = build(family)
    ids = _prompt(length=30)
    logits = {}
    for strategy in ("compressed", "full"):
        cache = tqai_torch.patch(model, bits_k=3, bits_v=2, cache_strategy=strategy)
        with torch.no_grad():
            model(ids[:, :20], **cache_kw(cache))
            logits[strategy] = model(ids[:, 20:], **cache_kw(cache)).logits
        tqai_torch.unpatch(model)
    torch.testing.assert_close(logits["compressed"], logits["full"], atol=2e-4, rtol=1e-3)


def test_unpatch_is_bit_identical(family):
    model = build(family)
    ids = _prompt()
    with torch.no_grad():
        before = model(ids).logits
        tqai_torch.patch(model, bits_k=4, bits_v=2)
        tqai_torch.unpatch(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation != "tqai"


def test_sliding_layers_stay_uncompressed():
    model = build("gemma3")
    cache = tqai_torch.patch(model)
    tqai_torch.unpatch(model)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "TqaiLayer"] * 2


def test_left_padded_batch_matches_unpadded_rows():
    model = build("llama")
    ids = _prompt(batch=2, length=12)
    pad = torch.zeros((1, 5), dtype=ids.dtype)
    padded = torch.cat([torch.cat([pad, ids[:1]], 1), torch.cat([ids[1:2, :5], ids[1:]], 1)])
    mask = torch.ones_like(padded)
    mask[0, :5] = 0
    cache = tqai_torch.patch(model, bits_k=8, bits_v=8, sink_tokens=0)
    with torch.no_grad():
        out = model.generate(
            padded,
            attention_mask=mask,
            **cache_kw(cache),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
        single = model.generate(
            ids[:1],
            attention_mask=torch.ones_like(ids[:1]),
            **cache_kw(tqai_torch.new_cache(model)),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
    tqai_torch.unpatch(model)
    assert torch.equal(out[0, -10:], single[0, -10:])


def _masks_seen(monkeypatch) -> list:
    """Record the mask each TqaiLayer.attend call receives (None or its shape)."""
    seen = []
    original = TqaiLayer.attend

    def spy(self, query, mask, *args, **kwargs):
        seen.append((query.shape[2], None if mask is None else tuple(mask.shape)))
        return original(self, query, mask, *args, **kwargs)

    monkeypatch.setattr(TqaiLayer, "attend", spy)
    return seen


def test_decode_steps_take_no_mask_unless_padded(monkeypatch):
    """One-token steps of an unpadded batch get no mask (nothing to build, nothing for the cache
    to read back); prompts and padded batches get explicit ones; the tokens are the same as
    with an explicit mask on every step."""
    from tqai_torch import attention

    model = build("llama")
    ids = _prompt(batch=2, length=12)
    seen = _masks_seen(monkeypatch)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=0)
    try:
        out = _generate(model, ids, cache, max_new_tokens=6)
        steps = [mask for tq, mask in seen if tq == 1]
        prompts = [mask for tq, mask in seen if tq > 1]
        assert steps
        assert all(mask is None for mask in steps)
        assert prompts
        assert all(mask is not None for mask in prompts)
        # the same generation with every mask explicit (the skip turned off)
        monkeypatch.setattr(attention, "_query_length", lambda args, kwargs: None)
        tqai_torch.unpatch(model)
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=0)
        seen.clear()
        explicit = _generate(model, ids, cache, max_new_tokens=6)
        assert all(mask is not None for _, mask in seen)
        padded = ids.clone()
        pad_mask = torch.ones_like(ids)
        pad_mask[0, :3] = 0
        seen.clear()
        monkeypatch.undo()
        seen = _masks_seen(monkeypatch)
        tqai_torch.unpatch(model)
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=0)
        with torch.no_grad():
            model.generate(
                padded, attention_mask=pad_mask, **cache_kw(cache), max_new_tokens=3,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        assert all(mask is not None for _, mask in seen)
    finally:
        tqai_torch.unpatch(model)
    assert torch.equal(out, explicit)


def test_sampling_and_beam_search_run():
    model = build("qwen2")
    ids = _prompt(batch=1)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2)
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = model.generate(
            ids, **cache_kw(cache), max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0
        )
        beams = model.generate(
            ids,
            **cache_kw(tqai_torch.new_cache(model)),
            max_new_tokens=8,
            num_beams=3,
            do_sample=False,
            pad_token_id=0,
        )
    tqai_torch.unpatch(model)
    assert sampled.shape == beams.shape == (1, ids.shape[1] + 8)


def test_beam_search_matches_dynamic_cache_at_eight_bits():
    model = build("llama")
    ids = _prompt(batch=1)
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
        cache = tqai_torch.patch(model, bits_k=8, bits_v=8)
        out = model.generate(
            ids, **cache_kw(cache), max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0
        )
    tqai_torch.unpatch(model)
    assert torch.equal(out, base)


def test_crop_rolls_back_exactly():
    """Without a window, crop(-n) returns the cache to exactly its earlier state.

    (With a full-precision window, tokens that left the window were compressed; a crop keeps
    them compressed, so the state after the crop is the right length but not bit-identical.)
    """
    model = build("llama")
    ids = _prompt(batch=1, length=30)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2, residual_window=0)
    with torch.no_grad():
        model(ids[:, :20], **cache_kw(cache))
        ref = cache.copy()
        model(ids[:, 20:], **cache_kw(cache))
        cache.crop(-10)
        assert cache.get_seq_length() == 20
        a = model(ids[:, 20:], **cache_kw(cache)).logits
        b = model(ids[:, 20:], **cache_kw(ref)).logits
    tqai_torch.unpatch(model)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_prompt_cache_reuse_does_not_corrupt_the_prefix():
    model = build("llama")
    ids = _prompt(batch=1, length=16)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2)
    with torch.no_grad():
        model(ids, **cache_kw(cache))
        snapshot = cache.copy()
        first = _generate(model, ids, cache.copy(), max_new_tokens=6)
        second = _generate(model, ids, cache.copy(), max_new_tokens=6)
    tqai_torch.unpatch(model)
    assert torch.equal(first, second)
    for a, b in zip(cache.layers, snapshot.layers, strict=True):
        if isinstance(a, TqaiLayer):
            ka, va = a.store.dequantize()
            kb, vb = b.store.dequantize()
            assert torch.equal(ka, kb)
            assert torch.equal(va, vb)


def test_nbytes_is_real_and_smaller_than_bf16():
    model = build("llama", num_attention_heads=2, num_key_value_heads=2, hidden_size=128)
    model = model.to(torch.bfloat16)
    ids = _prompt(batch=1, length=300)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=0, residual_window=0)
    with torch.no_grad():
        model(ids, **cache_kw(cache))
    tqai_torch.unpatch(model)
    per_layer = cache.layer_nbytes()
    assert len(per_layer) == 2
    assert all(part["staged"] == 0 and part["window"] == 0 for part in per_layer)
    bf16 = 2 * 2 * 300 * 64 * 2 * 2  # layers * (K, V) * tokens * head_dim * heads * 2 bytes
    capacity = cache.layers[0].store.keys.capacity
    expected = 2 * 2 * capacity * ((32 + 2) + (16 + 2))
    assert cache.nbytes() == expected
    assert cache.nbytes() < 0.5 * bf16


def _storages(obj, found, depth=0):
    """Every torch tensor storage reachable from ``obj`` through the attributes of tqai's
    objects, lists, tuples and dicts (the quantizers, shared by the layers, left out): data
    pointer -> bytes."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for value in list(obj.values()):
            _storages(value, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _storages(value, found, depth + 1)
    elif type(obj).__module__.startswith("tqai") and hasattr(obj, "__dict__"):
        for name, value in list(vars(obj).items()):
            if "quantizer" not in name:
                _storages(value, found, depth + 1)


def test_cache_holds_only_its_own_bytes():
    """After a one-forward prefill, the sink and window tokens are the cache's own compact
    tensors, not views that keep the whole prompt's keys and values (the attention's
    projections, all of it in full precision) alive, and decode steps keep them so; and every
    tensor a layer's store can reach is what ``nbytes`` counts (the packed buffers, sinks,
    window), up to the window's tokens sharing a step's slightly larger tensor: no second copy
    of the prompt's codes."""
    model = build("llama")
    ids = _prompt(batch=2, length=300)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2, sink_tokens=4, residual_window=8)
    with torch.no_grad():
        out = model(ids, **cache_kw(cache))
        for step in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(nxt, **cache_kw(cache))
            for layer in cache.layers:
                store = layer.store
                held = [*store.sinks, *store.window]
                assert all(t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size()
                           for t in held), step  # fmt: skip
    tqai_torch.unpatch(model)
    first = cache.layers[0].store
    assert first.sink_length == 4
    assert first.window_length == 8
    for layer in cache.layers:
        store = layer.store
        found: dict[int, int] = {}
        _storages(store, found)
        window = sum(t.numel() * t.element_size() for t in store.window)
        assert sum(found.values()) <= sum(store.nbytes().values()) + window


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits_k": 0}, ValueError, "bits_k must be in 1..8"),
        ({"bits_v": 9}, ValueError, "bits_v must be in 1..8"),
        ({"cache_strategy": "lossy"}, ValueError, "cache_strategy must be one of"),
        ({"skip_layers": [5]}, ValueError, r"skip_layers must be layer indices in 0\.\.1"),
        ({"rotation": "dct"}, ValueError, "rotation must be one of"),
    ],
)
def test_patch_bad_input(kwargs, error, match):
    model = build("llama")
    with pytest.raises(error, match=match):
        tqai_torch.patch(model, **kwargs)
    assert model.config._attn_implementation != "tqai"


def test_patch_refuses_unsupported_models():
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        tqai_torch.patch(torch.nn.Linear(3, 3))
    model = build("llama").to(torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tqai_torch.patch(model)


def test_cache_without_patched_attention_fails_clearly():
    model = build("llama")
    cache = tqai_torch.patch(model)
    tqai_torch.unpatch(model)
    with pytest.raises(RuntimeError, match="'tqai' attention"), torch.no_grad():
        model(_prompt(batch=1), **cache_kw(cache))


@pytest.mark.parametrize("family_name", ["llama", "gemma3"])
def test_save_and_load_prompt_cache(tmp_path, family_name):
    model = build(family_name).to(torch.bfloat16)
    ids = _prompt(batch=1, length=24)
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2, residual_window=3)
    with torch.no_grad():
        model(ids[:, :20], **cache_kw(cache))
        path = tmp_path / "prompt.tqai"
        cache.save(path)
        loaded = TqaiCache.load(path, model)
        a = model(ids[:, 20:], **cache_kw(cache)).logits
        b = model(ids[:, 20:], **cache_kw(loaded)).logits
    tqai_torch.unpatch(model)
    assert torch.equal(a, b)
    assert loaded.get_seq_length() == 24


def test_load_refuses_other_model_or_config(tmp_path):
    model = build("llama")
    cache = tqai_torch.patch(model, bits_k=4, bits_v=2)
    with torch.no_grad():
        model(_prompt(batch=1), **cache_kw(cache))
    path = tmp_path / "prompt.tqai"
    cache.save(path)
    tqai_torch.patch(model, bits_k=3, bits_v=2)
    with pytest.raises(ValueError, match="another tqai config"):
        TqaiCache.load(path, model)
    tqai_torch.unpatch(model)
    other = build("qwen3")
    tqai_torch.patch(other, bits_k=4, bits_v=2)
    with pytest.raises(ValueError, match="saved for another model"):
        TqaiCache.load(path, other)
    tqai_torch.unpatch(other)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    tqai_torch.patch(model, bits_k=4, bits_v=2)
    with pytest.raises(ValueError, match="checksum mismatch"):
        TqaiCache.load(path, model)
    tqai_torch.unpatch(model)


def test_device_option_keeps_codes_where_asked():
    model = build("llama")
    ids = _prompt(batch=1)
    with torch.no_grad():
        base = _generate(model, ids, tqai_torch.patch(model, bits_k=4, bits_v=2))
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, device="cpu")
        out = _generate(model, ids, cache)
    tqai_torch.unpatch(model)
    assert torch.equal(out, base)
    assert all(b.device.type == "cpu" for b in cache.layers[0].store.keys.buffers.values())
    with pytest.raises(ValueError, match="device must be a torch device"):
        tqai_torch.patch(model, device="nowhere")
    tqai_torch.unpatch(model)


def test_patch_refuses_a_model_with_nothing_to_compress():
    model = build("mistral", sliding_window=16)  # every layer is a sliding-window layer
    with pytest.raises(ValueError, match="no full-attention layer left to compress"):
        tqai_torch.patch(model)
    model = build("llama")
    with pytest.raises(ValueError, match="no full-attention layer left to compress"):
        tqai_torch.patch(model, skip_layers=[0, 1])
    assert model.config._attn_implementation != "tqai"

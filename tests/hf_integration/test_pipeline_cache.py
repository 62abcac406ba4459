"""``tqai_torch.patch(model, pipeline=...)``: the compression pipeline inside the transformers cache.

Tiny random Llama (2 layers, 2 KV heads of size 16). The LLM caches store each token at one
width shared by its batch rows and heads, so the supported pipelines are "no strategy" (plain
quantization at the pipeline's widths) and ``tiered`` (built with ``rank="token"``: score-routed
widths per token), each with an optional monitor that moves the width between steps; such a cache
keeps one packed history per (key width, value width) and attention reads them all in time order.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai
import tqai_torch
from tqai.pipeline import PipelineConfigError
from tqai.testing import TIERED_PIPELINE, stored_widths

pytestmark = pytest.mark.integration


class _Alternating:
    """A monitor that moves the width every commit: base, base+1, base+2, base, ..."""

    name = "alternating"

    def __init__(self) -> None:
        self.calls: dict[tuple, int] = {}

    def observe(self, x, result, *, layer=None, step=None, stream=None, queries=None) -> None:
        self.calls[(layer, stream)] = self.calls.get((layer, stream), 0) + 1

    def adjust(self, n_bits, *, layer=None, stream=None) -> int:
        return n_bits + self.calls.get((layer, stream), 0) % 3

    def reset(self) -> None:
        self.calls.clear()


def _ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, cache, ids, steps: int = 6) -> torch.Tensor:
    """Prefill all but the last ``steps`` tokens, then feed those one by one (teacher forced)."""
    rows = []
    with torch.no_grad():
        out = model(ids[:, :-steps], **cache_kw(cache)).logits[:, -1]
        rows.append(out)
        rows.extend(
            model(ids[:, -i : ids.shape[1] - i + 1], **cache_kw(cache)).logits[:, -1]
            for i in range(steps, 0, -1)
        )
    return torch.stack(rows, 1)


def _generate(model, ids, cache, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            pad_token_id=0,
            max_new_tokens=n,
            **cache_kw(cache),
        )


@pytest.fixture
def model():
    m = build("llama")
    yield m
    tqai_torch.unpatch(m)


def test_pipeline_none_is_bit_identical_to_no_argument(model):
    ids = _ids()
    plain = _logits(model, tqai_torch.patch(model, bits_k=3, bits_v=2, sink_tokens=2), ids)
    cache = tqai_torch.patch(model, bits_k=3, bits_v=2, sink_tokens=2, pipeline=None)
    assert all(layer.store.pipeline is None for layer in cache.layers)
    assert torch.equal(_logits(model, cache, ids), plain)


@pytest.mark.parametrize("monitor", ["stability", "lyapunov"])
def test_supported_pipeline_generates_and_stays_compressed(model, monitor):
    ids = _ids(length=400)  # long enough that codes dominate the sinks and spare capacity
    cache = tqai.patch(model, bits_k=4, bits_v=2, pipeline={"monitor": monitor})
    out = _generate(model, ids, cache)
    assert out.shape == (2, ids.shape[1] + 12)
    length = out.shape[1] - 1
    for layer in cache.layers:
        assert layer.store.tiers
        assert not layer.store.keys.length
        assert layer.store.length == length
    c = model.config
    bf16 = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * length * 16 * 2
    assert 0 < cache.nbytes() < bf16


def test_several_widths_attend_like_the_dequantized_reference(model):
    """Codes at three widths, read by compressed attention, match the ``full`` strategy."""
    ids = _ids(length=30)
    options = {"bits_k": 3, "bits_v": 2, "sink_tokens": 2, "residual_window": 3}
    cache = tqai_torch.patch(model, **options, pipeline={"monitor": _Alternating()})
    logits = _logits(model, cache, ids, steps=8)
    widths = {spec[0].n_bits for spec in cache.layers[0].store.tiers}
    assert widths == {3, 4, 5}
    full = tqai_torch.patch(
        model, **options, cache_strategy="full", pipeline={"monitor": _Alternating()}
    )
    reference = _logits(model, full, ids, steps=8)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # crop (speculative decoding) keeps the first tokens of every width in time order
    store = cache.layers[0].store
    n = store.length
    cache.crop(n - 5)
    assert store.length == n - 5
    assert sum(t.length for t in store.tiers.values()) == store.history_length


def test_skip_layers_keeps_the_plain_widths(model):
    ids = _ids()
    cache = tqai_torch.patch(
        model,
        bits_k=4,
        bits_v=2,
        residual_window=0,
        pipeline={"monitor": "stability", "skip_layers": [0]},
    )
    _generate(model, ids, cache, n=4)
    skipped, piped = (layer.store for layer in cache.layers)
    assert skipped.pipeline is None
    assert not skipped.tiers
    assert skipped.keys.view().spec.n_bits == 4
    assert skipped.values.view().spec.n_bits == 2
    assert piped.pipeline is not None
    assert piped.tiers
    assert not piped.keys.length


def test_tiered_routes_tokens_and_attends_like_the_dequantized_reference(model):
    ids = _ids(length=200)
    options = {"bits_k": 3, "bits_v": 3, "sink_tokens": 2, "residual_window": 3}
    cache = tqai.patch(model, **options, pipeline=TIERED_PIPELINE)
    logits = _logits(model, cache, ids, steps=8)
    for layer in cache.layers:
        store = layer.store
        assert store.pipeline.strategy.rank == "token"
        assert not store.keys.length
        for stream in (0, 1):
            widths = stored_widths(store, stream)
            assert set(widths) == {2, 4}
            assert abs(widths.count(4) / len(widths) - 0.25) < 0.03
    full = tqai_torch.patch(model, **options, cache_strategy="full", pipeline=TIERED_PIPELINE)
    reference = _logits(model, full, ids, steps=8)
    for a, b in zip(cache.layers, full.layers, strict=True):
        assert stored_widths(a.store, 0) == stored_widths(b.store, 0)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_tiered_cache_save_load_gives_the_same_logits(model, tmp_path):
    ids = _ids(length=120)
    cache = tqai.patch(model, bits_k=3, bits_v=3, sink_tokens=2, pipeline=TIERED_PIPELINE)
    with torch.no_grad():
        model(ids[:, :100], **cache_kw(cache))
    path = tmp_path / "tiered.tqai"
    cache.save(path)
    loaded = tqai_torch.TqaiCache.load(path, model)
    assert loaded.pipeline is cache.pipeline is cache.copy().pipeline  # the patched model's
    for a, b in zip(cache.layers, loaded.layers, strict=True):
        assert stored_widths(a.store, 1) == stored_widths(b.store, 1)
        assert len(b.store.tiers) > 1
    with torch.no_grad():
        after_load = model(ids[:, 100:], **cache_kw(loaded)).logits
        original = model(ids[:, 100:], **cache_kw(cache)).logits
    assert torch.equal(after_load, original)
    assert loaded.get_seq_length() == cache.get_seq_length() == 120
    # Another pipeline config, or none, refuses the file.
    tqai.patch(
        model, bits_k=3, bits_v=3, sink_tokens=2, pipeline={**TIERED_PIPELINE, "scorer": "fisher"}
    )
    with pytest.raises(ValueError, match="another compression pipeline"):
        tqai_torch.TqaiCache.load(path, model)
    tqai.patch(model, bits_k=3, bits_v=3, sink_tokens=2)
    with pytest.raises(ValueError, match="another compression pipeline"):
        tqai_torch.TqaiCache.load(path, model)


def test_monitor_cache_save_load_and_objects_refused(model, tmp_path):
    ids = _ids(length=60)
    cache = tqai.patch(model, sink_tokens=2, residual_window=0, pipeline={"monitor": "stability"})
    with torch.no_grad():
        model(ids[:, :50], **cache_kw(cache))
    cache.save(tmp_path / "m.tqai")
    loaded = tqai_torch.TqaiCache.load(tmp_path / "m.tqai", model)
    with torch.no_grad():
        assert torch.equal(
            model(ids[:, 50:], **cache_kw(loaded)).logits,
            model(ids[:, 50:], **cache_kw(cache)).logits,
        )
    cache = tqai.patch(model, pipeline={"monitor": _Alternating()})
    _generate(model, _ids(), cache, n=2)
    with pytest.raises(ValueError, match="built from plugin objects"):
        cache.save(tmp_path / "c.tqai")


@pytest.mark.parametrize(
    ("pipeline", "match"),
    [
        (
            {"scorer": "palm", "strategy": "tiered", "strategy_kwargs": {"rank": "joint"}},
            "'tiered' is not supported",
        ),
        ({"strategy": "delta"}, "diffusion-step strategy"),
        ({"scorer": "nope", "strategy": "tiered"}, "allowed values"),
        ({"monitor": "stability", "skip_layers": [7]}, "skip_layers"),
        ({"bits": 3}, "unknown pipeline config key"),
        ({"bits_k": 12}, "bits_k"),
        ("stability", "must be None"),
    ],
)
def test_bad_pipeline_configs_fail_at_patch_time(model, pipeline, match):
    with pytest.raises(PipelineConfigError, match=match):
        tqai_torch.patch(model, pipeline=pipeline)
    assert model.config._attn_implementation != "tqai"  # nothing was changed

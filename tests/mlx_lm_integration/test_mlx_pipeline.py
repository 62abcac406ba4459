"""``tqai_mlx.patch(model, pipeline=...)``: the compression pipeline inside the mlx-lm cache.

Tiny random mlx-lm Llama (2 layers, 2 KV heads of size 32), built as the other mlx-lm tests do.
"""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import llama  # noqa: E402

import tqai  # noqa: E402
import tqai_mlx  # noqa: E402
from tqai.pipeline import PipelineConfigError  # noqa: E402
from tqai.testing import TIERED_PIPELINE, stored_widths  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB = 128


def _model():
    mx.random.seed(0)
    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            head_dim=32,
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=VOCAB,
        )
    )
    mx.eval(model.parameters())
    return model


def _prompt(length: int = 32):
    mx.random.seed(1)
    return mx.random.randint(0, VOCAB, (1, length))


def _decode(model, cache, prompt, n: int = 6):
    logits = model(prompt, cache=cache)
    rows = [logits[:, -1]]
    for _ in range(n):
        y = mx.argmax(logits[:, -1], axis=-1)
        logits = model(y[:, None], cache=cache)
        rows.append(logits[:, -1])
    out = mx.stack(rows, axis=1)
    mx.eval(out)
    return out


@pytest.fixture
def model():
    m = _model()
    yield m
    tqai_mlx.unpatch(m)


def test_pipeline_none_is_bit_identical_to_no_argument(model):
    prompt = _prompt()
    plain = _decode(model, tqai_mlx.patch(model, bits_k=3, bits_v=2), prompt)
    cache = tqai_mlx.patch(model, bits_k=3, bits_v=2, pipeline=None)
    assert all(c.store.pipeline is None for c in cache)
    assert mx.array_equal(_decode(model, cache, prompt), plain).item()


def test_supported_pipeline_generates_and_stays_compressed(model):
    prompt = _prompt(length=300)
    cache = tqai.patch(model, bits_k=4, bits_v=2, pipeline={"monitor": "stability"})
    logits = _decode(model, cache, prompt)
    assert mx.all(mx.isfinite(logits)).item()
    for c in cache:
        assert c.store.tiers
        assert not c.store.keys.length
        assert c.offset == 306
    mx.eval([c.state for c in cache])  # what mlx-lm's generate does between steps
    bf16 = 2 * 2 * 2 * 306 * 32 * 2
    assert 0 < sum(c.nbytes for c in cache) < bf16


def test_several_widths_match_the_full_strategy(model):
    """Widths moved by a monitor, read from the codes, equal the dequantized reference."""

    class Alternating:
        name = "alternating"

        def __init__(self):
            self.n = {}

        def observe(self, x, result, *, layer=None, step=None, stream=None, queries=None):
            self.n[(layer, stream)] = self.n.get((layer, stream), 0) + 1

        def adjust(self, n_bits, *, layer=None, stream=None):
            return n_bits + self.n.get((layer, stream), 0) % 3

        def reset(self):
            self.n.clear()

    prompt = _prompt()
    options = {"bits_k": 3, "bits_v": 2, "residual_window": 2}
    cache = tqai_mlx.patch(model, **options, pipeline={"monitor": Alternating()})
    logits = _decode(model, cache, prompt)
    assert {spec[0].n_bits for spec in cache[0].store.tiers} == {3, 4, 5}
    full = tqai_mlx.patch(
        model, **options, cache_strategy="full", pipeline={"monitor": Alternating()}
    )
    reference = _decode(model, full, prompt)
    assert mx.allclose(logits, reference, rtol=1e-4, atol=1e-4).item()


def test_skip_layers_keeps_the_plain_widths(model):
    cache = tqai_mlx.patch(
        model,
        bits_k=4,
        bits_v=2,
        residual_window=0,
        pipeline={"monitor": "stability", "skip_layers": [0]},
    )
    _decode(model, cache, _prompt(), n=2)
    skipped, piped = (c.store for c in cache)
    assert skipped.pipeline is None
    assert not skipped.tiers
    assert skipped.keys.view().spec.n_bits == 4
    assert skipped.values.view().spec.n_bits == 2
    assert piped.tiers
    assert not piped.keys.length


def test_tiered_routes_tokens_and_matches_the_full_strategy(model):
    prompt = _prompt(length=160)
    options = {"bits_k": 3, "bits_v": 3, "residual_window": 2}
    cache = tqai_mlx.patch(model, **options, pipeline=TIERED_PIPELINE)
    logits = _decode(model, cache, prompt)
    for c in cache:
        assert c.store.pipeline.strategy.rank == "token"
        for stream in (0, 1):
            widths = stored_widths(c.store, stream)
            assert set(widths) == {2, 4}
            assert abs(widths.count(4) / len(widths) - 0.25) < 0.03
    full = tqai_mlx.patch(model, **options, cache_strategy="full", pipeline=TIERED_PIPELINE)
    reference = _decode(model, full, prompt)
    assert mx.allclose(logits, reference, rtol=1e-4, atol=1e-4).item()


def test_tiered_cache_save_load_gives_the_same_logits(model, tmp_path):
    prompt = _prompt(length=80)
    cache = tqai_mlx.patch(model, bits_k=3, bits_v=3, pipeline=TIERED_PIPELINE)
    model(prompt[:, :70], cache=cache)
    mx.eval([c.state for c in cache])
    path = tmp_path / "tiered.tqai"
    tqai_mlx.save_cache(path, cache, model=model)
    with pytest.raises(ValueError, match="pass model="):
        tqai_mlx.load_cache(path)
    loaded = tqai_mlx.load_cache(path, model=model)
    for a, b in zip(cache, loaded, strict=True):
        assert stored_widths(a.store, 0) == stored_widths(b.store, 0)
        assert len(b.store.tiers) > 1
    after_load = model(prompt[:, 70:], cache=loaded)
    original = model(prompt[:, 70:], cache=cache)
    assert mx.array_equal(after_load, original).item()
    tqai_mlx.patch(model, bits_k=3, bits_v=3, pipeline={**TIERED_PIPELINE, "scorer": "fisher"})
    with pytest.raises(ValueError, match="another compression pipeline"):
        tqai_mlx.load_cache(path, model=model)
    tqai_mlx.patch(model, bits_k=3, bits_v=3)
    with pytest.raises(ValueError, match="another compression pipeline"):
        tqai_mlx.load_cache(path, model=model)


@pytest.mark.parametrize(
    ("pipeline", "match"),
    [
        (
            {"scorer": "palm", "strategy": "tiered", "strategy_kwargs": {"rank": "joint"}},
            "'tiered' is not supported",
        ),
        ({"strategy": "delta"}, "diffusion-step strategy"),
        ({"monitor": "nope"}, "allowed values"),
        ({"monitor": "stability", "skip_layers": [5]}, "skip_layers"),
        ({"bits": 3}, "unknown pipeline config key"),
    ],
)
def test_bad_pipeline_configs_fail_at_patch_time(model, pipeline, match):
    with pytest.raises(PipelineConfigError, match=match):
        tqai_mlx.patch(model, pipeline=pipeline)
    assert not tqai_mlx.is_patched(model)

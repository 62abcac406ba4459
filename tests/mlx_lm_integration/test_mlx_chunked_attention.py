"""``chunk_attention=True`` on tiny mlx-lm models, and the mlx chunked attention vs mlx's SDPA."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import tqai_mlx  # noqa: E402
import tqai_mlx.patching as patching  # noqa: E402
from tqai_mlx.chunked_attention import (  # noqa: E402
    CHUNK_ATTR,
    boolean_mask,
    chunked_scaled_dot_product_attention,
)

pytestmark = pytest.mark.integration


def _model(**extra):
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
        head_dim=16, **extra,
    )  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _ids():
    return mx.array(np.random.default_rng(3).integers(3, 128, (1, 23)))


def _prefill_and_step(model, cache):
    ids = _ids()
    first = model(ids[:, :-1], cache=cache)
    second = model(ids[:, -1:], cache=cache)
    return np.array(first), np.array(second)


@pytest.mark.parametrize(
    "extra", [{}, {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}]
)
def test_chunked_layers_match_mlx_attention(monkeypatch, extra):
    model = _model(**extra)
    options = {"bits_k": 8, "bits_v": 8, "skip_layers": [0], "chunk_size": 4}
    want = _prefill_and_step(model, tqai_mlx.patch(model, **options))
    calls = []
    original = patching.chunked_scaled_dot_product_attention
    monkeypatch.setattr(
        patching,
        "chunked_scaled_dot_product_attention",
        lambda *a, **k: calls.append(k["chunk_size"]) or original(*a, **k),
    )
    cache = tqai_mlx.patch(model, chunk_attention=True, **options)
    assert [getattr(c, CHUNK_ATTR) for c in cache] == [4, 4]
    got = _prefill_and_step(model, cache)
    assert calls == [4, 4]  # layer 0 (skipped, plain cache), prefill and decode
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
    tqai_mlx.unpatch(model)
    assert not any(hasattr(c, CHUNK_ATTR) for c in make_prompt_cache(model))


def test_full_strategy_is_chunked_and_unpatched_models_are_not(monkeypatch):
    model, other = _model(), _model()
    calls = []
    monkeypatch.setattr(
        patching,
        "chunked_scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or mx.zeros(a[0].shape),
    )
    tqai_mlx.patch(model, cache_strategy="full", chunk_attention=True)
    other(_ids(), cache=make_prompt_cache(other))  # unpatched model, dispatcher installed
    assert calls == []
    model(_ids(), cache=make_prompt_cache(model))
    assert len(calls) == 2
    tqai_mlx.unpatch(model)
    with pytest.raises(ValueError, match="chunk_attention must be True or False"):
        tqai_mlx.patch(model, chunk_attention=1)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", None])
def test_chunked_attention_matches_mlx_fast_sdpa(mask_kind):
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal((2, 8, 9, 32)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, 2, 21, 32)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, 2, 21, 32)).astype(np.float32))
    if mask_kind == "bool":
        mask = boolean_mask("causal", 9, 21)
        mask = mx.array(np.array(mask) & (rng.random((2, 1, 9, 21)) > 0.3))
        mask = mx.array(np.array(mask) | (np.arange(21) == 0))
    else:
        mask = mask_kind
    out = chunked_scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, chunk_size=5)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=0, atol=3e-6)

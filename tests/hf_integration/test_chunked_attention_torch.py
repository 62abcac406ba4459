"""``chunk_attention=True`` on tiny transformers models, and the torch attention vs SDPA."""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai_torch
import tqai_torch.chunked_attention as chunked_module
from tqai_torch.chunked_attention import CHUNK_ATTR, chunked_attention_forward

pytestmark = pytest.mark.integration


def _ids(length: int = 30) -> torch.Tensor:
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(7))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids), **kwargs).logits


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "qwen2-sliding"])
def test_chunked_forward_matches_the_models_own_attention(family, monkeypatch):
    model = build(family)
    ids = _ids()
    before = _logits(model, ids, use_cache=False)
    calls = []
    original = chunked_module.chunked_attention
    monkeypatch.setattr(
        chunked_module,
        "chunked_attention",
        lambda *a, **k: calls.append(k["chunk_size"]) or original(*a, **k),
    )
    tqai_torch.patch(model, chunk_attention=True, chunk_size=4)
    after = _logits(model, ids, use_cache=False)  # no cache: every call is a fallback call
    assert set(calls) == {4}
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(after, before, rtol=0, atol=2e-5)
    tqai_torch.unpatch(model)
    assert not hasattr(model.config, CHUNK_ATTR)
    assert torch.equal(_logits(model, ids, use_cache=False), before)


def test_chunk_attention_off_uses_the_previous_implementation(monkeypatch):
    model = build("llama")
    calls = []
    monkeypatch.setattr(chunked_module, "chunked_attention", lambda *a, **k: calls.append(1))
    tqai_torch.patch(model, chunk_attention=True)
    tqai_torch.patch(model)  # re-patching without it turns it off
    _logits(model, _ids(), use_cache=False)
    assert calls == []
    with pytest.raises(ValueError, match="chunk_attention must be True or False"):
        tqai_torch.patch(model, chunk_attention="yes")
    tqai_torch.unpatch(model)


def test_generation_with_a_compressed_cache_and_chunked_fallback():
    model = build("gemma3")  # sliding layers use the chunked fallback, global ones the codes
    ids = _ids(20)
    cache = tqai_torch.patch(model, bits_k=8, bits_v=8, chunk_attention=True, chunk_size=3)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
            **cache_kw(cache),
        )  # fmt: skip
    tqai_torch.unpatch(model)
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("tq", "t"), [(33, 33), (1, 40), (5, 19)])
def test_chunked_attention_forward_matches_sdpa(tq, t):
    g = torch.Generator().manual_seed(tq * t)
    q = torch.randn(2, 8, tq, 32, generator=g)
    k = torch.randn(2, 2, t, 32, generator=g)
    v = torch.randn(2, 2, t, 32, generator=g)
    mask = torch.ones(tq, t, dtype=torch.bool).tril(diagonal=t - tq)[None, None].repeat(2, 1, 1, 1)
    mask[1, ..., :2] = False
    module = torch.nn.Module()
    module.config = type("C", (), {CHUNK_ATTR: 4})()
    module.is_causal = True
    out, _ = chunked_attention_forward(module, q, k, v, mask, scaling=0.17)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.17, enable_gqa=True
    ).transpose(1, 2)
    # Rows whose every key is masked: SDPA gives NaN, tqai gives 0; compare the others.
    valid = mask.any(-1)[:, 0, :]  # (B, Tq)
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=3e-6)

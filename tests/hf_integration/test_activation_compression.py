"""Activation compression hooks and named configs on tiny transformers models."""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai
import tqai_torch
from tqai.activations import ActivationCompressor, ActivationConfig
from tqai_torch.activations import activation_config, apply_activation_compression

pytestmark = pytest.mark.integration


def _ids(length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(4))


def _logits(model, ids, cache=None) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {} if cache is None else cache_kw(cache)
        return model(ids, **kwargs).logits


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("name", ["kv+hidden8", "kv+ffn8", "all6", "aggressive"])
def test_named_config_compresses_activations_then_unpatch_is_exact(family, name):
    model = build(family)
    ids = _ids()
    before = _logits(model, ids)
    hooks_before = _hook_count(model)
    cache = tqai.patch(model, config=name)
    spec = tqai.named_configs.named_config(name)
    assert (cache.tqai_config.bits_k, cache.tqai_config.bits_v) == (spec.bits_k, spec.bits_v)
    assert activation_config(model) == ActivationConfig(
        hidden_bits=spec.hidden_bits, ffn_bits=spec.ffn_bits
    )
    layers = model.config.num_hidden_layers
    expected = layers * ((spec.hidden_bits is not None) + (spec.ffn_bits is not None))
    assert _hook_count(model) == hooks_before + expected
    # Without a cache only the activations are compressed: the logits move, boundedly.
    patched = _logits(model, ids)
    err = ((patched - before).norm() / before.norm()).item()
    assert 0 < err < (0.05 if name.endswith("8") else 0.2), err
    tqai.unpatch(model)
    assert _hook_count(model) == hooks_before
    assert torch.equal(_logits(model, ids), before)


def test_kv_only_adds_no_hooks():
    model = build("llama")
    hooks = _hook_count(model)
    cache = tqai_torch.patch(model, config="kv-only")
    assert _hook_count(model) == hooks
    assert activation_config(model) is None
    assert (cache.tqai_config.bits_k, cache.tqai_config.bits_v) == (4, 2)
    tqai_torch.unpatch(model)


def test_hidden_hook_outputs_the_codec_reconstruction():
    model = build("llama")
    layer = model.model.layers[0]
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("raw", out))
    _logits(model, _ids())
    handle.remove()
    apply_activation_compression(model, ActivationConfig(hidden_bits=5, seed=2))
    got = {}
    # A hook registered after tqai's sees tqai's output.
    handle = layer.register_forward_hook(lambda m, a, out: got.setdefault("out", out))
    _logits(model, _ids())
    handle.remove()
    raw = seen["raw"][0] if isinstance(seen["raw"], tuple) else seen["raw"]
    out = got["out"][0] if isinstance(got["out"], tuple) else got["out"]
    assert torch.equal(out, ActivationCompressor(n_bits=5, seed=2)(raw))
    tqai_torch.unpatch(model)  # also removes activation hooks applied on their own
    assert activation_config(model) is None


def test_repatch_replaces_the_hooks_and_generation_runs():
    model = build("qwen2")
    hooks = _hook_count(model)
    tqai_torch.patch(model, config="all8")
    cache = tqai_torch.patch(model, bits_k=8, bits_v=8, hidden_bits=8, rotation="rotor", seed=3)
    assert _hook_count(model) == hooks + model.config.num_hidden_layers
    assert activation_config(model) == ActivationConfig(hidden_bits=8, rotation="rotor", seed=3)
    ids = _ids(12)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            **cache_kw(cache),
        )
    assert out.shape == (2, 18)
    tqai_torch.unpatch(model)
    assert _hook_count(model) == hooks


def test_bad_options_leave_the_model_untouched():
    model = build("llama")
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match="contradicts"):
        tqai_torch.patch(model, config="all8", bits_k=3)
    with pytest.raises(ValueError, match="config must be one of"):
        tqai_torch.patch(model, config="everything")
    with pytest.raises(ValueError, match=r"hidden_bits must be in 1\.\.8"):
        tqai_torch.patch(model, hidden_bits=0)
    for layer in model.model.layers:
        del layer.mlp.down_proj
    with pytest.raises(ValueError, match=r"no `mlp.down_proj`"):
        tqai_torch.patch(model, config="kv+ffn8")
    assert _hook_count(model) == hooks
    assert model.config._attn_implementation != "tqai"

"""Activation compression (class-swap hooks) and named configs on tiny mlx-lm models."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import llama, qwen3  # noqa: E402

import tqai  # noqa: E402
import tqai_mlx  # noqa: E402
from tqai.activations import ActivationCompressor, ActivationConfig  # noqa: E402
from tqai_mlx.activations import activation_config  # noqa: E402

pytestmark = pytest.mark.integration

COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
}


def _model(family: str):
    mx.random.seed(0)
    if family == "llama":
        model = llama.Model(llama.ModelArgs(model_type="llama", head_dim=16, **COMMON))
    else:
        model = qwen3.Model(
            qwen3.ModelArgs(
                model_type="qwen3",
                head_dim=16,
                max_position_embeddings=512,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                **COMMON,
            )
        )
    mx.eval(model.parameters())
    return model


def _ids():
    return mx.array(np.random.default_rng(2).integers(3, 128, (1, 20)))


def _classes(model):
    return [type(m) for _, m in model.named_modules()]


def _weights(model):
    from mlx.utils import tree_flatten

    return sorted(k for k, _ in tree_flatten(model.parameters()))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("name", ["kv+hidden8", "kv+ffn8", "aggressive"])
def test_named_config_compresses_activations_then_unpatch_is_exact(family, name):
    model = _model(family)
    ids = _ids()
    before = np.array(model(ids))
    classes, weights = _classes(model), _weights(model)
    caches = tqai.patch(model, config=name)
    spec = tqai.named_configs.named_config(name)
    config = tqai_mlx.patching.patch_config(model)
    assert (config.bits_k, config.bits_v) == (spec.bits_k, spec.bits_v)
    assert len(caches) == len(model.layers)
    assert activation_config(model) == ActivationConfig(
        hidden_bits=spec.hidden_bits, ffn_bits=spec.ffn_bits
    )
    assert _weights(model) == weights  # the parameter tree is untouched
    swapped = sum(a is not b for a, b in zip(_classes(model), classes, strict=True))
    assert swapped == len(model.layers) * (
        (spec.hidden_bits is not None) + (spec.ffn_bits is not None)
    )
    patched = np.array(model(ids))
    err = np.linalg.norm(patched - before) / np.linalg.norm(before)
    assert 0 < err < (0.05 if name.endswith("8") else 0.2), err
    tqai.unpatch(model)
    assert _classes(model) == classes
    assert np.array_equal(np.array(model(ids)), before)


def test_hidden_output_is_the_codec_reconstruction():
    model = _model("llama")
    layer = model.layers[0]
    x = mx.array(np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32))
    raw = layer(x, mask=None, cache=None)
    tqai_mlx.patch(model, hidden_bits=5)
    out = layer(x, mask=None, cache=None)
    want = ActivationCompressor(n_bits=5)(raw)
    assert np.array_equal(np.array(out), np.array(want))
    tqai_mlx.unpatch(model)
    assert np.array_equal(np.array(layer(x, mask=None, cache=None)), np.array(raw))


def test_generation_through_the_patched_model():
    from mlx_lm.generate import generate_step

    model = _model("qwen3")
    cache = tqai_mlx.patch(model, config="all8")
    tokens = [
        t
        for (t, _), _ in zip(
            generate_step(_ids()[0], model, prompt_cache=cache), range(5), strict=False
        )
    ]
    assert len(tokens) == 5
    tqai_mlx.unpatch(model)


def test_bad_options_leave_the_model_untouched():
    model = _model("llama")
    tqai_mlx.patch(model, config="kv+hidden8")
    with pytest.raises(ValueError, match="contradicts"):
        tqai_mlx.patch(model, config="all8", bits_v=4)
    for layer in model.layers:
        del layer.mlp["down_proj"]
    with pytest.raises(ValueError, match=r"no `mlp.down_proj`"):
        tqai_mlx.patch(model, config="kv+ffn8")
    # the earlier patch is still in effect
    assert activation_config(model) == ActivationConfig(hidden_bits=8)
    tqai_mlx.unpatch(model)
    assert not [c for c in _classes(model) if c.__name__.startswith("Tqai")]

"""Model adapters: layer naming, config facts, step semantics, and what the pipeline allows."""

from __future__ import annotations

import pytest

from tqai.pipeline import ModelAdapter, build_pipeline
from tqai.pipeline.adapters.dit import DitAdapter
from tqai.pipeline.adapters.llm import LlmAdapter
from tqai.pipeline.adapters.wan import WanAdapter
from tqai.pipeline.protocols import FEATURES
from tqai.registry import registry

SMOLLM2_135M = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
}
WAN_1_3B = {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128}


@pytest.mark.parametrize("name", ["llm", "dit", "wan"])
def test_adapter_contract(name):
    adapter = registry("tqai.adapters").get(name)()
    assert isinstance(adapter, ModelAdapter)
    assert adapter.name == name
    assert adapter.step_semantics in ("decode", "denoise")
    assert adapter.features <= set(FEATURES)
    assert adapter.cfg_layout in (None, "batched", "split")
    assert ("cfg" in adapter.features) == (adapter.cfg_layout is not None)


@pytest.mark.parametrize(
    ("adapter", "name", "index"),
    [
        (LlmAdapter(), "model.layers.12.self_attn", 12),
        (LlmAdapter(), "layers.0.self_attn", 0),
        (LlmAdapter(), "model.layers.12.self_attn.k_proj", None),
        (LlmAdapter(), "model.layers.12.mlp", None),
        (DitAdapter(), "transformer.transformer_blocks.27.attn1", 27),
        (DitAdapter(), "transformer_blocks.3.attn", 3),
        (DitAdapter(), "transformer_blocks.3.attn2", None),
        (WanAdapter(), "transformer.blocks.39.attn1", 39),
        (WanAdapter(), "blocks.39.attn2", None),
        (WanAdapter(), "blocks.39.ffn", None),
    ],
)
def test_adapter_layer_names(adapter, name, index):
    assert adapter.layer_index(name) == index


def test_llm_adapter_reads_transformers_configs():
    llm = LlmAdapter()
    assert (llm.num_layers(SMOLLM2_135M), llm.kv_heads(SMOLLM2_135M)) == (30, 3)
    assert llm.head_dim(SMOLLM2_135M) == 64
    assert llm.head_dim({**SMOLLM2_135M, "head_dim": 256}) == 256
    assert llm.kv_heads({"num_attention_heads": 8}) == 8
    gemma_like = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    assert llm.sliding_layers(gemma_like) == [0, 2]
    assert llm.sliding_layers(SMOLLM2_135M) == []
    with pytest.raises(KeyError, match="llm adapter: the model config has none of"):
        llm.num_layers({})
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        llm.head_dim({"hidden_size": 100, "num_attention_heads": 3})


def test_dit_and_wan_adapters_read_diffusers_configs():
    wan = WanAdapter()
    assert (wan.num_layers(WAN_1_3B), wan.kv_heads(WAN_1_3B), wan.head_dim(WAN_1_3B)) == (
        30,
        12,
        128,
    )
    assert DitAdapter().num_layers({"num_layers": 28}) == 28
    with pytest.raises(ValueError, match="must be a positive int"):
        DitAdapter().head_dim({"attention_head_dim": 0})


def test_wan_token_grid_matches_the_480p_sequence_length():
    # Wan 2.1 at 832x480, 81 frames: 21 x 30 x 52 = 32760 latent patches.
    assert WanAdapter().token_grid(num_frames=81, height=480, width=832) == (21, 30, 52)
    assert WanAdapter().token_grid(num_frames=1, height=64, width=64) == (1, 4, 4)
    with pytest.raises(ValueError, match="has no tokens"):
        WanAdapter().token_grid(num_frames=1, height=8, width=8)


@pytest.mark.parametrize(
    ("adapter", "strategy", "allowed"),
    [
        ("llm", "tiered", True),
        ("llm", "delta", False),
        ("llm", "delta2", False),
        ("llm", "window", False),
        ("llm", "cfg_sharing", False),
        ("dit", "delta2", True),
        ("dit", "cfg_sharing", True),
        ("wan", "window", True),
    ],
)
def test_pipeline_allows_what_the_model_family_runs(adapter, strategy, allowed):
    config = {"adapter": adapter, "scorer": "palm", "strategy": strategy}
    if allowed:
        assert build_pipeline(config).adapter.name == adapter
    else:
        with pytest.raises(ValueError, match="requires model features"):
            build_pipeline(config)

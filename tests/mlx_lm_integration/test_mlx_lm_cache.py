"""tqai_mlx with real mlx-lm model code: tiny random-weight llama, mistral, qwen2, qwen3, gemma3.

Each model is built from its mlx-lm ``ModelArgs`` (2 layers, hidden 64, 4 heads, 2 KV heads, head
dim 32; qwen2 derives head dim from hidden 128) with a seeded ``mx.random``; mistral (llama code
with a sliding layer) and gemma3 keep a ``RotatingKVCache`` layer beside the compressed one.
Logit errors are teacher-forced (the baseline's tokens are fed back), so they measure the cache
and not a divergent continuation, and are relative to the baseline logits' standard deviation.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import base, gemma3_text, llama, qwen2, qwen3  # noqa: E402
from mlx_lm.models.base import scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    KVCache,
    RotatingKVCache,
    make_prompt_cache,
    trim_prompt_cache,
)

import tqai  # noqa: E402
import tqai_mlx  # noqa: E402
from tqai.container import TqaiFormatError  # noqa: E402
from tqai.kvstore import KVCacheConfig  # noqa: E402
from tqai_mlx.cache import TqaiKVCache  # noqa: E402
from tqai_mlx.patching import patch_config, patch_layer_configs  # noqa: E402

pytestmark = pytest.mark.integration

MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
VOCAB = 128
PROMPT_LEN = 32
NEW_TOKENS = 8
ORIGINAL_SDPA = base.scaled_dot_product_attention


@functools.cache
def _model(name: str) -> nn.Module:
    mx.random.seed(0)
    common = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
    }
    if name == "llama":
        model = llama.Model(llama.ModelArgs(model_type="llama", head_dim=32, **common))
    elif name == "mistral":
        layer_types = ["sliding_attention", "full_attention"]
        model = llama.Model(
            llama.ModelArgs(
                model_type="mistral",
                head_dim=32,
                layer_types=layer_types,
                sliding_window=8,
                **common,
            )
        )
    elif name == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **{**common, "hidden_size": 128}))
    elif name == "qwen3":
        model = qwen3.Model(
            qwen3.ModelArgs(
                model_type="qwen3",
                head_dim=32,
                max_position_embeddings=512,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                **common,
            )
        )
    else:
        model = gemma3_text.Model(
            gemma3_text.ModelArgs(
                model_type="gemma3_text",
                head_dim=32,
                sliding_window=8,
                sliding_window_pattern=2,
                query_pre_attn_scalar=32,
                **common,
            )
        )
    mx.eval(model.parameters())
    return model


@functools.cache
def _prompt(batch: int = 1) -> mx.array:
    mx.random.seed(1)
    return mx.random.randint(0, VOCAB, (batch, PROMPT_LEN))


def _decode(model, cache, prompt, *, forced=None, n=NEW_TOKENS):
    """Prefill, then ``n`` greedy (or ``forced``) steps; returns tokens and last-position logits."""
    logits = model(prompt, cache=cache)
    tokens, rows = [], [logits[:, -1]]
    for i in range(n):
        y = mx.argmax(logits[:, -1], axis=-1) if forced is None else forced[:, i]
        tokens.append(y)
        logits = model(y[:, None], cache=cache)
        rows.append(logits[:, -1])
    return mx.stack(tokens, axis=1), mx.stack(rows, axis=1)


@functools.cache
def _baseline(name: str, batch: int = 1):
    model = _model(name)
    tokens, logits = _decode(model, make_prompt_cache(model), _prompt(batch))
    mx.eval(tokens, logits)
    return tokens, logits


def _rel_error(logits, ref) -> float:
    return mx.max(mx.abs(logits - ref)).item() / mx.std(ref).item()


@pytest.fixture
def patched():
    """``patched(name, **options) -> (model, cache)``; always unpatched afterwards."""
    models = []

    def make(name, **options):
        model = _model(name)
        models.append(model)
        return model, tqai_mlx.patch(model, **options)

    yield make
    for model in models:
        tqai_mlx.unpatch(model)
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA


# ---- generation quality --------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_eight_bits_generates_the_baseline_tokens(patched, name):
    ref_tokens, ref_logits = _baseline(name)
    model, cache = patched(name, bits_k=8, bits_v=8)
    compressed = [type(c) is TqaiKVCache for c in cache]
    sliding = [type(c) is RotatingKVCache for c in cache]
    assert compressed == [not s for s in sliding]
    assert any(sliding) == (name in ("mistral", "gemma3"))
    tokens, logits = _decode(model, cache, _prompt())
    assert tokens.tolist() == ref_tokens.tolist()
    assert _rel_error(logits, ref_logits) < 0.1
    assert cache[-1].offset == PROMPT_LEN + NEW_TOKENS


@pytest.mark.parametrize("name", MODELS)
def test_low_bits_diverge_boundedly(patched, name):
    ref_tokens, ref_logits = _baseline(name)
    errors = {}
    for bits_k, bits_v in ((8, 8), (4, 2)):
        model, cache = patched(name, bits_k=bits_k, bits_v=bits_v)
        _, logits = _decode(model, cache, _prompt(), forced=ref_tokens)
        errors[bits_k, bits_v] = _rel_error(logits, ref_logits)
    assert errors[8, 8] < errors[4, 2] < 1.5, errors


@pytest.mark.parametrize(
    "options",
    [
        {"bits_k": 4, "bits_v": 2},
        {"bits_k": 3, "bits_v": 3, "sink_tokens": 0, "rotation": "hadamard"},
        {"bits_k": 4, "bits_v": 2, "use_qjl": True, "chunk_size": 7},
        {"bits_k": 4, "bits_v": 2, "cache_strategy": "residual", "residual_window": 6},
    ],
    ids=["k4v2", "k3v3-hadamard-nosink", "qjl-chunked", "residual"],
)
def test_attention_from_codes_equals_dequantized_reference(patched, options):
    """compressed/residual (codes, dispatcher) == full (dequantize + mlx-lm's own attention)."""
    ref_tokens, _ = _baseline("llama")
    model, cache = patched("llama", **options)
    _, from_codes = _decode(model, cache, _prompt(), forced=ref_tokens)
    strategy_ref = {**options, "cache_strategy": "full"}
    model, cache = patched("llama", **strategy_ref)
    _, reference = _decode(model, cache, _prompt(), forced=ref_tokens)
    np.testing.assert_allclose(np.array(from_codes), np.array(reference), atol=2e-4, rtol=1e-4)


def test_batch_and_chunked_prefill(patched):
    """Batch 2, prompt fed in two chunks (a 'causal' mask with an offset), then decode."""
    ref_tokens, ref_logits = _baseline("qwen3", batch=2)
    model, cache = patched("qwen3", bits_k=8, bits_v=8, sink_tokens=2)
    prompt = _prompt(2)
    model(prompt[:, :20], cache=cache)
    tokens, logits = _decode(model, cache, prompt[:, 20:])
    assert tokens.tolist() == ref_tokens.tolist()
    assert _rel_error(logits, ref_logits) < 0.1


def test_mlx_lm_generate_step_and_make_prompt_cache(patched):
    """mlx-lm's own loop, with our cache and with the one make_prompt_cache builds while patched."""
    ref_tokens, _ = _baseline("gemma3")
    model, cache = patched("gemma3", bits_k=8, bits_v=8)
    prompt = _prompt()[0]
    steps = generate_step(prompt, model, max_tokens=NEW_TOKENS, prompt_cache=cache)
    assert [t for t, _ in steps] == ref_tokens[0].tolist()
    built = make_prompt_cache(model)
    assert [type(c) for c in built] == [RotatingKVCache, TqaiKVCache]
    steps = generate_step(prompt, model, max_tokens=NEW_TOKENS)  # builds its own cache
    assert [t for t, _ in steps] == ref_tokens[0].tolist()


# ---- masks ---------------------------------------------------------------------------------
def test_mask_conventions_agree():
    """'causal', an explicit boolean array, an additive float mask and make_mask agree."""
    rng = np.random.default_rng(3)
    k = mx.array(rng.standard_normal((1, 2, 12, 32)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 4, 5, 32)).astype(np.float32))
    outs = []
    for kind in ("causal", "bool", "additive"):
        cache = TqaiKVCache(KVCacheConfig(bits_k=4, bits_v=4, sink_tokens=2))
        cache.store.update(k[:, :, :7], k[:, :, :7])
        cache.store.commit()
        mask = cache.make_mask(5, return_array=True)  # before the update, as mlx-lm does
        assert mask.shape == (5, 12)
        assert mask.dtype == mx.bool_
        if kind == "causal":
            mask = cache.make_mask(5)
            assert mask == "causal"
        elif kind == "additive":
            mask = mx.where(mask, 0.0, -mx.inf)
        cache.store.update(k[:, :, 7:], k[:, :, 7:])
        outs.append(np.array(cache.attend(q, scale=32**-0.5, mask=mask)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-4)
    assert TqaiKVCache().make_mask(1) is None


# ---- trim, save/load -----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["compressed", "residual"])
def test_trim_rolls_back_exactly(patched, strategy):
    ref_tokens, _ = _baseline("llama")
    model, cache = patched("llama", bits_k=4, bits_v=2, cache_strategy=strategy, residual_window=0)
    _, logits = _decode(model, cache, _prompt(), forced=ref_tokens)
    assert all(c.is_trimmable() for c in cache)
    assert trim_prompt_cache(cache, 3) == 3
    assert cache[0].offset == PROMPT_LEN + NEW_TOKENS - 3
    # One token per step, as generated: tokens of one forward pass see each other exactly, so a
    # chunked replay would differ by design. logits[:, i + 1] followed token i.
    for i in range(NEW_TOKENS - 3, NEW_TOKENS):
        replay = model(ref_tokens[:, i : i + 1], cache=cache)[:, -1]
        np.testing.assert_allclose(np.array(replay), np.array(logits[:, i + 1]), atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_save_load_round_trip_continues_identically(patched, tmp_path, name):
    ref_tokens, _ = _baseline(name)
    model, cache = patched(name, bits_k=4, bits_v=2, sink_tokens=3)
    model(_prompt(), cache=cache)
    path = tmp_path / "prompt.tqai"
    tqai_mlx.save_cache(path, cache, model=model, metadata={"note": "hi"})
    loaded, meta = tqai_mlx.load_cache(path, model, return_metadata=True)
    assert meta == {"note": "hi"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.offset for c in loaded] == [c.offset for c in cache]
    assert [c.nbytes for c in loaded] == [c.nbytes for c in cache]
    forced = ref_tokens[:, :4]
    _, a = _decode(model, cache, forced[:, :1], forced=forced[:, 1:], n=3)
    _, b = _decode(model, loaded, forced[:, :1], forced=forced[:, 1:], n=3)
    assert mx.array_equal(a, b).item()


def test_load_refuses_another_model_or_config(patched, tmp_path):
    model, cache = patched("llama", bits_k=4, bits_v=2)
    model(_prompt(), cache=cache)
    path = tmp_path / "c.tqai"
    tqai_mlx.save_cache(path, cache, model=model)
    other, _ = patched("qwen3", bits_k=4, bits_v=2)
    with pytest.raises(ValueError, match="another model"):
        tqai_mlx.load_cache(path, other)
    tqai_mlx.patch(model, bits_k=3, bits_v=2)
    with pytest.raises(ValueError, match=r"other settings: bits_k=4 \(model: 3\)"):
        tqai_mlx.load_cache(path, model)
    tqai_mlx.unpatch(model)
    with pytest.raises(ValueError, match="patch the model"):
        tqai_mlx.load_cache(path, model)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(TqaiFormatError, match="checksum"):
        tqai_mlx.load_cache(path)


def test_layer_bits_set_each_layers_widths_and_travel_with_the_saved_cache(patched, tmp_path):
    ref_tokens, _ = _baseline("llama")
    model, cache = patched(
        "llama", bits_k=3.5, bits_v=2.5, residual_window=0, layer_bits={0: (8, 4)}
    )
    assert [(c.config.bits_k, c.config.bits_v) for c in cache] == [(8, 4), (3.5, 2.5)]
    assert [c.config for c in make_prompt_cache(model)] == list(patch_layer_configs(model))
    model(_prompt(), cache=cache)
    assert [len(c.store.key_parts) for c in cache] == [1, 2]  # layer 1 splits its channels
    path = tmp_path / "prompt.tqai"
    tqai_mlx.save_cache(path, cache, model=model)
    loaded = tqai_mlx.load_cache(path, model)
    assert [c.config for c in loaded] == [c.config for c in cache]
    forced = ref_tokens[:, :4]
    _, a = _decode(model, cache, forced[:, :1], forced=forced[:, 1:], n=3)
    _, b = _decode(model, loaded, forced[:, :1], forced=forced[:, 1:], n=3)
    assert mx.array_equal(a, b).item()
    tqai_mlx.patch(model, bits_k=3.5, bits_v=2.5, residual_window=0)  # other layer-0 widths
    with pytest.raises(ValueError, match=r"layer 0: .*bits_k=8 \(model: 3.5\)"):
        tqai_mlx.load_cache(path, model)


def test_layer_bits_list_of_pairs_equals_the_uniform_setting(patched):
    """One pair per layer, all (8, 8): bit-identical to bits_k=bits_v=8; the widths are used."""
    ref_tokens, _ = _baseline("llama")
    runs = {}
    for name, options in {
        "uniform8": {"bits_k": 8, "bits_v": 8},
        "layers8": {"layer_bits": [(8, 8), (8, 8)]},
        "layers2": {"layer_bits": [(2, 2), (2, 2)]},
    }.items():
        model, cache = patched("llama", residual_window=0, **options)
        runs[name] = _decode(model, cache, _prompt(), forced=ref_tokens)[1]
    assert mx.array_equal(runs["uniform8"], runs["layers8"]).item()
    assert not mx.allclose(runs["uniform8"], runs["layers2"], atol=1e-3).item()


# ---- patch / unpatch -----------------------------------------------------------------------
def test_unpatch_restores_everything_exactly():
    model = _model("llama")
    ref_tokens, ref_logits = _baseline("llama")
    before = dict(vars(model))
    params = {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}
    cache = tqai.patch(model, bits_k=4, bits_v=2)  # the core dispatcher picks the mlx backend
    assert isinstance(cache[0], TqaiKVCache)
    assert llama.scaled_dot_product_attention is not ORIGINAL_SDPA
    # While patched, a plain mlx-lm cache still runs mlx-lm's own attention, bit for bit.
    tokens, logits = _decode(model, [KVCache(), KVCache()], _prompt())
    assert mx.array_equal(logits, ref_logits).item()
    tqai.unpatch(model)
    tqai.unpatch(model)  # a no-op
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA
    assert llama.scaled_dot_product_attention is ORIGINAL_SDPA
    assert scaled_dot_product_attention is ORIGINAL_SDPA  # this module imported it by name
    assert dict(vars(model)) == before
    assert all(
        np.array_equal(params[k], np.array(v)) for k, v in nn.utils.tree_flatten(model.parameters())
    )
    tokens, logits = _decode(model, make_prompt_cache(model), _prompt())
    assert mx.array_equal(tokens, ref_tokens).item()
    assert mx.array_equal(logits, ref_logits).item()
    with pytest.raises(RuntimeError, match="not routed"):
        model(_prompt(), cache=cache)


def test_patch_through_core_dispatcher_by_name():
    model = _model("qwen2")
    cache = tqai.patch(model, backend="mlx", bits_k=2, bits_v=2, skip_layers=[-1])
    assert [type(c) for c in cache] == [TqaiKVCache, KVCache]
    assert tqai_mlx.is_patched(model)
    tqai.unpatch(model)
    assert not tqai_mlx.is_patched(model)


class Attention(nn.Module):
    """A toy attention whose Python module (this file) imports mlx-lm's attention by name."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.n_heads = self.n_kv_heads = 1
        self.head_dim = head_dim


class _Block(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(head_dim)


class _Toy(nn.Module):
    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = layers


@pytest.mark.parametrize(
    ("model", "options", "error", "match"),
    [
        ("llama", {"bits_k": 0}, ValueError, "bits_k"),
        ("llama", {"bits_v": 9}, ValueError, "bits_v"),
        ("llama", {"bits_k": 1, "use_qjl": True}, ValueError, "bits_k"),
        ("llama", {"cache_strategy": "lossy"}, ValueError, "strategy"),
        ("llama", {"rotation": "nope"}, ValueError, "rotation"),
        ("llama", {"skip_layers": [2]}, ValueError, "skip_layers"),
        ("llama", {"skip_layers": [0, 1]}, ValueError, "nothing to compress"),
        ("llama", {"kernel": "cuda"}, ValueError, "kernel"),
        ("llama", {"layer_bits": [(4, 2)]}, ValueError, "one .* pair per layer"),
        ("llama", {"layer_bits": {0: (4, 0)}}, ValueError, "bits_v"),
        ("llama", {"layer_bits": {2: (4, 2)}}, ValueError, "layer indices"),
        ("llama", {"layer_bits": {1: (4.01, 2)}}, ValueError, "bits_k"),
        (
            "llama",
            {"layer_bits": {0: (4, 2)}, "pipeline": {"monitor": "stability"}},
            ValueError,
            "layer_bits",
        ),
        ("no-layers", {}, ValueError, "no `layers`"),
        ("no-attention", {}, ValueError, "no attention"),
        ("head-dim-1", {}, ValueError, "head_dim of layer 0"),
        ("not-a-module", {}, TypeError, "mlx.nn.Module"),
    ],
)
def test_bad_input_is_refused_at_patch_time(model, options, error, match):
    models = {
        "no-layers": lambda: nn.Linear(2, 2),
        "no-attention": lambda: _Toy([nn.Linear(4, 4)]),
        "head-dim-1": lambda: _Toy([_Block(1)]),
        "not-a-module": lambda: object(),
    }
    target = _model(model) if model in MODELS else models[model]()
    with pytest.raises(error, match=match):
        tqai_mlx.patch(target, **options)
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA
    assert "make_cache" not in vars(target) if isinstance(target, nn.Module) else True


def test_nbytes_against_mlx_lm_kv_cache():
    """K4/V2 at head dim 128, 1024 tokens: the bytes held vs mlx-lm's fp16 KVCache."""
    k = mx.random.normal((1, 2, 1024, 128)).astype(mx.float16)
    ours = TqaiKVCache(KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=4))
    ours.store.update(k, k)
    ours.store.commit()
    theirs = KVCache()
    theirs.update_and_fetch(k, k)
    fp16 = 2 * k.nbytes
    assert theirs.nbytes == fp16
    assert ours.nbytes / fp16 < 0.22, ours.store.nbytes()


@pytest.mark.parametrize("tokens", [0, 3, 40])
def test_state_round_trip_including_empty_and_trimmed(tokens):
    """state/meta_state -> from_state, for an empty, a sink-only and a compressed layer."""
    config = KVCacheConfig(bits_k=3, bits_v=2, sink_tokens=4, residual_window=5)
    cache = TqaiKVCache(config)
    if tokens:
        k = mx.random.normal((1, 2, tokens, 32)).astype(mx.bfloat16)
        cache.store.update(k, -k)
        cache.store.commit()
    copies = [TqaiKVCache.from_state(cache.state, cache.meta_state)]
    if tokens:
        cache.trim(tokens)  # cropped to nothing: a held dtype but no arrays
        copies.append(TqaiKVCache.from_state(cache.state, cache.meta_state))
    for copy in copies:
        assert copy.config == config
        assert copy.empty() == (copy.offset == 0)
    if tokens:
        restored = copies[0]
        assert restored.offset == tokens
        for a, b in zip(restored.store.dequantize(), _dequantized(tokens, config, k), strict=True):
            assert a.dtype == mx.bfloat16
            assert mx.array_equal(a, b).item()
        assert copies[1].offset == 0


def _dequantized(tokens, config, k):
    store = TqaiKVCache(config).store
    store.update(k, -k)
    store.commit()
    return store.dequantize()


def test_metal_kernel_is_opt_in(monkeypatch):
    model = _model("llama")
    cache = tqai_mlx.patch(model)
    assert cache[0].kernel == "reference"
    tqai_mlx.unpatch(model)
    if mx.metal.is_available():
        pytest.skip("Metal is available here; the refusal below is for machines without it")
    monkeypatch.setenv("TQAI_KERNEL", "metal")
    with pytest.raises(ValueError, match="needs Apple Metal"):
        tqai_mlx.patch(model)
    assert not tqai_mlx.is_patched(model)


@pytest.mark.metal
def test_metal_kernels_generate_the_baseline_tokens(patched):
    ref_tokens, ref_logits = _baseline("llama")
    model, cache = patched("llama", bits_k=8, bits_v=8, kernel="metal")
    tokens, logits = _decode(model, cache, _prompt())
    assert tokens.tolist() == ref_tokens.tolist()
    assert _rel_error(logits, ref_logits) < 0.1


def test_dispatcher_lives_while_any_model_is_patched():
    import gc

    first, second = _model("llama"), _model("qwen3")
    tqai_mlx.patch(first)
    tqai_mlx.patch(second)
    tqai_mlx.unpatch(first)
    assert base.scaled_dot_product_attention is not ORIGINAL_SDPA
    _decode(second, second.make_cache(), _prompt(), n=1)
    tqai_mlx.unpatch(second)
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA
    mx.random.seed(0)
    throwaway = llama.Model(first.args)
    tqai_mlx.patch(throwaway)
    del throwaway
    gc.collect()  # a patched model that is garbage collected releases the dispatcher
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA


def test_failed_repatch_keeps_the_previous_patch():
    model = _model("mistral")
    tqai_mlx.patch(model, bits_k=3, bits_v=3)
    with pytest.raises(ValueError, match="skip_layers"):
        tqai_mlx.patch(model, skip_layers=[5])
    with pytest.raises(ValueError, match="nothing to compress"):
        tqai_mlx.patch(model, skip_layers=[1])  # layer 0 is sliding: nothing would be left
    assert patch_config(model).bits_k == 3
    assert isinstance(model.make_cache()[1], TqaiKVCache)
    tqai_mlx.unpatch(model)
    assert base.scaled_dot_product_attention is ORIGINAL_SDPA

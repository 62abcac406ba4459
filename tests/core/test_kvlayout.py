"""Coding options of the KV store: centering, outlier-channel split, key balancing.

Each is an exact rewrite of attention: attention read from the codes must equal attention over
the store's own reconstructions, whatever the options; and each must do what it is for (smaller
coding error on the data it targets).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tqai._xp import namespace, to_host
from tqai.attention import attention_reference
from tqai.kvlayout import attention_weight_mass, fit_stream, split_widths, validate_bits
from tqai.kvstore import KVCacheConfig, KVStore
from tqai.quantizers import TurboQuantMSE
from tqai.testing import make_array

_NAMES = ("center_keys", "center_values", "balance_keys", "bits_k", "bits_v")
OPTIONS = [  # none, each alone, pairs that interact, all together
    dict(zip(_NAMES, combo, strict=True))
    for combo in [
        (False, False, False, 4, 2),
        (True, False, False, 4, 2),
        (False, True, False, 4, 2),
        (False, False, True, 4, 2),
        (False, False, False, 3.5, 2),
        (False, False, False, 4, 2.5),
        (True, True, False, 3.5, 2.5),
        (True, False, True, 3.5, 2),
        (True, True, True, 3.5, 2.5),
    ]
]


def _offset_data(rng, shape, offset=3.0):
    """Vectors with a large common offset per head and a few loud channels, like real keys."""
    b, h, _, d = shape
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., : d // 8] *= 6.0
    return x + offset * rng.standard_normal((b, h, 1, d)).astype(np.float32)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_attention_from_codes_equals_attention_over_reconstructions(xp, options):
    rng = np.random.default_rng(0)
    config = KVCacheConfig(
        sink_tokens=2, residual_window=3, norm_dtype="float32", chunk_size=8, **options
    )
    store = KVStore(config)
    d = 32
    for t in (20, 1, 5, 1):
        k, v = (_offset_data(rng, (2, 2, t, d)) for _ in range(2))
        q = rng.standard_normal((2, 4, t, d)).astype(np.float32)
        store.update(make_array(xp, k), make_array(xp, v))
        mask = np.tril(np.ones((t, store.length), bool), store.length - t)[None, None]
        k_hat, v_hat = (to_host(a) for a in store.dequantize())
        out = to_host(store.attend(make_array(xp, q), scale=d**-0.5, mask=make_array(xp, mask)))
        ref = attention_reference(q, k_hat, v_hat, scale=d**-0.5, mask=mask)
        np.testing.assert_allclose(out, ref, atol=5e-5, rtol=1e-4)
    assert store.plain == config.plain
    assert store.history_length == 27 - 2 - 3


def test_split_widths():
    assert split_widths(4, 64) == [(64, 4)]
    assert split_widths(3.5, 64) == [(32, 4), (32, 3)]
    assert split_widths(2.25, 128) == [(32, 3), (96, 2)]  # the paper's 32/96 split
    with pytest.raises(ValueError, match=r"bits_k=3\.01 on head_dim 64"):
        split_widths(3.01, 64, name="bits_k")


@pytest.mark.parametrize(
    ("bits", "error"), [(True, TypeError), ("4", TypeError), (0.5, ValueError), (8.5, ValueError)]
)
def test_validate_bits_names_the_parameter(bits, error):
    with pytest.raises(error, match="bits_v"):
        validate_bits(bits, name="bits_v")


def test_fractional_bits_cost_what_they_say():
    """K3.5/V2.5 holds between K3/V2 and K4/V3 per token, and the split puts the extra bit on
    the loud channels."""
    rng = np.random.default_rng(1)
    x = _offset_data(rng, (1, 2, 256, 64), offset=0.0)
    sizes = {}
    for bits in ((3, 2), (3.5, 2.5), (4, 3)):
        store = KVStore(KVCacheConfig(bits_k=bits[0], bits_v=bits[1], sink_tokens=0))
        store.update(x, x)
        store.commit()
        sizes[bits] = store.nbytes()["codes"]
        if bits == (3.5, 2.5):
            loud = store.key_coding.channels[0]  # the 32 channels coded at 4 bits
            assert set(range(8)) <= set(loud[0, 0].tolist())
    assert sizes[(3, 2)] < sizes[(3.5, 2.5)] < sizes[(4, 3)]
    per_coord = 8 * sizes[(3.5, 2.5)] / (2 * 2 * 256 * 64)
    assert per_coord == pytest.approx(3.0 + 0.5)  # codes: 3 bits on average; 2 fp16 norms / 64


def test_centering_reduces_coding_error_on_offset_data():
    rng = np.random.default_rng(2)
    x = _offset_data(rng, (1, 2, 200, 64), offset=4.0)

    def error(center):
        coding = fit_stream(
            x, 3, lambda d, b, p: TurboQuantMSE(d, b, norm_dtype="float32"), center=center, xp=np
        )
        y = coding.decode(coding.encode(x, xp=np), xp=np)
        return float(np.sum((y - x) ** 2) / np.sum(x**2))

    assert error(True) < 0.5 * error(False)


def test_balancing_reduces_score_error_when_query_and_key_energy_disagree():
    """Keys loud where queries are quiet and vice versa: moving scale to the queries evens the
    coding error out over the channels that matter."""
    rng = np.random.default_rng(3)
    d = 32
    loud = np.where(np.arange(d) < d // 2, 8.0, 0.25).astype(np.float32)
    k = rng.standard_normal((1, 1, 300, d)).astype(np.float32) * loud
    q = rng.standard_normal((1, 1, 50, d)).astype(np.float32) / loud
    exact = q @ k.transpose(0, 1, 3, 2)

    def error(balance):
        config = KVCacheConfig(bits_k=3, bits_v=3, sink_tokens=0, balance_keys=balance)
        store = KVStore(config)
        store.update(k, k)
        store.attend(q, scale=1.0, mask=None)
        k_hat = store.dequantize()[0]
        return float(np.mean((q @ k_hat.transpose(0, 1, 3, 2) - exact) ** 2))

    assert error(True) < 0.5 * error(False)


def test_statistics_stay_fixed_as_generation_drifts_away_from_the_prompt():
    """The long-generation update rule: none. Tokens decoded after the prompt are coded against
    the prompt's mean, channels and scales; attention stays exact; drift costs accuracy only."""
    rng = np.random.default_rng(6)
    d = 32
    config = KVCacheConfig(
        bits_k=3.5,
        bits_v=2.5,
        sink_tokens=2,
        residual_window=3,
        center_keys=True,
        center_values=True,
        balance_keys=True,
        norm_dtype="float32",
    )
    store = KVStore(config)
    prompt = _offset_data(rng, (1, 2, 40, d))
    store.update(prompt, prompt)
    store.attend(rng.standard_normal((1, 4, 40, d)).astype(np.float32), scale=d**-0.5, mask=None)
    fitted = copy.deepcopy((store.key_coding, store.value_coding))
    drift = 6.0 * rng.standard_normal((1, 2, 1, d)).astype(np.float32)  # the text moves on
    decoded = []
    for _ in range(30):
        token = _offset_data(rng, (1, 2, 1, d), offset=0.0) + prompt.mean(2, keepdims=True) + drift
        decoded.append(token)
        store.update(token, token)
        k_hat, v_hat = store.dequantize()  # what this step's attention reads
        q = rng.standard_normal((1, 4, 1, d)).astype(np.float32)
        out = store.attend(q, scale=d**-0.5, mask=None)
        np.testing.assert_allclose(
            out, attention_reference(q, k_hat, v_hat, scale=d**-0.5, mask=None), atol=5e-5
        )
    for now, then in zip((store.key_coding, store.value_coding), fitted, strict=True):
        for name in ("mean", "scale"):
            a, b = getattr(now, name), getattr(then, name)
            assert (a is None) == (b is None)
            assert a is None or np.array_equal(a, b)
        assert all(np.array_equal(a, b) for a, b in zip(now.channels, then.channels, strict=True))
    # Coding error per token: the drifted tokens (far from the prompt's mean) are coded worse.
    held = np.concatenate([prompt, *decoded], 2)
    error = np.sum((v_hat - held) ** 2, axis=-1).mean(axis=(0, 1))  # (tokens,)
    coded_prompt, coded_drifted = error[2:40], error[40:-3]  # sinks, window: exact
    assert coded_drifted.mean() > 2 * coded_prompt.mean()


def test_means_leave_the_sinks_out():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 1, 40, 16)).astype(np.float32)
    k[:, :, :4] += 100.0  # attention-sink-like outliers
    store = KVStore(KVCacheConfig(sink_tokens=4, center_keys=True, center_values=True))
    store.update(k, k)
    store.commit()
    np.testing.assert_allclose(store.key_coding.mean, k[:, :, 4:].mean(2, keepdims=True), rtol=1e-5)


def test_state_round_trip_copy_crop_and_batch_maps_keep_the_statistics(xp):
    rng = np.random.default_rng(5)
    config = KVCacheConfig(
        bits_k=3.5,
        bits_v=2.5,
        center_keys=True,
        center_values=True,
        balance_keys=True,
        norm_dtype="float32",
    )
    store = KVStore(config)
    k, v = (_offset_data(rng, (3, 2, 30, 32)) for _ in range(2))
    q = make_array(xp, rng.standard_normal((3, 2, 1, 32)).astype(np.float32))
    store.update(make_array(xp, k), make_array(xp, v))
    store.attend(
        make_array(xp, rng.standard_normal((3, 2, 30, 32)).astype(np.float32)), scale=1, mask=None
    )
    meta, arrays = store.state()
    assert {"coding.k.mean", "coding.k.scale", "coding.k.channels0", "coding.v.mean"} <= set(arrays)
    loaded = KVStore.from_state(config, meta, arrays)
    twin = copy.deepcopy(store)
    out = to_host(store.attend(q, scale=0.2, mask=None))
    np.testing.assert_array_equal(to_host(loaded.attend(q, scale=0.2, mask=None)), out)
    np.testing.assert_array_equal(to_host(twin.attend(q, scale=0.2, mask=None)), out)
    pick = make_array(xp, np.array([2, 0]), dtype="int64")
    twin.map_batch(lambda a: namespace(a).take(a, pick, axis=0))
    picked = to_host(twin.attend(namespace(q).take(q, pick, axis=0), scale=0.2, mask=None))
    np.testing.assert_array_equal(picked, out[[2, 0]])
    twin.crop(10)
    assert twin.length == 10
    assert store.length == 30


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize(
    "options", [{}, {"center_keys": True, "center_values": True, "bits_k": 3.5}]
)
def test_quantize_staged_scores_a_chunk_exactly_as_decoding_would(xp, window, options):
    """With quantize_staged, a chunk of T tokens gets the attention outputs that T decoding
    steps would: each query reads its last ``window`` tokens and itself in full precision and
    everything older from the codes."""
    rng = np.random.default_rng(6)
    k, v = (_offset_data(rng, (1, 2, 24, 16)) for _ in range(2))
    q = rng.standard_normal((1, 4, 24, 16)).astype(np.float32)
    config = KVCacheConfig(
        **{"bits_k": 2, "bits_v": 2, "sink_tokens": 2, "residual_window": window, **options},
        norm_dtype="float32",
    )
    prompt = np.tril(np.ones((16, 16), bool))[None, None]
    chunked, stepped = KVStore(config), KVStore(config)
    for store in (chunked, stepped):
        store.update(make_array(xp, k[:, :, :16]), make_array(xp, v[:, :, :16]))
        store.attend(make_array(xp, q[:, :, :16]), scale=0.25, mask=make_array(xp, prompt))
    chunked.quantize_staged = True
    chunked.update(make_array(xp, k[:, :, 16:]), make_array(xp, v[:, :, 16:]))
    mask = np.tril(np.ones((8, 24), bool), 16)[None, None]
    out = to_host(
        chunked.attend(make_array(xp, q[:, :, 16:]), scale=0.25, mask=make_array(xp, mask))
    )
    for i in range(8):
        stepped.update(
            make_array(xp, k[:, :, 16 + i : 17 + i]), make_array(xp, v[:, :, 16 + i : 17 + i])
        )
        step = to_host(
            stepped.attend(make_array(xp, q[:, :, 16 + i : 17 + i]), scale=0.25, mask=None)
        )
        np.testing.assert_allclose(out[:, :, i : i + 1], step, atol=2e-5, rtol=1e-4)
    assert chunked.length == stepped.length == 24
    assert chunked.window_length == stepped.window_length == window


def test_pipeline_and_coding_options_are_refused_together():
    from tqai.pipeline import build_pipeline

    pipe = build_pipeline({"adapter": "llm", "bits_k": 4, "bits_v": 2})
    with pytest.raises(ValueError, match="center_keys"):
        KVStore(KVCacheConfig(center_keys=True), pipe, 0)


def test_balance_keys_needs_attention_through_the_store():
    with pytest.raises(ValueError, match="balance_keys"):
        KVCacheConfig(balance_keys=True, strategy="full")


def test_attention_weight_mass_and_the_weighted_mean():
    """The mean that centering uses is weighted by how much attention each token draws (sum of
    squared weights): a token every query attends to pulls the mean to itself."""
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((1, 1, 40, 16)).astype(np.float32)
    query = np.repeat(keys[:, :, 10:11] * 50.0, 40, axis=2)  # every query looks at token 10
    mass = attention_weight_mass(query, keys, scale=1.0, xp=np)
    assert mass.shape == (1, 1, 40)
    assert mass[0, 0, 10] == pytest.approx(16.0, rel=1e-3)  # 16 sampled queries, weight ~1 each
    values = rng.standard_normal((1, 1, 40, 16)).astype(np.float32)
    coding = fit_stream(
        values, 2, lambda d, b, p: TurboQuantMSE(d, b), center=True, weights=mass, xp=np
    )
    np.testing.assert_allclose(coding.mean[0, 0, 0], values[0, 0, 10], atol=1e-3)

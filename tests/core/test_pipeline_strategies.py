"""Strategies: the contract on every backend, honest bit accounting, each method's property."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tqai import TurboQuantMSE
from tqai._xp import namespace, namespace_name, to_host
from tqai.pipeline import QuantizerBank
from tqai.pipeline.strategies.cfg_sharing import CfgSharingStrategy
from tqai.pipeline.strategies.delta import DeltaStrategy
from tqai.pipeline.strategies.delta2 import Delta2Strategy
from tqai.pipeline.strategies.tiered import TieredStrategy
from tqai.pipeline.strategies.window import WindowStrategy, similar_rows
from tqai.registry import registry
from tqai.testing import make_array, xp_assert_equal

D = 64


def _bank(xp=None) -> QuantizerBank:
    norm = "float16" if xp is None or hasattr(xp, "float16") else "float32"
    return QuantizerBank(options={"norm_dtype": norm})


def _nmse(rec, x) -> float:
    rec, x = to_host(rec).astype(np.float64), to_host(x).astype(np.float64)
    return float(np.sum((rec - x) ** 2) / np.sum(x**2))


def _vector_bits(n_bits: int) -> int:
    """Bits of one stored TurboQuant_mse vector: packed codes plus an fp16 norm."""
    return n_bits * D + 16


def _correlated(steps: int, shape, rho: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(shape)]
    for _ in range(steps - 1):
        xs.append(rho * xs[-1] + math.sqrt(1 - rho**2) * rng.standard_normal(shape))
    return [x.astype(np.float32) for x in xs]


@pytest.mark.parametrize("name", ["tiered", "delta", "delta2", "window", "cfg_sharing"])
def test_strategy_contract(xp, name):
    strategy = registry("tqai.strategies").get(name)()
    host = _correlated(3, (2, 2, 8, D), 0.999, seed=1)
    bank = _bank(xp)
    for x_host in host:
        x = make_array(xp, x_host, "float32")
        scores = make_array(xp, np.abs(x_host).sum(-1), "float32")
        res = strategy.compress(x, scores, bank, n_bits=3, layer=0, step=0, stream="k")
        assert namespace_name(namespace(res.reconstruction)) == namespace_name(namespace(x))
        assert tuple(res.reconstruction.shape) == tuple(x.shape)
        assert res.reconstruction.dtype == x.dtype
        assert res.n_coords == x_host.size
        assert res.n_bits == 3
        assert res.bits >= sum(8 * qt.nbytes for qt in res.payload)
        assert _nmse(res.reconstruction, x) < 0.06
    strategy.reset()


@pytest.mark.parametrize("name", ["tiered", "delta", "delta2", "window", "cfg_sharing"])
def test_strategy_keeps_half_precision_inputs(name):
    strategy = registry("tqai.strategies").get(name)()
    x = np.random.default_rng(2).standard_normal((2, 8, D)).astype(np.float16)
    res = strategy.compress(x, np.ones(x.shape[:-1]), _bank(), n_bits=4)
    assert res.reconstruction.dtype == np.float16
    assert _nmse(res.reconstruction, x) < 0.02


# tiered ----------------------------------------------------------------------------------------


def test_tiered_spends_the_bits_it_reports(xp):
    x_host = np.random.default_rng(3).standard_normal((2, 3, 10, D)).astype(np.float32)
    scores = make_array(xp, np.random.default_rng(4).random((2, 3, 10)), "float32")
    res = TieredStrategy(fraction=0.3, high_bits=4, low_bits=2).compress(
        make_array(xp, x_host, "float32"), scores, _bank(xp), n_bits=3
    )
    n, k = 60, 18
    norm_bits = 16 if hasattr(xp, "float16") else 32
    expected = k * (4 * D + norm_bits) + (n - k) * (2 * D + norm_bits) + n
    assert res.bits == expected
    assert [qt.spec.n_bits for qt in res.payload] == [4, 2]
    assert [math.prod(qt.shape) for qt in res.payload] == [k, n - k]
    assert res.bits_per_coord == pytest.approx(expected / (n * D))


def test_tiered_routes_the_top_scores_to_the_high_tier(xp):
    x_host = np.random.default_rng(5).standard_normal((40, D)).astype(np.float32)
    scores_host = np.random.default_rng(6).random(40)
    res = TieredStrategy(fraction=0.25, high_bits=6, low_bits=1).compress(
        make_array(xp, x_host, "float32"),
        make_array(xp, scores_host, "float32"),
        _bank(xp),
        n_bits=3,
    )
    err = np.sum((to_host(res.reconstruction) - x_host) ** 2, axis=-1) / np.sum(x_host**2, -1)
    top = np.argsort(-scores_host)[:10]
    rest = np.setdiff1d(np.arange(40), top)
    assert err[top].max() < err[rest].min()
    assert res.info == {"high_tokens": 10, "high_bits": 6, "low_bits": 1}


def test_tiered_by_energy_beats_uniform_bits_on_heavy_tailed_norms():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 4, 64, D)) * np.exp(rng.standard_normal((1, 4, 64, 1)))
    x = x.astype(np.float32)
    energy = np.mean(x**2, axis=-1)
    tiered = TieredStrategy().compress(x, energy, _bank(), n_bits=3)
    plain = TurboQuantMSE(D, 3)
    uniform = plain.dequantize(plain.quantize(x))
    assert tiered.bits_per_coord == pytest.approx(3 + 16 / D + 1 / D)
    assert _nmse(tiered.reconstruction, x) < 0.5 * _nmse(uniform, x)


def test_tiered_default_widths_stay_in_range():
    assert TieredStrategy().widths(1) == (2, 1)
    assert TieredStrategy().widths(8) == (8, 7)
    assert TieredStrategy(high_bits=5).widths(2) == (5, 1)
    with pytest.raises(ValueError, match=r"high_bits \(2\) must be >= low_bits \(3\)"):
        TieredStrategy(high_bits=2, low_bits=3)
    with pytest.raises(ValueError, match="tiered routes tokens by score"):
        TieredStrategy().compress(np.ones((2, D), np.float32), None, _bank(), n_bits=2)


def test_tiered_with_one_tier_stores_no_mask():
    x = np.random.default_rng(8).standard_normal((6, D)).astype(np.float32)
    res = TieredStrategy(fraction=1.0).compress(x, np.ones(6), _bank(), n_bits=3)
    assert res.bits == 6 * _vector_bits(4)
    assert res.info["high_tokens"] == 6


def test_tiered_token_rank_stores_one_width_per_token(xp):
    """rank="token": every batch row and head of a token at one width; the payload is one
    (B, H, T_w) tensor per width with the tokens it holds, and each token reconstructs as its
    width's quantizer alone would."""
    rng = np.random.default_rng(9)
    x_host = rng.standard_normal((2, 3, 12, D)).astype(np.float32)
    scores_host = rng.random((2, 3, 12)).astype(np.float32)
    bank = _bank(xp)
    strategy = TieredStrategy(fraction=0.25, high_bits=4, low_bits=2, rank="token")
    res = strategy.compress(
        make_array(xp, x_host, "float32"), make_array(xp, scores_host, "float32"), bank, n_bits=3
    )
    high, low = res.info["token_index"]
    assert sorted(high + low) == list(range(12))
    assert res.info["high_tokens"] == len(high)
    assert [tuple(qt.shape) for qt in res.payload] == [(2, 3, len(high)), (2, 3, len(low))]
    expected = TieredStrategy(fraction=0.25, rank="token").route(scores_host.mean(axis=(0, 1)))
    assert list(np.flatnonzero(expected)) == list(high)
    for width, idx in ((4, high), (2, low)):
        q = bank.get(D, width)
        part = make_array(xp, x_host[:, :, list(idx)], "float32")
        got = namespace(res.reconstruction).take(
            res.reconstruction, make_array(xp, np.array(idx), "int64"), axis=-2
        )
        xp_assert_equal(got, q.dequantize(q.quantize(part)))
    norm_bits = 16 if hasattr(xp, "float16") else 32
    assert res.bits == 6 * (len(high) * (4 * D + norm_bits) + len(low) * (2 * D + norm_bits)) + 12


def test_tiered_token_rank_is_causal_and_keeps_the_fraction_when_scores_drift():
    rng = np.random.default_rng(10)
    scores = rng.random(3000) + np.linspace(0, 3, 3000)  # a rising trend: every token scores high
    whole = TieredStrategy(fraction=0.25, rank="token").route(scores)
    assert abs(whole.mean() - 0.25) < 0.01
    stepwise = TieredStrategy(fraction=0.25, rank="token")
    chunks = np.split(scores, [1, 2, 500, 501, 1700])
    routed = np.concatenate([stepwise.route(c, ("layer", "k")) for c in chunks])
    np.testing.assert_array_equal(routed, whole)  # the route of a token ignores later tokens
    # Stationary uniform scores: once a horizon of scores is seen, the high tier holds the top
    # quarter (scores > 0.75) up to the budget feedback's slack.
    flat = rng.random(3000)
    routed = TieredStrategy(fraction=0.25, rank="token").route(flat)
    assert abs(routed.mean() - 0.25) < 0.01
    high = flat[256:][routed[256:]]
    assert high.min() > 0.6
    assert np.mean(high > 0.75) > 0.9


def test_tiered_token_rank_options_are_checked():
    with pytest.raises(ValueError, match="rank must be one of 'joint', 'token'"):
        TieredStrategy(rank="row")
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        TieredStrategy(rank="token", horizon=0)
    with pytest.raises(ValueError, match="settle must be an integer >= 1"):
        TieredStrategy(rank="token", settle=1.5)
    strategy = TieredStrategy(rank="token")
    strategy.route(np.ones(4), ("a", "k"))
    strategy.reset()
    assert not strategy._history


# delta -----------------------------------------------------------------------------------------


def test_delta_first_step_is_plain_quantization(xp):
    x = make_array(xp, _correlated(1, (2, 8, D), 0.9)[0], "float32")
    bank = _bank(xp)
    res = DeltaStrategy().compress(x, None, bank, n_bits=3, layer=0, stream="k")
    q = bank.get(D, 3)
    xp_assert_equal(res.reconstruction, q.dequantize(q.quantize(x)))
    assert res.bits == 16 * _vector_bits(3) - 16 * (16 - (16 if hasattr(xp, "float16") else 32))


def test_delta_codes_the_change_at_a_fraction_of_the_error(xp):
    steps = _correlated(4, (2, 16, D), 0.95, seed=9)
    delta, bank = DeltaStrategy(), _bank(xp)
    errors, bits = [], []
    for x in steps:
        res = delta.compress(make_array(xp, x, "float32"), None, bank, n_bits=3, layer=0)
        errors.append(_nmse(res.reconstruction, x))
        bits.append(res.bits)
    # The residual of an AR(1) step has ~1 - rho^2 = 0.1 of the energy: ~10x less error.
    assert max(errors[1:]) < errors[0] / 5, errors
    assert bits[1] == bits[0] + 32  # the same codes plus one mode bit per vector


def test_delta_falls_back_to_full_coding_for_jumps():
    rng = np.random.default_rng(10)
    x0 = rng.standard_normal((8, D)).astype(np.float32)
    x1 = x0.copy()
    x1[:3] = -x0[:3]  # three tokens flip: the delta is twice the token itself
    delta, bank = DeltaStrategy(), _bank()
    delta.compress(x0, None, bank, n_bits=3)
    assert delta.compress(x1, None, bank, n_bits=3).info["order_counts"] == (3, 5)


def test_delta_without_fallback_stores_no_side_information():
    x = _correlated(2, (4, D), 0.9, seed=11)
    delta, bank = DeltaStrategy(fallback=False), _bank()
    first = delta.compress(x[0], None, bank, n_bits=2)
    second = delta.compress(x[1], None, bank, n_bits=2)
    assert first.bits == second.bits == 4 * _vector_bits(2)
    assert second.info["order_counts"] == (0, 4)


def test_delta_state_is_per_layer_stream_and_shape():
    x = _correlated(2, (4, D), 0.9, seed=12)
    delta, bank = DeltaStrategy(), _bank()
    delta.compress(x[0], None, bank, n_bits=2, layer=0, stream="k")
    assert delta.compress(x[1], None, bank, n_bits=2, layer=0, stream="v").info["order_counts"] == (
        4,
        0,
    )
    assert delta.compress(x[1][:3], None, bank, n_bits=2, layer=0, stream="k").info[
        "order_counts"
    ] == (3, 0)
    delta.reset()
    assert delta.compress(x[1], None, bank, n_bits=2, layer=0, stream="v").info["order_counts"] == (
        4,
        0,
    )


# delta2 ----------------------------------------------------------------------------------------


def test_delta2_extrapolates_steady_motion_better_than_delta(xp):
    rng = np.random.default_rng(13)
    base, drift = rng.standard_normal((2, 16, D)), 0.3 * rng.standard_normal((2, 16, D))
    steps = [(base + t * drift).astype(np.float32) for t in range(5)]
    errors = {}
    for strategy in (DeltaStrategy(), Delta2Strategy()):
        bank = _bank(xp)
        for x in steps:
            res = strategy.compress(make_array(xp, x, "float32"), None, bank, n_bits=3)
        errors[strategy.name] = _nmse(res.reconstruction, steps[-1])
        if strategy.name == "delta2":
            assert res.info["order_counts"][2] > 28  # nearly every vector extrapolated
    assert errors["delta2"] < 0.5 * errors["delta"], errors


def test_delta2_falls_back_when_the_second_order_prediction_is_worse(xp):
    # An oscillation x, -x, x: extrapolation predicts -3x where x comes (residual 4|x|), reuse
    # predicts -x (residual 2|x|) and full coding costs |x|: the chain 2 -> 1 -> full ends at full.
    rng = np.random.default_rng(14)
    a = rng.standard_normal((12, D)).astype(np.float32)
    delta2, bank = Delta2Strategy(), _bank(xp)
    counts = [
        delta2.compress(make_array(xp, sign * a, "float32"), None, bank, n_bits=3).info[
            "order_counts"
        ]
        for sign in (1, -1, 1)
    ]
    assert counts == [(12, 0, 0), (12, 0, 0), (12, 0, 0)]


def test_delta2_falls_back_to_first_order_when_motion_stops():
    # A tensor that moved and then froze: extrapolation overshoots, plain reuse is exact.
    rng = np.random.default_rng(15)
    a, b = rng.standard_normal((2, 12, D)).astype(np.float32)
    delta2, bank = Delta2Strategy(), QuantizerBank(options={"norm_dtype": "float32"})
    for x in (a, b, b):
        res = delta2.compress(x, None, bank, n_bits=4)
    assert res.info["order_counts"] == (0, 12, 0)
    assert res.bits == 12 * (4 * D + 32) + 12 * 2  # two mode bits per vector


# window ----------------------------------------------------------------------------------------


def test_window_reuses_when_similar_and_recomputes_when_not(xp):
    rng = np.random.default_rng(16)
    x0 = rng.standard_normal((2, 3, 8, D)).astype(np.float32)
    x1 = x0 + 0.01 * rng.standard_normal(x0.shape).astype(np.float32)
    x1[1, 2] = rng.standard_normal((8, D))  # one (batch, head) row changed completely
    window, bank = WindowStrategy(threshold=0.95), _bank(xp)
    first = window.compress(make_array(xp, x0, "float32"), None, bank, n_bits=3, layer=0)
    second = window.compress(make_array(xp, x1, "float32"), None, bank, n_bits=3, layer=0)

    rec0, rec1 = to_host(first.reconstruction), to_host(second.reconstruction)
    assert second.info == {"reused_rows": 5, "rows": 6}
    kept1, kept0 = (np.delete(r.reshape(6, 8, D), 5, axis=0) for r in (rec1, rec0))
    np.testing.assert_array_equal(kept1, kept0)
    assert _nmse(rec1[1, 2], x1[1, 2]) < 0.05  # the changed row was recomputed
    vector_bits = 8 * first.payload[0].nbytes // 48
    assert second.bits == 8 * vector_bits + 6  # one fresh row of 8 tokens, one flag per row


def test_window_limits_consecutive_reuse():
    x = np.random.default_rng(17).standard_normal((2, 8, D)).astype(np.float32)
    window, bank = WindowStrategy(threshold=0.9, max_reuse=2), _bank()
    reused = [window.compress(x, None, bank, n_bits=2).info["reused_rows"] for _ in range(5)]
    assert reused == [0, 2, 2, 0, 2]


def test_window_compares_with_the_last_recompute_so_drift_is_caught():
    rng = np.random.default_rng(18)
    x = rng.standard_normal((1, 8, D)).astype(np.float32)
    direction = rng.standard_normal((1, 8, D)).astype(np.float32)
    window, bank = WindowStrategy(threshold=0.995, max_reuse=None), _bank()
    reused = []
    for t in range(8):  # each step moves ~0.05 of the norm: small steps, large total drift
        res = window.compress(x + 0.05 * t * direction, None, bank, n_bits=2)
        reused.append(res.info["reused_rows"])
    assert reused[1] == 1
    assert 0 in reused[2:]


# cfg_sharing -----------------------------------------------------------------------------------


def test_cfg_batched_codes_the_partner_from_the_primary(xp):
    rng = np.random.default_rng(19)
    uncond = rng.standard_normal((1, 2, 16, D))
    cond = uncond + 0.2 * rng.standard_normal(uncond.shape)
    pair = np.concatenate([uncond, cond]).astype(np.float32)
    bank = _bank(xp)
    res = CfgSharingStrategy().compress(make_array(xp, pair, "float32"), None, bank, n_bits=3)
    q = bank.get(D, 3)
    alone = to_host(q.dequantize(q.quantize(make_array(xp, pair[1:], "float32"))))

    rec = to_host(res.reconstruction)
    assert res.info == {"partner_modes": (0, 32), "shared_rows": 0}
    assert _nmse(rec[1:], pair[1:]) < 0.2 * _nmse(alone, pair[1:])
    assert res.bits == sum(8 * qt.nbytes for qt in res.payload) + 32


def test_cfg_share_threshold_reuses_the_primary_outright():
    rng = np.random.default_rng(20)
    uncond = rng.standard_normal((2, 2, 8, D))
    cond = uncond + 0.01 * rng.standard_normal(uncond.shape)
    cond[1, 0] = rng.standard_normal((8, D))  # one partner row differs
    pair = np.concatenate([uncond, cond]).astype(np.float32)
    res = CfgSharingStrategy(share_threshold=0.99).compress(pair, None, _bank(), n_bits=3)
    rec = res.reconstruction
    assert res.info["shared_rows"] == 3
    np.testing.assert_array_equal(rec[2, 0], rec[0, 0])
    np.testing.assert_array_equal(rec[2, 1], rec[0, 1])
    assert res.bits == 8 * res.payload[0].nbytes + 8 * res.payload[1].nbytes + 4 + 8


def test_cfg_split_pairs_back_to_back_calls(xp):
    rng = np.random.default_rng(21)
    cond = rng.standard_normal((1, 2, 16, D)).astype(np.float32)
    uncond = (cond + 0.1 * rng.standard_normal(cond.shape)).astype(np.float32)
    strategy, bank = CfgSharingStrategy(mode="split"), _bank(xp)
    roles = []
    for x in (cond, uncond, cond, uncond):
        res = strategy.compress(make_array(xp, x, "float32"), None, bank, n_bits=3, layer=4)
        roles.append(res.info["role"])
    assert roles == ["primary", "partner", "primary", "partner"]
    assert _nmse(res.reconstruction, uncond) < 0.01


def test_cfg_batched_needs_an_even_batch():
    with pytest.raises(ValueError, match=r"needs a \(2B, \.\.\., T, D\) batch"):
        CfgSharingStrategy().compress(np.ones((3, 4, D), np.float32), None, _bank(), n_bits=2)
    with pytest.raises(ValueError, match="mode must be one of batched, split"):
        CfgSharingStrategy(mode="both")


def test_similar_rows_is_the_window_cosine_test(xp):
    x = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
    y = x.copy()
    y[1] = -y[1]  # opposite direction: cosine -1
    y[2] = 2.0 * y[2]  # same direction: cosine 1
    same = similar_rows(make_array(xp, x), make_array(xp, y), threshold=0.99)
    assert [bool(v) for v in to_host(same)] == [True, False, True]
    with pytest.raises(ValueError, match="equal shapes"):
        similar_rows(make_array(xp, x), make_array(xp, x[:2]), threshold=0.5)

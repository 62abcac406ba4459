"""Scorers: the contract on every backend, and each paper's defining property."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tqai import TurboQuantMSE
from tqai._xp import namespace, namespace_name, to_host
from tqai.pipeline import QuantizerBank
from tqai.pipeline.scorers.bsa import BsaScorer
from tqai.pipeline.scorers.fisher import FisherScorer
from tqai.pipeline.scorers.fisher_static import (
    CalibrationError,
    FisherCalibration,
    FisherStaticScorer,
)
from tqai.pipeline.scorers.palm import PalmScorer
from tqai.pipeline.scorers.sheaf import SheafScorer
from tqai.pipeline.scorers.snr import SCHEDULES, SnrScorer, min_snr_weight, snr
from tqai.pipeline.strategies.tiered import TieredStrategy
from tqai.registry import registry
from tqai.testing import make_array

D = 64
HEADS = 2


def _calibration() -> FisherCalibration:
    return FisherCalibration(
        k=np.array([[1.0, 3.0], [2.0, 2.0]]), v=np.array([[1.0, 1.0], [4.0, 0.5]]), model="toy"
    )


def _scorer(name: str):
    if name == "fisher_static":
        return FisherStaticScorer(calibration=_calibration())
    if name == "bsa":
        return BsaScorer(block_size=5)
    return registry("tqai.scorers").get(name)()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("name", ["palm", "snr", "fisher", "fisher_static", "sheaf", "bsa"])
def test_scorer_contract(xp, name):
    x = make_array(xp, np.random.default_rng(0).standard_normal((1, HEADS, 12, D)), "float32")
    scorer = _scorer(name)

    for step in range(2):
        scores = scorer.score(x, layer=1, step=step, stream="k")
        assert namespace_name(namespace(scores)) == namespace_name(namespace(x))
        assert tuple(scores.shape) == (1, HEADS, 12)
        assert "float32" in str(scores.dtype)
        host = to_host(scores)
        assert np.all(np.isfinite(host))
        assert np.all(host >= 0)
    scorer.reset()


@pytest.mark.parametrize("name", ["palm", "snr", "fisher", "sheaf", "bsa"])
def test_scorer_rejects_a_non_token_array(name):
    with pytest.raises(ValueError, match=r"needs a non-empty \(\.\.\., T, D\) array"):
        _scorer(name).score(np.ones(8, dtype=np.float32))


# palm ------------------------------------------------------------------------------------


def test_palm_ranks_the_unexpected_token_first(xp):
    rng = np.random.default_rng(1)
    scorer = PalmScorer()
    for _ in range(5):
        scorer.score(make_array(xp, rng.standard_normal((1, 16, D)), "float32"), layer=0)
    x = rng.standard_normal((1, 16, D))
    x[0, 9] += 6.0
    scores = to_host(scorer.score(make_array(xp, x, "float32"), layer=0))
    assert int(np.argmax(scores[0])) == 9


def test_palm_habituates_to_a_recurring_outlier():
    rng = np.random.default_rng(2)
    outlier = 10.0 * rng.standard_normal(D)

    def final_score(outlier_every_step: bool) -> float:
        scorer = PalmScorer(momentum=0.2)
        for _ in range(12):
            x = rng.standard_normal((16, D))
            if outlier_every_step:
                x[3] = outlier
            scorer.score(x, layer=0, stream="k")
        x = rng.standard_normal((16, D))
        x[3] = outlier
        return float(scorer.score(x, layer=0, stream="k")[3])

    fresh, habituated = final_score(False), final_score(True)
    assert fresh > 4 * habituated, (fresh, habituated)


def test_palm_keeps_streams_and_layers_apart():
    scorer = PalmScorer()
    quiet = np.zeros((8, 4))
    scorer.score(quiet, layer=0, stream="k")
    loud = np.zeros((8, 4))
    loud[2] = 5.0
    # Layer 1 has no history: scored against its own batch, not against layer 0's quiet stream.
    assert scorer.score(loud, layer=1, stream="k")[2] < scorer.score(loud, layer=0, stream="k")[2]


# snr ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_schedule_is_strictly_decreasing(schedule):
    values = snr(np.arange(1000), schedule=schedule, shift=3.0)
    assert np.all(np.diff(values[:-1]) < 0), schedule
    assert values[0] > 100 > 0.01 > values[-2]


def test_snr_cosine_matches_the_closed_form():
    t = np.array([1.0, 250.0, 500.0, 999.0])
    f = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    alpha_bar = f / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(snr(t), alpha_bar / (1 - alpha_bar), rtol=1e-9)


def test_min_snr_weight_clips_at_gamma():
    s = np.array([0.1, 1.0, 5.0, 50.0, 500.0])
    np.testing.assert_allclose(min_snr_weight(s, gamma=5.0), [1, 1, 1, 0.1, 0.01])
    np.testing.assert_allclose(min_snr_weight(s, prediction="x0"), [0.1, 1, 5, 5, 5])
    np.testing.assert_allclose(min_snr_weight(s, prediction="v"), np.minimum(s, 5) / (s + 1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_step_weights_follow_min_snr(schedule):
    eps = SnrScorer(schedule=schedule, num_steps=30, shift=3.0)
    x0 = SnrScorer(schedule=schedule, num_steps=30, prediction="x0", shift=3.0)
    assert np.all(np.diff(eps.weights) <= 1e-12)  # noisy steps weigh 1, clean steps gamma/SNR
    assert np.all(np.diff(x0.weights) >= -1e-12)
    assert eps.weights[0] == pytest.approx(1.0)
    assert eps.weights[-1] < 0.5
    assert eps.step_weight(None) == 1.0
    assert eps.step_weight(1000) == eps.weights[-1]


def test_snr_scores_are_step_weight_times_relative_energy(xp):
    scorer = SnrScorer(num_steps=10)
    host = np.random.default_rng(3).standard_normal((2, 8, D))
    scores = to_host(scorer.score(make_array(xp, host, "float32"), step=9))
    energy = np.mean(host**2, axis=-1)
    np.testing.assert_allclose(scores, scorer.weights[9] * energy / energy.mean(), rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "sigmoid"}, "schedule must be one of cosine, linear, flow"),
        ({"prediction": "noise"}, "prediction must be one of epsilon, x0, v"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
    ],
)
def test_snr_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnrScorer(**kwargs)


# fisher --------------------------------------------------------------------------------------


def test_fisher_weakness_scale_changes_the_score_not_the_error():
    # Known weakness, measured: mean(x^2) grows 100x when a token is scaled 10x, although
    # TurboQuant's relative error of that token is exactly the same (it quantizes x / ||x||).
    x = np.random.default_rng(4).standard_normal((2, D)).astype(np.float32)
    x[1] = 10 * x[0]
    q = TurboQuantMSE(D, 2, norm_dtype="float32")
    rel = np.sum((q.dequantize(q.quantize(x)) - x) ** 2, axis=-1) / np.sum(x**2, axis=-1)

    scores = FisherScorer().score(x)

    assert scores[1] / scores[0] == pytest.approx(100.0, rel=1e-5)
    assert rel[1] == pytest.approx(rel[0], rel=1e-4)


def test_fisher_weakness_magnitude_is_not_sensitivity():
    # Known weakness, measured: values that no query attends to can have the largest norms.
    # Their quantization error never reaches the attention output (sensitivity a_i^2 ||v_i||^2),
    # yet mean(v^2) ranks them first, so tiered bits go where they matter least.
    rng = np.random.default_rng(5)
    t, n_q = 64, 8
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    queries = 6.0 * (u + 0.1 * rng.standard_normal((n_q, D)))
    attended = np.arange(t) % 2 == 0
    keys = np.where(attended[:, None], u, -u) * 4.0 + 0.3 * rng.standard_normal((t, D))
    values = rng.standard_normal((t, D)) * np.where(attended, 1.0, 10.0)[:, None]
    logits = queries @ keys.T / np.sqrt(D)
    attn = np.exp(logits - logits.max(axis=-1, keepdims=True))
    attn /= attn.sum(axis=-1, keepdims=True)
    sensitivity = np.sum(attn**2, axis=0) * np.sum(values**2, axis=-1)
    v32 = values.astype(np.float32)
    fisher = FisherScorer().score(v32)

    def output_error(scores: np.ndarray) -> float:
        rec = TieredStrategy().compress(v32, scores, QuantizerBank(), n_bits=2).reconstruction
        out = attn @ values
        return float(np.sum((attn @ rec - out) ** 2) / np.sum(out**2))

    assert _spearman(fisher, sensitivity) < -0.5
    assert output_error(fisher) > 5 * output_error(sensitivity.astype(np.float32))


# fisher_static ---------------------------------------------------------------------------------


def test_fisher_static_scores_are_head_weights_times_energy(xp):
    host = np.random.default_rng(6).standard_normal((1, HEADS, 4, D))
    scorer = FisherStaticScorer(calibration=_calibration())
    scores = to_host(scorer.score(make_array(xp, host, "float32"), layer=0, stream="k"))
    energy = np.mean(host**2, axis=-1)
    np.testing.assert_allclose(scores, energy * np.array([0.5, 1.5])[None, :, None], rtol=1e-5)
    flat = FisherStaticScorer(calibration=_calibration(), token_energy=False)
    np.testing.assert_allclose(
        to_host(flat.score(make_array(xp, host, "float32"), layer=1, stream="v")),
        np.broadcast_to(np.array([4.0, 0.5])[None, :, None] / 1.625, (1, HEADS, 4)),
        rtol=1e-5,
    )


def test_fisher_static_moves_high_tier_tokens_to_sensitive_heads():
    x = np.random.default_rng(7).standard_normal((1, HEADS, 32, D)).astype(np.float32)
    scores = FisherStaticScorer(calibration=_calibration()).score(x, layer=0, stream="k")
    res = TieredStrategy(fraction=0.5).compress(x, scores, QuantizerBank(), n_bits=2)
    err = np.sum((res.reconstruction - x) ** 2, axis=(0, 2, 3)) / np.sum(x**2, axis=(0, 2, 3))
    assert err[1] < err[0] / 3  # head 1 (weight 3) got the 3-bit tier, head 0 mostly 1 bit


def test_fisher_calibration_round_trips_through_json(tmp_path):
    path = _calibration().save(tmp_path / "fisher.json")
    loaded = FisherCalibration.load(path)
    data = json.loads(path.read_text())

    assert data["format"] == "tqai.fisher"
    assert data["version"] == 1
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.model) == (2, 2, "toy")
    np.testing.assert_array_equal(loaded.v, _calibration().v)
    scorer = FisherStaticScorer(path)
    np.testing.assert_allclose(scorer.head_weights(1, "v"), np.array([4.0, 0.5]) / 1.625)


def _valid() -> dict:
    return _calibration().to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("k"), r"missing required key\(s\) k"),
        (lambda d: d.update(kk=[]), r"unknown key\(s\) 'kk'; allowed keys: format"),
        (lambda d: d.update(format="fisher"), r"'format' must be 'tqai\.fisher'"),
        (lambda d: d.update(version=2), r"unsupported version 2"),
        (lambda d: d.update(num_layers=0), r"'num_layers' must be an integer >= 1"),
        (lambda d: d.update(num_kv_heads=3), r"'k' must be num_layers x num_kv_heads = 2 x 3"),
        (lambda d: d["v"].pop(), r"'v' must be num_layers x num_kv_heads = 2 x 2, got 1 rows"),
        (lambda d: d["k"][0].__setitem__(1, -1.0), r"'k' must hold finite values >= 0"),
        (lambda d: d["k"][0].__setitem__(1, "x"), r"'k' must hold numbers only"),
        (lambda d: d.update(v=[[0, 0], [0, 0]]), r"'v' is all zeros"),
        (lambda d: d.update(model=3), r"'model' must be a string"),
        (lambda d: d.update(meta=[1]), r"'meta' must be a JSON object"),
    ],
)
def test_fisher_calibration_validation_names_the_problem(tmp_path, edit, message):
    data = _valid()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=message):
        FisherCalibration.load(path)


def test_fisher_calibration_file_errors(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read Fisher calibration"):
        FisherCalibration.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        FisherCalibration.load(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CalibrationError, match="expected a JSON object, got list"):
        FisherCalibration.load(tmp_path / "list.json")


def test_fisher_static_call_errors():
    scorer = FisherStaticScorer(calibration=_calibration())
    x = np.ones((1, HEADS, 4, D), dtype=np.float32)
    with pytest.raises(ValueError, match="layer 2 is outside the calibration's 2 layers"):
        scorer.score(x, layer=2)
    with pytest.raises(ValueError, match="needs an integer layer index, got None"):
        scorer.score(x)
    with pytest.raises(ValueError, match="H = 2 calibrated K/V heads"):
        scorer.score(np.ones((1, 3, 4, D), dtype=np.float32), layer=0)
    with pytest.raises(ValueError, match="exactly one of path= or calibration="):
        FisherStaticScorer()


def test_fisher_static_through_a_pipeline_config(tmp_path):
    from tqai.pipeline import build_pipeline

    path = _calibration().save(tmp_path / "fisher.json")
    pipe = build_pipeline(
        {"scorer": "fisher_static", "scorer_kwargs": {"path": str(path)}, "strategy": "tiered"}
    )
    x = np.random.default_rng(8).standard_normal((1, HEADS, 8, D)).astype(np.float32)
    assert pipe.compress(x, layer=1, stream="v").info["high_tokens"] == 8


# sheaf -----------------------------------------------------------------------------------------


def test_sheaf_ramp_is_harmonic_and_a_spike_is_not(xp):
    ramp = np.tile(np.linspace(-1, 1, 16)[:, None], (1, D)) + np.linspace(0, 1, D)
    spiky = ramp.copy()
    spiky[7] += 3.0
    scores = to_host(SheafScorer().score(make_array(xp, np.stack([ramp, spiky]), "float32")))
    np.testing.assert_allclose(scores[0, 1:-1], 0.0, atol=1e-6)
    assert int(np.argmax(scores[1])) == 7


def test_sheaf_radius_widens_the_neighbourhood():
    x = np.zeros((12, 4))
    x[5] = 1.0
    near = SheafScorer(radius=1).score(x)
    wide = SheafScorer(radius=3).score(x)
    assert near[8] == 0.0
    assert wide[8] > 0.0


def test_sheaf_grid_uses_the_3d_lattice(xp):
    f, h, w = 3, 4, 5
    grid = np.stack(np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij"), -1)
    smooth = (grid.reshape(-1, 3) @ np.ones((3, D)) / 10.0) + 1.0  # linear in every axis
    spiky = smooth.copy()
    spiky[1 * h * w + 2 * w + 3] += 5.0
    scorer = SheafScorer(grid=(f, h, w))
    scores = to_host(scorer.score(make_array(xp, np.stack([smooth, spiky]), "float32")))
    interior = grid.reshape(-1, 3)
    inside = np.all((interior > 0) & (interior < np.array([f, h, w]) - 1), axis=-1)
    np.testing.assert_allclose(scores[0][inside], 0.0, atol=1e-6)
    assert int(np.argmax(scores[1])) == 1 * h * w + 2 * w + 3
    with pytest.raises(ValueError, match=r"grid \(3, 4, 5\) has 60 tokens but x has T = 59"):
        scorer.score(smooth[:59])


# bsa -------------------------------------------------------------------------------------------


def test_bsa_ranks_distinct_tokens_above_redundant_ones_in_a_block(xp):
    rng = np.random.default_rng(9)
    x = np.repeat(rng.standard_normal((4, 1, D)), 8, axis=1).reshape(32, D)
    x[10] = rng.standard_normal(D)
    scores = to_host(BsaScorer(block_size=8).score(make_array(xp, x, "float32")))
    block = scores[8:16]
    assert int(np.argmax(block)) == 2
    assert np.allclose(np.delete(block, 2), block[0])


def test_bsa_ranks_salient_blocks_first():
    rng = np.random.default_rng(10)
    u = rng.standard_normal(D)
    u *= 3.0 / np.linalg.norm(u)
    centres = np.stack([u, u, u, -u]) + 0.05 * rng.standard_normal((4, D))
    x = np.repeat(centres[:, None, :], 6, axis=1).reshape(24, D)
    scores = BsaScorer(block_size=6).score(x)
    # Every block attends to itself, so the margin is the attention of the other blocks.
    assert scores[:18].min() > 1.1 * scores[18:].max()


def test_bsa_handles_a_partial_last_block():
    x = np.random.default_rng(11).standard_normal((2, 13, D)).astype(np.float32)
    scores = BsaScorer(block_size=4).score(x)
    assert scores.shape == (2, 13)
    assert np.all(np.isfinite(scores))

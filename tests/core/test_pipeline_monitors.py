"""Monitors: stability (attention-entropy shift) and lyapunov (divergence rate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tqai.pipeline import CompressionResult, build_pipeline
from tqai.pipeline.monitors.lyapunov import LyapunovMonitor
from tqai.pipeline.monitors.stability import StabilityMonitor, attention_entropy
from tqai.testing import make_array

D = 32


def _result(reconstruction) -> CompressionResult:
    return CompressionResult(reconstruction=reconstruction, bits=0, n_coords=1, n_bits=2)


def _keys(seed: int = 0, shape=(1, 2, 32, D)) -> np.ndarray:
    return (2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# stability -------------------------------------------------------------------------------------


def test_attention_entropy_bounds(xp):
    uniform_keys = make_array(xp, np.zeros((1, 8, D)), "float32")
    queries = make_array(xp, np.ones((1, 3, D)), "float32")
    h = np.asarray(attention_entropy(queries, uniform_keys))
    np.testing.assert_allclose(h, math.log(8), rtol=1e-5)
    peaked = np.zeros((1, 8, D))
    peaked[0, 2] = 100.0
    h = np.asarray(attention_entropy(queries, make_array(xp, peaked, "float32")))
    np.testing.assert_allclose(h, 0.0, atol=1e-4)


def test_stability_adds_bits_for_heavy_distortion_only():
    keys = _keys(1)
    rng = np.random.default_rng(2)
    mild = keys + 0.01 * rng.standard_normal(keys.shape).astype(np.float32)
    heavy = keys + 2.0 * rng.standard_normal(keys.shape).astype(np.float32)
    calm, alarmed = StabilityMonitor(), StabilityMonitor()
    calm.observe(keys, _result(mild), layer=0, stream="k")
    alarmed.observe(keys, _result(heavy), layer=0, stream="k")

    assert calm.adjust(2, layer=0, stream="k") == 2
    assert alarmed.adjust(2, layer=0, stream="k") == 4  # capped at max_extra_bits
    assert alarmed.adjust(2, layer=1, stream="k") == 2  # per layer
    assert alarmed.adjust(8, layer=0, stream="v") == 8  # never past 8 bits


def test_stability_ignores_values_and_folds_grouped_queries():
    keys = _keys(3)
    heavy = _result(keys[..., ::-1, :].copy())
    monitor = StabilityMonitor()
    monitor.observe(keys, heavy, layer=0, stream="v")
    assert monitor.ema == {}
    queries = np.random.default_rng(4).standard_normal((1, 6, 4, D)).astype(np.float32)
    assert monitor.shift(keys, keys, queries) == 0.0
    assert monitor.shift(keys, heavy.reconstruction, queries) > 0.0
    with pytest.raises(ValueError, match=r"query heads \(5\) must be a multiple"):
        monitor.shift(keys, keys, queries[:, :5])


def test_stability_closes_the_loop_in_a_pipeline():
    # At 1 bit the entropy shift is large: the monitor raises the width; at the raised width
    # the shift shrinks and the average decays, so the extra bits are given back over time.
    pipe = build_pipeline({"monitor": "stability", "bits_k": 1})
    keys = _keys(5, shape=(1, 2, 64, D))
    widths = [pipe.compress(keys, layer=0, stream="k").n_bits for _ in range(12)]
    assert widths[0] == 1
    assert max(widths) == 3
    assert widths[-1] < max(widths)


# lyapunov --------------------------------------------------------------------------------------


def _trajectory(ratio: float, steps: int = 6) -> list[np.ndarray]:
    base = np.random.default_rng(6).standard_normal((2, 8, D))
    direction = np.random.default_rng(7).standard_normal((2, 8, D))
    offsets = np.cumsum([ratio**t for t in range(steps)])
    return [(base + o * direction).astype(np.float32) for o in offsets]


@pytest.mark.parametrize(("ratio", "width"), [(2.0, 4), (0.5, 2), (1.0, 3)])
def test_lyapunov_rate_moves_the_width(xp, ratio, width):
    monitor = LyapunovMonitor()
    for x in _trajectory(ratio):
        monitor.observe(make_array(xp, x, "float32"), _result(None), layer=0, stream="k")
    assert monitor.rate(layer=0, stream="k") == pytest.approx(math.log(ratio), abs=1e-5)
    assert monitor.adjust(3, layer=0, stream="k") == width


def test_lyapunov_without_lower_bound_never_lowers():
    monitor = LyapunovMonitor(lower_below=None)
    for x in _trajectory(0.5):
        monitor.observe(x, _result(None), layer=0, stream="v")
    assert monitor.adjust(3, layer=0, stream="v") == 3
    assert monitor.adjust(1, layer=0, stream="v") == 1


def test_lyapunov_restarts_when_the_shape_changes():
    monitor = LyapunovMonitor()
    for x in _trajectory(2.0):
        monitor.observe(x, _result(None), layer=0, stream="k")
    monitor.observe(np.ones((1, 3, D), np.float32), _result(None), layer=0, stream="k")
    assert monitor.rate(layer=0, stream="k") == 0.0
    monitor.reset()
    assert monitor.adjust(3, layer=0, stream="k") == 3


def test_monitor_settings_are_validated():
    with pytest.raises(ValueError, match="momentum must be in"):
        LyapunovMonitor(momentum=0.0)
    with pytest.raises(ValueError, match="lower_below"):
        LyapunovMonitor(raise_above=0.0, lower_below=0.1)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        StabilityMonitor(threshold=0.0)

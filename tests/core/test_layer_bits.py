"""Per-layer widths under a budget (reverse water-filling on a grid) and per-layer configs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tqai.kvstore import KVCacheConfig
from tqai.layer_bits import allocate_layer_bits, fisher_layer_bits, layer_configs


@given(
    st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=40),
    st.sampled_from([2, 2.5, 3, 3.5, 4]),
)
def test_allocation_stays_within_budget_and_follows_importance(importance, budget):
    bits = allocate_layer_bits(importance, budget, low=1, high=8)
    assert np.mean(bits) <= budget + 1e-9
    assert np.mean(bits) > budget - 0.5  # the budget is spent, up to one grid step per layer
    n = len(importance)
    pairs = [(a, b) for a in range(n) for b in range(n) if importance[a] < importance[b]]
    assert all(bits[a] <= bits[b] for a, b in pairs)


def test_uniform_importance_gives_the_budget_everywhere_and_sensitive_layers_get_more():
    assert allocate_layer_bits([1, 1, 1, 1], 3) == [3, 3, 3, 3]
    bits = allocate_layer_bits([16, 1, 1, 1, 1, 16], 3)
    assert min(bits[0], bits[-1]) > 3 > max(bits[1:-1])
    # reverse water-filling: 16x the sensitivity is worth log4(16) = 2 more bits
    ends, middle = np.mean([bits[0], bits[-1]]), np.mean(bits[1:-1])
    assert ends - middle == pytest.approx(2.0, abs=0.5)


@pytest.mark.parametrize(
    ("importance", "budget", "match"),
    [([], 3, "importance"), ([1, -1], 3, "importance"), ([1, 2], 9, "budget")],
)
def test_allocation_errors_name_the_parameter(importance, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate_layer_bits(importance, budget)


def test_fisher_layer_bits_spreads_both_budgets():
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    cal = FisherCalibration.from_dict(
        {
            "format": "tqai.fisher",
            "version": 1,
            "model": "tiny",
            "num_layers": 3,
            "num_kv_heads": 2,
            "k": [[1, 1], [10, 10], [1, 1]],
            "v": [[5, 5], [1, 1], [1, 1]],
        }
    )
    with pytest.raises(ValueError, match="k_energy"):  # this file records no energies
        fisher_layer_bits(cal, 4, 2)
    with pytest.raises(ValueError, match="weight must be one of"):
        fisher_layer_bits(cal, 4, 2, weight="hessian")
    pairs = fisher_layer_bits(cal, 4, 2, weight="fisher")
    assert pairs[1][0] > pairs[0][0]
    assert pairs[0][1] > pairs[1][1]
    assert np.mean([p[0] for p in pairs]) <= 4
    assert np.mean([p[1] for p in pairs]) <= 2
    # Only the compressed layers share the budget (Gemma-3's sliding layers stay exact).
    some = fisher_layer_bits(cal, 4, 2, layers=[0, 2], weight="fisher", step=1)
    assert some[1] is None
    assert np.mean([some[0][0], some[2][0]]) == 4  # equal weights: the budget split evenly
    assert [c.bits_k for c in layer_configs(KVCacheConfig(bits_k=3), some, 3)] == [4, 3, 4]
    with pytest.raises(ValueError, match=r"layer indices in 0\.\.2"):
        fisher_layer_bits(cal, 4, 2, layers=[3], weight="fisher")


def test_layer_configs_list_mapping_and_errors():
    base = KVCacheConfig(bits_k=4, bits_v=2)
    assert layer_configs(base, None, 3) == [base] * 3
    configs = layer_configs(base, {0: (8, 4)}, 3)
    assert (configs[0].bits_k, configs[0].bits_v) == (8, 4)
    assert configs[1] == base
    assert [c.bits_v for c in layer_configs(base, [(4, 2), (4, 3), (4, 2.5)], 3)] == [2, 3, 2.5]
    with pytest.raises(ValueError, match=r"one .* pair per layer"):
        layer_configs(base, [(4, 2)], 3)
    with pytest.raises(ValueError, match=r"layer indices in 0\.\.2"):
        layer_configs(base, {5: (4, 2)}, 3)
    with pytest.raises(ValueError, match="bits_v"):
        layer_configs(base, {0: (4, 9)}, 3)


def test_fisher_energy_weight_moves_bits_to_the_energetic_layer():
    """Equal gradients, one layer's values 16x more energetic: it gets the bits under
    ``fisher_energy`` and none extra under ``fisher``."""
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    cal = FisherCalibration(
        k=np.ones((2, 1)),
        v=np.ones((2, 1)),
        meta={"k_energy": [[1.0], [1.0]], "v_energy": [[16.0], [1.0]]},
    )
    assert fisher_layer_bits(cal, 4, 3, weight="fisher", step=1) == [(4, 3), (4, 3)]
    pairs = fisher_layer_bits(cal, 4, 3, step=1)
    assert [p[0] for p in pairs] == [4, 4]
    assert pairs[0][1] > pairs[1][1]
    assert (pairs[0][1] + pairs[1][1]) / 2 <= 3

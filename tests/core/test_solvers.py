"""Codebook solvers beside Lloyd-Max: CMA-ES, fuzzy c-means, the attention-aware objective."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tqai.codebooks import Codebook, codebook_distortion, lloyd_max_codebook
from tqai.registry import registry
from tqai.solvers.attention_aware import (
    AttentionObjective,
    attention_aware_codebook,
    logit_moments,
    sampled_attention_loss,
)
from tqai.solvers.cmaes import cmaes_codebook, minimize_cmaes
from tqai.solvers.fuzzy_cmeans import annealing_schedule, fuzzy_cmeans_codebook

D = 64


def _sorted_symmetric(cb: Codebook) -> None:
    c = cb.centroids
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    np.testing.assert_allclose(cb.boundaries, (c[1:] + c[:-1]) / 2, rtol=0, atol=1e-15)
    assert np.all(np.abs(c) < 1)


def _sigma_units(a: Codebook, b: Codebook) -> float:
    """Largest centroid difference in N(0, 1) units (centroids times sqrt(d))."""
    return float(np.max(np.abs(a.centroids - b.centroids)) * math.sqrt(a.d))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("cmaes", {}),
        ("fuzzy_cmeans", {}),
        ("attention_aware", {"num_samples": 256}),
    ],
)
def test_solver_plugins_return_sorted_symmetric_codebooks_of_their_kind(name, options):
    solver = registry("tqai.codebooks").get(name)
    cb = solver(32, 2, **options)
    assert isinstance(cb, Codebook)
    assert (cb.kind, cb.d, cb.n_bits) == (name, 32, 2)
    _sorted_symmetric(cb)


# --- CMA-ES -------------------------------------------------------------------------------


def test_minimize_cmaes_finds_a_quadratic_minimum_and_never_regresses():
    target = np.array([3.0, -1.0, 0.5, 2.0, -2.5])
    result = minimize_cmaes(lambda x: float(np.sum((x - target) ** 2)), np.zeros(5), 1.0, seed=3)
    np.testing.assert_allclose(result.x, target, atol=1e-4)
    assert np.all(np.diff(result.history) <= 0)
    assert result.fun <= float(np.sum(target**2))


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4])
def test_cmaes_is_never_worse_than_lloyd_max_on_distortion(n_bits):
    start = lloyd_max_codebook(D, n_bits)
    cb = cmaes_codebook(D, n_bits, seed=n_bits)
    assert codebook_distortion(cb) <= codebook_distortion(start)
    assert cb.kind == "cmaes"
    _sorted_symmetric(cb)


def test_cmaes_improves_a_caller_objective_to_its_optimum():
    """Distortion at d=16 from Lloyd-Max at d=64: CMA-ES must reach Lloyd-Max(16)'s value."""

    def objective(c: Codebook) -> float:
        return codebook_distortion(c, 16)

    cb = cmaes_codebook(D, 3, objective=objective)
    start = objective(lloyd_max_codebook(D, 3))
    optimum = codebook_distortion(lloyd_max_codebook(16, 3))
    assert objective(cb) < start
    assert objective(cb) == pytest.approx(optimum, rel=1e-6)


def test_cmaes_is_deterministic_for_a_seed():
    def objective(c: Codebook) -> float:
        return codebook_distortion(c, 24)

    first = cmaes_codebook(D, 3, objective=objective, seed=7, max_evals=300)
    again = cmaes_codebook(D, 3, objective=objective, seed=7, max_evals=300)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    np.testing.assert_array_equal(first.boundaries, again.boundaries)


def test_cmaes_keeps_the_start_exactly_when_nothing_beats_it():
    start = Codebook(
        centroids=np.array([-0.2, -0.05, 0.05, 0.2]),
        boundaries=np.array([-0.1, 0.0, 0.1]),  # not midpoints: kept as they are
        d=D,
        n_bits=2,
        kind="custom",
    )

    def objective(c: Codebook) -> float:
        return float(np.sum((c.centroids - start.centroids) ** 2))

    cb = cmaes_codebook(D, 2, objective=objective, start=start, max_evals=200)
    np.testing.assert_array_equal(cb.centroids, start.centroids)
    np.testing.assert_array_equal(cb.boundaries, start.boundaries)
    assert cb.kind == "cmaes"


def test_cmaes_asymmetric_search_stays_sorted_and_not_worse():
    start = lloyd_max_codebook(D, 2)
    weights = np.array([1.0, 2.0, 1.0, 0.5])

    def objective(c: Codebook) -> float:  # an asymmetric objective
        return codebook_distortion(c) + float(np.sum(weights * c.centroids))

    cb = cmaes_codebook(D, 2, objective=objective, symmetric=False, max_evals=600)
    assert np.all(np.diff(cb.centroids) > 0)
    assert objective(cb) < objective(start)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"objective": 3}, TypeError, "objective must be a callable"),
        ({"start": lloyd_max_codebook(32, 2)}, ValueError, "start codebook is for d=32"),
        ({"start": "lloyd_max"}, TypeError, "start must be"),
        ({"sigma0": 0.0}, ValueError, "sigma0"),
        ({"max_evals": 0}, ValueError, "max_evals"),
        (
            {
                "start": Codebook(
                    centroids=np.array([-0.2, 0.0, 0.1, 0.2]),
                    boundaries=np.array([-0.1, 0.05, 0.15]),
                    d=D,
                    n_bits=2,
                )
            },
            ValueError,
            "symmetric start",
        ),
    ],
)
def test_cmaes_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        cmaes_codebook(D, 2, **kwargs)


# --- fuzzy c-means -----------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4])
def test_fuzzy_cmeans_converges_near_lloyd_max_for_small_m(n_bits):
    cb = fuzzy_cmeans_codebook(128, n_bits, m_end=1.05)
    lm = lloyd_max_codebook(128, n_bits)
    assert cb.kind == "fuzzy_cmeans"
    _sorted_symmetric(cb)
    assert _sigma_units(cb, lm) < 2e-3
    assert codebook_distortion(cb) == pytest.approx(codebook_distortion(lm), rel=1e-5)


def test_fuzzy_cmeans_approaches_lloyd_max_as_m_anneals_toward_one():
    lm = lloyd_max_codebook(128, 2)
    gaps = [_sigma_units(fuzzy_cmeans_codebook(128, 2, m_end=m), lm) for m in (1.5, 1.2, 1.05)]
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[0] > 5 * gaps[2], gaps  # a large fuzzifier really is a different codebook


def test_fuzzy_cmeans_on_samples_is_near_lloyd_max():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, D))
    samples = (x / np.linalg.norm(x, axis=-1, keepdims=True)).reshape(-1)
    cb = fuzzy_cmeans_codebook(D, 2, samples=samples)
    assert np.all(np.diff(cb.centroids) > 0)
    assert _sigma_units(cb, lloyd_max_codebook(D, 2)) < 0.02


def test_annealing_schedule_runs_from_m_start_to_m_end():
    m = annealing_schedule(2.0, 1.01, 8)
    assert m[0] == pytest.approx(2.0)
    assert m[-1] == pytest.approx(1.01)
    assert np.all(np.diff(m) < 0)
    np.testing.assert_array_equal(annealing_schedule(1.5, 1.1, 1), [1.1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m_start": 1.2, "m_end": 1.5}, "m_start >= m_end > 1"),
        ({"m_end": 1.0}, "m_end > 1"),
        ({"stages": 0}, "stages"),
        ({"num_nodes": 8}, "num_nodes"),
        ({"samples": np.zeros(3)}, "samples must hold"),
        ({"samples": np.full(100, 2.0)}, "samples must hold"),
    ],
)
def test_fuzzy_cmeans_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fuzzy_cmeans_codebook(D, 2, **kwargs)


# --- attention-aware ---------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", [1, 2, 3, 5])
def test_lloyd_max_logit_moments_are_one_minus_distortion(n_bits):
    """Lloyd-Max logits are the conditional mean of the exact ones: beta = gamma = 1 - D."""
    lm = lloyd_max_codebook(D, n_bits)
    beta, gamma = logit_moments(lm)
    assert beta == pytest.approx(1 - codebook_distortion(lm), rel=1e-9)
    assert gamma == pytest.approx(beta, rel=1e-9)


@pytest.mark.parametrize("n_bits", [1, 2, 3])
def test_attention_objective_matches_sampled_keys_and_queries(n_bits):
    """The Gaussian form the solver uses agrees with the direct estimate of J on the sphere."""
    lm = lloyd_max_codebook(D, n_bits)
    gaussian = AttentionObjective(D, num_samples=4096, seed=3)(lm)
    sampled = sampled_attention_loss(lm, num_queries=1024, seed=3)
    assert gaussian == pytest.approx(sampled, rel=0.1)


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4])
def test_attention_aware_is_never_worse_than_lloyd_max_on_its_objective(n_bits):
    cb = attention_aware_codebook(D, n_bits, num_samples=512, max_evals=300)
    objective = AttentionObjective(D, num_samples=512)
    assert objective(cb) <= objective(lloyd_max_codebook(D, n_bits))
    assert cb.kind == "attention_aware"
    _sorted_symmetric(cb)


@pytest.mark.parametrize(
    ("n_bits", "logit_scale", "gain"),
    [(1, 2.0, 0.01), (1, 4.0, 0.1), (2, 4.0, 0.005)],
)
def test_attention_aware_preserves_softmax_better_than_lloyd_max_on_held_out_data(
    n_bits, logit_scale, gain
):
    """Held out: fresh sampled unit keys and queries (seed 99), quantized coordinate-wise."""
    cb = attention_aware_codebook(D, n_bits, logit_scale=logit_scale, num_samples=1024)
    lm = lloyd_max_codebook(D, n_bits)
    ours, mse = (
        sampled_attention_loss(c, num_queries=2048, logit_scale=logit_scale, seed=99)
        for c in (cb, lm)
    )
    assert ours < (1 - gain) * mse, (ours, mse)


def test_attention_aware_l2_divergence_is_not_worse_than_lloyd_max():
    cb = attention_aware_codebook(D, 1, divergence="l2", num_samples=512)
    objective = AttentionObjective(D, num_samples=512, divergence="l2")
    assert objective(cb) < objective(lloyd_max_codebook(D, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_keys": 1}, ValueError, "num_keys"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale"),
        ({"logit_scale": "2"}, TypeError, "logit_scale"),
        ({"divergence": "js"}, ValueError, "divergence"),
        ({"num_samples": 0}, ValueError, "num_samples"),
    ],
)
def test_attention_objective_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AttentionObjective(D, **kwargs)


def test_attention_objective_refuses_another_size():
    with pytest.raises(ValueError, match="d=32"):
        AttentionObjective(D)(lloyd_max_codebook(32, 2))

"""Lloyd-Max codebooks: exactness, symmetry, optimality, shipped tables, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate

from tqai.codebooks import (
    SHIPPED_HEAD_DIMS,
    codebook_distortion,
    coordinate_density,
    lloyd_max_codebook,
    solve_lloyd_max,
)


@given(d=st.integers(2, 4096), n_bits=st.integers(1, 8))
def test_codebook_sorted_symmetric_inside(d, n_bits):
    cb = lloyd_max_codebook(d, n_bits)
    c = cb.centroids
    assert c.shape == (2**n_bits,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    assert np.all(np.abs(c) < 1)
    np.testing.assert_allclose(cb.boundaries, (c[1:] + c[:-1]) / 2)


@pytest.mark.parametrize("d", [2, 3, 7, 64, 100, 128])
@pytest.mark.parametrize("n_bits", [1, 2, 3, 5, 8])
def test_lloyd_max_conditions_hold(d, n_bits):
    """Every centroid is the conditional mean of its cell (checked by quadrature)."""
    cb = lloyd_max_codebook(d, n_bits)
    edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
    for lo, hi, c in zip(edges[:-1], edges[1:], cb.centroids, strict=True):
        f = lambda t: coordinate_density(np.array(t), d)  # noqa: E731
        mass = integrate.quad(f, lo, hi, limit=200)[0]
        mean = integrate.quad(lambda t, f=f: t * f(t), lo, hi, limit=200)[0] / mass
        assert mean == pytest.approx(c, rel=1e-7, abs=1e-12)


def test_known_large_d_values():
    """The reference's large-d examples: b=1 +-sqrt(2/pi)/sqrt(d); b=2 +-0.453, +-1.51."""
    d = 4096
    c1 = lloyd_max_codebook(d, 1).centroids * math.sqrt(d)
    assert c1[1] == pytest.approx(math.sqrt(2 / math.pi), rel=2e-4)
    c2 = lloyd_max_codebook(d, 2).centroids * math.sqrt(d)
    np.testing.assert_allclose(c2[2:], [0.4528, 1.510], rtol=3e-3)


def test_uniform_density_at_d3():
    """At d=3 a coordinate is uniform on [-1, 1]: the codebook is the uniform quantizer."""
    cb = lloyd_max_codebook(3, 3)
    np.testing.assert_allclose(cb.centroids, (np.arange(8) - 3.5) / 4, atol=1e-12)
    assert codebook_distortion(cb) == pytest.approx(3 * (2 / 8) ** 2 / 12, rel=1e-10)


@pytest.mark.parametrize("d", [2, 5, 64, 128])
@pytest.mark.parametrize("n_bits", [1, 2, 4])
def test_distortion_matches_quadrature(d, n_bits):
    cb = lloyd_max_codebook(d, n_bits)
    edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
    total = 0.0
    for lo, hi, c in zip(edges[:-1], edges[1:], cb.centroids, strict=True):
        g = lambda t, c=c: (t - c) ** 2 * coordinate_density(np.array(t), d)  # noqa: E731
        total += integrate.quad(g, lo, hi, limit=200)[0]
    assert codebook_distortion(cb) == pytest.approx(d * total, rel=1e-6)


def test_gaussian_limit_distortions():
    """At large d the distortions approach the Gaussian Lloyd-Max values 0.3634/0.1175/..."""
    limit = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
    for b, value in limit.items():
        assert codebook_distortion(lloyd_max_codebook(8192, b)) == pytest.approx(value, rel=2e-3)


def test_codebook_beats_perturbations():
    """Moving any centroid increases the distortion (a local optimum)."""
    from tqai.codebooks import Codebook

    cb = lloyd_max_codebook(64, 3)
    base = codebook_distortion(cb)
    for i in range(cb.size):
        for delta in (-1e-3, 1e-3):
            c = cb.centroids.copy()
            c[i] += delta
            moved = Codebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2, d=64, n_bits=3)
            assert codebook_distortion(moved) > base


def test_shipped_tables_match_solver():
    from importlib import resources

    doc = json.loads(resources.files("tqai").joinpath("_tables/lloyd_max.json").read_text())
    assert {k.split("/")[0] for k in doc["centroids"]} == {str(d) for d in SHIPPED_HEAD_DIMS}
    for key, centroids in doc["centroids"].items():
        d, b = map(int, key.split("/"))
        np.testing.assert_allclose(centroids, solve_lloyd_max(d, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"d": 64, "n_bits": 0}, ValueError, "n_bits must be in 1..8"),
        ({"d": 64, "n_bits": 9}, ValueError, "n_bits must be in 1..8"),
        ({"d": 64, "n_bits": 2.0}, TypeError, "n_bits must be an integer"),
        ({"d": 64, "n_bits": True}, TypeError, "n_bits must be an integer"),
        ({"d": 1, "n_bits": 2}, ValueError, "d must be an integer >= 2"),
        ({"d": -4, "n_bits": 2}, ValueError, "d must be an integer >= 2"),
        ({"d": 64.5, "n_bits": 2}, TypeError, "d must be an integer"),
    ],
)
def test_bad_codebook_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lloyd_max_codebook(**kwargs)

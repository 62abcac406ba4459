"""Rotations: orthogonal, norm-preserving, invertible, seeded identically on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tqai._xp import to_host
from tqai.rotations import ROTATIONS, make_rotation
from tqai.testing import make_array, xp_assert_close
from tqai.testing.arrays import float_vectors

KINDS = sorted(ROTATIONS)
DIMS = [1, 2, 3, 5, 8, 64, 80, 96, 127, 128, 256]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", DIMS)
def test_rotation_matrix_is_orthogonal(kind, d):
    p = make_rotation(kind, d, seed=11).matrix()
    np.testing.assert_allclose(p @ p.T, np.eye(d), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), d=st.sampled_from([2, 3, 12, 64, 80, 96]), seed=st.integers(0, 2**31))
def test_rotation_preserves_norms_and_inverts(xp, kind, data, d, seed):
    x_host = data.draw(float_vectors(d, max_rows=5, max_abs=1e2))
    rot = make_rotation(kind, d, seed=seed)
    x = make_array(xp, x_host, "float32")
    y = rot.rotate(x)
    norms = np.linalg.norm(x_host.astype(np.float64), axis=-1)
    tol = 1e-5 * max(1.0, float(norms.max()))
    np.testing.assert_allclose(
        np.linalg.norm(to_host(y).astype(np.float64), axis=-1), norms, atol=tol, rtol=1e-5
    )
    xp_assert_close(rot.unrotate(y), x, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [5, 64, 96])
def test_rotation_same_seed_same_matrix_on_every_backend(xp, kind, d):
    rot = make_rotation(kind, d, seed=7)
    x_host = np.random.default_rng(0).standard_normal((4, d))
    expected = x_host @ rot.matrix().T
    y = rot.rotate(make_array(xp, x_host, "float32"))
    xp_assert_close(y, make_array(xp, expected, "float32"), atol=1e-5, rtol=1e-5)


def test_seed_changes_the_rotation():
    a = make_rotation("haar", 16, seed=1).matrix()
    b = make_rotation("haar", 16, seed=2).matrix()
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, make_rotation("haar", 16, seed=1).matrix())


@pytest.mark.parametrize("d", [80, 96])
def test_hadamard_mixes_every_coordinate_for_non_power_of_two(d):
    """H (x) Q has no zero entry: every output coordinate depends on every input one."""
    p = make_rotation("hadamard", d, seed=3).matrix()
    assert np.min(np.abs(p)) > 1e-6


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="rotation must be one of"):
        make_rotation("givens", 8)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_rotation("haar", 8, seed=-1)
    with pytest.raises(ValueError, match=r"last dimension d=8"):
        make_rotation("haar", 8).rotate(np.zeros((2, 7)))

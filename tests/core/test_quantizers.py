"""TurboQuant_mse and TurboQuant_prod: paper properties, cross-backend codes, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tqai import QuantizedTensor, TurboQuantMSE, TurboQuantProd
from tqai._xp import namespace, to_host
from tqai.codebooks import codebook_distortion, lloyd_max_codebook
from tqai.quantizers import nearest_codes
from tqai.testing import make_array, xp_assert_equal
from tqai.testing.arrays import float_vectors


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _norm_dtype(xp) -> str:
    return "float16" if hasattr(xp, "float16") else "float32"


@pytest.mark.parametrize("rotation", ["haar", "hadamard", "rotor"])
@pytest.mark.parametrize("n_bits", [1, 2, 3, 4])
def test_mse_distortion_matches_theory(rotation, n_bits):
    d = 64
    x = _unit(np.random.default_rng(n_bits), 4000, d).astype(np.float32)
    q = TurboQuantMSE(d, n_bits, rotation=rotation)
    err = np.mean(np.sum((q.dequantize(q.quantize(x)) - x) ** 2, axis=-1))
    theory = codebook_distortion(lloyd_max_codebook(d, n_bits))
    assert err == pytest.approx(theory, rel=0.05)


@given(d=st.sampled_from([2, 3, 16, 64, 80, 128]), n_bits=st.integers(1, 8), data=st.data())
def test_quantize_of_dequantize_gives_the_same_codes(xp, d, n_bits, data):
    """The scalar quantizer is idempotent: the codes of the centroids are the codes.

    (At the vector level the identity does not hold by design: TurboQuant_mse reconstructs
    ``||x|| Pi^T c``, whose norm is ``||x|| ||c|| < ||x||``, so renormalizing it shifts every
    coordinate by ``1 / ||c||`` and can cross a narrow cell of a high-bit codebook.)
    """
    codes_host = data.draw(
        st.lists(st.integers(0, 2**n_bits - 1), min_size=d, max_size=d).map(
            lambda v: np.array(v, np.uint8)
        )
    )
    q = TurboQuantMSE(d, n_bits, norm_dtype=_norm_dtype(xp))
    codes = make_array(xp, codes_host)
    centroids = make_array(xp, q.codebook.centroids, "float32")
    bounds = make_array(xp, q.codebook.boundaries, "float32")
    cxp = namespace(codes)  # the array-API view of the backend (torch has no xp.astype)
    y = cxp.take(centroids, cxp.astype(codes, cxp.int64), axis=0)
    xp_assert_equal(nearest_codes(y, bounds, n_bits), codes)


@given(data=st.data(), d=st.sampled_from([4, 32, 96]), n_bits=st.integers(1, 8))
def test_rotated_error_within_the_cell_of_each_code(data, d, n_bits):
    x = data.draw(float_vectors(d, max_rows=6, allow_zero=False)).astype(np.float64)
    q = TurboQuantMSE(d, n_bits, norm_dtype="float32")
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = q.rotation.rotate(unit)
    c = q.codebook.centroids[q.codes(q.quantize(unit))]
    edges = np.concatenate([[-1.0], q.codebook.boundaries, [1.0]])
    cent = q.codebook.centroids
    # The farthest a value can sit from its centroid: the centroid's distance to a cell edge.
    reach = np.maximum(cent - edges[:-1], edges[1:] - cent)
    assert np.max(np.abs(y - c)) <= np.max(reach) + 1e-12


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_codes_identical_across_backends_for_the_same_seed(xp, kind):
    cls = TurboQuantMSE if kind == "mse" else TurboQuantProd
    q = cls(96, 3, rotation="hadamard", seed=5, norm_dtype="float32")
    x_host = np.random.default_rng(3).standard_normal((3, 40, 96))
    dtype = "float64" if hasattr(xp, "float64") and "mlx" not in xp.__name__ else "float32"
    ref = q.quantize(x_host.astype(dtype))
    qt = q.quantize(make_array(xp, x_host, dtype))
    for name, arr in ref.arrays().items():
        if arr.dtype == np.uint8:
            np.testing.assert_array_equal(to_host(qt.arrays()[name]), arr, err_msg=name)


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_zero_vectors_decode_to_exact_zero(xp, cls):
    q = cls(32, 3, norm_dtype=_norm_dtype(xp))
    x_host = np.random.default_rng(0).standard_normal((4, 32))
    x_host[1] = 0
    out = to_host(q.dequantize(q.quantize(make_array(xp, x_host, "float32"))))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1], np.zeros(32))


def test_prod_is_unbiased_and_mse_is_not():
    """Averaged over quantizer seeds, TurboQuant_prod's inner product equals the true one.

    The same statistic for TurboQuant_mse at the same total bits shows its multiplicative bias
    (about 1 - D_mse), so this test fails for a biased estimator.
    """
    d, n_bits, trials = 32, 2, 600
    rng = np.random.default_rng(0)
    x, z = _unit(rng, 2, d)
    y = 0.6 * x + 0.8 * (z - (z @ x) * x) / np.linalg.norm(z - (z @ x) * x)
    true = float(y @ x)
    prod, mse = [], []
    for seed in range(trials):
        p = TurboQuantProd(d, n_bits, seed=seed, norm_dtype="float32")
        m = TurboQuantMSE(d, n_bits, seed=seed, norm_dtype="float32")
        prod.append(float(y @ p.dequantize(p.quantize(x[None]))[0]))
        mse.append(float(y @ m.dequantize(m.quantize(x[None]))[0]))
    se_prod = np.std(prod) / math.sqrt(trials)
    se_mse = np.std(mse) / math.sqrt(trials)
    assert abs(np.mean(prod) - true) < 4 * se_prod, (np.mean(prod), true, se_prod)
    assert abs(np.mean(mse) - true) > 4 * se_mse, (np.mean(mse), true, se_mse)


@pytest.mark.parametrize("n_bits", [1, 3])
def test_prod_inner_product_variance_matches_theory(n_bits):
    d = 64
    rng = np.random.default_rng(1)
    x, y = _unit(rng, 3000, d), _unit(rng, 3000, d)
    q = TurboQuantProd(d, n_bits, norm_dtype="float32")
    x_hat = q.dequantize(q.quantize(x.astype(np.float32))).astype(np.float64)
    measured = d * np.mean((np.sum(y * x, -1) - np.sum(y * x_hat, -1)) ** 2)
    theory = (
        math.pi
        / 2
        * (codebook_distortion(lloyd_max_codebook(d, n_bits - 1)) if n_bits > 1 else 1.0)
    )
    assert measured == pytest.approx(theory, rel=0.1)


def test_qjl_dim_sets_the_sketch_size():
    q = TurboQuantProd(64, 3, qjl_dim=32)
    qt = q.quantize(np.ones((5, 64), np.float32))
    assert q.sketch.shape == (32, 64)
    assert qt.qjl.shape == (5, 4)
    assert qt.packed.shape == (5, 16)  # 2-bit MSE stage


def test_nbytes_counts_what_is_held():
    q = TurboQuantMSE(128, 3)
    qt = q.quantize(np.ones((2, 10, 128), np.float32))
    assert qt.nbytes == 2 * 10 * (48 + 2) == sum(a.nbytes for a in qt.arrays().values())
    assert qt.bits_per_coordinate == pytest.approx(3 + 16 / 128)
    p = TurboQuantProd(128, 4).quantize(np.ones((7, 128), np.float32))
    assert p.nbytes == 7 * (48 + 2 + 16 + 2)


def test_dequantize_defaults_to_input_dtype(xp):
    q = TurboQuantMSE(16, 4, norm_dtype=_norm_dtype(xp))
    for dtype in ("float32", "float16", "bfloat16"):
        if not hasattr(xp, dtype):
            continue
        x = make_array(xp, np.random.default_rng(0).standard_normal((3, 16)), dtype)
        assert q.dequantize(q.quantize(x)).dtype == x.dtype


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.full((2, 8), np.nan, np.float32), ValueError, "NaN or Inf"),
        (np.array([[np.inf] + [0.0] * 7]), ValueError, "NaN or Inf"),
        (np.ones((2, 8), np.int32), TypeError, "must be a floating array"),
        (np.ones((0, 8), np.float32), ValueError, "x is empty"),
        (np.ones((2, 9), np.float32), ValueError, r"shape \(\.\.\., 8\) for d=8"),
        (np.full((1, 8), 1e5, np.float32), ValueError, "norm_dtype='float32'"),
    ],
)
def test_quantize_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        TurboQuantMSE(8, 2).quantize(x)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e5, 1e30])
def test_extreme_norms_with_float32_norms(scale):
    """No under- or overflow in the norm: tiny and huge finite vectors keep their direction."""
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * np.float32(scale)
    q = TurboQuantMSE(8, 8, norm_dtype="float32")
    out = q.dequantize(q.quantize(x))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out / scale, x / scale, rtol=0.05, atol=0.02)


def test_dequantize_refuses_another_quantizers_tensor():
    qt = TurboQuantMSE(16, 3, seed=1).quantize(np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="seed=2 vs 1"):
        TurboQuantMSE(16, 3, seed=2).dequantize(qt)
    with pytest.raises(ValueError, match="rotation='hadamard' vs 'haar'"):
        TurboQuantMSE(16, 3, seed=1, rotation="hadamard").dequantize(qt)
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        TurboQuantMSE(16, 3).dequantize(np.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d": 16, "n_bits": 9}, "n_bits must be in 1..8"),
        ({"d": 1, "n_bits": 2}, "d must be an integer >= 2"),
        ({"d": 16, "n_bits": 2, "norm_dtype": "bfloat16"}, "norm_dtype must be one of"),
        ({"d": 16, "n_bits": 2, "rotation": "dct"}, "rotation must be one of"),
    ],
)
def test_quantizer_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TurboQuantMSE(**kwargs)


def test_quantized_tensor_is_the_container():
    qt = TurboQuantProd(16, 2).quantize(np.ones((3, 16), np.float32))
    assert isinstance(qt, QuantizedTensor)
    assert set(qt.arrays()) == {"packed", "norms", "qjl", "residual_norms"}

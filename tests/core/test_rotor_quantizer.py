"""RotorQuantizer: the quantizer plugin is TurboQuant_mse with the rotor rotation, nothing more."""

from __future__ import annotations

import numpy as np
import pytest

from tqai import QuantizedTensor
from tqai._xp import device_of
from tqai.codebooks import codebook_distortion, lloyd_max_codebook
from tqai.quantizers import TurboQuantMSE
from tqai.registry import registry
from tqai.rotor_quantizer import RotorQuantizer
from tqai.testing import make_array, xp_assert_equal


def _norm_dtype(xp) -> str:
    return "float16" if hasattr(xp, "float16") else "float32"


def test_rotor_is_a_quantizer_plugin():
    assert registry("tqai.quantizers").get("rotor") is RotorQuantizer


@pytest.mark.parametrize("d", [64, 80, 96])  # d mod 3 = 1, 2, 0
@pytest.mark.parametrize("n_bits", [2, 4])
def test_rotor_matches_turboquant_mse_with_rotor_rotation(xp, d, n_bits):
    norm_dtype = _norm_dtype(xp)
    ours = RotorQuantizer(d, n_bits, seed=3, norm_dtype=norm_dtype)
    reference = TurboQuantMSE(d, n_bits, rotation="rotor", seed=3, norm_dtype=norm_dtype)
    assert ours.spec == reference.spec
    x = make_array(xp, np.random.default_rng(d).standard_normal((3, 5, d)), "float32")
    qt, qt_ref = ours.quantize(x), reference.quantize(x)
    xp_assert_equal(qt.packed, qt_ref.packed)
    xp_assert_equal(qt.norms, qt_ref.norms)
    xp_assert_equal(ours.dequantize(qt), reference.dequantize(qt_ref))
    xp_assert_equal(reference.dequantize(qt), ours.dequantize(qt))  # they decode each other


@pytest.mark.parametrize("d", [64, 80, 96])
@pytest.mark.parametrize("n_bits", [1, 2, 3, 4])
def test_rotor_round_trip_distortion_matches_theory(d, n_bits):
    rng = np.random.default_rng(n_bits)
    x = rng.standard_normal((4000, d))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    q = RotorQuantizer(d, n_bits)
    err = np.mean(np.sum((q.dequantize(q.quantize(x.astype(np.float32))) - x) ** 2, axis=-1))
    assert err == pytest.approx(codebook_distortion(lloyd_max_codebook(d, n_bits)), rel=0.05)


def test_rotor_round_trips_through_the_byte_format(xp):
    q = RotorQuantizer(96, 3, seed=9, norm_dtype=_norm_dtype(xp))
    x = make_array(xp, np.random.default_rng(0).standard_normal((2, 7, 96)), "float32")
    qt = q.quantize(x)
    back = QuantizedTensor.from_bytes(qt.to_bytes(), xp=xp, device=device_of(x))
    assert back.spec == qt.spec
    xp_assert_equal(back.packed, qt.packed)
    xp_assert_equal(q.dequantize(back), q.dequantize(qt))


def test_rotor_keeps_codes_of_its_centroids():
    """Quantizing a decoded tensor again gives the same codes (no drift through the rotation)."""
    q = RotorQuantizer(96, 4, seed=1, norm_dtype="float32")
    x = np.random.default_rng(2).standard_normal((16, 96)).astype(np.float64)
    qt = q.quantize(x)
    rotated = q.dequantize_rotated(qt) / qt.norms[:, None]
    np.testing.assert_array_equal(q.codes(q.quantize(q.rotation.unrotate(rotated))), q.codes(qt))


def test_rotor_refuses_other_rotations():
    with pytest.raises(ValueError, match="always uses rotation='rotor'"):
        RotorQuantizer(64, 2, rotation="haar")
    assert "RotorQuantizer(d=64, n_bits=2, rotation='rotor'" in repr(RotorQuantizer(64, 2))

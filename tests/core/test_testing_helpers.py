"""tqai.testing itself: the assertions must catch what they promise to catch."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from hypothesis import given

from tqai._xp import namespace, namespace_name
from tqai.testing import (
    assert_parity,
    bits_and_codes,
    codes_arrays,
    default_rtol,
    float_vectors,
    make_array,
    xp_assert_close,
    xp_assert_equal,
)
from tqai.testing.fixtures import (
    ALL_BACKENDS,
    Backend,
    BackendUnavailableWarning,
    available_backends,
    requested_backends,
)


def test_equal_passes_and_fails_on_values(xp: ModuleType) -> None:
    a = make_array(xp, np.array([1, 2, 3], dtype=np.int32))
    xp_assert_equal(a, make_array(xp, np.array([1, 2, 3], dtype=np.int32)))
    with pytest.raises(AssertionError):
        xp_assert_equal(a, make_array(xp, np.array([1, 2, 4], dtype=np.int32)))


@pytest.mark.skip_xp_backends("numpy", reason="numpy is the namespace being caught")
def test_silent_numpy_result_is_caught(xp: ModuleType) -> None:
    desired = make_array(xp, np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(AssertionError, match="namespace mismatch"):
        xp_assert_close(np.array([1.0, 2.0], dtype=np.float32), desired)
    # Even when the test's expected value was itself built with numpy:
    with pytest.raises(AssertionError, match="backend under test"):
        xp_assert_close(np.array([1.0, 2.0], dtype=np.float32), [1.0, 2.0])


def test_dtype_and_shape_are_checked(xp: ModuleType) -> None:
    a = make_array(xp, np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(AssertionError, match="dtype mismatch"):
        xp_assert_equal(a, make_array(xp, np.zeros((2, 3), dtype=np.int32)))
    with pytest.raises(AssertionError, match="shape mismatch"):
        xp_assert_equal(a, make_array(xp, np.zeros((3, 2), dtype=np.float32)))
    xp_assert_equal(a, make_array(xp, np.zeros((2, 3), dtype=np.int32)), check_dtype=False)


def test_close_default_rtol_follows_dtype(xp: ModuleType) -> None:
    desired = make_array(xp, np.array([1.0, -3.0], dtype=np.float32))
    xp_assert_close(make_array(xp, np.array([1.0005, -3.001], dtype=np.float32)), desired)
    with pytest.raises(AssertionError):
        xp_assert_close(make_array(xp, np.array([1.01, -3.0], dtype=np.float32)), desired)


def test_python_scalar_result_is_rejected() -> None:
    with pytest.raises(TypeError, match="not an array"):
        xp_assert_close(1.0, np.float64(1.0))


def test_numpy_scalars_are_numpy() -> None:
    xp_assert_close(np.float64(2.0), np.asarray(2.0))


def test_default_rtol() -> None:
    assert default_rtol("int32") == 0
    assert default_rtol("float64") < default_rtol("float32") < default_rtol("float16")
    assert default_rtol("float32") == pytest.approx(4 * np.finfo(np.float32).eps ** 0.5)


def test_parity_accepts_kernel_within_rule() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((31, 17)).astype(np.float32)
    same = ref.astype(np.float16)
    kernel = (ref + 1.5 * (same.astype(np.float32) - ref)).astype(np.float16)
    assert_parity(kernel, ref, same)


def test_parity_reports_numbers_when_it_fails() -> None:
    ref = np.linspace(-1, 1, 50, dtype=np.float32)
    same = ref.astype(np.float16)
    bad = ref + np.float32(0.05)
    with pytest.raises(AssertionError, match=r"max\|out - ref\| = 0\.05.*> bound") as info:
        assert_parity(bad, ref, same, err_msg="rotate")
    message = str(info.value)
    assert message.startswith("rotate")
    assert "noise" in message
    assert "worst at index" in message


def test_parity_fails_on_nan() -> None:
    ref = np.ones(4, dtype=np.float32)
    out = ref.copy()
    out[2] = np.nan
    with pytest.raises(AssertionError, match=r"index \(2,\)"):
        assert_parity(out, ref, ref)


def test_parity_across_namespaces(xp: ModuleType) -> None:
    ref = np.arange(8, dtype=np.float32) / 7
    assert_parity(make_array(xp, ref), ref, ref)


def test_requested_backends_parsing() -> None:
    assert requested_backends("") == ALL_BACKENDS
    assert requested_backends(" numpy , mlx ") == ("numpy", "mlx.core")
    assert requested_backends("torch-cuda") == ("torch-cuda",)
    with pytest.raises(ValueError, match="unknown backend"):
        requested_backends("jax")


def test_available_backends_filters() -> None:
    got = available_backends("numpy")
    assert got == [Backend("numpy", np)]
    for backend_id, module in available_backends():
        assert namespace_name(module) in ALL_BACKENDS
        assert backend_id


def test_unimportable_backend_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqai.testing import fixtures

    def broken(name: str) -> ModuleType:
        raise ImportError(f"no {name} here")

    monkeypatch.setattr(fixtures.importlib, "import_module", broken)
    fixtures._available.cache_clear()
    try:
        with pytest.warns(BackendUnavailableWarning) as record:
            assert fixtures.available_backends("numpy,torch") == []
    finally:
        fixtures._available.cache_clear()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "'numpy' is not importable" in messages[0]
    assert "'torch' is not importable" in messages[1]


@given(case=bits_and_codes(max_len=40))
def test_bits_and_codes_are_valid(xp: ModuleType, case: tuple[int, np.ndarray]) -> None:
    n_bits, codes = case
    assert codes.dtype == np.uint8
    assert codes.ndim == 1
    assert codes.size <= 40
    assert np.all(codes < (1 << n_bits))
    x = make_array(xp, codes)
    assert namespace_name(namespace(x)) == namespace_name(xp)
    xp_assert_equal(x, make_array(xp, codes))


@given(codes=codes_arrays(3, max_len=10, min_len=1))
def test_codes_arrays_respect_bounds(codes: np.ndarray) -> None:
    assert 1 <= codes.size <= 10
    assert codes.max() <= 7


@given(x=float_vectors(16, allow_zero=False, max_abs=10.0))
def test_float_vectors(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    assert x.shape[1] == 16
    assert 1 <= x.shape[0] <= 8
    assert np.all(np.isfinite(x))
    assert np.all(np.abs(x) <= 10.0)
    assert np.all(np.linalg.norm(x.astype(np.float64), axis=1) > 0)


@pytest.mark.gpu
def test_gpu_marker_runs_only_where_cuda_is() -> None:
    import torch

    assert torch.cuda.is_available()


@pytest.mark.metal
def test_metal_marker_runs_only_where_metal_is() -> None:
    import mlx.core as mx

    assert mx.metal.is_available()

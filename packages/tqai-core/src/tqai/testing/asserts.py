"""Namespace-checking assertions shared by the core, the backends and third-party plugins.

Why it is shaped like this: a function that quietly converts its input to numpy still produces the
right numbers, so a value-only comparison cannot catch it. Every assertion here therefore checks,
before any value, that ``actual`` lives in the same array library (and on the same device) as
``desired`` and as the backend the ``xp`` test fixture selected (scipy's ``default_xp`` idea: the
fixture sets a context variable, see :mod:`tqai.testing.fixtures`). Values are then compared on the
host through :func:`tqai._xp.to_host`, so one numpy implementation serves every backend.

:func:`assert_parity` holds the one tolerance rule for float kernels (FlashAttention's): a kernel
may be at most ``rtol`` times as far from an fp32/fp64 reference as a same-dtype reference is, plus
the measured rounding noise of the reference's own dtype.
"""

from __future__ import annotations

import contextvars
import math
from types import ModuleType
from typing import Any

import numpy as np

from tqai._xp import device_of, namespace, namespace_name, to_host

__all__ = [
    "assert_parity",
    "default_device",
    "default_rtol",
    "default_xp",
    "dtype_name",
    "xp_assert_close",
    "xp_assert_equal",
]

#: The namespace of the backend under test, set by the ``xp`` fixture (``None`` outside it).
default_xp: contextvars.ContextVar[ModuleType | None] = contextvars.ContextVar(
    "tqai_default_xp", default=None
)
#: The device of the backend under test (``None`` means the library's default device).
default_device: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "tqai_default_device", default=None
)

# Machine epsilon per dtype name; bfloat16 is absent from numpy, so it is listed by hand.
_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
    "complex64": float(np.finfo(np.float32).eps),
    "complex128": float(np.finfo(np.float64).eps),
}


def _is_python_value(x: Any) -> bool:
    return isinstance(x, list | tuple) or (
        isinstance(x, int | float | complex | bool) and not isinstance(x, np.generic)
    )


def _namespace_name_of(x: Any) -> str:
    if isinstance(x, np.ndarray | np.generic):
        return "numpy"
    return namespace_name(namespace(x))


def _device(x: Any) -> str:
    return "cpu" if isinstance(x, np.ndarray | np.generic) else str(device_of(x))


def _host(x: Any) -> np.ndarray:
    """``to_host`` that also accepts numpy scalars (``np.float64`` is a ``float`` subclass)."""
    return np.asarray(x) if isinstance(x, np.ndarray | np.generic) else np.asarray(to_host(x))


def dtype_name(x: Any) -> str:
    """The dtype of ``x`` as a library-independent name (``float32``, ``bfloat16``, ``uint8``...)."""
    name = str(x.dtype).rsplit(".", 1)[-1]
    return "bool" if name == "bool_" else name


def default_rtol(dtype: str) -> float:
    """scipy's default relative tolerance: ``4 * sqrt(eps)`` for floats, 0 for exact dtypes."""
    eps = _EPS.get(dtype)
    return 0.0 if eps is None else 4.0 * math.sqrt(eps)


def _prefix(err_msg: str) -> str:
    return f"{err_msg}\n" if err_msg else ""


def _check_meta(
    actual: Any,
    desired: Any,
    *,
    check_namespace: bool,
    check_dtype: bool,
    check_shape: bool,
    check_device: bool,
    err_msg: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Check namespace, device, dtype and shape; return both operands as host numpy arrays."""
    if _is_python_value(actual):
        raise TypeError(
            f"{_prefix(err_msg)}actual is a Python {type(actual).__name__}, not an array: "
            "tqai functions must return arrays of the namespace they were given"
        )
    desired_is_array = not _is_python_value(desired)
    pre = _prefix(err_msg)

    if check_namespace:
        got = _namespace_name_of(actual)
        if desired_is_array:
            want = _namespace_name_of(desired)
            assert got == want, f"{pre}namespace mismatch: actual is {got}, desired is {want}"
        xp = default_xp.get()
        if xp is not None:
            want = namespace_name(xp)
            assert got == want, (
                f"{pre}namespace mismatch: actual is {got} but the backend under test is {want} "
                "(did a function silently return numpy?)"
            )
        if check_device and desired_is_array:
            dev_a, dev_d = _device(actual), _device(desired)
            assert dev_a == dev_d, f"{pre}device mismatch: actual is on {dev_a}, desired on {dev_d}"

    if check_dtype and desired_is_array:
        got, want = dtype_name(actual), dtype_name(desired)
        assert got == want, f"{pre}dtype mismatch: actual is {got}, desired is {want}"

    host_actual = _host(actual)
    host_desired = _host(desired) if desired_is_array else np.asarray(desired)
    if check_shape and desired_is_array:
        shape_a, shape_d = tuple(actual.shape), tuple(desired.shape)
        assert shape_a == shape_d, f"{pre}shape mismatch: actual {shape_a}, desired {shape_d}"
    return host_actual, host_desired


def xp_assert_equal(
    actual: Any,
    desired: Any,
    *,
    check_namespace: bool = True,
    check_dtype: bool = True,
    check_shape: bool = True,
    check_device: bool = True,
    err_msg: str = "",
) -> None:
    """Assert ``actual == desired`` exactly (NaNs compare equal), after the metadata checks.

    ``desired`` may be a Python scalar or list; then only ``actual``'s namespace is checked
    (against the backend under test), and its values are compared with broadcasting.
    """
    host_actual, host_desired = _check_meta(
        actual,
        desired,
        check_namespace=check_namespace,
        check_dtype=check_dtype,
        check_shape=check_shape,
        check_device=check_device,
        err_msg=err_msg,
    )
    np.testing.assert_array_equal(host_actual, host_desired, err_msg=err_msg)


def xp_assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float = 0,
    check_namespace: bool = True,
    check_dtype: bool = True,
    check_shape: bool = True,
    check_device: bool = True,
    equal_nan: bool = True,
    err_msg: str = "",
) -> None:
    """Assert ``|actual - desired| <= atol + rtol * |desired|`` elementwise, on the host.

    ``rtol=None`` picks :func:`default_rtol` of ``actual``'s dtype (``4 * sqrt(eps)``: about
    1.4e-3 for float32, 0.125 for float16, 0.35 for bfloat16, 6e-8 for float64; 0 for integers).
    Values are compared in float64, so low-precision inputs lose nothing in the comparison itself.
    """
    host_actual, host_desired = _check_meta(
        actual,
        desired,
        check_namespace=check_namespace,
        check_dtype=check_dtype,
        check_shape=check_shape,
        check_device=check_device,
        err_msg=err_msg,
    )
    if rtol is None:
        rtol = default_rtol(dtype_name(actual))
    cast = np.complex128 if np.iscomplexobj(host_actual) else np.float64
    np.testing.assert_allclose(
        host_actual.astype(cast),
        np.asarray(host_desired).astype(cast),
        rtol=rtol,
        atol=atol,
        equal_nan=equal_nan,
        err_msg=err_msg,
    )


def _max_abs(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def assert_parity(
    out: Any,
    out_ref: Any,
    out_same_dtype_ref: Any,
    *,
    rtol: float = 2,
    err_msg: str = "",
) -> None:
    """FlashAttention's parity rule for a float kernel against a reference.

    ``out`` is the kernel's result, ``out_ref`` a high-precision (fp32 or fp64) reference and
    ``out_same_dtype_ref`` the reference computed in the kernel's own dtype. The assertion is::

        max|out - out_ref| <= rtol * max|out_same_dtype_ref - out_ref| + noise
        noise = 2 * max|(out_ref + 0.3 - 0.3) - out_ref|      (in out_ref's dtype)

    The three operands may come from different namespaces (a torch kernel against a numpy
    reference); shapes must match. A NaN anywhere the reference is finite fails.
    """
    pre = _prefix(err_msg)
    arrays = {"out": out, "out_ref": out_ref, "out_same_dtype_ref": out_same_dtype_ref}
    host = {k: _host(v) for k, v in arrays.items()}
    shapes = {k: tuple(v.shape) for k, v in host.items()}
    assert len(set(shapes.values())) == 1, f"{pre}shape mismatch: {shapes}"

    ref = host["out_ref"]
    if not np.issubdtype(ref.dtype, np.inexact):
        ref = ref.astype(np.float64)
    noise = 2.0 * _max_abs((ref + ref.dtype.type(0.3) - ref.dtype.type(0.3)) - ref)
    ref64 = ref.astype(np.float64)
    diff = np.abs(host["out"].astype(np.float64) - ref64)
    err = _max_abs(diff)
    ref_err = _max_abs(host["out_same_dtype_ref"].astype(np.float64) - ref64)
    bound = rtol * ref_err + noise
    if err <= bound:  # NaN never satisfies this
        return
    where = ""
    if diff.size:
        ranked = np.where(np.isnan(diff), np.inf, diff)
        worst = np.unravel_index(int(np.argmax(ranked)), diff.shape)
        where = (
            f"\n  worst at index {tuple(int(i) for i in worst)}: "
            f"out={host['out'][worst]!r}, out_ref={ref64[worst]!r}"
        )
    raise AssertionError(
        f"{pre}parity failed: max|out - ref| = {err:.6g} > bound {bound:.6g}"
        f" = rtol {rtol:g} * max|same_dtype_ref - ref| {ref_err:.6g}"
        f" + noise {noise:.6g} (2 * max|(ref + 0.3 - 0.3) - ref| in {ref.dtype})"
        f"\n  out dtype {dtype_name(out)}, same-dtype ref dtype {dtype_name(out_same_dtype_ref)},"
        f" ref dtype {dtype_name(out_ref)}, shape {shapes['out']}{where}"
    )

"""Array-namespace plumbing: the only core module that knows library names.

Why it is shaped like this: tqai-core must run on numpy, torch, mlx.core and array-api-strict
without importing any of them. Namespaces are resolved from the arrays a caller passes in
(array-api-compat, which itself checks ``sys.modules`` and never imports a library), and a library
is recognised by its module name only. If the user never imported torch, no torch tensor can exist,
so nothing here ever needs to import it.

Host-side work (codebook fitting, seeded random matrices) is done in float64 numpy and moved to the
caller's namespace with :func:`from_host`; :func:`to_host` is the one route back to numpy.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "device_of",
    "from_host",
    "is_mlx_namespace",
    "is_numpy_namespace",
    "namespace",
    "namespace_name",
    "to_host",
]


class _MlxNamespace:
    """mlx.core with the few array-API signatures it lacks (keyword ``device``, ``sum(dtype=)``).

    MLX reaches array-api-compat through ``__array_namespace__`` with no wrapper, so the gaps are
    closed here, in the one module allowed to know library names. Everything else is mlx.core's.
    """

    __name__ = "mlx.core"

    def __init__(self, mx: ModuleType) -> None:
        self._mx = mx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mx, name)

    def _creation(self, fn: str, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        return getattr(self._mx, fn)(*args, **kwargs)

    def zeros(self, *args: Any, **kwargs: Any) -> Any:
        return self._creation("zeros", *args, **kwargs)

    def ones(self, *args: Any, **kwargs: Any) -> Any:
        return self._creation("ones", *args, **kwargs)

    def full(self, *args: Any, **kwargs: Any) -> Any:
        return self._creation("full", *args, **kwargs)

    def arange(self, *args: Any, **kwargs: Any) -> Any:
        return self._creation("arange", *args, **kwargs)

    def asarray(self, x: Any, dtype: Any = None, *, device: Any = None, copy: Any = None) -> Any:
        out = self._mx.array(x)
        return out if dtype is None else out.astype(dtype)

    def argsort(self, x: Any, /, *, axis: int = -1, descending: bool = False, stable: bool = True):
        # mlx's argsort takes neither keyword; callers here only need ties in a fixed order.
        return self._mx.argsort(-x if descending else x, axis=axis)

    def sum(self, x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
        if dtype is not None:
            x = x.astype(dtype)
        return self._mx.sum(x, axis=axis, keepdims=keepdims)


@functools.cache
def _mlx_namespace() -> _MlxNamespace:
    return _MlxNamespace(sys.modules["mlx.core"])


def namespace(*arrays: Any, xp: ModuleType | None = None) -> ModuleType:
    """Return the array namespace of ``arrays`` (or ``xp`` when the caller already knows it).

    Python scalars and ``None`` are ignored. Mixed namespaces raise ``TypeError``. For mlx arrays
    this is a thin wrapper of ``mlx.core`` that fills its array-API gaps.
    """
    if xp is not None:
        return _mlx_namespace() if getattr(xp, "__name__", "") == "mlx.core" else xp
    arrays = tuple(a for a in arrays if a is not None and not isinstance(a, int | float | bool))
    if not arrays:
        raise TypeError("namespace() needs at least one array to infer the array library from")
    xp = array_api_compat.array_namespace(*arrays)
    return _mlx_namespace() if getattr(xp, "__name__", "") == "mlx.core" else xp


def namespace_name(xp: ModuleType) -> str:
    """A stable short name for a namespace: ``numpy``, ``torch``, ``mlx.core``, ``array_api_strict``."""
    name = getattr(xp, "__name__", str(xp))
    for short in ("numpy", "torch", "mlx.core", "array_api_strict"):
        if name == short or name.endswith("." + short) or name.startswith(short + "."):
            return short
    return name


def is_numpy_namespace(xp: ModuleType) -> bool:
    return namespace_name(xp) == "numpy"


def is_mlx_namespace(xp: ModuleType) -> bool:
    return namespace_name(xp) == "mlx.core"


def device_of(x: Any) -> Any:
    """The device of ``x``, or ``None`` for libraries without a device concept (mlx, numpy)."""
    if is_mlx_namespace(namespace(x)):
        return None
    return array_api_compat.device(x)


def to_host(x: Any, *, xp: ModuleType | None = None) -> np.ndarray:
    """Copy ``x`` to a numpy array (the one sanctioned route to host memory)."""
    if isinstance(x, np.ndarray):
        return x
    xp = namespace(x, xp=xp)
    name = namespace_name(xp)
    if name == "torch":
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    if name == "mlx.core":
        mx = sys.modules["mlx.core"]
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x, copy=True)
    return np.asarray(x)


def from_host(a: np.ndarray, xp: ModuleType, *, dtype: Any = None, device: Any = None) -> Any:
    """Move a numpy array into namespace ``xp`` (optionally casting to ``dtype`` on ``device``)."""
    if is_mlx_namespace(xp):
        out = sys.modules["mlx.core"].array(a)
        return out if dtype is None else out.astype(dtype)
    if is_numpy_namespace(xp):
        out = np.asarray(a)
        return out if dtype is None else out.astype(dtype)
    kwargs = {} if device is None else {"device": device}
    return xp.asarray(a, **kwargs) if dtype is None else xp.asarray(a, dtype=dtype, **kwargs)


class HostConstants:
    """Per-target cache of host (numpy) constants moved into a namespace, dtype and device.

    Rotations and quantizers keep their matrices and codebooks as float64 numpy; the first use on
    a new (namespace, dtype, device) moves them once and later calls reuse the moved array.
    """

    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}

    def get(self, name: str, host: np.ndarray, like: Any, xp: ModuleType, *, dtype=None) -> Any:
        """``host`` as an array next to ``like`` (``like``'s dtype unless ``dtype`` is given)."""
        device = device_of(like)
        dtype = like.dtype if dtype is None else dtype
        key = (name, namespace_name(xp), str(dtype), str(device))
        value = self._values.get(key)
        if value is None:
            value = from_host(host, xp, dtype=dtype, device=device)
            self._values[key] = value
        return value

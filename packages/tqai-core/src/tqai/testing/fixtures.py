"""The ``xp`` pytest fixture: one test, run once per importable array backend.

Why it is shaped like this: tqai-core must never import a backend, yet its tests must run on all
of them. So the backends are imported here, by name, through :func:`importlib.import_module` (never
an ``import`` statement, which the core's import-hygiene checks forbid), and only when a test
session asks for them. The fixture yields the library's own namespace (``numpy``, ``torch``,
``mlx.core``, ``array_api_strict``): tests build inputs with :func:`make_array` and tqai functions
resolve namespaces from the arrays through array-api-compat, exactly as a user's call would.

Backends are chosen with ``TQAI_TEST_BACKENDS`` (a comma list of libraries such as ``numpy,torch``
or of backend ids such as ``torch-cuda``; default: all). One that fails to import is left out with a
:class:`BackendUnavailableWarning`, never an error. Test ids are readable: ``numpy``,
``array_api_strict``, ``torch-cpu``, ``torch-cuda``, ``mlx-cpu`` (or ``mlx-gpu`` on Metal).

Backend gaps are declared with a marker, not an ``if`` in the test body::

    @pytest.mark.skip_xp_backends("mlx.core", reason="no unique_values")

Use it from a conftest (third-party plugins included)::

    from tqai.testing.fixtures import register_markers, xp, xp_device  # noqa: F401

    def pytest_configure(config):
        register_markers(config)

or load the module as a plugin (``-p tqai.testing.fixtures``), which also registers the marker.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import pytest

from tqai._xp import from_host, namespace_name
from tqai.testing.asserts import default_device, default_xp

__all__ = [
    "ALL_BACKENDS",
    "ARRAY_API_STRICT_VERSION",
    "ENV_VAR",
    "Backend",
    "BackendUnavailableWarning",
    "available_backends",
    "backend_device",
    "make_array",
    "make_xp_fixture",
    "register_markers",
    "requested_backends",
    "xp",
    "xp_device",
]

ENV_VAR = "TQAI_TEST_BACKENDS"
#: The array libraries the suite knows, in the order their tests run.
ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "mlx.core")
#: array-api-strict is pinned to this standard version where the installed release supports it.
ARRAY_API_STRICT_VERSION = "2024.12"

_ALIASES = {"np": "numpy", "mlx": "mlx.core", "array-api-strict": "array_api_strict"}


class BackendUnavailableWarning(UserWarning):
    """A requested test backend could not be imported; its tests are left out."""


class Backend(NamedTuple):
    """One test backend: a readable id (``torch-cuda``) and the library namespace it runs on."""

    id: str
    module: ModuleType


def _library_of(selector: str) -> str:
    """The library a ``TQAI_TEST_BACKENDS`` entry names (``torch-cuda`` -> ``torch``)."""
    name = _ALIASES.get(selector, selector)
    if name in ALL_BACKENDS:
        return name
    head, sep, _ = selector.partition("-")
    head = _ALIASES.get(head, head)
    if sep and head in ALL_BACKENDS:
        return head
    raise ValueError(
        f"{ENV_VAR}: unknown backend {selector!r}; use any of {', '.join(ALL_BACKENDS)} "
        "or a backend id such as torch-cpu, torch-cuda, mlx-cpu"
    )


def requested_backends(spec: str | None = None) -> tuple[str, ...]:
    """Parse a backend list (default: ``$TQAI_TEST_BACKENDS``; empty or unset means all)."""
    if spec is None:
        spec = os.environ.get(ENV_VAR, "")
    entries = tuple(e.strip() for e in spec.split(",") if e.strip())
    if not entries:
        return ALL_BACKENDS
    for entry in entries:
        _library_of(entry)  # validate early, with a helpful message
    return tuple(_ALIASES.get(e, e) for e in entries)


def _pin_array_api_strict(module: ModuleType) -> None:
    # A release that lacks this version (or the flags API) keeps its own default.
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        module.set_array_api_strict_flags(api_version=ARRAY_API_STRICT_VERSION)


def _backend_ids(library: str, module: ModuleType) -> list[str]:
    if library == "torch":
        return ["torch-cpu"] + (["torch-cuda"] if module.cuda.is_available() else [])
    if library == "mlx.core":
        on_gpu = module.default_device().type == module.DeviceType.gpu
        return ["mlx-gpu" if on_gpu else "mlx-cpu"]
    return [library]


@functools.cache
def _available(spec: str) -> tuple[Backend, ...]:
    selectors = requested_backends(spec)
    libraries = [lib for lib in ALL_BACKENDS if lib in {_library_of(s) for s in selectors}]
    found: list[Backend] = []
    for library in libraries:
        try:
            module = importlib.import_module(library)
        except Exception as exc:  # any failure: missing, broken build, missing shared library
            warnings.warn(
                f"tqai test backend {library!r} is not importable and is skipped: "
                f"{type(exc).__name__}: {exc}",
                BackendUnavailableWarning,
                stacklevel=3,
            )
            continue
        if library == "array_api_strict":
            _pin_array_api_strict(module)
        found.extend(
            Backend(bid, module)
            for bid in _backend_ids(library, module)
            if library in selectors or bid in selectors
        )
    return tuple(found)


def available_backends(spec: str | None = None) -> list[Backend]:
    """The requested backends that import, as ``(id, module)`` pairs (computed once per list)."""
    if spec is None:
        spec = os.environ.get(ENV_VAR, "")
    return list(_available(spec))


def backend_device(backend: Backend) -> Any:
    """The device arrays of ``backend`` are created on (``None``: the library's default)."""
    if backend.id == "torch-cuda":
        return "cuda"
    if backend.id == "torch-cpu":
        return "cpu"
    return None


def make_array(xp: ModuleType, a: Any, dtype: Any = None, *, device: Any = None) -> Any:
    """Copy host data ``a`` into namespace ``xp`` (via :func:`tqai._xp.from_host`).

    ``dtype`` is a dtype of ``xp`` or its name (``"float32"``). ``device`` defaults to the device
    of the backend under test when ``xp`` is the ``xp`` fixture's namespace (``torch-cuda``).
    The data is always copied, so the test's numpy array and the backend array never alias.
    """
    host = np.array(a, copy=True)
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    if device is None and xp is default_xp.get():
        device = default_device.get()
    if dtype is not None and namespace_name(xp) == "torch":
        return xp.asarray(host, dtype=dtype, device=device)  # torch has no top-level astype
    return from_host(host, xp, dtype=dtype, device=device)


def _matches(selector: str, backend: Backend) -> bool:
    selector = _ALIASES.get(selector, selector)
    return selector in (backend.id, namespace_name(backend.module)) or backend.id.startswith(
        selector + "-"
    )


def _skip_marked(request: pytest.FixtureRequest, backend: Backend) -> None:
    for marker in request.node.iter_markers("skip_xp_backends"):
        if any(_matches(s, backend) for s in marker.args):
            reason = marker.kwargs.get("reason") or "backend gap declared by skip_xp_backends"
            pytest.skip(f"{backend.id}: {reason}")


def make_xp_fixture(
    backends: Iterable[Backend] | None = None, *, name: str = "xp"
) -> Callable[..., Any]:
    """Build a pytest fixture named ``name`` parametrized over ``backends`` (default: available).

    While a test runs, :data:`tqai.testing.default_xp` and :data:`tqai.testing.default_device`
    hold the backend under test, so the ``xp_assert_*`` helpers can catch a result in the wrong
    namespace and :func:`make_array` puts data on the right device.
    """
    chosen = list(available_backends() if backends is None else backends)

    @pytest.fixture(name=name, params=[pytest.param(b, id=b.id) for b in chosen])
    def _xp_fixture(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
        backend: Backend = request.param
        _skip_marked(request, backend)
        xp_token = default_xp.set(backend.module)
        device_token = default_device.set(backend_device(backend))
        try:
            yield backend.module
        finally:
            default_device.reset(device_token)
            default_xp.reset(xp_token)

    return _xp_fixture


#: The array namespace under test, parametrized over :func:`available_backends`.
xp = make_xp_fixture()


@pytest.fixture
def xp_device(xp: ModuleType) -> Any:
    """The device the ``xp`` backend creates arrays on (``None``: the library default)."""
    return default_device.get()


def register_markers(config: pytest.Config) -> None:
    """Declare the ``skip_xp_backends`` marker (needed under ``--strict-markers``)."""
    config.addinivalue_line(
        "markers",
        "skip_xp_backends(*backends, reason=None): skip the xp fixture for these backends "
        "(a library such as mlx.core, or an id such as torch-cuda)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Plugin hook, used when this module is loaded with ``-p`` or ``pytest_plugins``."""
    register_markers(config)

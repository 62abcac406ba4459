"""Suite-wide pytest setup: hypothesis profiles, the ``xp`` fixture, hardware-marker skips.

The ``xp`` fixture comes from :mod:`tqai.testing.fixtures` (shipped, so plugins reuse it);
``TQAI_TEST_BACKENDS=numpy,torch`` narrows it. ``HYPOTHESIS_PROFILE`` picks ``dev`` (default),
``ci`` (default when ``CI`` is set: derandomized, no deadline) or ``nightly`` (many examples).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tqai.testing.fixtures import register_markers, xp, xp_device

__all__ = ["xp", "xp_device"]

# The xp fixture only sets which backend runs; it holds no state a generated example could leak.
_SUPPRESS = (HealthCheck.function_scoped_fixture,)

# Parent "default", not the current default: hypothesis itself switches to its own "ci" profile
# when CI is set, and dev/nightly must not inherit that (derandomize, no database).
_BASE = settings.get_profile("default")
settings.register_profile(
    "dev", _BASE, max_examples=25, deadline=None, suppress_health_check=_SUPPRESS
)
settings.register_profile(
    "ci",
    _BASE,
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "nightly",
    _BASE,
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=(*_SUPPRESS, HealthCheck.too_slow),
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


def _cuda_available() -> bool:
    try:
        import torch  # lazily: only when a gpu test is collected
    except Exception:
        return False
    return bool(torch.cuda.is_available())


def _metal_available() -> bool:
    try:
        import mlx.core as mx  # lazily: only when a metal test is collected
    except Exception:
        return False
    return bool(mx.metal.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {
        "gpu": (_cuda_available, "needs a CUDA GPU (torch.cuda.is_available() is False)"),
        "metal": (_metal_available, "needs Apple Metal (mlx.core.metal.is_available() is False)"),
    }
    available: dict[str, bool] = {}
    for item in items:
        for marker, (check, reason) in checks.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in available:
                available[marker] = check()
            if not available[marker]:
                item.add_marker(pytest.mark.skip(reason=reason))

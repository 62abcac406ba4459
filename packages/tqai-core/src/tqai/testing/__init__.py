"""Test helpers for tqai and its plugins: assertions, the ``xp`` fixture, hypothesis data.

Why it is shaped like this: the backends and third-party plugins test against the same rules as
the core, so the rules ship with the core. ``import tqai.testing`` needs only numpy: the
assertions load eagerly, while the pytest fixtures (:mod:`tqai.testing.fixtures`) and the
hypothesis helpers (:mod:`tqai.testing.arrays`) load on first use, since pytest and hypothesis
are test dependencies, not dependencies of tqai-core.
"""

from __future__ import annotations

import importlib
from typing import Any

from tqai.testing.asserts import (
    assert_parity,
    default_device,
    default_rtol,
    default_xp,
    dtype_name,
    xp_assert_close,
    xp_assert_equal,
)
from tqai.testing.stores import TIERED_PIPELINE, stored_widths

__all__ = [
    "TIERED_PIPELINE",
    "assert_parity",
    "available_backends",
    "bits_and_codes",
    "codes_arrays",
    "default_device",
    "default_rtol",
    "default_xp",
    "dtype_name",
    "float_vectors",
    "make_array",
    "n_bits_values",
    "stored_widths",
    "xp_assert_close",
    "xp_assert_equal",
]

_LAZY = {
    "available_backends": "tqai.testing.fixtures",
    "make_array": "tqai.testing.fixtures",
    "bits_and_codes": "tqai.testing.arrays",
    "codes_arrays": "tqai.testing.arrays",
    "float_vectors": "tqai.testing.arrays",
    "n_bits_values": "tqai.testing.arrays",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tqai.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

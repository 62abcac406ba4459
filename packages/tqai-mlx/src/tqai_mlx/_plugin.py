"""Entry-point target for tqai-mlx: the ``tqai.backends`` value ``BACKEND``.

Loading this module does not import mlx: ``info`` imports it when called, ``detects`` only reads
module names, and ``patch``/``unpatch`` import :mod:`tqai_mlx.patching` (mlx, mlx-lm) when
called.
"""

from __future__ import annotations

from typing import Any

from tqai.backend import Backend, module_detector

__all__ = ["BACKEND"]


def _info() -> dict[str, object]:
    """Return the mlx version, its default device and whether Metal is available."""
    import mlx.core as mx

    return {
        "mlx": mx.__version__,
        "default device": str(mx.default_device()),
        "metal available": mx.metal.is_available(),
    }


def _patch(model: Any, **kwargs: Any) -> list[Any]:
    """``tqai_mlx.patch`` (imported on first use)."""
    from tqai_mlx.patching import patch

    return patch(model, **kwargs)


def _unpatch(model: Any) -> None:
    """``tqai_mlx.unpatch`` (imported on first use)."""
    from tqai_mlx.patching import unpatch

    unpatch(model)


BACKEND = Backend(
    name="mlx",
    package="tqai-mlx",
    array_namespace="mlx.core",
    info=_info,
    detects=module_detector("mlx", "mlx_lm"),
    patch=_patch,
    unpatch=_unpatch,
)

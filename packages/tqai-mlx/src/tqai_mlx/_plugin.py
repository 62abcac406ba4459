"""Entry-point target for tqai-mlx: the ``tqai.backends`` value ``BACKEND``.

Loading this module does not import mlx: ``info`` imports it when called, and ``detects`` only
reads module names.
"""

from __future__ import annotations

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


BACKEND = Backend(
    name="mlx",
    package="tqai-mlx",
    array_namespace="mlx.core",
    info=_info,
    detects=module_detector("mlx", "mlx_lm"),
)

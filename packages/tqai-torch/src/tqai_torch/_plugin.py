"""Entry-point target for tqai-torch: the ``tqai.backends`` value ``BACKEND``.

Loading this module imports neither torch nor triton: ``info`` imports them when called, and
``detects`` only reads module names, so ``tqai plugins`` stays fast.
"""

from __future__ import annotations

from tqai.backend import Backend, module_detector

__all__ = ["BACKEND"]


def _info() -> dict[str, object]:
    """Return torch and triton versions and the devices torch can use."""
    import torch

    cuda = torch.cuda.is_available()
    devices = ["cpu"]
    if cuda:
        devices += [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]
    if torch.backends.mps.is_available():
        devices.append("mps")
    try:
        import triton
    except ImportError:
        triton_version = None
    else:
        triton_version = triton.__version__
    return {
        "torch": torch.__version__,
        "cuda available": cuda,
        "cuda": torch.version.cuda,
        "devices": devices,
        "triton": triton_version,
    }


def _patch(model: object, **kwargs: object) -> object:
    """``tqai.patch`` for transformers models: :func:`tqai_torch.patch` (imported on call)."""
    from tqai_torch.patching import patch

    return patch(model, **kwargs)


def _unpatch(model: object) -> None:
    from tqai_torch.patching import unpatch

    unpatch(model)


BACKEND = Backend(
    name="torch",
    package="tqai-torch",
    array_namespace="torch",
    info=_info,
    detects=module_detector("torch", "transformers"),
    patch=_patch,
    unpatch=_unpatch,
)

"""Entry-point target for tqai-diffusers: the ``tqai.backends`` value ``BACKEND``.

diffusers runs on torch, so ``info`` adds the diffusers version to tqai-torch's report of torch
versions and devices. Loading this module imports neither diffusers nor torch.
"""

from __future__ import annotations

from tqai.backend import Backend, module_detector
from tqai_torch._plugin import BACKEND as TORCH_BACKEND

__all__ = ["BACKEND"]


def _info() -> dict[str, object]:
    """Return the diffusers version plus torch's versions and devices."""
    import diffusers

    return {"diffusers": diffusers.__version__, **TORCH_BACKEND.info()}


BACKEND = Backend(
    name="diffusers",
    package="tqai-diffusers",
    array_namespace="torch",
    info=_info,
    detects=module_detector("diffusers"),
)

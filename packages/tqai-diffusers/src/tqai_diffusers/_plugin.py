"""Entry-point target for tqai-diffusers: the ``tqai.backends`` value ``BACKEND``.

diffusers runs on torch, so ``info`` adds the diffusers version to tqai-torch's report of torch
versions and devices; ``patch``/``unpatch`` are :func:`tqai_diffusers.apply_tqai` and
:func:`tqai_diffusers.remove_tqai`. Loading this module imports neither diffusers nor torch.
"""

from __future__ import annotations

from tqai.backend import Backend, module_detector
from tqai_torch._plugin import BACKEND as TORCH_BACKEND

__all__ = ["BACKEND"]


def _info() -> dict[str, object]:
    """Return the diffusers version plus torch's versions and devices."""
    import diffusers

    return {"diffusers": diffusers.__version__, **TORCH_BACKEND.info()}


def _patch(model: object, **kwargs: object) -> object:
    """``tqai.patch`` for diffusers: ``apply_tqai(model, TqaiConfig(**kwargs))``; returns the stats.

    ``config=`` passes a ready :class:`tqai_diffusers.TqaiConfig` instead of its fields.
    """
    from tqai_diffusers.config import TqaiConfig
    from tqai_diffusers.patching import apply_tqai, get_stats

    config = kwargs.pop("config", None)
    if config is not None and kwargs:
        raise TypeError(
            f"pass either config= or TqaiConfig fields, not both (got {sorted(kwargs)})"
        )
    if config is None:
        try:
            config = TqaiConfig(**kwargs)  # type: ignore[arg-type]
        except TypeError as ex:
            raise TypeError(
                f"tqai.patch on a diffusers model takes TqaiConfig fields: {ex}"
            ) from None
    apply_tqai(model, config)  # type: ignore[arg-type]
    return get_stats(model)


def _unpatch(model: object) -> None:
    from tqai_diffusers.patching import remove_tqai

    remove_tqai(model)


BACKEND = Backend(
    name="diffusers",
    package="tqai-diffusers",
    array_namespace="torch",
    info=_info,
    detects=module_detector("diffusers"),
    patch=_patch,
    unpatch=_unpatch,
)

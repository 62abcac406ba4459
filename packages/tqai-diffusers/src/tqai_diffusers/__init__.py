"""tqai_diffusers: tqai for diffusers video pipelines (WAN 2.x, LTX).

Registered through the ``tqai.backends`` entry point, so ``tqai.patch(pipe, ...)`` reaches
:func:`apply_tqai` for diffusers pipelines and transformers. The public names load on first use:
importing the plugin module (``tqai_diffusers._plugin``) imports neither torch nor diffusers.

Example:
    >>> import tqai_diffusers  # doctest: +SKIP
    >>> tqai_diffusers.optimize_vae_memory(pipe)  # doctest: +SKIP
    >>> tqai_diffusers.apply_tqai(pipe, tqai_diffusers.TqaiConfig(strategy="delta"))  # doctest: +SKIP
    >>> tqai_diffusers.remove_tqai(pipe)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__all__ = [
    "TqaiConfig",
    "TqaiStats",
    "__version__",
    "apply_tqai",
    "get_stats",
    "optimize_vae_memory",
    "patch_mps_compatibility",
    "remove_tqai",
]

__version__ = importlib.metadata.version("tqai-diffusers")

_LAZY = {
    "TqaiConfig": "tqai_diffusers.config",
    "TqaiStats": "tqai_diffusers.hooks",
    "apply_tqai": "tqai_diffusers.patching",
    "get_stats": "tqai_diffusers.patching",
    "remove_tqai": "tqai_diffusers.patching",
    "optimize_vae_memory": "tqai_diffusers.vae",
    "patch_mps_compatibility": "tqai_diffusers.mps",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tqai_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

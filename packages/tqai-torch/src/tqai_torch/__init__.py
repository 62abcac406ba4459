"""tqai_torch: the PyTorch backend of tqai (transformers KV cache, attention, kernels).

Registered through the ``tqai.backends`` entry point; ``tqai.patch(model)`` reaches
:func:`patch` for transformers models. The public names are loaded on first use, so importing
the plugin module (``tqai_torch._plugin``) does not import torch or transformers.

Example:
    >>> import tqai_torch  # doctest: +SKIP
    >>> cache = tqai_torch.patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
    >>> model.generate(**inputs, cache=cache, max_new_tokens=64)  # doctest: +SKIP
    >>> tqai_torch.unpatch(model)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__all__ = ["TqaiCache", "TqaiLayer", "__version__", "new_cache", "patch", "unpatch"]

__version__ = importlib.metadata.version("tqai-torch")

_LAZY = {
    "TqaiCache": "tqai_torch.cache",
    "TqaiLayer": "tqai_torch.cache",
    "new_cache": "tqai_torch.patching",
    "patch": "tqai_torch.patching",
    "unpatch": "tqai_torch.patching",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tqai_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

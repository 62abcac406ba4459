"""tqai_mlx: the MLX backend of tqai (mlx-lm caches, model patching, Metal kernels).

Why it is shaped like this: the ``tqai.backends`` entry point loads ``tqai_mlx._plugin``, which
imports this package first, and ``tqai plugins`` must stay fast and work where mlx-lm is not
installed. So nothing here imports mlx or mlx-lm: the public names below are resolved on first
use (PEP 562 ``__getattr__``).

Example:
    >>> import tqai_mlx
    >>> cache = tqai_mlx.patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
    >>> mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)  # doctest: +SKIP
    >>> tqai_mlx.unpatch(model)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__all__ = [
    "TqaiKVCache",
    "__version__",
    "is_patched",
    "load_cache",
    "patch",
    "save_cache",
    "unpatch",
]

__version__ = importlib.metadata.version("tqai-mlx")

_LAZY = {
    "TqaiKVCache": "tqai_mlx.cache",
    "is_patched": "tqai_mlx.patching",
    "patch": "tqai_mlx.patching",
    "unpatch": "tqai_mlx.patching",
    "load_cache": "tqai_mlx.prompt_cache",
    "save_cache": "tqai_mlx.prompt_cache",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tqai_mlx' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(
            f"tqai_mlx.{name} needs mlx and mlx-lm ({exc}); install them with "
            "`pip install tqai-mlx[lm]`"
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

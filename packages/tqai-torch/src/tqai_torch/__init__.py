"""tqai_torch: the PyTorch backend of tqai (transformers KV cache, attention, kernels).

Registered through the ``tqai.backends`` entry point; ``tqai.patch(model)`` reaches
:func:`patch` for transformers models.

Example:
    >>> import tqai_torch  # doctest: +SKIP
    >>> cache = tqai_torch.patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
    >>> model.generate(**inputs, cache=cache, max_new_tokens=64)  # doctest: +SKIP
    >>> tqai_torch.unpatch(model)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata

from tqai_torch.cache import TqaiCache, TqaiLayer
from tqai_torch.patch import new_cache, patch, unpatch

__all__ = ["TqaiCache", "TqaiLayer", "__version__", "new_cache", "patch", "unpatch"]

__version__ = importlib.metadata.version("tqai-torch")

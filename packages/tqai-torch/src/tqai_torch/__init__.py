"""tqai_torch: the torch backend of tqai (registered through the ``tqai.backends`` entry point)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["__version__"]

__version__ = importlib.metadata.version("tqai-torch")

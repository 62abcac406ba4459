"""A cache of quantizers by vector size and bit width, resolved through ``tqai.quantizers``.

Strategies spend different bit widths on different tokens (and monitors move the width from step
to step), so they ask for quantizers by ``(d, n_bits)`` instead of holding one. Building a
TurboQuant quantizer costs a rotation matrix and a codebook, so each is built once and kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from tqai.codebooks import validate_dim, validate_n_bits
from tqai.pipeline.protocols import Quantizer
from tqai.registry import registry

__all__ = ["QuantizerBank"]


class QuantizerBank:
    """Quantizers of one kind, one per ``(d, n_bits)``, built on first use.

    Args:
        kind: a ``tqai.quantizers`` plugin name: ``"mse"`` (TurboQuant_mse, default) or
            ``"prod"`` (TurboQuant_prod), or a third-party one.
        options: keyword arguments for the quantizer class besides ``d`` and ``n_bits``
            (``rotation``, ``seed``, ``norm_dtype``...). Empty means the class defaults, so
            ``QuantizerBank().get(d, b)`` decodes exactly like ``TurboQuantMSE(d, b)``.

    Example:
        >>> bank = QuantizerBank("mse", options={"seed": 7})
        >>> q = bank.get(64, 3)
        >>> q is bank.get(64, 3), q.spec.seed
        (True, 7)
    """

    def __init__(self, kind: str = "mse", *, options: Mapping[str, Any] | None = None) -> None:
        self.kind = kind
        self.options = dict(options or {})
        self._factory = registry("tqai.quantizers").get(kind)
        self._built: dict[tuple[int, int], Quantizer] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"QuantizerBank({self.kind!r}, options={self.options!r})"

    def get(self, d: int, n_bits: int) -> Quantizer:
        """The quantizer for ``d``-vectors at ``n_bits`` bits per coordinate."""
        key = (validate_dim(d), validate_n_bits(n_bits))
        with self._lock:
            quantizer = self._built.get(key)
            if quantizer is None:
                quantizer = self._factory(key[0], key[1], **self.options)
                self._built[key] = quantizer
            return quantizer

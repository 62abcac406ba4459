"""Activation compression: quantize-dequantize hidden states and FFN activations with TurboQuant.

Why it is shaped like this: KV compression keeps codes in a cache, but activations are consumed
right after they are made, so compressing them means passing each activation vector through the
TurboQuant_mse codec (rotation, Lloyd-Max codes, norm) and handing the reconstruction on: the
error the model sees is exactly what storing or sending the codes would cost (the "named configs"
of SPEC.md: kv+hidden8, all6, ...). This module holds the math only, on any array namespace;
tqai-torch and tqai-mlx attach it to models with forward hooks (``tqai_torch.activations``,
``tqai_mlx.activations``).

Two streams can be compressed, each vector along the model's last axis:

- ``hidden``: the output hidden state of every decoder layer, ``(B, T, hidden_size)``;
- ``ffn``: the FFN activations, i.e. the input of each FFN's down projection,
  ``(B, T, intermediate_size)`` (the largest activation of a transformer block).

Norms are kept in float32 (residual-stream norms can exceed float16's range). Every vector size
gets one quantizer (rotation seeded by ``seed``, ``seed + 1`` for the FFN stream), built on first
use and reused.

Example:
    >>> import numpy as np
    >>> from tqai.activations import ActivationCompressor
    >>> compress = ActivationCompressor(n_bits=8)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 96)).astype(np.float32)
    >>> y = compress(x)
    >>> y.shape, y.dtype, bool(np.sum((y - x) ** 2) / np.sum(x**2) < 1e-3)
    ((2, 5, 96), dtype('float32'), True)
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from tqai import _xp
from tqai.codebooks import validate_n_bits
from tqai.quantizers import TurboQuantMSE

__all__ = ["STREAMS", "ActivationCompressor", "ActivationConfig"]

STREAMS = ("hidden", "ffn")


@dataclass(frozen=True, kw_only=True, slots=True)
class ActivationConfig:
    """Which activations are compressed, at how many bits.

    Attributes:
        hidden_bits: bits per coordinate of decoder-layer outputs (1..8), or None (untouched).
        ffn_bits: bits per coordinate of FFN activations (1..8), or None (untouched).
        rotation: ``"haar"`` (default), ``"hadamard"``, ``"rotor"`` or a rotation plugin.
        seed: rotation seed of the hidden stream; the FFN stream uses ``seed + 1``.
    """

    hidden_bits: int | None = None
    ffn_bits: int | None = None
    rotation: str = "haar"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_bits", "ffn_bits"):
            value = getattr(self, name)
            if value is not None:
                validate_n_bits(value, name=name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        """Whether any stream is compressed."""
        return self.hidden_bits is not None or self.ffn_bits is not None

    def bits(self, stream: str) -> int | None:
        """The bits of ``stream`` (``"hidden"`` or ``"ffn"``), None when it is not compressed."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        return self.hidden_bits if stream == "hidden" else self.ffn_bits

    def compressor(self, stream: str) -> ActivationCompressor | None:
        """A fresh compressor for ``stream``, or None when it is not compressed."""
        bits = self.bits(stream)
        if bits is None:
            return None
        seed = self.seed + (stream == "ffn")
        return ActivationCompressor(n_bits=bits, rotation=self.rotation, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


class ActivationCompressor:
    """Quantize-dequantize ``(..., d)`` vectors with TurboQuant_mse at ``n_bits`` bits.

    Args:
        n_bits: bits per coordinate, 1..8.
        rotation: rotation kind of the quantizers.
        seed: rotation seed (one quantizer per vector size ``d``, all with this seed).

    Calling it on ``x (..., d)`` (any floating dtype, any namespace) returns the reconstruction,
    same shape, dtype and namespace. Thread-safe: quantizers are built under a lock.
    """

    def __init__(self, *, n_bits: int, rotation: str = "haar", seed: int = 0) -> None:
        self.n_bits = validate_n_bits(n_bits)
        self.rotation = rotation
        self.seed = seed
        self._quantizers: dict[int, TurboQuantMSE] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ActivationCompressor(n_bits={self.n_bits}, rotation={self.rotation!r}, "
            f"seed={self.seed})"
        )

    def quantizer(self, d: int) -> TurboQuantMSE:
        """The quantizer of size-``d`` vectors (built once)."""
        q = self._quantizers.get(d)
        if q is None:
            with self._lock:
                q = self._quantizers.get(d)
                if q is None:
                    q = TurboQuantMSE(
                        d, self.n_bits, rotation=self.rotation, seed=self.seed, norm_dtype="float32"
                    )
                    self._quantizers[d] = q
        return q

    def __call__(self, x: Any, *, xp: ModuleType | None = None) -> Any:
        xp = _xp.namespace(x, xp=xp)
        q = self.quantizer(int(x.shape[-1]))
        return q.dequantize(q.quantize(x, xp=xp), xp=xp)

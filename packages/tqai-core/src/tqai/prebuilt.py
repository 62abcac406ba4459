"""Prebuilt host constants (rotation factors, Lloyd-Max centroids) filled from a converted folder.

Why it is shaped like this: a quantizer's rotation (a seeded QR of a ``d x d`` Gaussian matrix
for ``haar``) and its codebook (a Lloyd-Max solve for head dims without a shipped table) are
computed on first use. ``tqai convert`` writes them next to a model (:mod:`tqai.pretrained`);
loading that folder puts them here, and :mod:`tqai.rotations` and :mod:`tqai.codebooks` look here
before computing anything. The values are exactly those the computation gives (the folder was
written from it and is checksummed), so this is a cache, not a second source of truth: which
quantizer a spec means does not change. Process-wide, guarded by a lock; leaf module (imports
nothing of tqai) so the low-level modules can consult it.

Example:
    >>> import numpy as np
    >>> from tqai import prebuilt
    >>> prebuilt.install_codebook(7, 1, np.array([-0.3, 0.3]))
    >>> prebuilt.centroids(7, 1)
    array([-0.3,  0.3])
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = [
    "centroids",
    "clear",
    "install_codebook",
    "install_rotation",
    "rotation_arrays",
]

_lock = threading.Lock()
_rotations: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
_codebooks: dict[tuple[int, int], np.ndarray] = {}


def install_rotation(kind: str, d: int, seed: int, arrays: dict[str, np.ndarray]) -> None:
    """Record the host arrays of rotation ``(kind, d, seed)`` (names as the rotation defines)."""
    with _lock:
        _rotations[(kind, int(d), int(seed))] = {k: np.asarray(v) for k, v in arrays.items()}


def rotation_arrays(kind: str, d: int, seed: int) -> dict[str, np.ndarray] | None:
    """The recorded host arrays of a rotation, or None (then it is computed)."""
    return _rotations.get((kind, int(d), int(seed)))


def install_codebook(d: int, n_bits: int, values: np.ndarray) -> None:
    """Record the Lloyd-Max centroids for ``(d, n_bits)``."""
    with _lock:
        _codebooks[(int(d), int(n_bits))] = np.asarray(values, dtype=np.float64)


def centroids(d: int, n_bits: int) -> np.ndarray | None:
    """The recorded centroids for ``(d, n_bits)``, or None (then they are solved)."""
    return _codebooks.get((int(d), int(n_bits)))


def clear() -> None:
    """Forget everything recorded (tests)."""
    with _lock:
        _rotations.clear()
        _codebooks.clear()

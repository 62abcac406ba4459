"""RotorQuantizer: TurboQuant_mse with the O(d) block-diagonal quaternion rotation (``rotor``).

TurboQuant (Zandieh et al., ICLR 2026, arXiv:2504.19874, Algorithm 1) needs a random rotation so
that every coordinate follows the density its codebook is built for. A dense Haar rotation costs
O(d^2) per vector; :class:`tqai.rotations.RotorRotation` costs O(d): a seeded permutation, then
3x3 rotations from uniformly random unit quaternions (a 2x2 rotation or a sign for ``d mod 3``).
This module only binds the two: all the math is :class:`tqai.quantizers.TurboQuantMSE`'s with
``rotation="rotor"``, so a ``RotorQuantizer`` and ``TurboQuantMSE(rotation="rotor")`` of the same
seed give identical codes, norms and specs and decode each other's tensors.

The trade-off (see the README's distortion table): block rotations mix coordinates only within a
block, so a random-looking vector is spread as well as by Haar, but a single outlier channel is
spread over 3 coordinates, not d.
"""

from __future__ import annotations

from tqai.quantizers import TurboQuantMSE

__all__ = ["RotorQuantizer"]


class RotorQuantizer(TurboQuantMSE):
    """TurboQuant_mse with the block-diagonal quaternion (rotor) rotation.

    Args:
        d: vector size (>= 2).
        n_bits: bits per coordinate, 1..8.
        rotation: must be ``"rotor"``; accepted so generic code that passes ``rotation=`` to any
            ``tqai.quantizers`` plugin works unchanged.
        seed: rotation seed; the same seed gives the same codes on every backend.
        norm_dtype: ``"float16"`` (default) or ``"float32"``.

    Example:
        >>> import numpy as np
        >>> q = RotorQuantizer(d=96, n_bits=3)
        >>> x = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
        >>> qt = q.quantize(x)
        >>> qt.spec.rotation, qt.packed.shape
        ('rotor', (8, 36))
        >>> bool(np.sum((q.dequantize(qt) - x) ** 2) / np.sum(x**2) < 0.05)
        True
    """

    def __init__(
        self,
        d: int,
        n_bits: int,
        *,
        rotation: str = "rotor",
        seed: int = 0,
        norm_dtype: str = "float16",
    ) -> None:
        if rotation != "rotor":
            raise ValueError(
                f"RotorQuantizer always uses rotation='rotor', got {rotation!r}; use "
                "TurboQuantMSE for other rotations"
            )
        super().__init__(d, n_bits, rotation="rotor", seed=seed, norm_dtype=norm_dtype)

"""Fused kernels of the MLX backend, one folder per kernel language (only Metal so far).

Every kernel mirrors an MLX-ops path with the same inputs and outputs, and is used only when
asked for (``kernel="metal"`` in :func:`tqai_mlx.patch`, or ``TQAI_KERNEL=metal``): the default
stays the MLX-ops path until a parity test has run on Apple hardware.
"""

from __future__ import annotations

__all__: list[str] = []

"""Metal kernels (``mx.fast.metal_kernel``) for TurboQuant encode and decode attention.

Why it is shaped like this: these machines have no Metal, so each kernel sits next to the MLX-ops
path it must reproduce, with the same inputs and outputs, and the launchers take an ``impl``
switch so that everything around the kernel (argument preparation, the merge with full-precision
segments, the final rotation) runs and is tested on MLX's CPU build with the MLX-ops twin in the
kernel's place. ``tests/mlx_backend/test_metal_kernels_parity.py`` compares the two on Metal
(``@pytest.mark.metal``; skipped elsewhere). Until those parity tests have passed on Apple
hardware, nothing selects these kernels by default.

- :mod:`tqai_mlx.kernels.metal.encode`: rotate, normalize, nearest centroid and bit-pack
  (TurboQuant_mse, Algorithm 1 of arXiv:2504.19874), mirroring ``TurboQuantMSE.quantize``.
- :mod:`tqai_mlx.kernels.metal.decode_attention`: one query token against the packed history,
  online softmax in the rotated domains (arXiv:2504.19874, Section 4; FlashAttention's recurrence,
  arXiv:2205.14135), mirroring the history part of :func:`tqai.attention.compressed_attention`.
"""

from __future__ import annotations

from tqai_mlx.kernels.metal.decode_attention import decode_attention, decode_supported
from tqai_mlx.kernels.metal.encode import MetalEncoder, encode_metal

__all__ = ["MetalEncoder", "decode_attention", "decode_supported", "encode_metal"]

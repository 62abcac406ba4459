"""Metal encode kernel: TurboQuant_mse quantization of vectors into packed codes and norms.

Mirrors ``tqai.quantizers.TurboQuantMSE.quantize`` (Algorithm 1 of arXiv:2504.19874, run on
MLX ops): ``norm = ||x||``, ``y = Pi (x / norm)``, code = the number of decision boundaries below
each coordinate (the nearest Lloyd-Max centroid; a value on a boundary goes to the lower cell),
codes bit-packed in the layout of :mod:`tqai.packing` (groups of 8 codes form one little-endian
bit stream of ``n_bits`` bytes). Same inputs (vectors and the quantizer), same output (a
:class:`~tqai.container.QuantizedTensor` with the same spec, shapes and dtypes).

One thread per (vector, group of 8 coordinates): it computes the norm, its 8 rotated
coordinates (a row-vector times the dense ``Pi^T``, which every rotation kind provides through
``Rotation.matrix()``), their codes, and writes its ``n_bits`` bytes. Codes can differ from the
MLX-ops path only where float rounding moves a coordinate across a boundary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx

from tqai.container import QuantizedTensor, dtype_name
from tqai.quantizers import TurboQuantMSE

__all__ = ["MetalEncoder", "encode_metal"]

_FLOAT16_MAX = 65504.0

_SOURCE = """
    uint tid = thread_position_in_grid.x;
    uint n_vec = x_shape[0];
    uint n = tid / GROUPS;
    uint g = tid % GROUPS;
    if (n >= n_vec) {
        return;
    }
    const device float* xv = x + n * D;
    float ss = 0.0f;
    for (uint i = 0; i < D; ++i) {
        float v = xv[i];
        ss += v * v;
    }
    float norm = metal::sqrt(ss);
    float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
    ulong stream = 0;
    for (uint c = 0; c < 8; ++c) {
        uint j = g * 8 + c;
        uint code = 0;
        if (j < D) {
            float y = 0.0f;
            for (uint i = 0; i < D; ++i) {
                y += xv[i] * rot_t[i * D + j];
            }
            y *= inv;
            for (uint k = 0; k < N_BOUNDS; ++k) {
                code += (y > bounds[k]) ? 1u : 0u;
            }
        }
        stream |= ((ulong)code) << (BITS * c);
    }
    device uint8_t* out = packed + n * (GROUPS * BITS) + g * BITS;
    for (uint k = 0; k < BITS; ++k) {
        out[k] = (uint8_t)((stream >> (8 * k)) & 0xFF);
    }
    if (g == 0) {
        norms[n] = norm;
    }
"""


@functools.cache
def _kernel() -> Any:
    return mx.fast.metal_kernel(
        name="tqai_encode_mse",
        input_names=["x", "rot_t", "bounds"],
        output_names=["packed", "norms"],
        source=_SOURCE,
    )


@functools.lru_cache(maxsize=64)
def _rotation_t(quantizer: TurboQuantMSE) -> mx.array:
    """The dense ``Pi^T`` of a quantizer's rotation as float32 (cached per quantizer)."""
    return mx.array(quantizer.rotation.matrix().T).astype(mx.float32)


def encode_metal(x: mx.array, quantizer: TurboQuantMSE) -> QuantizedTensor:
    """``quantizer.quantize(x)`` on the Metal encode kernel.

    Args:
        x: ``(..., d)`` floating vectors (any float dtype; the math runs in float32).
        quantizer: a :class:`~tqai.quantizers.TurboQuantMSE` of size ``d``.

    Returns:
        The same :class:`~tqai.container.QuantizedTensor` the MLX-ops path returns: packed
        ``(..., ceil(d / 8) * n_bits)`` uint8 codes and ``(...)`` norms in the spec's dtype.

    Raises:
        NotImplementedError: ``quantizer`` is not TurboQuant_mse (QJL keys use the MLX path).
        ValueError: as the MLX-ops path: wrong size, non-finite values, a norm out of range.
    """
    spec = quantizer.spec
    if spec.kind != "mse":
        raise NotImplementedError("the Metal encode kernel covers TurboQuant_mse only")
    d, n_bits = spec.d, spec.n_bits
    if x.ndim < 1 or x.shape[-1] != d or x.size == 0:
        raise ValueError(f"x must be a non-empty array of shape (..., {d}), got {tuple(x.shape)}")
    if not mx.all(mx.isfinite(x)).item():
        raise ValueError("x contains NaN or Inf; only finite values can be quantized")
    lead = tuple(x.shape[:-1])
    flat = x.reshape(-1, d).astype(mx.float32)
    groups = math.ceil(d / 8)
    threads = flat.shape[0] * groups
    packed, norms = _kernel()(
        inputs=[flat, _rotation_t(quantizer), quantizer.constant("boundaries", flat)],
        template=[("D", d), ("BITS", n_bits), ("GROUPS", groups), ("N_BOUNDS", 2**n_bits - 1)],
        grid=(threads, 1, 1),
        threadgroup=(min(256, threads), 1, 1),
        output_shapes=[(flat.shape[0], groups * n_bits), (flat.shape[0],)],
        output_dtypes=[mx.uint8, mx.float32],
    )
    if spec.norm_dtype == "float16" and mx.any(norms > _FLOAT16_MAX).item():
        raise ValueError(
            f"a vector norm exceeds float16's range ({_FLOAT16_MAX}); use norm_dtype='float32'"
        )
    return QuantizedTensor(
        spec=spec,
        shape=lead,
        dtype=dtype_name(x),
        packed=packed.reshape(*lead, groups * n_bits),
        norms=norms.reshape(lead).astype(getattr(mx, spec.norm_dtype)),
    )


class MetalEncoder:
    """A TurboQuant_mse quantizer whose ``quantize`` runs :func:`encode_metal`.

    Every other attribute (spec, rotation, codebook, ``dequantize``, ...) is the wrapped
    quantizer's, so a :class:`~tqai.kvstore.KVStore` holding it encodes on Metal and decodes and
    attends exactly as before.
    """

    def __init__(self, quantizer: TurboQuantMSE) -> None:
        self.inner = quantizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"MetalEncoder({self.inner!r})"

    def quantize(self, x: mx.array, *, xp: Any = None) -> QuantizedTensor:
        return encode_metal(x, self.inner)

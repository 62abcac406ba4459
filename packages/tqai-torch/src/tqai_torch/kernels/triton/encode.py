"""Fused TurboQuant_mse encode (Triton): norm, rotation, nearest centroid, bit packing, one launch.

Reference: :meth:`tqai.quantizers.TurboQuantMSE.quantize` (the parity tests compare against it).

Each program takes ``BLOCK_M`` vectors: it splits off the norm exactly as the reference does
(rows scaled by their largest magnitude before squaring, so no finite vector over- or underflows;
a zero vector gets norm 0 and codes of the unit vector 0), rotates the unit vectors with the
quantizer's rotation (a dense matmul in chunks of 64 input dims, ``tf32x3`` on the tensor
cores, about float32 accuracy), counts the codebook boundaries below every coordinate (the
nearest centroid; a value equal to a boundary goes to the lower cell, as in the reference;
8-bit codebooks by binary search), packs 8 codes of ``b`` bits into ``b`` bytes LSB-first (the
layout of :mod:`tqai.packing`) and stores the packed rows and the fp16 norms. ``out=`` writes
them in place, e.g. into the spare capacity of a growable history.

Codes can differ from the reference only where a rotated coordinate lies within float32
rounding of a boundary (the two rotations round differently); the tests bound how often.

Not here (the reference does it): the input checks that need the host (NaN/Inf, norms beyond
fp16's range); :func:`quantize_triton` checks those only when ``check=True``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from tqai.container import QuantizedTensor, dtype_name
from tqai_torch.kernels.triton.launch import FastLaunch, int_types_key, ints_key, pointers_key

__all__ = ["TritonEncoder", "quantize_triton", "supports"]

_BITS = (1, 2, 3, 4, 8)
_FLOAT16_MAX = 65504.0
# the outputs are views into a history at any token offset: specialized on their 16-byte
# alignment, the kernel would compile a second time partway through a generation (a norm row
# is 16-byte aligned every eighth token), seconds in the middle of a decode step. Not
# specialized (where the installed Triton can say so), nothing is lost: the stores are per
# byte and per row anyway
_OUT_POINTERS = ["packed_ptr", "norm_ptr"]
_UNALIGNED = (
    {"do_not_specialize_on_alignment": _OUT_POINTERS}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
    else {}
)


@triton.jit(do_not_specialize=["n_rows"], **_UNALIGNED)
def _encode_kernel(
    x_ptr,  # (n_rows, D) rows, last stride 1
    stride_x,
    rot_ptr,  # (DP, DP) float32: Pi^T padded with zeros
    bound_ptr,  # (2**BITS - 1,) float32 boundaries, sorted
    packed_ptr,  # (n_rows, WR * BITS) uint8 out (rows of stride_p bytes)
    stride_p,
    norm_ptr,  # (n_rows,) fp16 out (stride_n)
    stride_n,
    n_rows,
    BITS: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    WR: tl.constexpr,  # packing groups per row: ceil(D / 8)
    WP: tl.constexpr,  # DP / 8
    DC: tl.constexpr,  # input dims per rotation chunk
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.arange(0, DP)
    x = tl.load(
        x_ptr + rows[:, None] * stride_x + dims[None, :],
        mask=row_ok[:, None] & (dims < D)[None, :],
        other=0.0,
    ).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # IEEE division and square root, as torch computes the reference (not the fast approximations)
    amax_safe = tl.where(amax > 0, amax, 1.0)
    scaled = tl.div_rn(x, amax_safe[:, None])
    scaled_norm = tl.sqrt_rn(tl.sum(scaled * scaled, axis=1))
    norm = amax * scaled_norm
    norm_safe = tl.where(scaled_norm > 0, scaled_norm, 1.0)
    # rotate the unit vectors in chunks of 64 input dims (the whole rotation of a 256-dim head
    # would not fit in shared memory): the chunk is reloaded and normalized like the whole row
    cols = tl.arange(0, DP)
    y = tl.zeros((BLOCK_M, DP), tl.float32)
    for d0 in tl.static_range(0, DP, DC):
        part = d0 + tl.arange(0, DC)
        x_c = tl.load(
            x_ptr + rows[:, None] * stride_x + part[None, :],
            mask=row_ok[:, None] & (part < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        unit_c = tl.div_rn(tl.div_rn(x_c, amax_safe[:, None]), norm_safe[:, None])
        rot = tl.load(rot_ptr + part[:, None] * DP + cols[None, :])
        y += tl.dot(unit_c, rot, input_precision="tf32x3")  # rotated unit vectors
    codes = tl.zeros((BLOCK_M, DP), tl.int32)
    if BITS <= 4:  # count the boundaries below each coordinate, one compare each
        for k in tl.static_range((1 << BITS) - 1):
            codes += (y > tl.load(bound_ptr + k)).to(tl.int32)
    else:  # the same count by binary search (255 compares unrolled took ptxas minutes)
        for level in tl.static_range(BITS):
            step = 1 << (BITS - 1 - level)
            probe = tl.load(bound_ptr + codes + (step - 1))  # boundaries sorted: all below
            codes += tl.where(y > probe, step, 0)
    codes = tl.where((dims < D)[None, :], codes, 0)  # padding codes are 0, as pack_bits pads
    shifts = tl.arange(0, 8) * BITS
    grouped = tl.reshape(codes, (BLOCK_M, WP, 8)).to(tl.uint64)
    groups = tl.sum(grouped << shifts.to(tl.uint64)[None, None, :], axis=2)  # (BLOCK_M, WP)
    units = tl.arange(0, WP)
    mask = row_ok[:, None] & (units < WR)[None, :]
    base = packed_ptr + rows[:, None] * stride_p + units[None, :] * BITS
    for byte in tl.static_range(BITS):
        tl.store(base + byte, ((groups >> (8 * byte)) & 0xFF).to(tl.uint8), mask=mask)
    tl.store(norm_ptr + rows * stride_n, norm.to(norm_ptr.dtype.element_ty), mask=row_ok)


_LAUNCHES = FastLaunch(_encode_kernel)
_ROTATIONS: dict = {}


def _device_constants(quantizer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(quantizer), device)
    found = _ROTATIONS.get(key)
    if found is None or found[0] is not quantizer:
        d = quantizer.spec.d
        dp = max(16, triton.next_power_of_2(d))
        rot = np.zeros((dp, dp))
        rot[:d, :d] = quantizer.rotation.matrix().T
        bounds = np.asarray(quantizer.codebook.boundaries, dtype=np.float32)
        found = (
            quantizer,
            torch.as_tensor(rot, dtype=torch.float32, device=device),
            torch.as_tensor(bounds, device=device),
        )
        _ROTATIONS[key] = found
    return found[1], found[2]


def _rows(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``t`` as rows (a view, no copy): merged leading axes, or ``t`` itself when it has one
    leading axis (any stride); None when the leading axes cannot be merged without a copy."""
    try:
        return t.view(shape)
    except RuntimeError:
        return t if t.dim() == len(shape) else None


def supports(quantizer: Any) -> bool:
    """Whether the fused encode serves this quantizer (else use ``quantizer.quantize``)."""
    spec = quantizer.spec
    return spec.kind == "mse" and spec.n_bits in _BITS and 2 <= spec.d <= 256


def quantize_triton(
    x: torch.Tensor,
    quantizer: Any,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    check: bool = False,
    block_m: int = 32,
) -> QuantizedTensor:
    """``quantizer.quantize(x)`` in one kernel: ``x (..., d)`` -> packed codes and norms.

    Args:
        x: floating vectors ``(..., d)`` on a CUDA device (or the CPU under the interpreter).
        quantizer: a :class:`tqai.quantizers.TurboQuantMSE` (see :func:`supports`).
        out: optional ``(packed (..., ceil(d / 8) * b) uint8, norms (...))`` views to write into
            (in place, e.g. a slice of a preallocated history); rows need last stride 1.
        check: also refuse NaN/Inf inputs and norms beyond the norm dtype's range, as the
            reference does (synchronizes with the device).

    Returns:
        a :class:`QuantizedTensor` over the written arrays (``out``'s views when given).
    """
    if not supports(quantizer):
        raise ValueError(f"quantizer {quantizer!r} is not served by the fused encode")
    d, bits = quantizer.spec.d, quantizer.spec.n_bits
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    lead = tuple(x.shape[:-1])
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    width = -(-d // 8) * bits
    norm_dtype = getattr(torch, quantizer.spec.norm_dtype)
    if out is None:
        packed = torch.empty((*lead, width), dtype=torch.uint8, device=x.device)
        norms = torch.empty(lead, dtype=norm_dtype, device=x.device)
    else:
        packed, norms = out
        if tuple(packed.shape) != (*lead, width) or packed.dtype != torch.uint8:
            raise ValueError(f"out[0] must be uint8 of shape {(*lead, width)}, got {packed.shape}")
        if tuple(norms.shape) != lead or norms.dtype != norm_dtype:
            raise ValueError(f"out[1] must be {norm_dtype} of shape {lead}, got {norms.shape}")
    packed_rows, norm_rows = _rows(packed, (-1, width)), _rows(norms, (-1,))
    if packed_rows is None or norm_rows is None:
        # strided views over several leading axes (a slice of a history buffer): each leading
        # index (sequence, head) holds rows at a fixed stride, which the kernel takes
        for index in np.ndindex(*lead[:-1]):
            quantize_triton(x[index], quantizer, out=(packed[index], norms[index]), block_m=block_m)
    elif n:
        if packed_rows.stride(-1) != 1:
            raise ValueError("out[0]: packed rows must be contiguous (last stride 1)")
        rot, bounds = _device_constants(quantizer, x.device)
        dp = rot.shape[0]
        strides = (rows.stride(0), packed_rows.stride(0), norm_rows.stride(0))
        args = (rows, strides[0], rot, bounds, packed_rows, strides[1], norm_rows, strides[2], n)
        constexprs = {"BITS": bits, "D": d, "DP": dp, "WR": -(-d // 8), "WP": dp // 8}
        constexprs |= {"DC": min(dp, 64), "BLOCK_M": block_m}
        key = (  # what Triton specializes the kernel on (n_rows: its type only); the outputs'
            # alignment too, which it may not (_UNALIGNED): a finer key costs a JIT call once
            x.device.index,
            tuple(constexprs.values()),
            pointers_key((rows, rot, bounds, packed_rows, norm_rows)),
            ints_key(strides),
            int_types_key((*strides, n)),
        )
        _LAUNCHES(key, x.device.index, (triton.cdiv(n, block_m),), args, constexprs)
    if check:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf; only finite values can be quantized")
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"a vector norm exceeds {quantizer.spec.norm_dtype}'s range")
    return QuantizedTensor(
        spec=quantizer.spec, shape=lead, dtype=dtype_name(x), packed=packed, norms=norms
    )


def _fused(x: Any) -> bool:
    """Whether :class:`TritonEncoder` encodes ``x`` with the fused kernel (CUDA tensors, unless
    ``TQAI_KERNEL=reference``)."""
    return (
        isinstance(x, torch.Tensor) and x.is_cuda and os.environ.get("TQAI_KERNEL") != "reference"
    )


class TritonEncoder:
    """A TurboQuant_mse quantizer whose ``quantize`` runs :func:`quantize_triton` on CUDA tensors.

    Every other attribute (spec, rotation, codebook, ``dequantize``, ...) is the wrapped
    quantizer's, so a :class:`~tqai.kvstore.KVStore` holding it encodes new tokens with one
    kernel launch and decodes and attends exactly as before. CPU tensors, and any call while
    ``TQAI_KERNEL=reference`` is set, go to the wrapped quantizer (the reference). No NaN/Inf
    check on the fused path (it would synchronize every step): a non-finite key or value gives
    a non-finite norm, hence non-finite attention, as the uncompressed cache would.
    """

    def __init__(self, quantizer: Any) -> None:
        if not supports(quantizer):
            raise ValueError(f"quantizer {quantizer!r} is not served by the fused encode")
        self.inner = quantizer

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (copy/pickle protocols probe before __init__)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"TritonEncoder({self.inner!r})"

    def quantize(self, x: Any, *, xp: Any = None) -> QuantizedTensor:
        if _fused(x):
            return quantize_triton(x, self.inner)
        return self.inner.quantize(x, xp=xp)

    def quantize_into(self, x: Any, arrays: dict[str, Any]) -> bool:
        """Quantize ``x (..., d)`` straight into ``arrays`` (``packed``, ``norms``: views of a
        history's next tokens, as :class:`~tqai.kvstore.KVStore` passes them) where
        :meth:`quantize` takes the fused path; elsewhere write nothing and return False."""
        if _fused(x):
            quantize_triton(x, self.inner, out=(arrays["packed"], arrays["norms"]))
            return True
        return False

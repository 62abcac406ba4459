"""The parity bound of the fused attention kernels against the float32 core reference."""

from __future__ import annotations

import torch


def check_kernel_output(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` has ``dtype``, is finite and within the kernels' bound of ``ref``: fp16 operands
    on the tensor cores (query, centroids, p * |v|) with fp32 accumulation, and one rounding to
    the output dtype, so a relative error well under 1e-2 of the reference."""
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    rounding = ((ref.to(dtype).float() - ref).norm() / ref.norm()).item()
    assert rel <= 2 * rounding + 3e-3, (rel, rounding)

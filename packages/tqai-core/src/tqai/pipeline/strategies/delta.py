"""delta: first-order inter-step prediction, ``x_t`` coded as ``x_t - x_hat_{t-1}``.

DiTFastAttn (Yuan et al., "DiTFastAttn: Attention Compression for Diffusion Transformer Models",
NeurIPS 2024, arXiv:2406.08552) observes that a DiT layer's attention changes little between
neighbouring denoising steps and reuses it across steps. This strategy keeps the reuse but makes
it lossless up to quantization: it stores the quantized *change* since the previous step's
reconstruction, so a slowly moving tensor costs the same bits as a full one but at the error
level of its (much smaller) change. Per-vector fallback to full coding (one bit per vector)
protects tokens that moved more than their own size. Engine and details:
:mod:`tqai.pipeline.strategies._predictive`.
"""

from __future__ import annotations

from typing import ClassVar

from tqai.pipeline.strategies._predictive import PredictiveStrategy

__all__ = ["DeltaStrategy"]


class DeltaStrategy(PredictiveStrategy):
    """Code each step as the residual from the previous step's reconstruction.

    Args:
        fallback: per vector, code in full when that is smaller than the delta (1 bit/vector).

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.bank import QuantizerBank
        >>> x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
        >>> delta, bank = DeltaStrategy(), QuantizerBank()
        >>> first = delta.compress(x, None, bank, n_bits=3, layer=0, stream="k")
        >>> second = delta.compress(x * 1.01, None, bank, n_bits=3, layer=0, stream="k")
        >>> first.info["order_counts"], second.info["order_counts"]
        ((8, 0), (0, 8))
    """

    name: ClassVar[str] = "delta"
    description: ClassVar[str] = "first-order inter-step delta (DiTFastAttn, arXiv:2406.08552)"
    max_order: ClassVar[int] = 1

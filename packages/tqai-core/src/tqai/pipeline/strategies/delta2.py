"""delta2: second-order inter-step prediction ``2 x_hat_{t-1} - x_hat_{t-2}``, fallback 2 -> 1 -> 0.

QuantSparse (Feng et al., "QuantSparse: Comprehensively Compressing Video Diffusion Transformer
with Model Quantization and Attention Sparsification", arXiv:2509.23681) finds that in video DiTs
the *second-order* residual across denoising steps is more stable than the first-order one and
exploits it to correct cached attention. Here the same observation drives prediction: a tensor
that moves steadily from step to step is extrapolated linearly, and only the deviation from the
extrapolation is quantized.

Extrapolation is worse than plain reuse when the motion reverses, and worse than nothing when a
token jumps, so every vector picks the best of order 2, order 1 and full coding (two bits per
vector), keeping order 2 unless its residual is strictly larger. Engine and details:
:mod:`tqai.pipeline.strategies._predictive`.
"""

from __future__ import annotations

from typing import ClassVar

from tqai.pipeline.strategies._predictive import PredictiveStrategy

__all__ = ["Delta2Strategy"]


class Delta2Strategy(PredictiveStrategy):
    """Code each step as the residual from a linear extrapolation of the last two steps.

    Args:
        fallback: per vector, fall back to order 1 or full coding when the second-order
            prediction is worse (2 bits/vector); ``False`` always extrapolates.

    Example:
        >>> import numpy as np
        >>> from tqai.pipeline.bank import QuantizerBank
        >>> base = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
        >>> drift = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
        >>> s, bank = Delta2Strategy(), QuantizerBank()
        >>> counts = [s.compress(base + t * drift, None, bank, n_bits=4).info["order_counts"]
        ...           for t in range(4)]
        >>> counts[0], counts[3]
        ((8, 0, 0), (0, 0, 8))
    """

    name: ClassVar[str] = "delta2"
    description: ClassVar[str] = "second-order prediction, 2->1->full fallback (arXiv:2509.23681)"
    max_order: ClassVar[int] = 2

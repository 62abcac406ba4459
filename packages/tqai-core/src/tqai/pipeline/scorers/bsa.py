"""bsa: block centroid saliency, after Bidirectional Sparse Attention.

Zhan et al., "Bidirectional Sparse Attention for Faster Video Diffusion Training",
arXiv:2509.01085. BSA partitions the tokens into blocks and works with block centroids at two
levels: on the query side a token that is nearly the same as its block's centre is redundant
(cosine similarity to the centre), and on the key/value side whole blocks are kept or dropped by
the attention they receive, estimated cheaply from block centroids.

The score combines both levels. Tokens are split into consecutive blocks of ``block_size`` (the
last block may be shorter); with centroids ``c_b`` (mean of a block's tokens)::

    A     = softmax_b'(c_b . c_b' / sqrt(D))                  (centroid-to-centroid attention)
    s_b   = num_blocks * mean_b A[b, b_target]                (attention a block receives; mean 1)
    u_i   = (1 - cos(x_i, c_b(i))) / 2                        (distinctness in its block, 0..1)
    score_i = s_b(i) * (1 + u_i)

so salient blocks rank first, and within a block the tokens that differ from its centre (those
that a shared centroid would represent worst) rank above the redundant ones.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.pipeline import _ops

__all__ = ["BsaScorer"]


class BsaScorer:
    """Block centroid saliency times in-block token distinctness.

    Args:
        block_size: tokens per block (>= 1); the last block takes the remainder.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = np.repeat(rng.standard_normal((1, 4, 1, 16)), 8, axis=2).reshape(1, 32, 16)
        >>> x[0, 5] = -x[0, 5]                        # one token unlike its block
        >>> s = BsaScorer(block_size=8).score(x)
        >>> int(np.argmax(s[0, :8]))
        5
    """

    name: ClassVar[str] = "bsa"
    description: ClassVar[str] = "block centroid attention x in-block distinctness (2509.01085)"

    def __init__(self, *, block_size: int = 64) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., T, D) -> (..., T)`` block saliency times ``1 +`` token distinctness."""
        _ops.check_tokens(x, "bsa")
        xp = _xp.namespace(x)
        xc = xp.astype(x, _ops.compute_dtype(x, xp))
        lead, t, d = tuple(xc.shape[:-2]), xc.shape[-2], xc.shape[-1]
        bs = min(self.block_size, t)
        nb = math.ceil(t / bs)
        padded = xc
        if nb * bs > t:
            pad = xp.zeros((*lead, nb * bs - t, d), dtype=xc.dtype, device=_xp.device_of(xc))
            padded = xp.concat([xc, pad], axis=-2)
        blocks = xp.reshape(padded, (*lead, nb, bs, d))
        sizes = np.full((nb, 1), float(bs))
        sizes[-1, 0] = t - (nb - 1) * bs
        centroids = xp.sum(blocks, axis=-2) / _xp.from_host(
            sizes, xp, dtype=xc.dtype, device=_xp.device_of(xc)
        )  # (..., nb, D)
        logits = (centroids @ xp.matrix_transpose(centroids)) / math.sqrt(d)
        logits = logits - xp.max(logits, axis=-1, keepdims=True)
        weights = xp.exp(logits)
        attn = weights / xp.sum(weights, axis=-1, keepdims=True)
        saliency = xp.mean(attn, axis=-2) * nb  # (..., nb): attention each block receives
        per_token = xp.reshape(
            xp.broadcast_to(centroids[..., None, :], (*lead, nb, bs, d)), (*lead, nb * bs, d)
        )[..., :t, :]
        cos = xp.sum(xc * per_token, axis=-1) / xp.maximum(
            xp.sqrt(xp.sum(xc * xc, axis=-1) * xp.sum(per_token * per_token, axis=-1)),
            xp.full((), 1e-12, dtype=xc.dtype, device=_xp.device_of(xc)),
        )
        distinct = (1.0 - cos) / 2.0
        block_of_token = xp.reshape(
            xp.broadcast_to(saliency[..., None], (*lead, nb, bs)), (*lead, nb * bs)
        )[..., :t]
        return block_of_token * (1.0 + distinct)

    def reset(self) -> None:
        """Stateless: nothing to forget."""

"""sheaf: how far each token is from harmonic on the token graph (discrete Laplacian residual).

After the cellular-sheaf view of feature harmonicity on graphs (arXiv:2601.21207): a signal on a
graph is *harmonic* at a node when it equals the average of its neighbours, i.e. the node is in
the kernel of the Laplacian and carries no information its neighbourhood does not already hold.
With identity restriction maps (the constant sheaf with stalk ``R^D``) the sheaf Laplacian is
the graph Laplacian acting on each channel, and the normalized residual

    (L_rw x)_i = x_i - mean_{j ~ i} x_j

measures the local disagreement at token ``i``. Tokens where the signal is smooth are predictable
from their neighbours (cheap to get wrong); tokens at edges, discontinuities and isolated spikes
are not. The score is the residual energy relative to the row's mean token energy::

    score_i = ||x_i - mean_{j ~ i} x_j||^2 / mean_j ||x_j||^2

Token graphs:

- ``grid=None`` (default): the sequence path graph, neighbours ``0 < |i - j| <= radius``
  (LLM tokens, or any stream without spatial layout).
- ``grid=(frames, height, width)``: the 6-neighbour lattice of a video DiT's latent patches in
  raster order (``T`` must equal ``frames * height * width``; see the ``wan`` adapter's
  ``token_grid``). Boundary tokens average over the neighbours they have.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

from tqai import _xp
from tqai.pipeline import _ops

__all__ = ["SheafScorer"]


def _shifted_sums(x: Any, axis: int, radius: int, *, xp: ModuleType) -> tuple[Any, Any]:
    """Sum of the neighbours within ``radius`` along ``axis`` (zero-padded) and their count."""
    n = x.shape[axis]
    ndim = x.ndim
    ax = axis % ndim
    total = xp.zeros_like(x)
    count_shape = [1] * ndim
    count_shape[ax] = n
    ones = xp.ones(tuple(count_shape), dtype=x.dtype, device=_xp.device_of(x))
    count = xp.zeros_like(ones)
    for offset in range(1, min(radius, n - 1) + 1):
        pad_shape = list(x.shape)
        pad_shape[ax] = offset
        pad = xp.zeros(tuple(pad_shape), dtype=x.dtype, device=_xp.device_of(x))
        cpad_shape = list(count_shape)
        cpad_shape[ax] = offset
        cpad = xp.zeros(tuple(cpad_shape), dtype=x.dtype, device=_xp.device_of(x))
        head = tuple(slice(None) if i != ax else slice(0, n - offset) for i in range(ndim))
        tail = tuple(slice(None) if i != ax else slice(offset, n) for i in range(ndim))
        # x[i - offset] arrives at i (left neighbour), x[i + offset] arrives at i (right).
        total = total + xp.concat([pad, x[head]], axis=ax) + xp.concat([x[tail], pad], axis=ax)
        count = (
            count + xp.concat([cpad, ones[head]], axis=ax) + xp.concat([ones[tail], cpad], axis=ax)
        )
    return total, count


class SheafScorer:
    """Laplacian (non-harmonic) residual energy of each token on the token graph.

    Args:
        radius: neighbours per side on the sequence graph (``grid=None``), >= 1.
        grid: ``(frames, height, width)`` of a video DiT's latent tokens, for the 3-D lattice
            graph instead of the sequence graph.

    Example:
        >>> import numpy as np
        >>> x = np.tile(np.arange(8.0)[:, None], (1, 4))    # a ramp: harmonic inside
        >>> x[5] += 10.0                                      # one spike
        >>> s = SheafScorer().score(x)
        >>> int(np.argmax(s)), bool(s[2] == 0.0)
        (5, True)
    """

    name: ClassVar[str] = "sheaf"
    description: ClassVar[str] = "graph-Laplacian non-harmonicity of tokens (arXiv:2601.21207)"

    def __init__(self, *, radius: int = 1, grid: tuple[int, int, int] | None = None) -> None:
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
            raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
        if grid is not None:
            grid = tuple(grid)
            if len(grid) != 3 or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid
            ):
                raise ValueError(f"grid must be (frames, height, width) positive ints, got {grid}")
        self.radius = radius
        self.grid = grid

    def _neighbour_mean(self, xc: Any, *, xp: ModuleType) -> Any:
        lead, t, d = tuple(xc.shape[:-2]), xc.shape[-2], xc.shape[-1]
        if self.grid is None:
            total, count = _shifted_sums(xc, -2, self.radius, xp=xp)
        else:
            if math.prod(self.grid) != t:
                raise ValueError(
                    f"sheaf: grid {self.grid} has {math.prod(self.grid)} tokens but x has T = {t}"
                )
            cube = xp.reshape(xc, (*lead, *self.grid, d))
            total, count = None, None
            for axis in (-4, -3, -2):
                s, c = _shifted_sums(cube, axis, 1, xp=xp)
                total = s if total is None else total + s
                count = c if count is None else count + c
            total = xp.reshape(total, (*lead, t, d))
            count = xp.reshape(count, (t, 1))  # the three counts broadcast to (F, H, W, 1)
        safe = xp.where(count > 0, count, xp.ones_like(count))
        return total / safe

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., T, D) -> (..., T)`` Laplacian residual energy over mean token energy."""
        _ops.check_tokens(x, "sheaf")
        xp = _xp.namespace(x)
        xc = xp.astype(x, _ops.compute_dtype(x, xp))
        residual = xc - self._neighbour_mean(xc, xp=xp)
        energy = xp.mean(xc * xc, axis=-1)
        scale = xp.mean(energy, axis=-1, keepdims=True)
        scale = xp.where(scale > 0, scale, xp.ones_like(scale))
        return xp.mean(residual * residual, axis=-1) / scale

    def reset(self) -> None:
        """Stateless: nothing to forget."""

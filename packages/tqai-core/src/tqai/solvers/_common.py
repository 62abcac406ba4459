"""Helpers shared by the codebook solvers: building a codebook, mirroring, density quantiles."""

from __future__ import annotations

import numpy as np
from scipy import special

from tqai.codebooks import Codebook, _moments, validate_dim

__all__ = [
    "codebook_from_centroids",
    "density_nodes",
    "density_quantiles",
    "mirror",
    "positive_half",
]


def codebook_from_centroids(centroids: np.ndarray, d: int, n_bits: int, kind: str) -> Codebook:
    """A :class:`Codebook` of sorted ``centroids`` with nearest-centroid (midpoint) boundaries.

    Raises:
        ValueError: the centroids are not ``2**n_bits`` strictly increasing values in (-1, 1).
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    if not np.all(np.isfinite(centroids)) or np.any(np.abs(centroids) >= 1):
        raise ValueError(f"{kind} codebook centroids must be finite and inside (-1, 1)")
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(centroids=centroids, boundaries=boundaries, d=d, n_bits=n_bits, kind=kind)


def mirror(half: np.ndarray) -> np.ndarray:
    """``(k,)`` ascending positive centroids -> the ``(2k,)`` codebook ``[-half[::-1], half]``."""
    return np.concatenate([-half[::-1], half])


def positive_half(codebook: Codebook, *, atol: float = 1e-12) -> np.ndarray:
    """The positive half of a symmetric codebook, or ``ValueError`` when it is not symmetric."""
    c = codebook.centroids
    if not np.allclose(c, -c[::-1], rtol=0.0, atol=atol):
        raise ValueError(
            f"a symmetric solver needs a symmetric start codebook; {codebook.kind!r} is not"
        )
    return c[c.size // 2 :].copy()


def density_quantiles(d: int, probs: np.ndarray) -> np.ndarray:
    """Quantiles ``F_d^{-1}(p)`` of the coordinate density ``f_d`` (float64, exact via betaincinv).

    ``T^2 ~ Beta(1/2, (d-1)/2)`` and ``f_d`` is symmetric, so ``F^{-1}(p) = sign(p - 1/2)
    sqrt(I^{-1}(|2p - 1|))``. Symmetric ``probs`` give exactly mirrored quantiles.
    """
    d = validate_dim(d)
    probs = np.asarray(probs, dtype=np.float64)
    centred = 2 * probs - 1
    magnitude = np.sqrt(special.betaincinv(0.5, (d - 1) / 2, np.abs(centred)))
    return np.sign(centred) * magnitude


def density_nodes(d: int, num_nodes: int, *, tail: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature of ``f_d``: ``(num_nodes,)`` nodes and weights (float64, weights sum to ~1).

    The support is cut where the tail mass beyond falls under ``tail`` and split into
    ``num_nodes`` equal-width bins (symmetric about 0 for an even count); each node is its bin's
    exact conditional mean and its weight the bin's exact mass (closed-form moments of
    :mod:`tqai.codebooks`). Equal widths keep the tails resolved, unlike equal-mass nodes.
    """
    d = validate_dim(d)
    t_max = min(1.0, float(density_quantiles(d, np.array([1.0 - tail]))[0]))
    edges = np.linspace(-t_max, t_max, num_nodes + 1)
    mass, first, _ = (np.diff(m) for m in _moments(edges, d))
    keep = mass > 0
    nodes = first[keep] / mass[keep]
    return np.clip(nodes, edges[:-1][keep], edges[1:][keep]), mass[keep]

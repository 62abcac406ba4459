"""Fuzzy c-means codebooks with an annealed fuzzifier (``tqai.codebooks`` plugin ``fuzzy_cmeans``).

Fuzzy c-means (J. C. Bezdek, "Pattern Recognition with Fuzzy Objective Function Algorithms",
1981) minimizes ``sum_i w_i sum_k u_ik^m (t_i - c_k)^2`` over soft memberships ``u_ik`` (rows sum
to 1) and centroids ``c_k``, by alternating the closed-form updates

    u_ik = dist_ik^(-2/(m-1)) / sum_j dist_ij^(-2/(m-1)),
    c_k  = sum_i w_i u_ik^m t_i / sum_i w_i u_ik^m.

The fuzzifier ``m > 1`` smooths the objective (every point pulls on every centroid), which makes
the early iterations insensitive to the start; as ``m -> 1`` the memberships harden and the fixed
point becomes the Lloyd-Max (hard k-means) codebook. Annealing ``m`` from ``m_start`` toward 1
(deterministic annealing, K. Rose, "Deterministic annealing for clustering, compression,
classification, regression, and related optimization problems", Proc. IEEE 1998) walks that path.

The points are the coordinates of rotated unit vectors: by default ``num_nodes`` quadrature nodes
of the exact density ``f_d`` (equal-width bins over its support, each node at its bin's exact
conditional mean and weighted by the bin's exact mass, so every bin's first two moments are kept
up to the within-bin variance), or caller-given samples binned the same way. Work is done in
``sqrt(d)``-scaled coordinates (the N(0, 1) scale); memberships are computed in log space, so ``m``
close to 1 does not overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import special

from tqai.codebooks import Codebook, validate_dim, validate_n_bits
from tqai.solvers._common import codebook_from_centroids, density_nodes, density_quantiles

__all__ = ["annealing_schedule", "fuzzy_cmeans_codebook"]


def annealing_schedule(m_start: float, m_end: float, stages: int) -> np.ndarray:
    """``(stages,)`` fuzzifiers from ``m_start`` to ``m_end``, geometric in ``m - 1``.

    Raises:
        ValueError: unless ``m_start >= m_end > 1`` and ``stages >= 1``.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if not (math.isfinite(m_start) and math.isfinite(m_end) and m_start >= m_end > 1):
        raise ValueError(f"need m_start >= m_end > 1, got m_start={m_start}, m_end={m_end}")
    if stages == 1:
        return np.array([float(m_end)])
    return 1 + (m_start - 1) * ((m_end - 1) / (m_start - 1)) ** np.linspace(0, 1, stages)


def _fcm_step(
    points: np.ndarray, weights: np.ndarray, centroids: np.ndarray, m: float
) -> np.ndarray:
    """One fuzzy c-means update of ``(K,)`` centroids for ``(N,)`` weighted points."""
    sq = (points[:, None] - centroids[None, :]) ** 2 + 1e-300  # (N, K)
    log_u = special.log_softmax(-np.log(sq) / (m - 1), axis=1)
    pull = weights[:, None] * np.exp(m * log_u)  # w_i u_ik^m
    return (pull.T @ points) / np.maximum(pull.sum(axis=0), 1e-300)


def _binned(samples: np.ndarray, num_nodes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples -> at most ``num_nodes`` weighted nodes (bin means, bin frequencies).

    Equal-width bins over the samples' range, as for the density, so the cost of an iteration
    does not grow with the number of samples.
    """
    t = np.asarray(samples, dtype=np.float64).reshape(-1)
    if t.size < 4 * k or not np.all(np.isfinite(t)) or np.any(np.abs(t) > 1):
        raise ValueError(
            f"samples must hold at least {4 * k} finite coordinates in [-1, 1] "
            f"(unit-sphere scale), got {t.size} values"
        )
    lo, hi = float(t.min()), float(t.max())
    bins = np.minimum(((t - lo) / max(hi - lo, 1e-300) * num_nodes).astype(np.int64), num_nodes - 1)
    counts = np.bincount(bins, minlength=num_nodes)
    sums = np.bincount(bins, weights=t, minlength=num_nodes)
    keep = counts > 0
    return sums[keep] / counts[keep], counts[keep] / t.size


def _anderson(
    fixed_map: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    tol: float,
    max_iter: int,
    depth: int = 5,
) -> np.ndarray:
    """Iterate ``x <- fixed_map(x)`` to a fixed point with Anderson acceleration.

    Plain FCM iteration, like Lloyd's, converges linearly and slowly once memberships are hard;
    Anderson mixing of the last ``depth`` iterates (H. F. Walker and P. Ni, SIAM J. Numer. Anal.
    49(4), 2011) cuts the iteration count by orders of magnitude. A mixed step that would leave the
    centroids unsorted falls back to the plain step, so every iterate is a valid codebook.
    """
    xs: list[np.ndarray] = []
    fs: list[np.ndarray] = []
    for _ in range(max_iter):
        gx = fixed_map(x)
        f = gx - x
        if float(np.max(np.abs(f))) < tol:
            return gx
        xs.append(x)
        fs.append(f)
        del xs[: -depth - 1], fs[: -depth - 1]
        nxt = gx
        if len(xs) > 1:
            d_x = np.diff(np.stack(xs), axis=0).T  # (K, j)
            d_f = np.diff(np.stack(fs), axis=0).T
            gamma = np.linalg.lstsq(d_f, f, rcond=None)[0]
            mixed = gx - (d_x + d_f) @ gamma
            if np.all(np.isfinite(mixed)) and np.all(np.diff(mixed) > 0):
                nxt = mixed
        x = nxt
    return x


def fuzzy_cmeans_codebook(
    d: int,
    n_bits: int,
    *,
    m_start: float = 1.5,
    m_end: float = 1.05,
    stages: int = 12,
    samples: np.ndarray | None = None,
    num_nodes: int | None = None,
    symmetric: bool | None = None,
    tol: float = 1e-9,
    max_iter: int = 300,
) -> Codebook:
    """Fuzzy c-means codebook of the coordinate density ``f_d``, annealing ``m`` toward 1.

    Args:
        d: vector size (>= 2).
        n_bits: bits per code, 1..8.
        m_start: first fuzzifier (> 1). Large values (about 2 and up at 4+ bits) can merge
            centroids before annealing separates them; that raises ``RuntimeError``.
        m_end: last fuzzifier (``1 < m_end <= m_start``); the closer to 1, the closer the result
            is to Lloyd-Max.
        stages: number of fuzzifiers on the geometric schedule (:func:`annealing_schedule`).
        samples: optional coordinates of rotated unit vectors (unit-sphere scale, any shape) to
            fit instead of the density; they are binned into ``num_nodes`` weighted nodes.
        num_nodes: quadrature nodes (:func:`tqai.solvers._common.density_nodes`) or sample bins;
            default ``max(4096, 32 * 2**n_bits)``.
        symmetric: force an exactly symmetric codebook; default: on for quantile nodes, off for
            samples.
        tol: stop a stage when one update moves no centroid by more than ``tol`` (``sqrt(d)``
            scale).
        max_iter: iteration cap per stage (Anderson-accelerated fixed-point iterations).

    Returns:
        A sorted :class:`~tqai.codebooks.Codebook` (midpoint boundaries), ``kind="fuzzy_cmeans"``.

    Raises:
        RuntimeError: centroids merged (lower ``m_start``).

    Example:
        >>> from tqai.codebooks import lloyd_max_codebook
        >>> cb = fuzzy_cmeans_codebook(128, 2)
        >>> bool(abs(cb.centroids - lloyd_max_codebook(128, 2).centroids).max() * 128**0.5 < 0.01)
        True
    """
    d = validate_dim(d)
    n_bits = validate_n_bits(n_bits)
    schedule = annealing_schedule(m_start, m_end, stages)
    k = 2**n_bits
    scale = math.sqrt(d)
    nodes = num_nodes if num_nodes is not None else max(4096, 32 * k)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 4 * k:
        raise ValueError(f"num_nodes must be an integer >= 4 * 2**n_bits, got {nodes!r}")
    if samples is None:
        points, weights = density_nodes(d, nodes)
        symmetric = True if symmetric is None else symmetric
    else:
        points, weights = _binned(samples, nodes, k)
        symmetric = False if symmetric is None else symmetric
    points = points * scale

    def step(c: np.ndarray, m: float) -> np.ndarray:
        new = _fcm_step(points, weights, c, m)
        return (new - new[::-1]) / 2 if symmetric else new

    # Start at the centres of k equal-mass cells of f_d: no dependence on Lloyd-Max.
    centroids = density_quantiles(d, (np.arange(k) + 0.5) / k) * scale
    for m in schedule:
        centroids = _anderson(lambda c, m=float(m): step(c, m), centroids, tol, max_iter)
    centroids = np.sort(centroids)
    if np.any(np.diff(centroids) <= 0):
        raise RuntimeError(
            f"fuzzy c-means merged centroids at m_start={m_start}; use a smaller m_start"
        )
    return codebook_from_centroids(centroids / scale, d, n_bits, "fuzzy_cmeans")

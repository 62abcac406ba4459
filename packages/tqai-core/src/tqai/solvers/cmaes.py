"""CMA-ES refinement of a scalar codebook (``tqai.codebooks`` plugin ``cmaes``).

Lloyd-Max (:mod:`tqai.codebooks`) is a stationary point of the mean squared error; under another
objective (an attention score loss, a distortion at another ``d``, a weighted error) it is only a
good start. This solver refines a start codebook with the covariance matrix adaptation evolution
strategy, (mu/mu_w, lambda)-CMA-ES with cumulative step-size adaptation, rank-one and rank-mu
covariance updates, as set out in N. Hansen, "The CMA Evolution Strategy: A Tutorial",
arXiv:1604.00772 (default strategy parameters of its Table 1).

Why it is shaped like this:

- It is derivative-free, so any objective ``Codebook -> float`` works, including Monte Carlo ones
  with piecewise-constant dependence on the decision boundaries.
- The search runs in ``sqrt(d)``-scaled coordinates (the N(0, 1) scale), where step sizes do not
  depend on ``d``. A candidate vector ``z`` is mapped to ``sort(|z|) / sqrt(d)`` mirrored
  (symmetric codebooks, the default: the density ``f_d`` is symmetric) or to ``sort(z) / sqrt(d)``,
  so every candidate is a sorted codebook; one with equal centroids or a centroid outside (-1, 1)
  scores ``+inf``.
- It is seeded (``numpy.random.default_rng(seed)``) and deterministic, and it tracks the best
  codebook seen, starting with the start itself, so the result is never worse than the start.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tqai.codebooks import (
    Codebook,
    codebook_distortion,
    lloyd_max_codebook,
    validate_dim,
    validate_n_bits,
)
from tqai.solvers._common import codebook_from_centroids, mirror, positive_half

__all__ = ["CMAESResult", "cmaes_codebook", "minimize_cmaes"]

CodebookObjective = Callable[[Codebook], float]


@dataclass(frozen=True, kw_only=True, slots=True)
class CMAESResult:
    """What :func:`minimize_cmaes` found.

    Attributes:
        x: ``(n,)`` float64 best point seen (``x0`` when nothing beat it).
        fun: objective value at ``x``.
        evaluations: number of objective calls, ``x0`` included.
        generations: number of CMA-ES generations run.
        history: best objective value after each generation (non-increasing).
    """

    x: np.ndarray = field(repr=False)
    fun: float
    evaluations: int
    generations: int
    history: tuple[float, ...] = field(repr=False)


def minimize_cmaes(
    fun: Callable[[np.ndarray], float],
    x0: np.ndarray,
    sigma0: float,
    *,
    seed: int = 0,
    max_evals: int = 2000,
    population_size: int | None = None,
    tol_sigma: float = 1e-12,
    tol_fun: float = 1e-10,
) -> CMAESResult:
    """Minimize ``fun`` with CMA-ES from ``x0`` (Hansen, arXiv:1604.00772), seeded.

    Args:
        fun: ``(n,) float64 -> float``; ``+inf`` marks an infeasible point (ranked last).
        x0: ``(n,)`` start point; evaluated first, so the result is never worse than it.
        sigma0: initial step size (> 0), in the units of ``x``.
        seed: ``numpy.random.default_rng`` seed; the same seed gives the same result.
        max_evals: budget of objective calls, ``x0`` included.
        population_size: lambda, default ``4 + floor(3 ln n)``.
        tol_sigma: stop when ``sigma * sqrt(max eig C)`` falls below this.
        tol_fun: stop when the best value improved by less than ``tol_fun * max(1, |best|)``
            over the last ``10 + ceil(30 n / lambda)`` generations (the tutorial's TolHistFun).

    Returns:
        The best point seen and its value, with the per-generation best values.
    """
    x0 = np.array(x0, dtype=np.float64).reshape(-1)
    n = x0.size
    if n == 0:
        raise ValueError("x0 must have at least one coordinate")
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise ValueError(f"sigma0 must be a positive finite number, got {sigma0!r}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    lam = population_size or 4 + int(3 * math.log(n))
    if lam < 2:
        raise ValueError(f"population_size must be >= 2, got {lam}")
    mu = lam // 2
    weights = math.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
    weights /= weights.sum()
    mu_eff = 1.0 / float(np.sum(weights**2))
    c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))

    rng = np.random.default_rng(seed)
    mean, sigma = x0.copy(), float(sigma0)
    cov, p_sigma, p_c = np.eye(n), np.zeros(n), np.zeros(n)
    best_x, best_f = x0.copy(), float(fun(x0))
    evals, generation, history = 1, 0, []
    # The O(n^3) eigendecomposition is refreshed only every few generations (tutorial, B.2).
    eigen_every = max(1, int(lam / ((c_1 + c_mu) * n * 10)))
    basis, scales = np.eye(n), np.ones(n)
    patience = 10 + math.ceil(30 * n / lam)
    while evals + lam <= max_evals:
        if generation % eigen_every == 0:
            eigvals, basis = np.linalg.eigh(cov)
            scales = np.sqrt(np.maximum(eigvals, 1e-300))
        if sigma * scales.max() < tol_sigma:
            break
        z = rng.standard_normal((lam, n))
        y = (z * scales) @ basis.T  # rows ~ N(0, C)
        xs = mean + sigma * y
        values = np.array([float(fun(x)) for x in xs])
        evals += lam
        generation += 1
        order = np.argsort(values, kind="stable")
        if values[order[0]] < best_f:
            best_f, best_x = float(values[order[0]]), xs[order[0]].copy()
        history.append(best_f)
        if generation > patience and history[-patience - 1] - best_f <= tol_fun * max(
            1.0, abs(best_f)
        ):
            break

        y_sel = y[order[:mu]]
        y_w = weights @ y_sel
        mean = mean + sigma * y_w
        inv_sqrt_y = basis @ ((basis.T @ y_w) / scales)  # C^{-1/2} y_w
        p_sigma = (1 - c_sigma) * p_sigma + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * inv_sqrt_y
        norm_ps = float(np.linalg.norm(p_sigma))
        h_sigma = (
            norm_ps / math.sqrt(1 - (1 - c_sigma) ** (2 * generation)) < (1.4 + 2 / (n + 1)) * chi_n
        )
        p_c = (1 - c_c) * p_c + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
        rank_mu = (y_sel * weights[:, None]).T @ y_sel
        decay = 1 - c_1 - c_mu + (1 - h_sigma) * c_1 * c_c * (2 - c_c)
        cov = decay * cov + c_1 * np.outer(p_c, p_c) + c_mu * rank_mu
        cov = (cov + cov.T) / 2
        sigma *= math.exp((c_sigma / d_sigma) * (norm_ps / chi_n - 1))
        if not math.isfinite(sigma) or sigma <= 0:
            break
    return CMAESResult(
        x=best_x, fun=best_f, evaluations=evals, generations=generation, history=tuple(history)
    )


def _decode(z: np.ndarray, d: int, symmetric: bool) -> np.ndarray | None:
    """Search vector (``sqrt(d)`` scale) -> sorted unit-scale centroids, or ``None`` if invalid."""
    z = np.sort(np.abs(z) if symmetric else z) / math.sqrt(d)
    centroids = mirror(z) if symmetric else z
    if np.any(np.diff(centroids) <= 0) or np.any(np.abs(centroids) >= 1):
        return None
    return centroids


def cmaes_codebook(
    d: int,
    n_bits: int,
    *,
    objective: CodebookObjective | None = None,
    start: Codebook | None = None,
    symmetric: bool = True,
    seed: int = 0,
    sigma0: float | None = None,
    max_evals: int | None = None,
    kind: str = "cmaes",
) -> Codebook:
    """Refine a codebook of the coordinate density ``f_d`` with CMA-ES (seeded, deterministic).

    Args:
        d: vector size (>= 2); the codebook is for the coordinates of rotated unit vectors in R^d.
        n_bits: bits per code, 1..8 (``2**n_bits`` centroids).
        objective: ``Codebook -> float`` to minimize; default the exact distortion
            :func:`tqai.codebooks.codebook_distortion` (``E||y - q(y)||^2``).
        start: start codebook, default ``lloyd_max_codebook(d, n_bits)``. With ``symmetric`` it
            must be symmetric.
        symmetric: search symmetric codebooks only (``2**(n_bits-1)`` free values); the result is
            then exactly symmetric.
        seed: CMA-ES seed; the same arguments give the same codebook.
        sigma0: initial step in ``sqrt(d)``-scaled units; default a quarter of the start's
            smallest centroid gap.
        max_evals: objective-call budget; default ``150 * (n + 10)`` for ``n`` free values.
        kind: the ``Codebook.kind`` of the result (other solvers built on this one set theirs).

    Returns:
        A sorted :class:`~tqai.codebooks.Codebook` (float64, midpoint boundaries) whose objective
        value is at most the start's.

    Example:
        >>> from tqai.codebooks import codebook_distortion, lloyd_max_codebook
        >>> cb = cmaes_codebook(64, 2, objective=lambda c: codebook_distortion(c, 16))
        >>> start = lloyd_max_codebook(64, 2)
        >>> codebook_distortion(cb, 16) < codebook_distortion(start, 16)
        True
    """
    d = validate_dim(d)
    n_bits = validate_n_bits(n_bits)
    objective = codebook_distortion if objective is None else objective
    if not callable(objective):
        raise TypeError(f"objective must be a callable Codebook -> float, got {objective!r}")
    start = lloyd_max_codebook(d, n_bits) if start is None else start
    if not isinstance(start, Codebook):
        raise TypeError(f"start must be a tqai.codebooks.Codebook, got {type(start).__name__}")
    if start.n_bits != n_bits or start.d != d:
        raise ValueError(
            f"start codebook is for d={start.d}, n_bits={start.n_bits}; expected d={d}, "
            f"n_bits={n_bits}"
        )
    free = positive_half(start) if symmetric else start.centroids.copy()
    z0 = free * math.sqrt(d)
    if sigma0 is None:
        gaps = np.diff(np.concatenate([[-z0[0]], z0]) if symmetric else z0)
        sigma0 = 0.25 * float(gaps.min())
    budget = 150 * (z0.size + 10) if max_evals is None else max_evals
    start_value = float(objective(start))

    def fun(z: np.ndarray) -> float:
        centroids = _decode(z, d, symmetric)
        if centroids is None:
            return math.inf
        value = float(objective(codebook_from_centroids(centroids, d, n_bits, kind)))
        return value if not math.isnan(value) else math.inf

    result = minimize_cmaes(fun, z0, sigma0, seed=seed, max_evals=budget)
    if result.fun < start_value:
        return codebook_from_centroids(_decode(result.x, d, symmetric), d, n_bits, kind)
    return dataclasses.replace(start, kind=kind)  # nothing beat the start: keep it exactly

"""Lloyd-Max scalar codebooks for the coordinates of a randomly rotated unit vector.

TurboQuant (Zandieh et al., ICLR 2026, arXiv:2504.19874, Algorithm 1) quantizes each coordinate of
``y = Pi x`` for a unit vector ``x`` and a random rotation ``Pi``. Each coordinate then follows the
exact density

    f_d(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - t^2)^((d-3)/2),   t in [-1, 1],

a scaled Beta (``t^2 ~ Beta(1/2, (d-1)/2)``), close to N(0, 1/d) for large d. The optimal scalar
quantizer of that density is its Lloyd-Max codebook (1-D continuous k-means), solved here exactly:
cell masses come from the regularized incomplete beta function and cell first moments have the
closed form ``int t f_d(t) dt = -c_d (1 - t^2)^((d-1)/2) / (d-1)``, so no sampling is involved.

The density is symmetric, so only the positive half is solved (boundary 0 fixed) and mirrored; the
codebook is exactly symmetric and sorted. Tables for the common head dims are shipped in
``_tables/lloyd_max.json`` (built by ``scripts/build_codebook_tables.py``) so start-up costs
nothing; other ``d`` are solved once (milliseconds) and cached in memory.

All host-side math is float64 numpy; kernels and quantizers move the centroids to their namespace.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from scipy import special

from tqai import prebuilt

__all__ = [
    "SHIPPED_HEAD_DIMS",
    "Codebook",
    "codebook_distortion",
    "coordinate_density",
    "lloyd_max_codebook",
    "solve_lloyd_max",
    "validate_dim",
    "validate_n_bits",
]

SHIPPED_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 256)
MAX_BITS = 8


def validate_n_bits(n_bits: object, *, name: str = "n_bits", low: int = 1) -> int:
    """Return ``n_bits`` as an int, or raise ``ValueError`` naming the parameter and the range."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int | np.integer):
        raise TypeError(f"{name} must be an integer in {low}..{MAX_BITS}, got {n_bits!r}")
    if not low <= int(n_bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in {low}..{MAX_BITS}, got {n_bits}")
    return int(n_bits)


def validate_dim(d: object, *, name: str = "d", low: int = 2) -> int:
    """Return the vector size ``d`` as an int, or raise naming the parameter and what is allowed."""
    if isinstance(d, bool) or not isinstance(d, int | np.integer):
        raise TypeError(f"{name} must be an integer >= {low}, got {d!r}")
    if int(d) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {d}")
    return int(d)


@dataclass(frozen=True, kw_only=True, slots=True)
class Codebook:
    """A sorted scalar codebook for the coordinates of a rotated unit vector of size ``d``.

    Attributes:
        centroids: ``(2**n_bits,)`` float64, sorted ascending, in unit-sphere coordinates
            (multiply by ``sqrt(d)`` to get the N(0, 1) scale).
        boundaries: ``(2**n_bits - 1,)`` float64 decision thresholds (midpoints of centroids);
            a value equal to a boundary goes to the lower cell.
        d: vector size the density was taken at.
        n_bits: bits per code.
        kind: solver name (``"lloyd_max"``).
    """

    centroids: np.ndarray = field(repr=False)
    boundaries: np.ndarray = field(repr=False)
    d: int
    n_bits: int
    kind: str = "lloyd_max"

    def __post_init__(self) -> None:
        validate_dim(self.d)
        validate_n_bits(self.n_bits)
        k = 2**self.n_bits
        if self.centroids.shape != (k,) or self.boundaries.shape != (k - 1,):
            raise ValueError(
                f"a {self.n_bits}-bit codebook needs {k} centroids and {k - 1} boundaries, got "
                f"{self.centroids.shape} and {self.boundaries.shape}"
            )
        if np.any(np.diff(self.centroids) <= 0):
            raise ValueError("codebook centroids must be strictly increasing")

    @property
    def size(self) -> int:
        return 2**self.n_bits


def _density_constant(d: int) -> float:
    return math.exp(math.lgamma(d / 2) - math.lgamma((d - 1) / 2)) / math.sqrt(math.pi)


def coordinate_density(t: np.ndarray, d: int) -> np.ndarray:
    """The exact density f_d(t) of one coordinate of a uniformly random unit vector in R^d."""
    d = validate_dim(d)
    t = np.asarray(t, dtype=np.float64)
    inside = np.abs(t) < 1
    out = np.zeros_like(t)
    out[inside] = _density_constant(d) * (1 - t[inside] ** 2) ** ((d - 3) / 2)
    return out


def _cdf_positive(t: np.ndarray, d: int) -> np.ndarray:
    """P(0 <= T <= t) for t in [0, 1]: half the regularized incomplete beta of t^2."""
    return 0.5 * special.betainc(0.5, (d - 1) / 2, np.clip(t, 0.0, 1.0) ** 2)


def _first_moment_positive(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """int_a^b t f_d(t) dt for 0 <= a <= b <= 1 (closed form)."""
    c = _density_constant(d)
    p = (d - 1) / 2
    return c * ((1 - a**2) ** p - (1 - b**2) ** p) / (d - 1)


def _lloyd_map(cent: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Lloyd step on the positive half: cell conditional means, and the edges and masses used."""
    edges = np.concatenate([[0.0], (cent[1:] + cent[:-1]) / 2, [1.0]])
    mass = _cdf_positive(edges[1:], d) - _cdf_positive(edges[:-1], d)
    moment = _first_moment_positive(edges[:-1], edges[1:], d)
    return moment / np.maximum(mass, 1e-300), edges, mass


def solve_lloyd_max(d: int, n_bits: int, *, tol: float = 1e-13, max_iter: int = 200) -> np.ndarray:
    """Solve the Lloyd-Max codebook of ``f_d`` with ``2**n_bits`` levels.

    The Lloyd-Max conditions (boundaries at centroid midpoints, centroids at cell conditional
    means) are solved on the positive half by Newton's method on ``g(c) = lloyd(c) - c``, whose
    Jacobian is tridiagonal (a cell mean moves only with its two edges). Plain Lloyd iteration
    needs ~10^5 steps at 8 bits; Newton from the density's quantiles converges in a handful.

    Returns:
        ``(2**n_bits,)`` float64 sorted centroids.
    """
    from scipy.linalg import solve_banded

    d = validate_dim(d)
    n_bits = validate_n_bits(n_bits)
    half = 2 ** (n_bits - 1)
    # Start at the positive-half quantiles: cell i holds mass (i + 1/2) / half of P(T >= 0).
    probs = (np.arange(half) + 0.5) / half
    cent = np.sqrt(special.betaincinv(0.5, (d - 1) / 2, probs))
    scale = 1 / math.sqrt(d)
    for _ in range(20):  # a few Lloyd steps put Newton well inside its basin
        cent = _lloyd_map(cent, d)[0]
    best, best_err, stalled = cent, np.inf, 0
    for _ in range(max_iter):
        new, edges, mass = _lloyd_map(cent, d)
        residual = new - cent
        err = float(np.max(np.abs(residual)))
        if err < best_err:
            best, best_err, stalled = new, err, 0
        else:
            stalled += 1
        # Converged, or at float64's noise floor (tail masses of 256-level books lose digits).
        if err < tol * scale or (stalled >= 3 and best_err < 1e-8 * scale):
            return np.concatenate([-best[::-1], best])
        f = coordinate_density(edges, d)
        lower = 0.5 * f[:-1] * (new - edges[:-1]) / mass  # d new_i / d c_{i-1} (and part of c_i)
        upper = 0.5 * f[1:] * (edges[1:] - new) / mass  # d new_i / d c_{i+1} (and part of c_i)
        lower[0] = 0.0  # edge 0 is pinned at t = 0 by symmetry
        upper[-1] = 0.0  # the last edge is t = 1
        bands = np.zeros((3, half))
        bands[0, 1:] = upper[:-1]
        bands[1] = lower + upper - 1.0
        bands[1, 0] = upper[0] - 1.0
        bands[1, -1] = lower[-1] - 1.0
        bands[2, :-1] = lower[1:]
        step = solve_banded((1, 1), bands, -residual)
        t = 1.0
        while t > 1e-4:  # damped: keep the centroids sorted and inside (0, 1)
            trial = cent + t * step
            if np.all(np.diff(trial) > 0) and trial[0] > 0 and trial[-1] < 1:
                break
            t /= 2
        cent = trial
    raise RuntimeError(f"Lloyd-Max did not converge for d={d}, n_bits={n_bits}")


def _from_centroids(centroids: np.ndarray, d: int, n_bits: int, kind: str) -> Codebook:
    centroids = np.asarray(centroids, dtype=np.float64)
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return Codebook(centroids=centroids, boundaries=boundaries, d=d, n_bits=n_bits, kind=kind)


@functools.cache
def _shipped_tables() -> dict[str, list[float]]:
    path = resources.files("tqai").joinpath("_tables/lloyd_max.json")
    try:
        return json.loads(path.read_text())["centroids"]
    except FileNotFoundError:
        return {}


@functools.lru_cache(maxsize=512)
def lloyd_max_codebook(d: int, n_bits: int) -> Codebook:
    """The Lloyd-Max codebook for size-``d`` rotated unit vectors at ``n_bits`` bits (cached).

    Shipped tables are used for ``d`` in :data:`SHIPPED_HEAD_DIMS`; other sizes are solved once.

    Example:
        >>> cb = lloyd_max_codebook(128, 2)
        >>> [round(float(c) * 128**0.5, 3) for c in cb.centroids]
        [-1.509, -0.453, 0.453, 1.509]
    """
    d = validate_dim(d)
    n_bits = validate_n_bits(n_bits)
    table = _shipped_tables().get(f"{d}/{n_bits}")
    if table is None:
        table = prebuilt.centroids(d, n_bits)  # filled from a `tqai convert` folder
    centroids = np.asarray(table) if table is not None else solve_lloyd_max(d, n_bits)
    return _from_centroids(centroids, d, n_bits, "lloyd_max")


def _moments(t: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Antiderivatives of t^k f_d(t), k = 0, 1, 2, at points t in [-1, 1] (closed forms).

    ``t^2 ~ Beta(1/2, (d-1)/2)``, so the zeroth and second moments are regularized incomplete
    beta functions (E[X; X <= x] = a/(a+b) I_x(a+1, b) for a Beta(a, b) variable), and the first
    has the elementary antiderivative ``-c_d (1 - t^2)^((d-1)/2) / (d-1)``.
    """
    t = np.clip(np.asarray(t, dtype=np.float64), -1.0, 1.0)
    s, t2 = np.sign(t), t * t
    m0 = 0.5 * s * special.betainc(0.5, (d - 1) / 2, t2)
    m1 = -_density_constant(d) * (1 - t2) ** ((d - 1) / 2) / (d - 1)
    m2 = 0.5 * s * special.betainc(1.5, (d - 1) / 2, t2) / d
    return m0, m1, m2


def codebook_distortion(codebook: Codebook, d: int | None = None) -> float:
    """Expected per-vector squared error ``E||y - q(y)||^2`` for a uniformly random unit vector.

    The integral of ``(t - c_i)^2 f_d(t)`` over every decision cell, evaluated exactly from the
    density's moment antiderivatives, times ``d`` (all coordinates share the density). This is the
    "theory" column of ``benchmarks/bench_distortion.py``. ``d`` defaults to the codebook's own.
    """
    d = codebook.d if d is None else validate_dim(d)
    edges = np.concatenate([[-1.0], codebook.boundaries, [1.0]])
    m0, m1, m2 = (np.diff(m) for m in _moments(edges, d))
    c = codebook.centroids
    return float(d * np.sum(m2 - 2 * c * m1 + c * c * m0))

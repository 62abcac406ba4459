"""Seeded random rotations of R^d: Haar, randomized Hadamard, and block-diagonal rotor.

TurboQuant (arXiv:2504.19874, Algorithm 1) rotates every vector by a random orthogonal ``Pi`` so
that each coordinate follows the known Beta-shaped density its codebook is built for. Every
rotation here is built on the host from ``numpy.random.default_rng(seed)`` and moved to the
caller's namespace, so the same seed gives the same matrix on numpy, torch and mlx.

Vectors are rows: ``rotate(x)`` maps ``(..., d) -> (..., d)`` with ``y = x @ Pi^T`` (``y = Pi x``
for each row) and ``unrotate`` applies ``Pi^T``. All three are exactly orthogonal.

- ``haar``: QR of a Gaussian matrix with the signs of R's diagonal folded in (Haar distributed).
  O(d^2) per vector.
- ``hadamard``: ``Pi = (H_{2^k} (x) Q_m) D`` for ``d = 2^k m`` with ``m`` odd: random signs ``D``,
  a fast Walsh-Hadamard transform over the power-of-two factor and a seeded Haar rotation ``Q_m``
  of the odd factor (the Kronecker product of two orthogonal matrices is orthogonal, and every
  entry of ``H (x) Q`` is non-zero, so every output coordinate mixes every input coordinate).
  O(d (k + m)) per vector: O(d log d) for powers of two (64, 128, 256), O(d log d + 3d) for 96,
  O(d log d + 5d) for 80. For odd ``d`` it is a Haar rotation. Randomized Hadamard is the fast
  stand-in for Haar used by QuIP# and most TurboQuant ports.
- ``rotor``: block-diagonal 3x3 rotations from seeded random unit quaternions (a 2x2 rotation or a
  sign for the ``d mod 3`` remainder), after a seeded permutation. O(d) per vector. It only mixes
  coordinates within a block, so it spreads a random-looking vector as well as Haar does but does
  not spread a single outlier channel across the vector; see the README's distortion table.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from tqai import _xp, prebuilt
from tqai.codebooks import validate_dim

__all__ = [
    "ROTATIONS",
    "HaarRotation",
    "HadamardRotation",
    "Rotation",
    "RotorRotation",
    "make_rotation",
]


def _haar_matrix(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _check_vectors(x: Any, d: int, xp: ModuleType) -> None:
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have last dimension d={d}, got shape {tuple(x.shape)}")


@dataclass(frozen=True, kw_only=True)
class Rotation(abc.ABC):
    """A seeded orthogonal map of R^d. Subclasses implement ``_rotate`` / ``_unrotate``."""

    d: int
    seed: int = 0
    kind: ClassVar[str] = ""
    _constants: _xp.HostConstants = field(
        default_factory=_xp.HostConstants, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        validate_dim(self.d, low=1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def rotate(self, x: Any, *, xp: ModuleType | None = None) -> Any:
        """``(..., d) -> (..., d)``: ``y = Pi x`` for every row, in ``x``'s namespace and dtype."""
        xp = _xp.namespace(x, xp=xp)
        _check_vectors(x, self.d, xp)
        return self._rotate(x, xp=xp)

    def unrotate(self, y: Any, *, xp: ModuleType | None = None) -> Any:
        """``(..., d) -> (..., d)``: ``x = Pi^T y`` for every row (the inverse of :meth:`rotate`)."""
        xp = _xp.namespace(y, xp=xp)
        _check_vectors(y, self.d, xp)
        return self._unrotate(y, xp=xp)

    def matrix(self) -> np.ndarray:
        """The dense ``(d, d)`` float64 matrix ``Pi`` (host numpy), for kernels and tests."""
        return self._rotate(np.eye(self.d), xp=np).T

    def _on(self, name: str, host: np.ndarray, like: Any, xp: ModuleType, *, index=False) -> Any:
        """Host constant ``host`` next to ``like``; ``index=True`` makes an int64 index array."""
        return self._constants.get(name, host, like, xp, dtype=xp.int64 if index else None)

    @abc.abstractmethod
    def _rotate(self, x: Any, *, xp: ModuleType) -> Any:
        """Rotate validated rows of ``x``."""

    @abc.abstractmethod
    def _unrotate(self, y: Any, *, xp: ModuleType) -> Any:
        """Unrotate validated rows of ``y``."""


@dataclass(frozen=True, kw_only=True)
class HaarRotation(Rotation):
    """A Haar-random orthogonal matrix (seeded QR of a Gaussian matrix)."""

    kind: ClassVar[str] = "haar"

    @functools.cached_property
    def _host(self) -> np.ndarray:
        hit = prebuilt.rotation_arrays(self.kind, self.d, self.seed)
        if hit is not None:
            return hit["matrix"]
        return _haar_matrix(self.d, np.random.default_rng([self.seed, self.d, 0x7A]))

    def host_arrays(self) -> dict[str, np.ndarray]:
        """What :mod:`tqai.prebuilt` records for this rotation."""
        return {"matrix": self._host}

    def matrix(self) -> np.ndarray:
        return self._host

    def _rotate(self, x: Any, *, xp: ModuleType) -> Any:
        return x @ self._on("pt", self._host.T, x, xp)

    def _unrotate(self, y: Any, *, xp: ModuleType) -> Any:
        return y @ self._on("p", self._host, y, xp)


def _fwht(x: Any, n: int, *, xp: ModuleType) -> Any:
    """Unnormalized Walsh-Hadamard transform over axis -2 (length ``n``, a power of two)."""
    lead = tuple(x.shape[:-2])
    m = x.shape[-1]
    h = 1
    while h < n:
        blocks = xp.reshape(x, (*lead, n // (2 * h), 2, h, m))
        a, b = blocks[..., 0, :, :], blocks[..., 1, :, :]
        x = xp.reshape(xp.stack([a + b, a - b], axis=-3), (*lead, n, m))
        h *= 2
    return x


@dataclass(frozen=True, kw_only=True)
class HadamardRotation(Rotation):
    """Randomized Hadamard rotation ``(H_{2^k} (x) Q_m) D`` for ``d = 2^k m`` (``m`` odd)."""

    kind: ClassVar[str] = "hadamard"

    @functools.cached_property
    def _factors(self) -> tuple[int, int, np.ndarray, np.ndarray]:
        m = self.d
        while m % 2 == 0:
            m //= 2
        n = self.d // m
        hit = prebuilt.rotation_arrays(self.kind, self.d, self.seed)
        if hit is not None:
            return n, m, hit["signs"], hit["q"]
        rng = np.random.default_rng([self.seed, self.d, 0x4AD])
        signs = rng.choice(np.array([-1.0, 1.0]), size=self.d)
        q = _haar_matrix(m, rng) if m > 1 else np.ones((1, 1))
        return n, m, signs, q

    def host_arrays(self) -> dict[str, np.ndarray]:
        """What :mod:`tqai.prebuilt` records for this rotation."""
        _, _, signs, q = self._factors
        return {"signs": signs, "q": q}

    def _rotate(self, x: Any, *, xp: ModuleType) -> Any:
        n, m, signs, q = self._factors
        lead = tuple(x.shape[:-1])
        y = xp.reshape(x * self._on("signs", signs, x, xp), (*lead, n, m))
        if m > 1:
            y = y @ self._on("qt", q.T, x, xp)
        y = _fwht(y, n, xp=xp) * (1 / math.sqrt(n))
        return xp.reshape(y, (*lead, self.d))

    def _unrotate(self, y: Any, *, xp: ModuleType) -> Any:
        n, m, signs, q = self._factors
        lead = tuple(y.shape[:-1])
        x = _fwht(xp.reshape(y, (*lead, n, m)), n, xp=xp) * (1 / math.sqrt(n))
        if m > 1:
            x = x @ self._on("q", q, y, xp)
        return xp.reshape(x, (*lead, self.d)) * self._on("signs", signs, y, xp)


def _quaternion_matrices(count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3, 3)`` rotation matrices of uniformly random unit quaternions."""
    q = rng.standard_normal((count, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


@dataclass(frozen=True, kw_only=True)
class RotorRotation(Rotation):
    """Block-diagonal rotation from random unit quaternions (3x3 blocks), after a permutation.

    ``d = 3 n + r``: ``n`` quaternion blocks, then a random 2x2 rotation (r = 2) or a random sign
    (r = 1) for the remainder. O(d) per vector.
    """

    kind: ClassVar[str] = "rotor"

    @functools.cached_property
    def _host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hit = prebuilt.rotation_arrays(self.kind, self.d, self.seed)
        if hit is not None:
            return hit["perm"], hit["blocks"], hit["tail"]
        rng = np.random.default_rng([self.seed, self.d, 0x9070])
        perm = rng.permutation(self.d)
        n, r = divmod(self.d, 3)
        blocks = _quaternion_matrices(n, rng)
        if r == 2:
            angle = rng.uniform(0, 2 * math.pi)
            tail = np.array(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
            )
        else:
            tail = np.array([[rng.choice([-1.0, 1.0])]]) if r == 1 else np.zeros((0, 0))
        return perm, blocks, tail

    def host_arrays(self) -> dict[str, np.ndarray]:
        """What :mod:`tqai.prebuilt` records for this rotation."""
        perm, blocks, tail = self._host
        return {"perm": perm, "blocks": blocks, "tail": tail}

    def _rotate(self, x: Any, *, xp: ModuleType) -> Any:
        perm, blocks, tail = self._host
        return self._apply(x, perm, blocks, tail, inverse=False, xp=xp)

    def _unrotate(self, y: Any, *, xp: ModuleType) -> Any:
        perm, blocks, tail = self._host
        return self._apply(y, perm, blocks, tail, inverse=True, xp=xp)

    def _apply(self, x, perm, blocks, tail, *, inverse: bool, xp: ModuleType) -> Any:
        lead = tuple(x.shape[:-1])
        n = blocks.shape[0]
        if not inverse:
            x = xp.take(x, self._on("perm", perm, x, xp, index=True), axis=-1)
        # Row-vector form: y_block = x_block @ B^T (rotate) or y_block @ B (unrotate).
        bt = np.swapaxes(blocks, 1, 2) if not inverse else blocks
        tt = tail.T if not inverse else tail
        head = xp.reshape(x[..., : 3 * n], (*lead, n, 1, 3))
        head = xp.reshape(head @ self._on(f"b{inverse}", bt, x, xp), (*lead, 3 * n))
        parts = [head]
        if tail.size:
            parts.append(x[..., 3 * n :] @ self._on(f"t{inverse}", tt, x, xp))
        y = xp.concat(parts, axis=-1) if len(parts) > 1 else head
        if inverse:
            y = xp.take(y, self._on("invperm", np.argsort(perm), y, xp, index=True), axis=-1)
        return y


ROTATIONS: dict[str, type[Rotation]] = {
    cls.kind: cls for cls in (HaarRotation, HadamardRotation, RotorRotation)
}


def make_rotation(kind: str, d: int, *, seed: int = 0) -> Rotation:
    """Build a rotation by name: a built-in (``"haar"``, ``"hadamard"``, ``"rotor"``) or a plugin.

    Plugins come from the ``tqai.rotations`` entry-point group and are looked up only when the name
    is not a built-in.
    """
    cls = ROTATIONS.get(kind)
    if cls is None:
        from tqai.registry import registry

        plugins = registry("tqai.rotations")
        if kind not in plugins.available():
            raise ValueError(f"rotation must be one of {plugins.available()}, got {kind!r}")
        cls = plugins.get(kind)
    return cls(d=d, seed=seed)

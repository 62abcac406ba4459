"""TurboQuant_mse and TurboQuant_prod: the reference quantizers (pure array API).

Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization with Near-optimal
Distortion Rate", ICLR 2026, arXiv:2504.19874.

- :class:`TurboQuantMSE` is Algorithm 1: store ``||x||``, rotate the unit vector, replace every
  coordinate by the index of its nearest Lloyd-Max centroid (:mod:`tqai.codebooks`), bit-pack the
  indices (:mod:`tqai.packing`). Dequantize: centroids, rotate back, scale by the norm.
- :class:`TurboQuantProd` is Algorithm 2: the MSE quantizer at ``n_bits - 1`` bits, then one bit
  per row of a Gaussian sketch ``S`` (``m x d``, QJL, Zandieh et al. AAAI 2025, arXiv:2406.03482)
  of the residual ``r``, plus ``gamma = ||r||``; the dequantized vector adds
  ``sqrt(pi/2) / m * gamma * S^T sign(S r)``, which makes inner products unbiased. The residual
  and sketch live in the rotated domain (``S Pi`` is again i.i.d. Gaussian, so this is the same
  estimator), which lets attention kernels work entirely on rotated queries.

Inputs are ``(..., d)`` floating arrays of any namespace; the math runs in float32 (float64 for
float64 input). Norms are stored as float16 by default (``norm_dtype="float32"`` for vectors whose
norm exceeds float16's range). The norm of a zero vector is 0 and it decodes to exactly 0.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.codebooks import Codebook, lloyd_max_codebook, validate_dim, validate_n_bits
from tqai.container import QuantizedTensor, QuantizerSpec, dtype_name
from tqai.packing import pack_bits, unpack_bits
from tqai.rotations import Rotation, make_rotation

__all__ = ["TurboQuantMSE", "TurboQuantProd", "nearest_codes"]

_FLOAT16_MAX = 65504.0


def nearest_codes(y: Any, boundaries: Any, n_bits: int, *, xp: ModuleType | None = None) -> Any:
    """Index of the nearest centroid for every element of ``y`` (branch-free binary search).

    Args:
        y: floating array of rotated unit-vector coordinates, any shape.
        boundaries: ``(2**n_bits - 1,)`` sorted decision thresholds, same namespace and dtype;
            a value equal to a threshold goes to the lower cell.
        n_bits: bits per code.

    Returns:
        uint8 array of ``y``'s shape with values in ``[0, 2**n_bits)``.
    """
    xp = _xp.namespace(y, xp=xp)
    shape = tuple(y.shape)
    flat = xp.reshape(y, (-1,))
    if hasattr(xp, "searchsorted") and not _xp.is_mlx_namespace(xp):
        # the number of thresholds strictly below y: one vectorized pass, same codes
        return xp.reshape(
            xp.astype(xp.searchsorted(boundaries, flat, side="left"), xp.uint8), shape
        )
    idx = xp.zeros(flat.shape, dtype=xp.int32, device=_xp.device_of(y))
    step = 2 ** (n_bits - 1)
    while step >= 1:
        cand = idx + step
        threshold = xp.take(boundaries, xp.astype(cand - 1, xp.int64), axis=0)
        idx = xp.where(flat > threshold, cand, idx)
        step //= 2
    return xp.reshape(xp.astype(idx, xp.uint8), shape)


def _compute_dtype(x: Any, xp: ModuleType) -> Any:
    return xp.float64 if x.dtype == xp.float64 else xp.float32


def _norms(x: Any, xp: ModuleType) -> Any:
    return xp.sqrt(xp.sum(x * x, axis=-1))


class _TurboQuant:
    """Shared validation, norm handling and rotation for both TurboQuant variants."""

    kind: ClassVar[str]

    def __init__(
        self,
        d: int,
        n_bits: int,
        *,
        rotation: str = "haar",
        seed: int = 0,
        norm_dtype: str = "float16",
        qjl_dim: int = 0,
    ) -> None:
        self.spec = QuantizerSpec(
            kind=self.kind,
            d=validate_dim(d),
            n_bits=validate_n_bits(n_bits),
            rotation=rotation,
            seed=seed,
            norm_dtype=norm_dtype,
            qjl_dim=qjl_dim,
        )
        self.rotation: Rotation = make_rotation(rotation, self.spec.d, seed=seed)
        self._constants = _xp.HostConstants()

    def __repr__(self) -> str:
        s = self.spec
        extra = f", qjl_dim={s.qjl_dim}" if s.kind == "prod" else ""
        return (
            f"{type(self).__name__}(d={s.d}, n_bits={s.n_bits}, rotation={s.rotation!r}, "
            f"seed={s.seed}, norm_dtype={s.norm_dtype!r}{extra})"
        )

    @functools.cached_property
    def codebook(self) -> Codebook | None:
        """The Lloyd-Max codebook of the MSE stage (``None`` for a 1-bit prod quantizer)."""
        bits = self.spec.mse_bits
        return lloyd_max_codebook(self.spec.d, bits) if bits else None

    def _check_input(self, x: Any, xp: ModuleType) -> None:
        d = self.spec.d
        if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != d:
            raise ValueError(
                f"x must be an array of shape (..., {d}) for d={d}, got {getattr(x, 'shape', x)}"
            )
        if math.prod(x.shape) == 0:
            raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to quantize")
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(
                f"x must be a floating array (float16, bfloat16, float32, float64), got {x.dtype}"
            )
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError("x contains NaN or Inf; only finite values can be quantized")

    def _split_norm(self, x: Any, xp: ModuleType) -> tuple[Any, Any]:
        """``x -> (unit vectors, norms in the storage dtype)``, free of under- and overflow.

        Rows are scaled by their largest magnitude before squaring, so a finite vector never
        yields an infinite or zero norm by accident, and a zero row gives norm 0 and unit 0.
        """
        x = xp.astype(x, _compute_dtype(x, xp))
        amax = xp.max(xp.abs(x), axis=-1)
        scaled = x / xp.where(amax > 0, amax, xp.ones_like(amax))[..., None]
        scaled_norms = _norms(scaled, xp)
        norms = amax * scaled_norms
        limit = _FLOAT16_MAX if self.spec.norm_dtype == "float16" else float(xp.finfo(x.dtype).max)
        if bool(xp.any(norms > limit)):
            hint = "; use norm_dtype='float32'" if self.spec.norm_dtype == "float16" else ""
            raise ValueError(
                f"a vector norm exceeds {self.spec.norm_dtype}'s range ({limit:.6g}){hint}"
            )
        unit = scaled / xp.where(scaled_norms > 0, scaled_norms, xp.ones_like(amax))[..., None]
        return unit, xp.astype(norms, self._norm_dtype(xp))

    def _norm_dtype(self, xp: ModuleType) -> Any:
        dtype = getattr(xp, self.spec.norm_dtype, None)
        if dtype is None:
            raise TypeError(
                f"{_xp.namespace_name(xp)} has no {self.spec.norm_dtype}; "
                "use norm_dtype='float32' with this array library"
            )
        return dtype

    def _codes(self, y: Any, xp: ModuleType) -> Any:
        bounds = self.constant("boundaries", y, xp=xp)
        return nearest_codes(y, bounds, self.codebook.n_bits, xp=xp)

    def constant(self, name: str, like: Any, *, xp: ModuleType | None = None) -> Any:
        """A host constant of this quantizer next to ``like`` (its namespace, dtype, device).

        ``name``: ``"centroids"``, ``"boundaries"``, ``"sketch"`` (``(m, d)``, prod only) or
        ``"sketch_t"`` (its transpose). Moved once per target and cached.
        """
        xp = _xp.namespace(like, xp=xp)
        hosts = {
            "centroids": lambda: self.codebook.centroids,
            "boundaries": lambda: self.codebook.boundaries,
            "sketch": lambda: self.sketch,
            "sketch_t": lambda: self.sketch.T,
        }
        if name not in hosts:
            raise ValueError(f"name must be one of {sorted(hosts)}, got {name!r}")
        return self._constants.get(name, hosts[name](), like, xp)

    def lookup_centroids(self, codes: Any, like: Any, *, xp: ModuleType | None = None) -> Any:
        """``codes (...)`` -> centroid values ``(...)`` in ``like``'s namespace and dtype."""
        xp = _xp.namespace(like, xp=xp)
        table = self.constant("centroids", like, xp=xp)
        flat = xp.take(table, xp.reshape(xp.astype(codes, xp.int64), (-1,)), axis=0)
        return xp.reshape(flat, tuple(codes.shape))

    def _check_quantized(self, qt: QuantizedTensor) -> None:
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        if qt.spec != self.spec:
            raise ValueError(
                "qt was made by a different quantizer (codebook/rotation mismatch): "
                + ", ".join(self.spec.mismatches(qt.spec))
            )

    def dequantize(self, qt: QuantizedTensor, *, dtype: Any = None, xp=None) -> Any:
        """Reconstruct ``shape + (d,)`` vectors, in ``qt``'s original dtype unless ``dtype`` is given.

        Raises:
            ValueError: ``qt`` was made by a quantizer with another spec (codebook or rotation).
        """
        self._check_quantized(qt)
        xp = _xp.namespace(qt.norms, xp=xp)
        y = self.rotation.unrotate(self.dequantize_rotated(qt, xp=xp), xp=xp)
        return xp.astype(y, getattr(xp, qt.dtype) if dtype is None else dtype)


class TurboQuantMSE(_TurboQuant):
    """TurboQuant_mse (Algorithm 1 of arXiv:2504.19874).

    Args:
        d: vector size (>= 2).
        n_bits: bits per coordinate, 1..8.
        rotation: ``"haar"`` (default), ``"hadamard"``, ``"rotor"`` or a ``tqai.rotations`` plugin.
        seed: rotation seed; the same seed gives the same codes on every backend.
        norm_dtype: ``"float16"`` (default) or ``"float32"``.

    Example:
        >>> import numpy as np
        >>> q = TurboQuantMSE(d=128, n_bits=4)
        >>> x = np.random.default_rng(0).standard_normal((2, 16, 128)).astype(np.float32)
        >>> qt = q.quantize(x)
        >>> qt.packed.shape, qt.norms.dtype, qt.nbytes
        ((2, 16, 64), dtype('float16'), 2112)
        >>> err = np.sum((q.dequantize(qt) - x) ** 2) / np.sum(x**2)
        >>> bool(err < 0.012)
        True
    """

    kind = "mse"

    def __init__(
        self,
        d: int,
        n_bits: int,
        *,
        rotation: str = "haar",
        seed: int = 0,
        norm_dtype: str = "float16",
    ) -> None:
        super().__init__(d, n_bits, rotation=rotation, seed=seed, norm_dtype=norm_dtype)

    def quantize(self, x: Any, *, xp: ModuleType | None = None) -> QuantizedTensor:
        """Quantize ``(..., d)`` floating vectors into a :class:`QuantizedTensor` (same namespace)."""
        xp = _xp.namespace(x, xp=xp)
        self._check_input(x, xp)
        unit, stored = self._split_norm(x, xp)
        codes = self._codes(self.rotation.rotate(unit, xp=xp), xp)
        return QuantizedTensor(
            spec=self.spec,
            shape=tuple(x.shape[:-1]),
            dtype=dtype_name(x),
            packed=pack_bits(codes, self.spec.n_bits, xp=xp),
            norms=stored,
        )

    def codes(self, qt: QuantizedTensor, *, xp: ModuleType | None = None) -> Any:
        """The unpacked ``shape + (d,)`` uint8 codebook indices of ``qt``."""
        self._check_quantized(qt)
        return unpack_bits(qt.packed, self.spec.n_bits, self.spec.d, xp=xp)

    def dequantize_rotated(self, qt: QuantizedTensor, *, xp: ModuleType | None = None) -> Any:
        """``shape + (d,)`` reconstruction in the rotated domain, ``||x|| * c[idx]`` (float32)."""
        xp = _xp.namespace(qt.norms, xp=xp)
        codes = self.codes(qt, xp=xp)
        norms = xp.astype(qt.norms, xp.float32)
        return self.lookup_centroids(codes, norms, xp=xp) * norms[..., None]


class TurboQuantProd(_TurboQuant):
    """TurboQuant_prod (Algorithm 2 of arXiv:2504.19874): unbiased inner products.

    Args:
        d: vector size (>= 2).
        n_bits: total bits per coordinate, 1..8: an ``n_bits - 1`` bit MSE stage plus one QJL bit
            (at ``n_bits=1`` the MSE stage is empty and the QJL bit carries the whole vector).
        qjl_dim: rows ``m`` of the Gaussian sketch (default ``d``, as in the paper); the QJL part
            costs ``m`` bits per vector.
        rotation, seed, norm_dtype: as for :class:`TurboQuantMSE`.
    """

    kind = "prod"

    def __init__(
        self,
        d: int,
        n_bits: int,
        *,
        qjl_dim: int | None = None,
        rotation: str = "haar",
        seed: int = 0,
        norm_dtype: str = "float16",
    ) -> None:
        d = validate_dim(d)
        super().__init__(
            d,
            n_bits,
            rotation=rotation,
            seed=seed,
            norm_dtype=norm_dtype,
            qjl_dim=d if qjl_dim is None else qjl_dim,
        )

    @functools.cached_property
    def sketch(self) -> np.ndarray:
        """The ``(qjl_dim, d)`` float64 i.i.d. N(0, 1) QJL matrix ``S`` (host numpy, seeded)."""
        s = self.spec
        return np.random.default_rng([s.seed, s.d, s.qjl_dim, 0x0571]).standard_normal(
            (s.qjl_dim, s.d)
        )

    def _mse_part(self, codes: Any, like: Any, xp: ModuleType) -> Any:
        if self.codebook is None:
            return xp.zeros_like(like)
        return self.lookup_centroids(codes, like, xp=xp)

    def quantize(self, x: Any, *, xp: ModuleType | None = None) -> QuantizedTensor:
        """Quantize ``(..., d)`` floating vectors into a :class:`QuantizedTensor` (same namespace)."""
        xp = _xp.namespace(x, xp=xp)
        self._check_input(x, xp)
        s = self.spec
        unit, stored = self._split_norm(x, xp)
        y = self.rotation.rotate(unit, xp=xp)
        if self.codebook is None:
            codes = xp.zeros(tuple(y.shape), dtype=xp.uint8, device=_xp.device_of(y))
        else:
            codes = self._codes(y, xp)
        residual = y - self._mse_part(codes, y, xp)
        projected = residual @ self.constant("sketch_t", y, xp=xp)
        signs = xp.astype(projected >= 0, xp.uint8)
        return QuantizedTensor(
            spec=s,
            shape=tuple(x.shape[:-1]),
            dtype=dtype_name(x),
            packed=pack_bits(codes, s.mse_bits, xp=xp) if s.mse_bits else codes[..., :0],
            norms=stored,
            qjl=pack_bits(signs, 1, xp=xp),
            residual_norms=xp.astype(_norms(residual, xp), self._norm_dtype(xp)),
        )

    def dequantize_rotated(self, qt: QuantizedTensor, *, xp: ModuleType | None = None) -> Any:
        """``shape + (d,)`` float32 reconstruction in the rotated domain (MSE part + QJL part)."""
        self._check_quantized(qt)
        xp = _xp.namespace(qt.norms, xp=xp)
        s = self.spec
        norms = xp.astype(qt.norms, xp.float32)
        gamma = xp.astype(qt.residual_norms, xp.float32)
        signs = xp.astype(unpack_bits(qt.qjl, 1, s.qjl_dim, xp=xp), xp.float32) * 2 - 1
        sketch = self.constant("sketch", norms, xp=xp)
        qjl_part = (signs @ sketch) * (gamma * (math.sqrt(math.pi / 2) / s.qjl_dim))[..., None]
        if s.mse_bits:
            codes = unpack_bits(qt.packed, s.mse_bits, s.d, xp=xp)
            qjl_part = qjl_part + self.lookup_centroids(codes, norms, xp=xp)
        return qjl_part * norms[..., None]

"""The compressed-tensor container and its versioned, checksummed byte format.

A :class:`QuantizedTensor` holds what SPEC.md's "data format" lists and nothing else: packed b-bit
codes, one norm per vector, the identity of the rotation and codebook (a :class:`QuantizerSpec`),
and for TurboQuant_prod the packed QJL sign bits and the residual norms. ``nbytes`` is the memory
the arrays really hold.

Byte format (version 1), identical whichever backend writes or reads it::

    b"TQAI"                     magic, 4 bytes
    uint16 little-endian        format version
    uint32 little-endian        header length H
    H bytes                     UTF-8 JSON header: spec, shape, dtype, and for every array its
                                name, dtype, shape, byte offset and byte length in the payload
    payload                     the arrays, C order, little-endian, back to back
    32 bytes                    SHA-256 of everything before it

Reading checks the magic, the version, the lengths, the checksum and the header's consistency, and
raises :class:`TqaiFormatError` (a ``ValueError``) naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field, fields
from types import ModuleType
from typing import Any

import numpy as np

from tqai import _xp
from tqai.codebooks import validate_dim, validate_n_bits

__all__ = [
    "FORMAT_VERSION",
    "ITEMSIZE",
    "NORM_DTYPES",
    "QuantizedTensor",
    "QuantizerSpec",
    "TqaiFormatError",
    "dtype_name",
]

MAGIC = b"TQAI"
FORMAT_VERSION = 1
NORM_DTYPES = ("float16", "float32")
_PREFIX = struct.Struct("<4sHI")
_DIGEST = 32
ITEMSIZE = {
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}
_ARRAY_FIELDS = ("packed", "norms", "qjl", "residual_norms")


class TqaiFormatError(ValueError):
    """A serialized tqai blob is corrupted, truncated, foreign or of an unsupported version."""


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantizerSpec:
    """Everything needed to decode codes: quantizer kind, sizes, rotation and codebook identity.

    Attributes:
        kind: ``"mse"`` (TurboQuant_mse, Algorithm 1) or ``"prod"`` (TurboQuant_prod, Algorithm 2).
        d: vector size.
        n_bits: bits per coordinate (for ``prod``: the MSE stage uses ``n_bits - 1``, plus 1 QJL bit).
        rotation: rotation name (``"haar"``, ``"hadamard"``, ``"rotor"`` or a plugin's).
        seed: rotation (and QJL sketch) seed.
        codebook: codebook solver name.
        norm_dtype: ``"float16"`` or ``"float32"``: how norms are stored.
        qjl_dim: QJL sketch size ``m`` (``prod`` only; 0 for ``mse``).
    """

    kind: str
    d: int
    n_bits: int
    rotation: str = "haar"
    seed: int = 0
    codebook: str = "lloyd_max"
    norm_dtype: str = "float16"
    qjl_dim: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in ("mse", "prod"):
            raise ValueError(f"kind must be 'mse' or 'prod', got {self.kind!r}")
        validate_dim(self.d)
        validate_n_bits(self.n_bits)
        if self.norm_dtype not in NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {NORM_DTYPES}, got {self.norm_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.kind == "prod":
            validate_dim(self.qjl_dim, name="qjl_dim", low=1)
        elif self.qjl_dim != 0:
            raise ValueError(f"qjl_dim applies to kind='prod' only, got {self.qjl_dim}")

    @property
    def mse_bits(self) -> int:
        """Bits of the MSE (codebook) stage: ``n_bits`` for mse, ``n_bits - 1`` for prod."""
        return self.n_bits - 1 if self.kind == "prod" else self.n_bits

    def mismatches(self, other: QuantizerSpec) -> list[str]:
        """Names of the fields in which ``other`` differs, as ``name=mine vs theirs``."""
        return [
            f"{f.name}={getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def dtype_name(a: Any) -> str:
    """The bare dtype name of an array of any namespace (``float16``, ``uint8``, ...)."""
    return str(a.dtype).rsplit(".", 1)[-1]


@dataclass(frozen=True, kw_only=True, eq=False)
class QuantizedTensor:
    """A compressed tensor of ``shape + (d,)`` vectors (arrays in any array-API namespace).

    Attributes:
        spec: the quantizer identity needed to decode.
        shape: leading shape (every array below starts with it).
        dtype: dtype name of the original tensor (the default of ``dequantize``).
        packed: ``shape + (ceil(d/8) * mse_bits,)`` uint8 codes (see :mod:`tqai.packing`).
        norms: ``shape`` float16/float32 vector norms.
        qjl: ``shape + (ceil(qjl_dim/8),)`` uint8 packed QJL signs (``prod`` only).
        residual_norms: ``shape`` norms of the MSE-stage residual of the unit vector (``prod``).
    """

    spec: QuantizerSpec
    shape: tuple[int, ...]
    dtype: str
    packed: Any = field(repr=False)
    norms: Any = field(repr=False)
    qjl: Any = field(default=None, repr=False)
    residual_norms: Any = field(default=None, repr=False)

    def arrays(self) -> dict[str, Any]:
        """The arrays held, by field name (absent ones left out)."""
        return {k: getattr(self, k) for k in _ARRAY_FIELDS if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes really held by the arrays (codes, norms, QJL bits, residual norms)."""
        return sum(math.prod(a.shape) * ITEMSIZE[dtype_name(a)] for a in self.arrays().values())

    @property
    def bits_per_coordinate(self) -> float:
        """Average stored bits per original coordinate, everything counted."""
        count = math.prod(self.shape) * self.spec.d
        return 8 * self.nbytes / count if count else 0.0

    def to_bytes(self) -> bytes:
        """Serialize to the versioned, checksummed format of this module's docstring."""
        host = {k: np.ascontiguousarray(_xp.to_host(v)) for k, v in self.arrays().items()}
        entries, offset = [], 0
        for name, a in host.items():
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            host[name] = a
            entries.append(
                {
                    "name": name,
                    "dtype": a.dtype.name,
                    "shape": list(a.shape),
                    "offset": offset,
                    "nbytes": a.nbytes,
                }
            )
            offset += a.nbytes
        header = json.dumps(
            {
                "spec": asdict(self.spec),
                "shape": list(self.shape),
                "dtype": self.dtype,
                "arrays": entries,
            },
            sort_keys=True,
        ).encode()
        body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
        body += b"".join(a.tobytes() for a in host.values())
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, blob: bytes, *, xp: ModuleType = np, device: Any = None) -> QuantizedTensor:
        """Read a blob written by :meth:`to_bytes` into namespace ``xp`` (numpy by default).

        Raises:
            TqaiFormatError: bad magic, unsupported version, truncation, checksum mismatch or an
                inconsistent header.
        """
        blob = bytes(blob)
        if len(blob) < _PREFIX.size + _DIGEST:
            raise TqaiFormatError(f"blob is truncated: {len(blob)} bytes is shorter than a header")
        magic, version, header_len = _PREFIX.unpack_from(blob)
        if magic != MAGIC:
            raise TqaiFormatError(f"not a tqai blob: magic {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise TqaiFormatError(
                f"unsupported format version {version}; this tqai reads version {FORMAT_VERSION}"
            )
        if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
            raise TqaiFormatError("checksum mismatch: the blob is truncated or corrupted")
        start = _PREFIX.size + header_len
        try:
            header = json.loads(blob[_PREFIX.size : start])
            spec = QuantizerSpec(**header["spec"])
            shape = tuple(int(s) for s in header["shape"])
            payload = blob[start:-_DIGEST]
            arrays = {}
            for e in header["arrays"]:
                if e["name"] not in _ARRAY_FIELDS or e["dtype"] not in ITEMSIZE:
                    raise ValueError(f"unknown array {e['name']!r} of dtype {e['dtype']!r}")
                raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
                a = np.frombuffer(raw, dtype=np.dtype(e["dtype"]).newbyteorder("<"))
                arrays[e["name"]] = _xp.from_host(
                    a.reshape(e["shape"]).astype(e["dtype"]), xp, device=device
                )
            qt = cls(spec=spec, shape=shape, dtype=str(header["dtype"]), **arrays)
        except TqaiFormatError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise TqaiFormatError(f"inconsistent tqai header: {exc}") from exc
        qt.validate()
        return qt

    def validate(self) -> None:
        """Check that the arrays have the shapes and dtypes the spec implies."""
        s, lead = self.spec, tuple(self.shape)
        want = {
            "packed": ((*lead, -(-s.d // 8) * s.mse_bits), ("uint8",)),
            "norms": (lead, (s.norm_dtype,)),
        }
        if s.kind == "prod":
            want["qjl"] = ((*lead, -(-s.qjl_dim // 8)), ("uint8",))
            want["residual_norms"] = (lead, (s.norm_dtype,))
        have = self.arrays()
        if set(have) != set(want):
            raise TqaiFormatError(f"a {s.kind!r} tensor holds {sorted(want)}, got {sorted(have)}")
        for name, (shape, dtypes) in want.items():
            a = have[name]
            if tuple(a.shape) != shape or dtype_name(a) not in dtypes:
                raise TqaiFormatError(
                    f"{name} must be {dtypes[0]} of shape {shape}, "
                    f"got {dtype_name(a)} of shape {tuple(a.shape)}"
                )

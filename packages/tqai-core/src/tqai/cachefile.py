"""Saved prompt caches: one versioned, checksummed file for a whole cache, any backend.

A cache file holds a JSON header (what made it: the model signature and the tqai cache config,
plus each layer's token counts) and named arrays: per compressed layer its sinks, packed codes,
norms and window, exactly what :meth:`tqai.kvstore.KVStore.state` returns; per uncompressed layer
its full-precision keys and values. Backends read and write the same bytes.

Layout (version 1)::

    b"TQAICACH"                 magic, 8 bytes
    uint16 little-endian        format version
    uint32 little-endian        header length H
    H bytes                     UTF-8 JSON: {"meta": ..., "arrays": [{name, dtype, shape,
                                offset, nbytes}, ...]}
    payload                     arrays back to back, C order, little-endian (bfloat16 is
                                stored as float32 and cast back on reading)
    32 bytes                    SHA-256 of everything before it

Writes are atomic (a temporary file renamed into place), so an interrupted save never leaves a
half-written file where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tqai import _xp
from tqai.container import TqaiFormatError, dtype_name

__all__ = ["CACHE_FORMAT_VERSION", "read_cache_file", "write_cache_file"]

MAGIC = b"TQAICACH"
CACHE_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHI")
_DIGEST = 32


def write_cache_file(path: str | os.PathLike, meta: dict, arrays: dict[str, Any]) -> Path:
    """Write ``meta`` (JSON-able) and ``arrays`` (any namespace) to ``path`` atomically."""
    path = Path(path)
    index, blobs, offset = [], [], 0
    for name, a in arrays.items():
        original = dtype_name(a)
        host = np.ascontiguousarray(_xp.to_host(a))
        host = host.astype(host.dtype.newbyteorder("<"), copy=False)
        index.append(
            {
                "name": name,
                "dtype": original,
                "stored": host.dtype.name,
                "shape": list(host.shape),
                "offset": offset,
                "nbytes": host.nbytes,
            }
        )
        blobs.append(host.tobytes())
        offset += host.nbytes
    header = json.dumps({"meta": meta, "arrays": index}, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, CACHE_FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body + hashlib.sha256(body).digest())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_cache_file(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[np.ndarray, str]]]:
    """Read a cache file: ``(meta, {name: (numpy array, original dtype name)})``.

    Raises:
        TqaiFormatError: not a tqai cache file, unsupported version, truncated or corrupted.
    """
    blob = Path(path).read_bytes()
    if len(blob) < _PREFIX.size + _DIGEST:
        raise TqaiFormatError(f"{path}: truncated ({len(blob)} bytes) or not a tqai cache file")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise TqaiFormatError(f"{path}: not a tqai cache file (magic {magic!r})")
    if version != CACHE_FORMAT_VERSION:
        raise TqaiFormatError(
            f"{path}: cache format version {version}; this tqai reads {CACHE_FORMAT_VERSION}"
        )
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise TqaiFormatError(f"{path}: checksum mismatch: the file is truncated or corrupted")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(blob[_PREFIX.size : start])
        payload = blob[start:-_DIGEST]
        arrays = {}
        for e in header["arrays"]:
            raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
            a = np.frombuffer(raw, dtype=np.dtype(e["stored"]).newbyteorder("<"))
            arrays[e["name"]] = (a.reshape(e["shape"]).astype(e["stored"]), e["dtype"])
        return header["meta"], arrays
    except (KeyError, TypeError, ValueError) as exc:
        raise TqaiFormatError(f"{path}: inconsistent cache header: {exc}") from exc

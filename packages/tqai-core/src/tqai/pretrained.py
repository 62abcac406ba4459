"""The folder ``tqai convert`` writes next to a model, and reading it back for a fast start.

Why it is shaped like this: everything ``tqai.patch`` needs beyond the model is a handful of
options plus host constants that are computed on first use (rotation matrices, Lloyd-Max
codebooks for sizes without a shipped table: activation widths such as 576 or 1536 cost a QR
and a solve each). ``tqai convert`` runs the backend's own ``patch`` once to validate the options
and collect exactly the quantizers it builds, then writes:

- ``tqai_config.json``: format name and version, the patch options, the model's fingerprint
  (the fields the settings depend on), the per-layer settings (compressed or not, head dim,
  cache layer type), the list of stored constants with their specs, the SHA-256 of the arrays
  file, and ``calibration`` (none is written yet: ``pipeline=`` options are refused);
- ``tqai_constants.npz``: the host arrays (float64 / int64 numpy), one entry per constant.

:func:`load_pretrained` checks the format, version, checksum and every array's shape, compares
the fingerprint with the model's (each mismatching field is named), then records the constants in
:mod:`tqai.prebuilt`, where rotations and codebooks look before computing anything. So
``patch(model, from_pretrained=DIR)`` is ``patch(model, **options)`` with no solving, and gives
bit-identical outputs (the constants are exactly the computed ones).

Example:
    >>> # tqai convert --model smollm2-135m --output ./smollm2-tqai --config all8
    >>> # tqai.patch(model, from_pretrained="./smollm2-tqai")
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tqai import prebuilt

__all__ = [
    "ARRAYS_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "VERSION",
    "PretrainedConfig",
    "PretrainedError",
    "check_fingerprint",
    "explicit_options",
    "load_pretrained",
    "save_pretrained",
]

FORMAT = "tqai-pretrained"
VERSION = 1
CONFIG_FILE = "tqai_config.json"
ARRAYS_FILE = "tqai_constants.npz"


class PretrainedError(ValueError):
    """A converted folder that cannot be used (missing, corrupted, another model or version)."""


@dataclass(frozen=True, slots=True)
class PretrainedConfig:
    """What a converted folder holds (after :func:`load_pretrained` checked it).

    Attributes:
        backend: the backend that wrote it (``"torch"``, ``"mlx"``).
        options: the patch options, as ``patch(model, **options)`` takes them.
        model: the fingerprint of the model it was converted for.
        layers: per-layer settings (``{"index", "compressed", ...}``).
        path: the folder.
    """

    backend: str
    options: dict[str, Any]
    model: dict[str, Any]
    layers: list[dict[str, Any]]
    path: Path


def _quantizer_constants(quantizers: Iterable[Any]) -> tuple[dict[str, np.ndarray], list[dict]]:
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict] = []
    seen = set()
    for q in quantizers:
        rot = q.rotation
        key = ("rotation", rot.kind, rot.d, rot.seed)
        host = getattr(rot, "host_arrays", None)
        if key not in seen and host is not None:
            seen.add(key)
            names = []
            for name, value in host().items():
                arrays[f"rotation/{rot.kind}/{rot.d}/{rot.seed}/{name}"] = np.asarray(value)
                names.append(name)
            entries.append(
                {
                    "what": "rotation",
                    "kind": rot.kind,
                    "d": rot.d,
                    "seed": rot.seed,
                    "arrays": names,
                }
            )
        cb = q.codebook
        key = ("codebook", q.spec.d, getattr(cb, "n_bits", None))
        if cb is not None and key not in seen:
            seen.add(key)
            arrays[f"codebook/{q.spec.d}/{cb.n_bits}"] = np.asarray(cb.centroids)
            entries.append({"what": "codebook", "d": q.spec.d, "n_bits": cb.n_bits})
    return arrays, entries


def save_pretrained(
    directory: str | Path,
    *,
    backend: str,
    options: Mapping[str, Any],
    model: Mapping[str, Any],
    layers: list[Mapping[str, Any]],
    quantizers: Iterable[Any],
) -> Path:
    """Write a converted folder (created if needed; the two files are replaced).

    Args:
        directory: the output folder.
        backend: the backend name (``"torch"`` / ``"mlx"``).
        options: JSON-able patch options.
        model: the model fingerprint (JSON-able).
        layers: per-layer settings.
        quantizers: every quantizer the patch builds (their rotations and codebooks are stored).

    Returns:
        The path of ``tqai_config.json``.
    """
    from importlib.metadata import version

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays, entries = _quantizer_constants(quantizers)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    (directory / ARRAYS_FILE).write_bytes(blob)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "tqai_version": version("tqai-core"),
        "backend": backend,
        "options": dict(options),
        "model": dict(model),
        "layers": [dict(layer) for layer in layers],
        "constants": {
            "file": ARRAYS_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "entries": entries,
        },
        "calibration": None,
    }
    path = directory / CONFIG_FILE
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _odd_part(d: int) -> int:
    while d % 2 == 0:
        d //= 2
    return d


def _expected_shapes(entry: dict) -> dict[str, tuple[int, ...]]:
    d = int(entry["d"])
    if entry["what"] == "codebook":
        return {"": (2 ** int(entry["n_bits"]),)}
    kind = entry["kind"]
    if kind == "haar":
        return {"matrix": (d, d)}
    if kind == "hadamard":
        m = _odd_part(d)
        return {"signs": (d,), "q": (m, m)}
    if kind == "rotor":
        n, r = divmod(d, 3)
        return {"perm": (d,), "blocks": (n, 3, 3), "tail": (r, r) if r else (0, 0)}
    return {}


def load_pretrained(directory: str | Path, *, backend: str | None = None) -> PretrainedConfig:
    """Read and check a converted folder, and record its constants in :mod:`tqai.prebuilt`.

    Args:
        directory: a folder written by ``tqai convert``.
        backend: if given, the folder must have been written for this backend.

    Raises:
        PretrainedError: a missing folder or file, another format or version, a checksum that
            does not match, an array of the wrong shape, or another backend.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PretrainedError(
            f"from_pretrained={str(directory)!r} has no {CONFIG_FILE}: not a folder written by "
            "`tqai convert`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as ex:
        raise PretrainedError(f"{path} is not valid JSON ({ex}); re-run `tqai convert`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PretrainedError(f"{path} is not a {FORMAT!r} file (format={doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise PretrainedError(
            f"{path} has version {doc.get('version')!r}; this tqai reads version {VERSION}: "
            "re-run `tqai convert`"
        )
    if backend is not None and doc.get("backend") != backend:
        raise PretrainedError(
            f"{path} was written for the {doc.get('backend')!r} backend, not {backend!r}"
        )
    constants = doc.get("constants") or {}
    blob_path = directory / constants.get("file", ARRAYS_FILE)
    if not blob_path.is_file():
        raise PretrainedError(f"{blob_path} is missing; re-run `tqai convert`")
    blob = blob_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != constants.get("sha256"):
        raise PretrainedError(
            f"{blob_path} does not match the SHA-256 recorded in {CONFIG_FILE} (corrupted or "
            "edited); re-run `tqai convert`"
        )
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    rotations, codebooks = [], []
    for entry in constants.get("entries", []):
        shapes = _expected_shapes(entry)
        if entry["what"] == "codebook":
            name = f"codebook/{entry['d']}/{entry['n_bits']}"
            values = arrays.get(name)
            if values is None or values.shape != shapes[""] or np.any(np.diff(values) <= 0):
                raise PretrainedError(f"{blob_path}: {name} is missing, misshaped or unsorted")
            codebooks.append((int(entry["d"]), int(entry["n_bits"]), values))
            continue
        prefix = f"rotation/{entry['kind']}/{entry['d']}/{entry['seed']}"
        found = {n: arrays.get(f"{prefix}/{n}") for n in entry["arrays"]}
        for n, value in found.items():
            want = shapes.get(n)
            if value is None or (want is not None and value.shape != want):
                raise PretrainedError(f"{blob_path}: {prefix}/{n} is missing or misshaped")
        rotations.append((entry["kind"], int(entry["d"]), int(entry["seed"]), found))
    for kind, d, seed, found in rotations:
        prebuilt.install_rotation(kind, d, seed, found)
    for d, n_bits, values in codebooks:
        prebuilt.install_codebook(d, n_bits, values)
    return PretrainedConfig(
        backend=doc.get("backend"),
        options=dict(doc.get("options") or {}),
        model=dict(doc.get("model") or {}),
        layers=list(doc.get("layers") or []),
        path=directory,
    )


def check_fingerprint(saved: Mapping[str, Any], actual: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`PretrainedError` naming every field where ``saved`` and ``actual`` differ."""
    diffs = [
        f"{k}: folder {saved.get(k)!r}, model {actual.get(k)!r}"
        for k in sorted(set(saved) | set(actual))
        if saved.get(k) != actual.get(k)
    ]
    if diffs:
        raise PretrainedError(
            f"{where} was converted for another model ({'; '.join(diffs)}); run `tqai convert` "
            "for this model"
        )


def explicit_options(fn: Any, arguments: Mapping[str, Any]) -> list[str]:
    """Names of ``fn``'s defaulted options in ``arguments`` (its ``locals()``) that differ from
    their defaults: what a ``patch(model, from_pretrained=DIR, ...)`` call was also given."""
    given = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.default is inspect.Parameter.empty or name == "from_pretrained":
            continue
        if name in arguments and arguments[name] != param.default:
            given.append(name)
    return given

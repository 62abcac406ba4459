"""The folder ``tqai convert`` writes next to a model, and reading it back for a fast start.

Why it is shaped like this: everything ``tqai.patch`` needs beyond the model is a handful of
options plus host constants that are computed on first use (rotation matrices, Lloyd-Max
codebooks for sizes without a shipped table: activation widths such as 576 or 1536 cost a QR
and a solve each). ``tqai convert`` runs the backend's own ``patch`` once to validate the options
and collect exactly the quantizers it builds, then writes:

- ``tqai_config.json``: format name and version, the patch options (``layer_bits`` as one
  ``[bits_k, bits_v]`` pair per layer; ``pipeline`` as a plain JSON dict), the model's
  fingerprint (the fields the settings depend on), the per-layer settings (compressed or not,
  head dim, cache layer type, widths), the list of stored constants with their specs, the
  SHA-256 of the arrays file, and ``calibration`` (``null``, or the calibration file's name,
  SHA-256, shape, model name and, when the per-layer widths came from it, the budgets);
- ``tqai_constants.npz``: the host arrays (float64 / int64 numpy), one entry per constant;
- ``tqai_calibration.json`` (only with a calibration): the ``tqai calibrate`` Fisher file
  (:class:`tqai.pipeline.scorers.fisher_static.FisherCalibration` format). A ``fisher_static``
  scorer in ``pipeline`` names it relative to the folder (:func:`pipeline_to_folder`); reading
  the folder turns that into the absolute path (:func:`pipeline_from_folder`).

:func:`load_pretrained` checks the format, version, both checksums and every array's shape,
compares the fingerprint with the model's (each mismatching field is named), then records the
constants in :mod:`tqai.prebuilt`, where rotations and codebooks look before computing anything.
So ``patch(model, from_pretrained=DIR)`` is ``patch(model, **options)`` with no solving and no
calibration work (per-layer widths are stored, not derived again), and gives bit-identical
outputs (the constants are exactly the computed ones).

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
    "CALIBRATION_FILE",
    "CONFIG_FILE",
    "FORMAT",
    "VERSION",
    "PretrainedConfig",
    "PretrainedError",
    "check_calibration",
    "check_fingerprint",
    "explicit_options",
    "fisher_options",
    "load_calibration",
    "load_pretrained",
    "pipeline_from_folder",
    "pipeline_quantizers",
    "pipeline_to_folder",
    "save_pretrained",
]

FORMAT = "tqai-pretrained"
VERSION = 2
"""Version 2 added the calibration file and stored ``pipeline`` / ``layer_bits`` options; a
version-1 folder (no calibration, neither option) reads the same way."""
_READABLE = (1, VERSION)
CONFIG_FILE = "tqai_config.json"
ARRAYS_FILE = "tqai_constants.npz"
CALIBRATION_FILE = "tqai_calibration.json"
_FISHER_SCORER = "fisher_static"


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
        calibration: the folder's checked ``tqai_calibration.json``, or None.
    """

    backend: str
    options: dict[str, Any]
    model: dict[str, Any]
    layers: list[dict[str, Any]]
    path: Path
    calibration: Path | None = None


def load_calibration(calibration: Any) -> Any:
    """A :class:`~tqai.pipeline.scorers.fisher_static.FisherCalibration` from a path or itself.

    Raises:
        ValueError: ``calibration`` is neither, or the file is malformed (``CalibrationError``
            names the file, the key and why).
    """
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    if isinstance(calibration, FisherCalibration):
        return calibration
    if isinstance(calibration, str | Path):
        return FisherCalibration.load(calibration)
    raise ValueError(
        "calibration must be a `tqai calibrate` JSON file path or a FisherCalibration, got "
        f"{type(calibration).__name__}"
    )


def check_calibration(calibration: Any, *, num_layers: int, num_kv_heads: int) -> None:
    """Raise ``ValueError`` unless ``calibration`` is ``(num_layers, num_kv_heads)``: it was
    measured on this model's layers and K/V heads."""
    have = (calibration.num_layers, calibration.num_kv_heads)
    if have != (num_layers, num_kv_heads):
        raise ValueError(
            f"calibration has {have[0]} layers x {have[1]} K/V heads, the model "
            f"{num_layers} x {num_kv_heads}: it was measured on another model (run `tqai "
            "calibrate` on this one)"
        )


def fisher_options(options: Mapping[str, Any], calibration: Any) -> tuple[list, dict[str, Any]]:
    """Per-layer widths for ``options`` from a Fisher calibration, and how they were derived.

    The budgets are the mean widths ``options`` give (``bits_k`` / ``bits_v`` or the named
    ``config``'s, K4/V2 by default): :func:`tqai.layer_bits.fisher_layer_bits` spreads them over
    the layers by their mean Fisher information, so the cache holds at most the uniform setting's
    mean bits, with more of them where the loss is sensitive.

    Returns:
        ``(layer_bits, record)``: one ``[bits_k, bits_v]`` per layer, and
        ``{"method": "fisher_layer_bits", "bits_k": budget_k, "bits_v": budget_v}``.

    Raises:
        ValueError: no calibration, ``options`` also give ``layer_bits``, or options the named
            config contradicts.
    """
    from tqai.layer_bits import fisher_layer_bits
    from tqai.named_configs import resolve_patch_options

    if calibration is None:
        raise ValueError("fisher_layer_bits=True needs calibration= (a `tqai calibrate` file)")
    if options.get("layer_bits") is not None:
        raise ValueError("give either layer_bits= or fisher_layer_bits=True, not both")
    budget_k, budget_v, _ = resolve_patch_options(
        options.get("config"),
        bits_k=options.get("bits_k"),
        bits_v=options.get("bits_v"),
        hidden_bits=options.get("hidden_bits"),
        ffn_bits=options.get("ffn_bits"),
    )
    pairs = [list(p) for p in fisher_layer_bits(calibration, budget_k, budget_v)]
    return pairs, {"method": "fisher_layer_bits", "bits_k": budget_k, "bits_v": budget_v}


def _same_calibration(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.k, b.k) and np.array_equal(a.v, b.v))


def pipeline_to_folder(pipeline: Any, calibration: Any = None) -> tuple[Any, Any]:
    """A pipeline config as a converted folder stores it, and the calibration the folder holds.

    The config must be plain JSON (plugin names, numbers, lists, dicts): classes and instances
    cannot be written. A ``fisher_static`` scorer's ``scorer_kwargs["path"]`` is read, becomes
    the folder's calibration and is replaced by :data:`CALIBRATION_FILE` (relative to the folder).

    Args:
        pipeline: None or a pipeline config dict (``patch(model, pipeline=...)``).
        calibration: the calibration given to ``convert`` besides it (a ``FisherCalibration``),
            or None.

    Returns:
        ``(stored_pipeline, calibration)``: the JSON dict (or None) and the folder's calibration.

    Raises:
        ValueError: a pipeline that is not plain JSON, ``scorer_kwargs={"calibration": ...}``
            (an object; pass ``path=``), or a scorer file that differs from ``calibration``.
    """
    if pipeline is None:
        return None, calibration
    if not isinstance(pipeline, Mapping):
        raise ValueError(
            "convert stores pipeline= as a config dict; got a "
            f"{type(pipeline).__name__} (pass the dict it was built from)"
        )
    try:
        stored = json.loads(json.dumps(pipeline))
    except (TypeError, ValueError) as ex:
        raise ValueError(
            f"convert stores pipeline= as JSON: plugin names, numbers, lists and dicts only ({ex})"
        ) from None
    kwargs = stored.get("scorer_kwargs")
    if (
        stored.get("scorer") != _FISHER_SCORER
        or not isinstance(kwargs, dict)
        or "path" not in kwargs
    ):
        return stored, calibration
    found = load_calibration(kwargs["path"])
    if calibration is not None and not _same_calibration(found, calibration):
        raise ValueError(
            f"pipeline scorer_kwargs['path'] = {kwargs['path']!r} is another calibration than "
            "calibration=; a converted folder holds one (pass the same file to both)"
        )
    stored["scorer_kwargs"] = {**kwargs, "path": CALIBRATION_FILE}
    return stored, found


def pipeline_from_folder(pipeline: Any, directory: Path, has_calibration: bool) -> Any:
    """The stored pipeline dict with a ``fisher_static`` scorer's file made absolute.

    Raises:
        PretrainedError: the pipeline names the folder's calibration but the folder has none.
    """
    kwargs = pipeline.get("scorer_kwargs") if isinstance(pipeline, dict) else None
    if not isinstance(kwargs, dict) or kwargs.get("path") != CALIBRATION_FILE:
        return pipeline
    if not has_calibration:
        raise PretrainedError(
            f"{directory / CONFIG_FILE}: the pipeline reads {CALIBRATION_FILE} but the folder "
            "records no calibration (edited?); re-run `tqai convert`"
        )
    return {**pipeline, "scorer_kwargs": {**kwargs, "path": str(directory / CALIBRATION_FILE)}}


def pipeline_quantizers(pipeline: Any, head_dims: Iterable[int]) -> list[Any]:
    """Every quantizer a built cache pipeline can ask its bank for, for ``head_dims``.

    Its base widths and, for a strategy with ``widths(n_bits)`` (``tiered``), their high and low
    widths; with a monitor (which moves the width between steps), every width 1..8 the bank's
    quantizer accepts. Stored so that no step solves a codebook mid-generation either.
    """
    if pipeline is None:
        return []
    widths = set(pipeline.bits.values())
    if pipeline.strategy is not None and hasattr(pipeline.strategy, "widths"):
        widths |= {w for b in pipeline.bits.values() for w in pipeline.strategy.widths(b)}
    if pipeline.monitor is not None:
        widths |= set(range(1, 9))
    out = []
    for d in head_dims:
        for bits in sorted(widths):
            try:
                out.append(pipeline.quantizers.get(d, bits))
            except (TypeError, ValueError):  # a width this quantizer never serves
                continue
    return out


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
    calibration: Any = None,
    layer_bits_from: Mapping[str, Any] | None = None,
) -> Path:
    """Write a converted folder (created if needed; its files are replaced).

    Args:
        directory: the output folder.
        backend: the backend name (``"torch"`` / ``"mlx"``).
        options: JSON-able patch options.
        model: the model fingerprint (JSON-able).
        layers: per-layer settings.
        quantizers: every quantizer the patch builds (their rotations and codebooks are stored).
        calibration: a ``FisherCalibration`` to store as :data:`CALIBRATION_FILE`, or None (a
            calibration file an earlier conversion left in the folder is then removed).
        layer_bits_from: how ``options["layer_bits"]`` was derived from ``calibration``
            (e.g. ``{"method": "fisher_layer_bits", "bits_k": 4, "bits_v": 2}``), or None.

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
    calibration_path = directory / CALIBRATION_FILE
    if calibration is None:
        calibration_path.unlink(missing_ok=True)
    else:
        text = json.dumps(calibration.to_dict(), indent=1) + "\n"
        calibration_path.write_text(text, encoding="utf-8")
        doc["calibration"] = {
            "file": CALIBRATION_FILE,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "num_layers": calibration.num_layers,
            "num_kv_heads": calibration.num_kv_heads,
            "model": calibration.model,
            "layer_bits_from": None if layer_bits_from is None else dict(layer_bits_from),
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
    if doc.get("version") not in _READABLE:
        raise PretrainedError(
            f"{path} has version {doc.get('version')!r}; this tqai reads versions "
            f"{', '.join(map(str, _READABLE))}: re-run `tqai convert`"
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
    calibration = _checked_calibration(directory, doc.get("calibration"))
    options = dict(doc.get("options") or {})
    if options.get("pipeline") is not None:
        options["pipeline"] = pipeline_from_folder(
            options["pipeline"], directory, calibration is not None
        )
    for kind, d, seed, found in rotations:
        prebuilt.install_rotation(kind, d, seed, found)
    for d, n_bits, values in codebooks:
        prebuilt.install_codebook(d, n_bits, values)
    return PretrainedConfig(
        backend=doc.get("backend"),
        options=options,
        model=dict(doc.get("model") or {}),
        layers=list(doc.get("layers") or []),
        path=directory,
        calibration=calibration,
    )


def _checked_calibration(directory: Path, record: Any) -> Path | None:
    """The folder's calibration file after its checksum check, or None if it records none."""
    if record is None:
        return None
    if not isinstance(record, dict) or "sha256" not in record:
        raise PretrainedError(
            f"{directory / CONFIG_FILE}: 'calibration' must be null or a record with the file's "
            f"sha256, got {record!r}; re-run `tqai convert`"
        )
    path = directory / record.get("file", CALIBRATION_FILE)
    if not path.is_file():
        raise PretrainedError(
            f"{path} is missing (the folder records a calibration); re-run `tqai convert`"
        )
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise PretrainedError(
            f"{path} does not match the SHA-256 recorded in {CONFIG_FILE} (corrupted or "
            "edited); re-run `tqai convert`"
        )
    return path


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

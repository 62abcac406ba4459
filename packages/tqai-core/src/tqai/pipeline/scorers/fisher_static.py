"""fisher_static: per-layer, per-head diagonal Fisher weights from an offline calibration file.

The runtime ``fisher`` proxy lacks the gradient factor of the Fisher information (see
:mod:`tqai.pipeline.scorers.fisher`). Offline calibration supplies it: real forward and backward
passes over calibration prompts give, per layer and per K/V head, the mean squared gradient of the
loss with respect to the keys and the values (``calibrate_fisher`` in tqai-torch and
``tqai calibrate`` write the file). At run time the score of token ``i`` in head ``h`` is the
second-order loss estimate of quantizing it (LeCun et al., "Optimal Brain Damage", 1989)::

    score_hi = F[layer, h] * mean_d x_hid^2        (token_energy=True, default)
    score_hi = F[layer, h]                         (token_energy=False)

since TurboQuant's error of a token scales with its squared norm. Weights are normalized to mean
1 per stream, so scores are comparable across heads and a strategy that ranks all heads jointly
moves bits to the sensitive heads.

Calibration file format (JSON, version 1)::

    {
      "format": "tqai.fisher",              required, exactly this string
      "version": 1,                         required
      "num_layers": 30,                     required, int >= 1
      "num_kv_heads": 3,                    required, int >= 1
      "k": [[f_00, f_01, f_02], ...],       required, num_layers rows of num_kv_heads floats
      "v": [[...], ...],                    required, same shape; finite, >= 0, not all zero
      "model": "HuggingFaceTB/SmolLM2-135M",   optional, str
      "meta": {"prompts": 64, "tokens": 32768} optional, dict (free-form provenance)
    }

Any other top-level key is an error, so a typo cannot pass silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tqai import _xp
from tqai.pipeline import _ops

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CalibrationError",
    "FisherCalibration",
    "FisherStaticScorer",
]

FORMAT = "tqai.fisher"
FORMAT_VERSION = 1
_REQUIRED = ("format", "version", "num_layers", "num_kv_heads", "k", "v")
_OPTIONAL = ("model", "meta")
_STREAMS = ("k", "v")


class CalibrationError(ValueError):
    """A Fisher calibration file is malformed; the message names the file, the key and why."""


def _positive_int(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{where}: {key!r} must be an integer >= 1, got {value!r}")
    return value


def _weights(data: Mapping[str, Any], key: str, shape: tuple[int, int], where: str) -> np.ndarray:
    rows = data[key]
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise CalibrationError(f"{where}: {key!r} must be a list of per-layer lists of floats")
    lengths = sorted({len(r) for r in rows})
    if len(rows) != shape[0] or lengths != [shape[1]]:
        raise CalibrationError(
            f"{where}: {key!r} must be num_layers x num_kv_heads = {shape[0]} x {shape[1]}, "
            f"got {len(rows)} rows of length {', '.join(map(str, lengths)) or '-'}"
        )
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for r in rows for v in r):
        raise CalibrationError(f"{where}: {key!r} must hold numbers only")
    weights = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise CalibrationError(f"{where}: {key!r} must hold finite values >= 0")
    if not np.any(weights > 0):
        raise CalibrationError(f"{where}: {key!r} is all zeros; the calibration carries nothing")
    return weights


@dataclass(frozen=True, kw_only=True)
class FisherCalibration:
    """Validated per-layer, per-head Fisher weights (the file format of the module docstring).

    Attributes:
        k, v: ``(num_layers, num_kv_heads)`` float64 mean squared gradients of the loss with
            respect to the keys and the values.
        model: the calibrated model's name, or ``None``.
        meta: free-form provenance (prompt count, tokens, date...).
    """

    k: np.ndarray = field(repr=False)
    v: np.ndarray = field(repr=False)
    model: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = {"k": np.asarray(self.k).tolist(), "v": np.asarray(self.v).tolist()}
        shape = np.shape(self.k)
        if len(shape) != 2:
            raise CalibrationError(f"k must be a (num_layers, num_kv_heads) array, got {shape}")
        for key in _STREAMS:
            object.__setattr__(self, key, _weights(data, key, shape, "FisherCalibration"))

    @property
    def num_layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.k.shape[1])

    @classmethod
    def from_dict(cls, data: object, *, where: str = "calibration") -> FisherCalibration:
        """Validate a parsed JSON object; raises :class:`CalibrationError` naming the problem."""
        if not isinstance(data, dict):
            raise CalibrationError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CalibrationError(f"{where}: missing required key(s) {', '.join(missing)}")
        unknown = [k for k in data if k not in _REQUIRED + _OPTIONAL]
        if unknown:
            raise CalibrationError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                f"{', '.join(_REQUIRED + _OPTIONAL)}"
            )
        if data["format"] != FORMAT:
            raise CalibrationError(f"{where}: 'format' must be {FORMAT!r}, got {data['format']!r}")
        if data["version"] != FORMAT_VERSION:
            raise CalibrationError(
                f"{where}: unsupported version {data['version']!r}; this tqai reads version "
                f"{FORMAT_VERSION}"
            )
        shape = (
            _positive_int(data, "num_layers", where),
            _positive_int(data, "num_kv_heads", where),
        )
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise CalibrationError(f"{where}: 'model' must be a string, got {model!r}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise CalibrationError(f"{where}: 'meta' must be a JSON object, got {meta!r}")
        return cls(
            k=_weights(data, "k", shape, where),
            v=_weights(data, "v", shape, where),
            model=model,
            meta=meta,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FisherCalibration:
        """Read and validate a calibration file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as ex:
            raise CalibrationError(f"cannot read Fisher calibration {path}: {ex}") from ex
        try:
            data = json.loads(text)
        except json.JSONDecodeError as ex:
            raise CalibrationError(f"{path}: not valid JSON: {ex}") from ex
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the file format (inverse of :meth:`from_dict`)."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "k": self.k.tolist(),
            "v": self.v.tolist(),
        }
        if self.model is not None:
            data["model"] = self.model
        if self.meta:
            data["meta"] = dict(self.meta)
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


class FisherStaticScorer:
    """Calibrated per-layer, per-head Fisher weight (times token energy) for each token.

    Args:
        path: a calibration JSON file (format in the module docstring).
        calibration: an already loaded :class:`FisherCalibration` (instead of ``path``).
        token_energy: multiply by each token's ``mean(x^2)`` (default) so tokens within a head
            are ranked too; ``False`` scores every token of a head alike.

    Inputs must be ``(..., H, T, D)`` with ``H`` the calibrated K/V head count, and calls must
    name the ``layer`` (and the ``stream``, ``"k"`` unless given).

    Example:
        >>> import numpy as np
        >>> cal = FisherCalibration(k=np.array([[1.0, 3.0]]), v=np.array([[1.0, 1.0]]))
        >>> s = FisherStaticScorer(calibration=cal).score(np.ones((1, 2, 4, 8)), layer=0)
        >>> s[0, :, 0].tolist()
        [0.5, 1.5]
    """

    name: ClassVar[str] = "fisher_static"
    description: ClassVar[str] = "offline per-layer/per-head Fisher weights x token energy"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        calibration: FisherCalibration | None = None,
        token_energy: bool = True,
    ) -> None:
        if (path is None) == (calibration is None):
            raise ValueError("fisher_static needs exactly one of path= or calibration=")
        self.calibration = FisherCalibration.load(path) if calibration is None else calibration
        self.token_energy = bool(token_energy)
        self._normalized = {
            s: getattr(self.calibration, s) / float(np.mean(getattr(self.calibration, s)))
            for s in _STREAMS
        }
        self._moved = _xp.HostConstants()

    def head_weights(self, layer: int, stream: str = "k") -> np.ndarray:
        """``(num_kv_heads,)`` normalized weights of one layer and stream (host float64)."""
        if stream not in _STREAMS:
            raise ValueError(f"fisher_static: stream must be 'k' or 'v', got {stream!r}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"fisher_static needs an integer layer index, got {layer!r}")
        if not 0 <= layer < self.calibration.num_layers:
            raise ValueError(
                f"fisher_static: layer {layer} is outside the calibration's "
                f"{self.calibration.num_layers} layers"
            )
        return self._normalized[stream][layer]

    def score(
        self,
        x: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        stream: str | None = None,
    ) -> Any:
        """``(..., H, T, D) -> (..., H, T)``: calibrated head weight (times token energy)."""
        _ops.check_tokens(x, "fisher_static")
        stream = "k" if stream is None else stream
        weights = self.head_weights(layer, stream)  # type: ignore[arg-type]
        heads = self.calibration.num_kv_heads
        if x.ndim < 3 or x.shape[-3] != heads:
            raise ValueError(
                f"fisher_static: x must be (..., H, T, D) with H = {heads} calibrated K/V "
                f"heads, got shape {tuple(x.shape)}"
            )
        xp = _xp.namespace(x)
        energy = _ops.token_energy(x, xp=xp)
        if not self.token_energy:
            energy = xp.ones_like(energy)
        name = f"{stream}{layer}"
        w = self._moved.get(name, weights, energy, xp)
        return energy * w[:, None]

    def reset(self) -> None:
        """Stateless at run time (the calibration is fixed): nothing to forget."""

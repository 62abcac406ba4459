"""Per-head-type codebooks: keys, values (or single layers and heads) each with their own codebook.

Keys and values play different parts in attention (keys feed a softmax, values are averaged), so
the best scalar codebook differs: an attention-aware solver (:mod:`tqai.solvers.attention_aware`)
suits keys, Lloyd-Max suits values. A :class:`CodebookRegistry` maps
``(head_type, d, n_bits)``, optionally narrowed to one ``layer`` and/or ``head``, to a
:class:`~tqai.codebooks.Codebook`; anything not set falls back to a default solver
(``"lloyd_max"``, resolved through the ``tqai.codebooks`` entry-point group). It is plain host data
(float64 numpy) and saves to a versioned JSON file, so codebooks solved offline (``tqai
calibrate``, ``tqai convert``) load at start-up without solving again.

Lookup order for ``get(head_type, d, n_bits, layer=L, head=H)``: ``(L, H)``, ``(L, any head)``,
``(any layer, H)``, ``(any layer, any head)``, then the default solver.

JSON format (version 1)::

    {"format": "tqai.codebook_registry", "version": 1, "default": "lloyd_max",
     "entries": [{"head_type": "key", "d": 128, "n_bits": 4, "layer": null, "head": null,
                  "kind": "attention_aware", "centroids": [...16 floats...],
                  "boundaries": [...15 floats...]}, ...]}

Floats are written with Python's shortest round-trip repr, so a save/load cycle is exact. Loading
validates every field and raises :class:`CodebookRegistryError` naming the entry and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from tqai.codebooks import Codebook, validate_dim, validate_n_bits

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HEAD_TYPES",
    "CodebookKey",
    "CodebookRegistry",
    "CodebookRegistryError",
]

FORMAT = "tqai.codebook_registry"
FORMAT_VERSION = 1
HEAD_TYPES: tuple[str, ...] = ("key", "value")
"""The conventional head types; any non-empty name (``"hidden"``, ``"ffn"``...) is allowed."""

_ENTRY_FIELDS = ("head_type", "d", "n_bits", "layer", "head", "kind", "centroids", "boundaries")


class CodebookRegistryError(ValueError):
    """A codebook registry file or dict is malformed, of another format, or of a newer version."""


def _check_head_type(head_type: object) -> str:
    if not isinstance(head_type, str) or not head_type.strip():
        raise ValueError(f"head_type must be a non-empty string such as 'key', got {head_type!r}")
    return head_type


def _check_index(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CodebookKey:
    """Where a codebook applies: a head type at one ``(d, n_bits)``, optionally one layer/head.

    Attributes:
        head_type: ``"key"``, ``"value"`` or a custom name.
        d: vector size.
        n_bits: codebook bits (for TurboQuant_prod, the MSE stage's ``n_bits - 1``).
        layer: layer index, or ``None`` for every layer.
        head: head index, or ``None`` for every head.
    """

    head_type: str
    d: int
    n_bits: int
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        _check_head_type(self.head_type)
        validate_dim(self.d)
        validate_n_bits(self.n_bits)
        _check_index(self.layer, "layer")
        _check_index(self.head, "head")


class CodebookRegistry:
    """Codebooks keyed by head type, size and bit width, with a default solver for the rest.

    Args:
        default: name of the ``tqai.codebooks`` solver used for keys with no codebook set
            (``(d, n_bits) -> Codebook``); default ``"lloyd_max"``. Its codebooks are solved on
            first use, cached, and not saved (they are reproducible from the name).

    Example:
        >>> from tqai.solvers.attention_aware import attention_aware_codebook
        >>> reg = CodebookRegistry()
        >>> key = reg.set("key", attention_aware_codebook(64, 2))
        >>> reg.get("key", 64, 2).kind, reg.get("value", 64, 2).kind
        ('attention_aware', 'lloyd_max')
        >>> reg.quantizer("key", 64, 2).spec.codebook
        'attention_aware'
        >>> CodebookRegistry.from_json(reg.to_json()) == reg
        True
    """

    def __init__(self, *, default: str = "lloyd_max") -> None:
        if not isinstance(default, str) or not default:
            raise ValueError(f"default must be a codebook solver name, got {default!r}")
        self.default = default
        self._codebooks: dict[CodebookKey, Codebook] = {}
        self._defaults: dict[tuple[int, int], Codebook] = {}

    def __repr__(self) -> str:
        return f"CodebookRegistry(default={self.default!r}, entries={len(self._codebooks)})"

    def __len__(self) -> int:
        return len(self._codebooks)

    def __iter__(self) -> Iterator[CodebookKey]:
        return iter(sorted(self._codebooks, key=_sort_key))

    def __contains__(self, key: object) -> bool:
        return key in self._codebooks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CodebookRegistry):
            return NotImplemented
        return self.default == other.default and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def items(self) -> list[tuple[CodebookKey, Codebook]]:
        """The codebooks set explicitly, sorted by key (defaults are not listed)."""
        return [(key, self._codebooks[key]) for key in self]

    def set(
        self,
        head_type: str,
        codebook: Codebook,
        *,
        layer: int | None = None,
        head: int | None = None,
    ) -> CodebookKey:
        """Use ``codebook`` for ``head_type`` at its own ``(d, n_bits)``, replacing any earlier one.

        Args:
            head_type: ``"key"``, ``"value"`` or a custom name.
            codebook: the codebook; its ``d`` and ``n_bits`` complete the key.
            layer, head: narrow it to one layer and/or one head (``None``: all).

        Returns:
            The key it was stored under.
        """
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook must be a tqai.codebooks.Codebook, got {codebook!r}")
        key = CodebookKey(
            head_type=head_type, d=codebook.d, n_bits=codebook.n_bits, layer=layer, head=head
        )
        self._codebooks[key] = codebook
        return key

    def remove(self, key: CodebookKey) -> None:
        """Forget the codebook stored under ``key`` (``KeyError`` naming it if there is none)."""
        try:
            del self._codebooks[key]
        except KeyError:
            raise KeyError(f"no codebook is set for {key}") from None

    def lookup(
        self,
        head_type: str,
        d: int,
        n_bits: int,
        *,
        layer: int | None = None,
        head: int | None = None,
    ) -> Codebook | None:
        """The most specific codebook set for this key (module docstring's order), or ``None``."""
        _check_head_type(head_type)
        layer, head = _check_index(layer, "layer"), _check_index(head, "head")
        for lay, hd in ((layer, head), (layer, None), (None, head), (None, None)):
            found = self._codebooks.get(
                CodebookKey(head_type=head_type, d=d, n_bits=n_bits, layer=lay, head=hd)
            )
            if found is not None:
                return found
        return None

    def get(
        self,
        head_type: str,
        d: int,
        n_bits: int,
        *,
        layer: int | None = None,
        head: int | None = None,
    ) -> Codebook:
        """The codebook for this key: the most specific one set, else the default solver's."""
        found = self.lookup(head_type, d, n_bits, layer=layer, head=head)
        if found is not None:
            return found
        d, n_bits = validate_dim(d), validate_n_bits(n_bits)
        cached = self._defaults.get((d, n_bits))
        if cached is None:
            cached = self._defaults[(d, n_bits)] = _solver(self.default)(d, n_bits)
        return cached

    def solve(
        self,
        head_type: str,
        d: int,
        n_bits: int,
        solver: str,
        *,
        layer: int | None = None,
        head: int | None = None,
        **options: Any,
    ) -> Codebook:
        """Solve a codebook with the ``tqai.codebooks`` plugin ``solver`` and :meth:`set` it.

        Example:
            >>> reg = CodebookRegistry()
            >>> reg.solve("key", 64, 1, "attention_aware").kind
            'attention_aware'
        """
        codebook = _solver(solver)(d, n_bits, **options)
        if not isinstance(codebook, Codebook):
            raise TypeError(f"codebook solver {solver!r} returned {type(codebook).__name__}")
        self.set(head_type, codebook, layer=layer, head=head)
        return codebook

    def quantizer(
        self,
        head_type: str,
        d: int,
        n_bits: int,
        *,
        kind: str = "mse",
        layer: int | None = None,
        head: int | None = None,
        **options: Any,
    ) -> Any:
        """A fresh ``tqai.quantizers`` quantizer of ``kind`` that uses this registry's codebook.

        ``n_bits`` is the quantizer's total bit width; the codebook looked up is that of its MSE
        stage (``n_bits - 1`` for TurboQuant_prod). The quantizer's ``spec.codebook`` names the
        codebook's kind, so tensors it makes are refused by a quantizer with another codebook.

        Args:
            head_type, d, n_bits, layer, head: as for :meth:`get`.
            kind: quantizer plugin name (``"mse"``, ``"prod"``, ``"rotor"``...).
            **options: passed to the quantizer class (``rotation``, ``seed``, ``norm_dtype``...).
        """
        from tqai.registry import registry

        quantizer = registry("tqai.quantizers").get(kind)(d, n_bits, **options)
        attribute = getattr(type(quantizer), "codebook", None)
        if not isinstance(attribute, functools.cached_property):
            raise TypeError(f"quantizer {kind!r} has no replaceable codebook")
        bits = quantizer.spec.mse_bits
        if bits:
            codebook = self.get(head_type, d, bits, layer=layer, head=head)
            # A cached_property accepts assignment: the quantizer is fresh, nothing was moved yet.
            quantizer.codebook = codebook
            quantizer.spec = dataclasses.replace(quantizer.spec, codebook=codebook.kind)
        return quantizer

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of the module docstring's format."""
        entries = [
            {
                "head_type": key.head_type,
                "d": key.d,
                "n_bits": key.n_bits,
                "layer": key.layer,
                "head": key.head,
                "kind": cb.kind,
                "centroids": [float(c) for c in cb.centroids],
                "boundaries": [float(b) for b in cb.boundaries],
            }
            for key, cb in self.items()
        ]
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "default": self.default,
            "entries": entries,
        }

    def to_json(self) -> str:
        """The registry as JSON text."""
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the registry to ``path`` as JSON (UTF-8)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodebookRegistry:
        """Rebuild a registry from :meth:`to_dict` output, validating every field.

        Raises:
            CodebookRegistryError: wrong format or version, or a malformed entry (named).
        """
        if not isinstance(data, Mapping):
            raise CodebookRegistryError(
                f"a codebook registry must be a JSON object, got {type(data).__name__}"
            )
        if data.get("format") != FORMAT:
            raise CodebookRegistryError(
                f"not a tqai codebook registry: format is {data.get('format')!r}, "
                f"expected {FORMAT!r}"
            )
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CodebookRegistryError(f"version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise CodebookRegistryError(
                f"codebook registry version {version} is newer than this tqai reads "
                f"({FORMAT_VERSION}); upgrade tqai-core"
            )
        unknown = set(data) - {"format", "version", "default", "entries"}
        if unknown:
            raise CodebookRegistryError(f"unknown top-level fields: {sorted(unknown)}")
        default = data.get("default", "lloyd_max")
        try:
            registry = cls(default=default)
        except ValueError as ex:
            raise CodebookRegistryError(str(ex)) from None
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise CodebookRegistryError(f"entries must be a list, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            key, codebook = _parse_entry(index, entry)
            if key in registry:
                raise CodebookRegistryError(f"entry {index}: duplicate key {key}")
            registry._codebooks[key] = codebook
        return registry

    @classmethod
    def from_json(cls, text: str) -> CodebookRegistry:
        """Parse JSON text (see :meth:`from_dict`); bad JSON raises ``CodebookRegistryError``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as ex:
            raise CodebookRegistryError(f"codebook registry is not valid JSON: {ex}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CodebookRegistry:
        """Read a registry written by :meth:`save`; errors name the file."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except CodebookRegistryError as ex:
            raise CodebookRegistryError(f"{os.fspath(path)}: {ex}") from None


def _sort_key(key: CodebookKey) -> tuple:
    return (
        key.head_type,
        key.d,
        key.n_bits,
        -1 if key.layer is None else key.layer,
        -1 if key.head is None else key.head,
    )


def _solver(name: str) -> Callable[..., Codebook]:
    from tqai.registry import registry

    return registry("tqai.codebooks").get(name)


def _float_list(value: object, length: int, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != length:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{what} must be a list of {length} numbers, got {got}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must hold only numbers")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) >= 1):
        raise ValueError(f"{what} must be finite and inside (-1, 1)")
    return array


def _parse_entry(index: int, entry: object) -> tuple[CodebookKey, Codebook]:
    if not isinstance(entry, Mapping):
        raise CodebookRegistryError(f"entry {index}: must be an object, got {entry!r}")
    missing = [f for f in _ENTRY_FIELDS if f not in entry]
    unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
    if missing or unknown:
        raise CodebookRegistryError(
            f"entry {index}: missing fields {missing}, unknown fields {unknown}"
        )
    where = f"entry {index} (head_type={entry['head_type']!r}, d={entry['d']!r}, " + (
        f"n_bits={entry['n_bits']!r})"
    )
    try:
        key = CodebookKey(
            head_type=entry["head_type"],
            d=entry["d"],
            n_bits=entry["n_bits"],
            layer=entry["layer"],
            head=entry["head"],
        )
        if not isinstance(entry["kind"], str) or not entry["kind"]:
            raise ValueError(f"kind must be a non-empty solver name, got {entry['kind']!r}")
        size = 2**key.n_bits
        centroids = _float_list(entry["centroids"], size, "centroids")
        boundaries = _float_list(entry["boundaries"], size - 1, "boundaries")
        codebook = Codebook(
            centroids=centroids,
            boundaries=boundaries,
            d=key.d,
            n_bits=key.n_bits,
            kind=entry["kind"],
        )
        if np.any(boundaries < centroids[:-1]) or np.any(boundaries > centroids[1:]):
            raise ValueError("every boundary must lie between its two centroids")
    except (TypeError, ValueError) as ex:
        raise CodebookRegistryError(f"{where}: {ex}") from None
    return key, codebook

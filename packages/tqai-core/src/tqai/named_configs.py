"""The named compression configs of ``tqai.patch(model, config=NAME)`` and ``tqai run --config``.

Why it is shaped like this: a named config is data, not code. Each one says how many bits the
keys and values of the KV cache get and whether (and at how many bits) the hidden states between
decoder layers and the FFN activations are compressed as well (:mod:`tqai.activations`). Backends
resolve a name into their ordinary patch options with :func:`resolve_patch_options`, so a named
config is exactly the same as spelling its options out.

=============  ====  ====  ======  =====
name           K     V     hidden  FFN
=============  ====  ====  ======  =====
kv-only        4     2     -       -
kv+hidden8     4     2     8       -
kv+hidden6     4     2     6       -
kv+ffn8        4     2     -       8
all8           4     2     8       8
all6           4     2     6       6
aggressive     3     2     6       6
=============  ====  ====  ======  =====

Example:
    >>> from tqai.named_configs import named_config
    >>> named_config("kv+hidden8").hidden_bits
    8
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from tqai.activations import ActivationConfig
from tqai.codebooks import validate_n_bits

__all__ = ["NAMED_CONFIGS", "NamedConfig", "named_config", "resolve_patch_options"]

_DEFAULT_BITS_K = 4
_DEFAULT_BITS_V = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class NamedConfig:
    """One named config: KV bits and the optional activation widths.

    Attributes:
        name: the name users type (``"kv+hidden8"``).
        bits_k, bits_v: KV cache bits per coordinate.
        hidden_bits: bits of the decoder layers' output hidden states, or None (not compressed).
        ffn_bits: bits of the FFN activations (the input of the down projection), or None.
        description: one line for ``--help`` and the README.
    """

    name: str
    bits_k: int
    bits_v: int
    hidden_bits: int | None = None
    ffn_bits: int | None = None
    description: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        validate_n_bits(self.bits_k, name="bits_k")
        validate_n_bits(self.bits_v, name="bits_v")
        for field in ("hidden_bits", "ffn_bits"):
            value = getattr(self, field)
            if value is not None:
                validate_n_bits(value, name=field)


def _named(*configs: NamedConfig) -> MappingProxyType:
    return MappingProxyType({c.name: c for c in configs})


NAMED_CONFIGS = _named(
    NamedConfig(name="kv-only", bits_k=4, bits_v=2, description="KV cache only"),
    NamedConfig(
        name="kv+hidden8", bits_k=4, bits_v=2, hidden_bits=8, description="KV + 8-bit hidden"
    ),
    NamedConfig(
        name="kv+hidden6", bits_k=4, bits_v=2, hidden_bits=6, description="KV + 6-bit hidden"
    ),
    NamedConfig(name="kv+ffn8", bits_k=4, bits_v=2, ffn_bits=8, description="KV + 8-bit FFN"),
    NamedConfig(
        name="all8", bits_k=4, bits_v=2, hidden_bits=8, ffn_bits=8, description="everything, 8-bit"
    ),
    NamedConfig(
        name="all6", bits_k=4, bits_v=2, hidden_bits=6, ffn_bits=6, description="everything, 6-bit"
    ),
    NamedConfig(
        name="aggressive",
        bits_k=3,
        bits_v=2,
        hidden_bits=6,
        ffn_bits=6,
        description="K3/V2 + 6-bit hidden and FFN",
    ),
)
"""Every named config by name (read-only)."""


def named_config(name: str) -> NamedConfig:
    """The named config ``name``; ``ValueError`` listing the names otherwise."""
    config = NAMED_CONFIGS.get(name) if isinstance(name, str) else None
    if config is None:
        raise ValueError(f"config must be one of {list(NAMED_CONFIGS)}, got {name!r}")
    return config


def resolve_patch_options(
    config: str | None,
    *,
    bits_k: int | None,
    bits_v: int | None,
    hidden_bits: int | None = None,
    ffn_bits: int | None = None,
    rotation: str = "haar",
    seed: int = 0,
) -> tuple[int, int, ActivationConfig | None]:
    """Merge a named config with explicitly given options into what a backend's patch uses.

    Explicit options (not None) must agree with the named config; with no name they stand alone
    and missing KV bits default to K4/V2.

    Args:
        config: a name of :data:`NAMED_CONFIGS` or None.
        bits_k, bits_v, hidden_bits, ffn_bits: the patch options as given (None = not given).
        rotation, seed: the patch's rotation options; the activation quantizers use them too.

    Returns:
        ``(bits_k, bits_v, activations)``; ``activations`` is None when nothing but the KV cache
        is compressed.

    Raises:
        ValueError: an unknown name, or an explicit option that contradicts the named config.
    """
    given = {"bits_k": bits_k, "bits_v": bits_v, "hidden_bits": hidden_bits, "ffn_bits": ffn_bits}
    if config is None:
        resolved = {
            "bits_k": _DEFAULT_BITS_K if bits_k is None else bits_k,
            "bits_v": _DEFAULT_BITS_V if bits_v is None else bits_v,
            "hidden_bits": hidden_bits,
            "ffn_bits": ffn_bits,
        }
    else:
        named = named_config(config)
        resolved = {name: getattr(named, name) for name in given}
        clashes = [
            f"{name}={value!r} (the config says {resolved[name]!r})"
            for name, value in given.items()
            if value is not None and value != resolved[name]
        ]
        if clashes:
            raise ValueError(
                f"config={config!r} contradicts the explicit option(s) {', '.join(clashes)}; "
                "pass either the named config or the options"
            )
    activations = ActivationConfig(
        hidden_bits=resolved["hidden_bits"],
        ffn_bits=resolved["ffn_bits"],
        rotation=rotation,
        seed=seed,
    )
    return resolved["bits_k"], resolved["bits_v"], activations if activations.enabled else None

"""``TqaiConfig``: what :func:`tqai_diffusers.apply_tqai` does to a video DiT, validated up front.

Why it is shaped like this: diffusers configures each hook method with one dataclass
(``FirstBlockCacheConfig``, ``PyramidAttentionBroadcastConfig``); tqai follows it, frozen and
keyword-only, checked in ``__post_init__`` so a bad field fails at construction with a message
that names the field and the allowed values. The compression itself is the core's pipeline
(:mod:`tqai.pipeline`): the scorer/strategy/monitor fields are passed to it as a config dict,
and its own validation (plugin names, kwargs) runs once when the config is applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ADAPTERS", "STRATEGIES", "TqaiConfig"]

STRATEGIES: tuple[str | None, ...] = (None, "delta", "delta2", "window", "cfg_sharing", "tiered")
"""Allowed ``strategy`` values: ``None`` is plain TurboQuant K/V quantization; ``"window"`` is
attention-output reuse (no K/V strategy); the others are the core's K/V strategies."""

ADAPTERS: tuple[str | None, ...] = (None, "wan", "dit")
"""Allowed ``adapter`` values: ``None`` picks ``"wan"`` for ``WanTransformer3DModel`` and
``"dit"`` (``transformer_blocks.{i}.attn1``, batched CFG: LTX, PixArt...) otherwise."""

_MIN_BITS, _MAX_BITS = 1, 8
_ROTATIONS = ("haar", "hadamard", "rotor")
_NORM_DTYPES = ("float16", "float32")


def _frozen(value: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"TqaiConfig.{name} must be a dict of keyword arguments, got {value!r}")
    return MappingProxyType(dict(value))


def _plugin_name(value: object, name: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"TqaiConfig.{name} must be a plugin name (str) or None, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TqaiConfig:
    """How tqai compresses the self-attention of a diffusers video transformer.

    Args:
        bits_k, bits_v: TurboQuant bits per coordinate of keys and values (1..8).
        strategy: ``None`` (plain quantization of every step's K/V), ``"delta"`` (each step coded
            as its change from the previous step, DiTFastAttn arXiv:2406.08552), ``"delta2"``
            (second-order extrapolation with 2 -> 1 -> full fallback, QuantSparse
            arXiv:2509.23681), ``"cfg_sharing"`` (the unconditional pass coded from the
            conditional one: split calls for WAN, a ``2B`` batch for LTX; the mode follows the
            adapter unless ``strategy_kwargs`` names one), ``"tiered"`` (score-routed widths,
            needs ``scorer``) or ``"window"`` (attention-output reuse: a layer whose input is
            still similar to the one it last computed returns that output without running
            attention, DiTFastAttn's sharing across timesteps; K/V of computed steps are
            quantized plainly unless ``compress_kv=False``).
        strategy_kwargs: keyword arguments of the strategy (``{"fallback": False}`` for
            delta/delta2, ``{"threshold": 0.98, "max_reuse": 2}`` for window, ``{"mode":
            "split"}`` for cfg_sharing).
        scorer, scorer_kwargs: a ``tqai.scorers`` plugin (for ``tiered``).
        monitor, monitor_kwargs: a ``tqai.monitors`` plugin (``"stability"``, ``"lyapunov"``)
            that moves the bit width from step to step.
        skip_layers: self-attention layer indices left untouched (no quantization, no reuse).
        adapter: see :data:`ADAPTERS`.
        compress_kv: quantize K/V (default); ``False`` only makes sense with ``"window"``.
        rotation, seed, norm_dtype: the TurboQuant quantizer's options (see
            :class:`tqai.quantizers.TurboQuantMSE`).
        version: config format version.

    Raises:
        ValueError: a field has a wrong type or value; the message names the field and what is
            allowed.

    Example:
        >>> TqaiConfig(bits_k=4, bits_v=2, strategy="delta2", skip_layers=(0,)).strategy
        'delta2'
        >>> TqaiConfig(strategy="delta3")
        Traceback (most recent call last):
        ...
        ValueError: TqaiConfig.strategy must be one of None, 'delta', 'delta2', 'window', 'cfg_sharing', 'tiered'; got 'delta3'
    """

    bits_k: int = 4
    bits_v: int = 2
    strategy: str | None = None
    strategy_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scorer: str | None = None
    scorer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    monitor: str | None = None
    monitor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    skip_layers: tuple[int, ...] = ()
    adapter: str | None = None
    compress_kv: bool = True
    rotation: str = "haar"
    seed: int = 0
    norm_dtype: str = "float16"
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("bits_k", "bits_v"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"TqaiConfig.{name} must be an int in {_MIN_BITS}..{_MAX_BITS}, got {value!r}"
                )
            if not _MIN_BITS <= value <= _MAX_BITS:
                raise ValueError(
                    f"TqaiConfig.{name} must be in {_MIN_BITS}..{_MAX_BITS}, got {value}"
                )
        if self.strategy not in STRATEGIES:
            allowed = ", ".join(repr(s) for s in STRATEGIES)
            raise ValueError(f"TqaiConfig.strategy must be one of {allowed}; got {self.strategy!r}")
        if self.adapter not in ADAPTERS:
            allowed = ", ".join(repr(a) for a in ADAPTERS)
            raise ValueError(f"TqaiConfig.adapter must be one of {allowed}; got {self.adapter!r}")
        _plugin_name(self.scorer, "scorer")
        _plugin_name(self.monitor, "monitor")
        for name in ("strategy_kwargs", "scorer_kwargs", "monitor_kwargs"):
            object.__setattr__(self, name, _frozen(getattr(self, name), name))
        skip = self.skip_layers
        if isinstance(skip, str | bytes) or not hasattr(skip, "__iter__"):
            raise ValueError(
                f"TqaiConfig.skip_layers must be a list of layer indices (ints >= 0), got {skip!r}"
            )
        skip = tuple(skip)
        bad = [i for i in skip if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(
                f"TqaiConfig.skip_layers must hold layer indices (ints >= 0), got {bad!r}"
            )
        object.__setattr__(self, "skip_layers", skip)
        if not isinstance(self.compress_kv, bool):
            raise ValueError(
                f"TqaiConfig.compress_kv must be True or False, got {self.compress_kv!r}"
            )
        if not self.compress_kv and self.strategy != "window":
            raise ValueError(
                "TqaiConfig.compress_kv=False leaves nothing to do unless strategy='window' "
                f"(attention-output reuse); got strategy={self.strategy!r}"
            )
        if self.rotation not in _ROTATIONS:
            raise ValueError(
                f"TqaiConfig.rotation must be one of {', '.join(map(repr, _ROTATIONS))}; "
                f"got {self.rotation!r}"
            )
        if self.norm_dtype not in _NORM_DTYPES:
            raise ValueError(
                f"TqaiConfig.norm_dtype must be one of {', '.join(map(repr, _NORM_DTYPES))}; "
                f"got {self.norm_dtype!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TqaiConfig.seed must be an int >= 0, got {self.seed!r}")

    def pipeline_config(self, adapter: str, cfg_layout: str | None) -> dict[str, Any] | None:
        """The :mod:`tqai.pipeline` config dict for the K/V hooks (``None``: no K/V hooks).

        Args:
            adapter: the adapter name in use (``"wan"`` or ``"dit"``).
            cfg_layout: the adapter's CFG layout, the default ``mode`` of ``cfg_sharing``.
        """
        if not self.compress_kv:
            return None
        strategy = None if self.strategy == "window" else self.strategy
        strategy_kwargs = dict(self.strategy_kwargs) if strategy is not None else {}
        if strategy == "cfg_sharing" and "mode" not in strategy_kwargs and cfg_layout:
            strategy_kwargs["mode"] = cfg_layout
        config: dict[str, Any] = {
            "adapter": adapter,
            "bits_k": self.bits_k,
            "bits_v": self.bits_v,
            "quantizer": "mse",
            "quantizer_kwargs": {
                "rotation": self.rotation,
                "seed": self.seed,
                "norm_dtype": self.norm_dtype,
            },
        }
        for key, value, kwargs in (
            ("strategy", strategy, strategy_kwargs),
            ("scorer", self.scorer, dict(self.scorer_kwargs)),
            ("monitor", self.monitor, dict(self.monitor_kwargs)),
        ):
            if value is not None:
                config[key] = value
                if kwargs:
                    config[f"{key}_kwargs"] = kwargs
            elif kwargs:
                raise ValueError(f"TqaiConfig.{key}_kwargs is given but TqaiConfig.{key} is None")
        return config

"""The pipeline runner: scorer -> strategy -> quantizer -> monitor, per layer and per step.

Why it is shaped like this: a cache (tqai-torch, tqai-mlx) or a diffusers hook calls the pipeline
once per layer per step on the tensor it is about to store, so the runner is a small object with
one hot method, :meth:`CompressionPipeline.compress`, and no knowledge of any host library. It is
built from a plain dict (what ``tqai.patch(model, pipeline={...})`` receives), every name resolved
through the plugin registry, so third-party scorers and strategies take the same path as the
built-ins. ``build_pipeline(None)`` returns ``None``: the plain quantizer path then runs with no
pipeline code at all (zero overhead), and a pipeline with no strategy reproduces that path bit
for bit.

How a cache calls it::

    pipe = build_pipeline(config)                    # once, at patch time; None = plain path
    ...
    if pipe is None or not pipe.handles(layer):      # per layer per step
        qt = quantizer.quantize(keys)                # plain TurboQuant, untouched
    else:
        res = pipe.compress(keys, layer=layer, stream="k", step=step, queries=queries)
        keys_hat, stored = res.reconstruction, res.payload   # res.bits: what it cost

Config keys (:data:`CONFIG_KEYS`)::

    scorer, strategy, monitor, adapter        plugin name (str), class, or instance
    scorer_kwargs, strategy_kwargs,           keyword arguments for the named plugin
      monitor_kwargs, adapter_kwargs
    skip_layers                               layers the pipeline leaves to the plain quantizer
    bits_k, bits_v                            base bit widths of the key and value streams
    quantizer, quantizer_kwargs               a tqai.quantizers plugin ("mse") and its options
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from tqai import _xp
from tqai.pipeline import _ops
from tqai.pipeline.bank import QuantizerBank
from tqai.pipeline.protocols import (
    CompressionResult,
    ModelAdapter,
    Monitor,
    QuantizerSource,
    Scorer,
    Strategy,
)
from tqai.registry import PluginLoadError, registry

__all__ = [
    "CONFIG_KEYS",
    "STREAMS",
    "CompressionPipeline",
    "PipelineConfigError",
    "build_pipeline",
]

STREAMS: tuple[str, ...] = ("k", "v")
"""Stream names: keys and values, with base widths ``bits_k`` and ``bits_v``."""

_PLUGINS: dict[str, tuple[str, type]] = {
    "scorer": ("tqai.scorers", Scorer),
    "strategy": ("tqai.strategies", Strategy),
    "monitor": ("tqai.monitors", Monitor),
    "adapter": ("tqai.adapters", ModelAdapter),
}
_DEFAULTS: dict[str, Any] = {"skip_layers": (), "bits_k": 4, "bits_v": 2, "quantizer": "mse"}

CONFIG_KEYS: tuple[str, ...] = (
    *_PLUGINS,
    *(f"{key}_kwargs" for key in _PLUGINS),
    "skip_layers",
    "bits_k",
    "bits_v",
    "quantizer",
    "quantizer_kwargs",
)
"""Every key a pipeline config may hold."""

_MIN_BITS, _MAX_BITS = 1, 8


class PipelineConfigError(ValueError):
    """A pipeline config is malformed; the message names the key and what is allowed."""


def _label(obj: object) -> str:
    """A plugin's name for messages: its registry name if it has one, else its class name."""
    return getattr(obj, "name", None) or type(obj).__name__


def _check_bits(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PipelineConfigError(
            f"config[{key!r}] must be an integer in {_MIN_BITS}..{_MAX_BITS}, got {value!r}"
        )
    if not _MIN_BITS <= value <= _MAX_BITS:
        raise PipelineConfigError(
            f"config[{key!r}] must be in {_MIN_BITS}..{_MAX_BITS}, got {value}"
        )
    return value


def _check_skip_layers(value: object) -> frozenset[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise PipelineConfigError(
            f"config['skip_layers'] must be a list of layer indices (ints >= 0), got {value!r}"
        )
    layers = list(value)
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise PipelineConfigError(
            f"config['skip_layers'] must hold layer indices (ints >= 0), got {bad!r}"
        )
    return frozenset(layers)


def _check_kwargs(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    kwargs = config.get(key)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise PipelineConfigError(
            f"config[{key!r}] must be a dict of keyword arguments, got {kwargs!r}"
        )
    return dict(kwargs)


def _resolve(config: Mapping[str, Any], key: str) -> Any:
    """Turn ``config[key]`` (name, class or instance) plus ``config[key_kwargs]`` into a plugin."""
    group, protocol = _PLUGINS[key]
    kwargs_key = f"{key}_kwargs"
    spec = config.get(key)
    kwargs = _check_kwargs(config, kwargs_key)
    if spec is None:
        if kwargs:
            raise PipelineConfigError(f"config[{kwargs_key!r}] is given but config[{key!r}] is not")
        return None
    if isinstance(spec, str):
        reg = registry(group)
        if spec not in reg:
            allowed = ", ".join(repr(n) for n in reg.available()) or "none installed"
            raise PipelineConfigError(
                f"config[{key!r}] = {spec!r} is not a {group} plugin; allowed values: {allowed}"
            )
        try:
            factory = reg.get(spec)
        except PluginLoadError as ex:
            raise PipelineConfigError(f"config[{key!r}] = {spec!r} failed to load: {ex}") from ex
    elif isinstance(spec, type):
        factory = spec
    else:
        if kwargs:
            raise PipelineConfigError(
                f"config[{kwargs_key!r}] is given but config[{key!r}] is an instance; "
                "pass a plugin name or class with kwargs, or a configured instance alone"
            )
        if not isinstance(spec, protocol):
            raise PipelineConfigError(
                f"config[{key!r}] must be a {group} plugin name, class or instance implementing "
                f"{protocol.__name__}; got {spec!r}"
            )
        return spec
    try:
        plugin = factory(**kwargs)
    except (TypeError, ValueError) as ex:
        raise PipelineConfigError(
            f"config[{kwargs_key!r}] = {kwargs!r} does not fit {key} {spec!r}: {ex}"
        ) from ex
    if not isinstance(plugin, protocol):
        raise PipelineConfigError(
            f"config[{key!r}] = {spec!r} built a {type(plugin).__name__}, which does not "
            f"implement {protocol.__name__}"
        )
    return plugin


class CompressionPipeline:
    """Runs scorer -> strategy -> quantizer -> monitor on one tensor per call.

    Args:
        scorer: a :class:`~tqai.pipeline.protocols.Scorer`, or ``None``.
        strategy: a :class:`~tqai.pipeline.protocols.Strategy`, or ``None`` for plain
            quantization (what the plain cache path stores, bit for bit).
        monitor: a :class:`~tqai.pipeline.protocols.Monitor` that moves the base bit width from
            step to step, or ``None``.
        adapter: a :class:`~tqai.pipeline.protocols.ModelAdapter`; when given, strategies that
            require features the model family lacks are refused.
        skip_layers: layer indices compressed by the plain quantizer at the base widths, with
            no scorer, strategy or monitor (e.g. sensitive first and last layers).
        bits_k, bits_v: base bit widths (1..8) of the key and value streams.
        quantizers: where strategies get quantizers (default: TurboQuant_mse with class
            defaults, ``QuantizerBank("mse")``).

    Raises:
        PipelineConfigError: an inconsistent combination (a strategy that ranks tokens without a
            scorer, a scorer without a strategy, a strategy the adapter's model cannot run).

    Example:
        >>> import numpy as np
        >>> pipe = CompressionPipeline.from_config({"scorer": "fisher", "strategy": "tiered"})
        >>> x = np.random.default_rng(0).standard_normal((2, 32, 64)).astype(np.float32)
        >>> res = pipe.compress(x, layer=0, stream="v")
        >>> res.n_bits, round(res.bits_per_coord, 3)
        (2, 2.266)
    """

    def __init__(
        self,
        *,
        scorer: Scorer | None = None,
        strategy: Strategy | None = None,
        monitor: Monitor | None = None,
        adapter: ModelAdapter | None = None,
        skip_layers: Iterable[int] = (),
        bits_k: int = 4,
        bits_v: int = 2,
        quantizers: QuantizerSource | None = None,
    ) -> None:
        self.scorer = scorer
        self.strategy = strategy
        self.monitor = monitor
        self.adapter = adapter
        self.skip_layers = _check_skip_layers(skip_layers)
        self.bits = {"k": _check_bits("bits_k", bits_k), "v": _check_bits("bits_v", bits_v)}
        self.quantizers = QuantizerBank() if quantizers is None else quantizers
        self._check_combination()
        #: The JSON form of the config dict it was built from (plugin names and kwargs, with
        #: defaults filled in), or None when built from objects: what a saved cache records.
        self.config: dict[str, Any] | None = None
        self._steps: dict[tuple[int | None, str], int] = {}
        self._spent: dict[str, list[int]] = {s: [0, 0] for s in STREAMS}

    def _check_combination(self) -> None:
        for key, (group, protocol) in _PLUGINS.items():
            plugin = getattr(self, key)
            if plugin is not None and not isinstance(plugin, protocol):
                raise PipelineConfigError(
                    f"{key} must implement {protocol.__name__} (a {group} plugin); got {plugin!r}"
                )
        strategy = self.strategy
        if strategy is None:
            if self.scorer is not None:
                raise PipelineConfigError(
                    f"config['scorer'] = {_label(self.scorer)!r} needs a config['strategy'] to "
                    "use its scores; without one the pipeline is plain quantization"
                )
            return
        if getattr(strategy, "needs_scores", False) and self.scorer is None:
            raise PipelineConfigError(
                f"config['strategy'] = {_label(strategy)!r} routes tokens by score and needs a "
                f"config['scorer']; allowed values: {', '.join(registry('tqai.scorers').available())}"
            )
        required = frozenset(getattr(strategy, "requires", frozenset()))
        if self.adapter is not None and not required <= frozenset(self.adapter.features):
            missing = ", ".join(sorted(required - frozenset(self.adapter.features)))
            raise PipelineConfigError(
                f"config['strategy'] = {_label(strategy)!r} requires model features {missing}, "
                f"which config['adapter'] = {_label(self.adapter)!r} does not have "
                f"(it has: {', '.join(sorted(self.adapter.features)) or 'none'})"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompressionPipeline:
        """Build a pipeline from a config dict (see the module docstring for the keys).

        Raises:
            PipelineConfigError: an unknown key, a plugin name no plugin has (the message lists
                the allowed names), kwargs the plugin rejects, or a bad bit width / layer list.
        """
        if not isinstance(config, Mapping):
            raise PipelineConfigError(
                f"a pipeline config must be a dict with keys from {', '.join(CONFIG_KEYS)}; "
                f"got {type(config).__name__}"
            )
        unknown = [k for k in config if k not in CONFIG_KEYS]
        if unknown:
            raise PipelineConfigError(
                f"unknown pipeline config key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(CONFIG_KEYS)}"
            )
        full = {**_DEFAULTS, **config}
        quantizer = full["quantizer"]
        quantizers = registry("tqai.quantizers")
        if not isinstance(quantizer, str) or quantizer not in quantizers:
            raise PipelineConfigError(
                f"config['quantizer'] = {quantizer!r} is not a tqai.quantizers plugin; allowed "
                f"values: {', '.join(repr(n) for n in quantizers.available())}"
            )
        try:
            bank = QuantizerBank(quantizer, options=_check_kwargs(full, "quantizer_kwargs"))
        except PluginLoadError as ex:
            raise PipelineConfigError(f"config['quantizer'] = {quantizer!r}: {ex}") from ex
        pipe = cls(
            **{key: _resolve(full, key) for key in _PLUGINS},
            skip_layers=full["skip_layers"],
            bits_k=full["bits_k"],
            bits_v=full["bits_v"],
            quantizers=bank,
        )
        pipe.config = _json_config(full)
        return pipe

    def __repr__(self) -> str:
        parts = [
            f"{key}={_label(getattr(self, key))!r}"
            for key in _PLUGINS
            if getattr(self, key) is not None
        ]
        parts += [f"bits_k={self.bits['k']}", f"bits_v={self.bits['v']}"]
        if self.skip_layers:
            parts.append(f"skip_layers={sorted(self.skip_layers)}")
        return f"CompressionPipeline({', '.join(parts)})"

    def handles(self, layer: int | None) -> bool:
        """False for a skipped layer: the caller may run its plain path there instead."""
        return layer not in self.skip_layers

    def compress(
        self,
        x: Any,
        *,
        layer: int | None = None,
        stream: str = "k",
        step: int | None = None,
        queries: Any = None,
    ) -> CompressionResult:
        """Compress one tensor of one layer at one step.

        Args:
            x: ``(B, H, T, D)`` keys or values (any ``(..., T, D)`` floating array).
            layer: attention layer index; skipped layers get the plain quantizer.
            stream: ``"k"`` or ``"v"``: picks the base width (``bits_k`` / ``bits_v``) and
                keeps the two streams' states apart.
            step: decode or denoising step; ``None`` counts calls per ``(layer, stream)``.
            queries: optional ``(B, Hq, Tq, D)`` queries of the layer, passed to the monitor.

        Returns:
            A :class:`~tqai.pipeline.protocols.CompressionResult`: the reconstruction (``x``'s
            shape, dtype and namespace), the payload and every bit spent.
        """
        if stream not in self.bits:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
        _ops.check_tokens(x, "CompressionPipeline.compress")
        key = (layer, stream)
        if step is None:
            step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        base = self.bits[stream]
        if not self.handles(layer) or (self.strategy is None and self.monitor is None):
            out = self._plain(x, base)
        else:
            out = self._run(x, base, layer=layer, stream=stream, step=step, queries=queries)
        spent = self._spent[stream]
        spent[0] += out.bits
        spent[1] += out.n_coords
        return out

    def compress_kv(
        self,
        keys: Any,
        values: Any,
        *,
        layer: int | None = None,
        step: int | None = None,
        queries: Any = None,
    ) -> tuple[CompressionResult, CompressionResult]:
        """:meth:`compress` the keys and the values of one layer at one step."""
        return (
            self.compress(keys, layer=layer, stream="k", step=step, queries=queries),
            self.compress(values, layer=layer, stream="v", step=step, queries=queries),
        )

    def _plain(self, x: Any, n_bits: int) -> CompressionResult:
        xp = _xp.namespace(x)
        quantizer = self.quantizers.get(x.shape[-1], n_bits)
        qt = quantizer.quantize(x, xp=xp)
        return CompressionResult(
            reconstruction=quantizer.dequantize(qt, xp=xp),
            bits=8 * qt.nbytes,
            n_coords=math.prod(x.shape),
            n_bits=n_bits,
            payload=(qt,),
        )

    def _run(
        self, x: Any, base: int, *, layer: int | None, stream: str, step: int, queries: Any
    ) -> CompressionResult:
        ctx = {"layer": layer, "stream": stream}
        n_bits = base
        if self.monitor is not None:
            n_bits = self.monitor.adjust(base, **ctx)
            if isinstance(n_bits, bool) or not isinstance(n_bits, int):
                raise TypeError(
                    f"monitor {_label(self.monitor)!r}.adjust returned {n_bits!r}, not an int"
                )
            n_bits = min(max(n_bits, _MIN_BITS), _MAX_BITS)
        scores = None
        if self.scorer is not None:
            scores = self.scorer.score(x, step=step, **ctx)
            if tuple(scores.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"scorer {_label(self.scorer)!r} returned scores of shape "
                    f"{tuple(scores.shape)}; expected x.shape[:-1] = {tuple(x.shape[:-1])}"
                )
        if self.strategy is None:
            out = self._plain(x, n_bits)
        else:
            out = self.strategy.compress(
                x, scores, self.quantizers, n_bits=n_bits, step=step, **ctx
            )
        if self.monitor is not None:
            self.monitor.observe(x, out, step=step, queries=queries, **ctx)
        return out

    def bits_per_coord(self, stream: str | None = None) -> float:
        """Average bits per coordinate spent so far on ``stream`` (both streams if ``None``)."""
        streams = STREAMS if stream is None else (stream,)
        bits = sum(self._spent[s][0] for s in streams)
        coords = sum(self._spent[s][1] for s in streams)
        return bits / coords if coords else math.nan

    def reset(self) -> None:
        """Forget every plugin's state, the step counters and the bit tally."""
        for plugin in (self.scorer, self.strategy, self.monitor):
            if plugin is not None:
                plugin.reset()
        self._steps.clear()
        self._spent = {s: [0, 0] for s in STREAMS}


def _json_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config`` as plain JSON values (sorted skip_layers), or None if it holds plugin objects."""
    plain = {k: v for k, v in config.items() if v is not None}
    if "skip_layers" in plain and isinstance(plain["skip_layers"], Iterable):
        plain["skip_layers"] = sorted(plain["skip_layers"])
    try:
        return json.loads(json.dumps(plain, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError):
        return None


def build_pipeline(
    config: Mapping[str, Any] | CompressionPipeline | None,
) -> CompressionPipeline | None:
    """The pipeline a cache or hook should run, or ``None`` for the plain quantizer path.

    Args:
        config: ``None`` (plain path, zero overhead), a config dict (see the module docstring),
            or an already built :class:`CompressionPipeline` (returned as is).

    Raises:
        PipelineConfigError: the config is malformed; the message names the key and the
            allowed values.

    Example:
        >>> build_pipeline(None) is None
        True
        >>> build_pipeline({"scorer": "snr", "strategy": "tiered", "bits_k": 3})
        CompressionPipeline(scorer='snr', strategy='tiered', bits_k=3, bits_v=2)
    """
    if config is None or isinstance(config, CompressionPipeline):
        return config
    return CompressionPipeline.from_config(config)

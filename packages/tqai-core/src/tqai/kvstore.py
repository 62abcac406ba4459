"""One attention layer's compressed K/V store: the cache logic every backend shares.

The transformers cache (tqai-torch) and the mlx-lm cache (tqai-mlx) are thin adapters around
:class:`KVStore`; all the logic of what is kept how lives here, in pure array API:

- ``sink_tokens``: the first tokens of the sequence, kept in full precision (attention sinks,
  Xiao et al. 2023, arXiv:2309.17453).
- the history: every other token as TurboQuant codes (packed, with fp16 norms) in growable
  buffers: amortized growth by 1/16 of the held tokens (at least 128) for decode-sized
  appends and exact allocation for large ones (prefill), never a concatenation of the whole
  history per step; ``nbytes`` counts the allocated capacity, i.e. the memory really held.
- ``residual_window``: the most recent tokens in full precision (KIVI, Liu et al. 2024,
  arXiv:2402.02750); older ones are compressed as they leave the window.

Tokens of the current forward pass are staged by :meth:`KVStore.update`, attend with the rest in
full precision (they exist in full precision anyway), and are committed (compressed or moved into
the sinks/window) by :meth:`KVStore.attend` or :meth:`KVStore.commit`. So after every forward
pass the store holds only sinks, packed codes and the window.

Coding options (:mod:`tqai.kvlayout`, fitted once from the prompt; all exact rewrites of
attention): ``center_keys`` / ``center_values`` (per-head mean subtracted before coding, added
back in attention), fractional ``bits_k`` / ``bits_v`` (an outlier-channel split: the
highest-energy channels of each head at one more bit), ``balance_keys`` (per-channel scales moved
from keys to queries).

Strategies (SPEC.md "The cache"): ``compressed`` (attention read from the codes, chunked
online softmax: :func:`tqai.attention.compressed_attention`), ``residual`` (the same with a
full-precision recent window, 128 tokens unless ``residual_window`` says otherwise) and ``full``
(dequantize everything each step; the reference for tests).

Arrays are ``(B, H, T, D)``: batch, KV heads, tokens, head dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tqai import _xp
from tqai.attention import CompressedHistory, _group, compressed_attention_multi
from tqai.codebooks import validate_dim
from tqai.container import ITEMSIZE, NORM_DTYPES, QuantizedTensor, QuantizerSpec, dtype_name
from tqai.kvlayout import (
    StreamCoding,
    attention_weight_mass,
    fit_stream,
    split_widths,
    validate_bits,
)
from tqai.quantizers import TurboQuantMSE, TurboQuantProd

__all__ = [
    "STRATEGIES",
    "KVCacheConfig",
    "KVStore",
    "build_cache_pipeline",
    "check_pipeline",
    "pipeline_config",
]

STRATEGIES = ("compressed", "residual", "full")
_DEFAULT_RESIDUAL_WINDOW = 128
_MIN_GROWTH = 128
# capacities are whole multiples of this many tokens, so a history's strides keep their
# divisibility as it grows (GPU kernels are compiled for the strides' divisibility by 16: a
# growth to a new divisibility would compile them again in the middle of a generation)
_CAPACITY_MULTIPLE = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class KVCacheConfig:
    """How a layer's K/V are kept. Validated on construction; errors name the field.

    Attributes:
        bits_k, bits_v: bits per coordinate for keys and values (1..8; with ``use_qjl`` the
            key budget includes the 1-bit QJL stage, so ``bits_k >= 2``). A fraction such as 3.5
            splits each head's channels: the highest-energy ones at the next width up
            (:func:`tqai.kvlayout.split_widths`).
        sink_tokens: leading tokens kept in full precision.
        residual_window: most recent tokens kept in full precision (``residual`` strategy: 128
            when left at 0).
        strategy: ``"compressed"``, ``"residual"`` or ``"full"``.
        use_qjl: keys with TurboQuant_prod (unbiased scores) instead of TurboQuant_mse.
        rotation: ``"haar"``, ``"hadamard"``, ``"rotor"`` or a ``tqai.rotations`` plugin.
        seed: rotation seed (keys use ``seed``, values ``seed + 1``).
        norm_dtype: ``"float16"`` or ``"float32"``.
        chunk_size: history tokens per online-softmax step.
        center_keys, center_values: code the vectors minus their per-head mean over the prompt
            (exact: the mean is added back in attention).
        balance_keys: move per-channel scales from keys to queries, fitted to the prompt's
            queries (needs attention through the store: not with ``strategy="full"``).
    """

    bits_k: int | float = 4
    bits_v: int | float = 2
    sink_tokens: int = 4
    residual_window: int = 0
    strategy: str = "compressed"
    use_qjl: bool = False
    rotation: str = "haar"
    seed: int = 0
    norm_dtype: str = "float16"
    chunk_size: int = 1024
    center_keys: bool = False
    center_values: bool = False
    balance_keys: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        bits_k = validate_bits(self.bits_k, name="bits_k", low=2 if self.use_qjl else 1)
        object.__setattr__(self, "bits_k", bits_k)
        object.__setattr__(self, "bits_v", validate_bits(self.bits_v, name="bits_v"))
        for name in ("center_keys", "center_values", "balance_keys", "use_qjl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.balance_keys and self.strategy == "full":
            raise ValueError(
                "balance_keys needs the queries of attention through the store; strategy='full' "
                "lets the model's own attention run: use 'compressed' or 'residual'"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("sink_tokens", "residual_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.norm_dtype not in NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {NORM_DTYPES}, got {self.norm_dtype!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size}")

    @property
    def window(self) -> int:
        """The effective full-precision recent window."""
        if self.strategy == "residual" and self.residual_window == 0:
            return _DEFAULT_RESIDUAL_WINDOW
        return self.residual_window

    @property
    def plain(self) -> bool:
        """Whole vectors at integer widths, nothing fitted: what single-history kernels read."""
        return not (
            self.center_keys
            or self.center_values
            or self.balance_keys
            or isinstance(self.bits_k, float)
            or isinstance(self.bits_v, float)
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def make_quantizer(self, stream: str, d: int, n_bits: int, part: int = 0) -> Any:
        """The quantizer of part ``part`` (``d`` channels, ``n_bits``) of the ``"k"``/``"v"`` stream.

        Seeds: keys ``seed + 2 * part``, values ``seed + 1 + 2 * part``.
        """
        common = {"rotation": self.rotation, "norm_dtype": self.norm_dtype}
        seed = self.seed + (stream == "v") + 2 * part
        if stream == "k" and self.use_qjl:
            return TurboQuantProd(d, n_bits, seed=seed, **common)
        return TurboQuantMSE(d, n_bits, seed=seed, **common)

    def part_quantizers(self, head_dim: int) -> tuple[list[Any], list[Any]]:
        """The (key, value) quantizers of each part for vectors of size ``head_dim``.

        One part each unless a width is fractional (an outlier-channel split).

        Raises:
            ValueError: ``head_dim`` is invalid or a fractional width cannot split it.
        """
        head_dim = validate_dim(head_dim, name="head_dim")
        out = []
        for stream, bits in (("k", self.bits_k), ("v", self.bits_v)):
            widths = split_widths(bits, head_dim, name=f"bits_{stream}")
            out.append([self.make_quantizer(stream, n, b, p) for p, (n, b) in enumerate(widths)])
        return out[0], out[1]


def build_cache_pipeline(
    pipeline: Any, config: KVCacheConfig, *, num_layers: int, head_dims: Iterable[int] = ()
) -> Any:
    """The compression pipeline an LLM cache runs, validated at patch time; None = plain path.

    Args:
        pipeline: ``None``, a pipeline config dict (``tqai.patch(model, pipeline={...})``) or a
            built :class:`tqai.pipeline.CompressionPipeline`. A dict gets defaults from the cache
            config where it says nothing: ``adapter="llm"`` (so strategies an LLM cannot run are
            refused by the pipeline itself), ``bits_k``/``bits_v``, and for the ``"mse"``
            quantizer the config's ``rotation``, ``seed`` and ``norm_dtype``; a named strategy
            gets its class's ``cache_kwargs`` under the config's ``strategy_kwargs`` (``tiered``:
            ``rank="token"``, one width per token).
        config: the cache's :class:`KVCacheConfig` (its widths serve ``skip_layers``).
        num_layers: the model's attention layers (``skip_layers`` must index them).
        head_dims: head dims the pipeline's quantizers must serve (built now, not mid-run).

    Raises:
        PipelineConfigError: a malformed config (the pipeline's own message), a strategy the
            cache cannot store (diffusion-step strategies, or several widths inside one
            ``(batch, head)`` row of a token), or ``skip_layers`` out of range.
    """
    if pipeline is None:
        return None
    from tqai.pipeline import CompressionPipeline, PipelineConfigError, build_pipeline

    if not config.plain:
        raise PipelineConfigError(
            "a compression pipeline cannot be combined with center_keys, center_values, "
            "balance_keys or fractional bits_k/bits_v (the pipeline codes whole vectors itself)"
        )

    if isinstance(pipeline, Mapping):
        full = {"adapter": "llm", "bits_k": config.bits_k, "bits_v": config.bits_v, **pipeline}
        if full.get("quantizer", "mse") == "mse" and "quantizer_kwargs" not in full:
            full["quantizer_kwargs"] = {
                "rotation": config.rotation,
                "seed": config.seed,
                "norm_dtype": config.norm_dtype,
            }
        strategy = _strategy_class(full.get("strategy"))
        _refuse_diffusion_strategy(strategy)
        defaults = getattr(strategy, "cache_kwargs", None)
        given = full.get("strategy_kwargs")
        named = isinstance(full.get("strategy"), str | type)
        if defaults and named and (given is None or isinstance(given, Mapping)):
            full["strategy_kwargs"] = {**defaults, **(given or {})}
        pipe = build_pipeline(full)
    elif isinstance(pipeline, CompressionPipeline):
        pipe = pipeline
    else:
        raise PipelineConfigError(
            "pipeline must be None, a pipeline config dict or a CompressionPipeline, got "
            f"{type(pipeline).__name__}"
        )
    if pipe.strategy is not None:
        _refuse_diffusion_strategy(pipe.strategy)
        if not getattr(pipe.strategy, "per_token", False):
            name = getattr(pipe.strategy, "name", None) or type(pipe.strategy).__name__
            raise PipelineConfigError(
                f"config['strategy'] = {name!r} is not supported by the LLM KV caches: they "
                "store each token at one width shared by every batch row and head (one packed "
                "history per width), and this strategy codes the vectors of one token at "
                "several widths (it does not set per_token = True). Supported: tiered (an LLM "
                "cache builds it with rank='token'; an explicit rank='joint' is refused), or no "
                "strategy (plain quantization at the pipeline's widths), each with an optional "
                "monitor ('stability', 'lyapunov', ...) and skip_layers"
            )
    bad = sorted(i for i in pipe.skip_layers if i >= num_layers)
    if bad:
        raise PipelineConfigError(
            f"config['skip_layers'] must be layer indices in 0..{num_layers - 1}, got {bad}"
        )
    widths = set(pipe.bits.values())
    if pipe.strategy is not None and hasattr(pipe.strategy, "widths"):
        widths |= {w for b in pipe.bits.values() for w in pipe.strategy.widths(b)}
    for d in head_dims:
        for bits in sorted(widths):
            try:
                pipe.quantizers.get(d, bits)
            except (TypeError, ValueError) as ex:
                raise PipelineConfigError(
                    f"config['quantizer'] / config['quantizer_kwargs'] cannot quantize "
                    f"head_dim {d} at {bits} bits: {ex}"
                ) from ex
    return pipe


def pipeline_config(pipeline: Any) -> dict | None:
    """What a saved cache records of its pipeline: its JSON config (None without a pipeline).

    Raises:
        ValueError: the pipeline was built from plugin objects, so no config describes it.
    """
    if pipeline is None:
        return None
    if pipeline.config is None:
        raise ValueError(
            "this cache's compression pipeline was built from plugin objects (instances or a "
            "CompressionPipeline), so a saved file could not name it; patch with a pipeline "
            "config dict of plugin names and JSON-able kwargs to save its caches"
        )
    return pipeline.config


def check_pipeline(path: Any, saved: dict | None, pipeline: Any) -> None:
    """Refuse loading a cache file written with another pipeline config than ``pipeline``'s.

    Raises:
        ValueError: the configs differ (None: no pipeline), or ``pipeline`` was built from
            plugin objects (see :func:`pipeline_config`).
    """
    current = pipeline_config(pipeline)
    if saved != current:
        raise ValueError(
            f"{path} was saved with another compression pipeline: {saved}; this cache uses "
            f"{current}: patch the model with the pipeline config it was saved with"
        )


def _strategy_class(spec: Any) -> Any:
    """The class a config's ``strategy`` names (None when unknown: the pipeline reports it)."""
    if isinstance(spec, type) or spec is None:
        return spec
    if not isinstance(spec, str):
        return type(spec)
    from tqai.registry import PluginLoadError, registry

    reg = registry("tqai.strategies")
    if spec not in reg:
        return None
    try:
        return reg.get(spec)
    except PluginLoadError:
        return None


def _refuse_diffusion_strategy(strategy: Any) -> None:
    """Refuse a strategy that needs model features an LLM cache lacks, saying why and where it
    applies (the diffusion-step strategies: delta, delta2, window, cfg_sharing)."""
    if strategy is None:
        return
    from tqai.pipeline import PipelineConfigError
    from tqai.pipeline.adapters.llm import LlmAdapter
    from tqai.pipeline.protocols import FEATURES

    missing = sorted(frozenset(getattr(strategy, "requires", ())) - LlmAdapter.features)
    if not missing:
        return
    name = getattr(strategy, "name", None) or getattr(strategy, "__name__", None)
    name = name or type(strategy).__name__
    needs = "; ".join(f"{f}: {FEATURES.get(f, 'a model feature')}" for f in missing)
    raise PipelineConfigError(
        f"config['strategy'] = {name!r} is a diffusion-step strategy and does not apply to LLM "
        f"KV caches: it requires {needs}. An LLM cache appends each step's new tokens to its "
        "history instead (appended_kv), so there is no earlier step of the same tokens to "
        "predict from or reuse. Use it for diffusion transformers through tqai-diffusers "
        f"(tqai_diffusers.apply_tqai(pipe, TqaiConfig(strategy={name!r}))). LLM caches support "
        "tiered or no strategy"
    )


def _cat(xp: ModuleType, parts: list[Any], axis: int) -> Any:
    parts = [p for p in parts if p is not None and p.shape[axis]]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)


def _kept(xp: ModuleType, part: Any, whole: int) -> Any:
    """``part``, a slice along the token axis of an array of ``whole`` tokens, as the store
    keeps it: its own row-major copy when it is at most half of that array, so that a few sink
    or window tokens never keep a long prompt's full-precision keys and values alive (a slice is
    a view into the caller's array in torch and numpy), and hold the layout a loaded cache
    holds (the same layout gives the same rounding, so a saved cache's logits are exact)."""
    if 2 * part.shape[2] > whole:
        return part
    out = xp.zeros(part.shape, dtype=part.dtype, device=_xp.device_of(part))
    out[...] = part
    return out


class _PackedHistory:
    """Growable buffers for the arrays of a :class:`QuantizedTensor` along the token axis."""

    def __init__(self) -> None:
        self.buffers: dict[str, Any] = {}
        self.length = 0
        # the held tokens' spec and dtype, from the first append (not that append's arrays:
        # keeping them would hold its codes a second time)
        self.spec: QuantizerSpec | None = None
        self.dtype: str | None = None

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0

    def append(self, qt: QuantizedTensor, xp: ModuleType) -> None:
        new = qt.shape[2]
        if self.spec is None:
            self.spec, self.dtype = qt.spec, qt.dtype
        self._reserve(new, qt.arrays(), xp)
        for name, a in qt.arrays().items():
            self.buffers[name][:, :, self.length : self.length + new, ...] = a
        self.length += new

    def append_encoded(self, quantizer: Any, x: Any, xp: ModuleType) -> None:
        """Append ``quantizer.quantize(x)`` (``x (B, H, new, d)``): written straight into the
        buffers' next tokens when the quantizer can (``quantize_into(x, arrays)`` returns True,
        as the fused GPU encodes do: no second copy of the codes), else quantized, then copied."""
        into = getattr(quantizer, "quantize_into", None)
        if into is not None and self.spec is not None and x.shape[:2] == self.batch_heads:
            new = x.shape[2]
            self._reserve(new, self.buffers, xp)
            span = slice(self.length, self.length + new)
            if into(x, {name: b[:, :, span, ...] for name, b in self.buffers.items()}):
                self.length += new
                return
        self.append(quantizer.quantize(x, xp=xp), xp)

    @property
    def batch_heads(self) -> tuple[int, ...]:
        return tuple(next(iter(self.buffers.values())).shape[:2]) if self.buffers else ()

    def _reserve(self, new: int, like: dict[str, Any], xp: ModuleType) -> None:
        """Room for ``new`` more tokens; new buffers shaped and typed as the arrays ``like``."""
        if self.length + new <= self.capacity:
            return
        needed = self.length + new
        # Decode-sized appends get spare room (amortized growth); a large append (prefill)
        # gets what it needs, rounded up to the capacity multiple (at most 15 tokens unused).
        spare = max(_MIN_GROWTH, needed // 16) if new < _MIN_GROWTH else 0
        target = -(-(needed + spare) // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE
        grow = target - self.capacity
        for name, a in like.items():
            old = self.buffers.get(name)
            shape = (*a.shape[:2], grow, *a.shape[3:])
            pad = xp.zeros(shape, dtype=a.dtype, device=_xp.device_of(a))
            self.buffers[name] = pad if old is None else xp.concat([old, pad], axis=2)

    def view(self) -> QuantizedTensor:
        """The held tokens as a compressed tensor of leading shape ``(B, H, length)`` (views)."""
        arrays = {name: b[:, :, : self.length, ...] for name, b in self.buffers.items()}
        b, h = arrays["norms"].shape[:2]
        return QuantizedTensor(
            spec=self.spec, shape=(b, h, self.length), dtype=self.dtype, **arrays
        )

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def map_batch(self, fn) -> None:
        self.buffers = {name: fn(b) for name, b in self.buffers.items()}

    def copy(self, clone) -> _PackedHistory:
        new = _PackedHistory()
        new.buffers = {name: clone(b) for name, b in self.buffers.items()}
        new.length, new.spec, new.dtype = self.length, self.spec, self.dtype
        return new

    def nbytes(self) -> int:
        return sum(_nbytes(b) for b in self.buffers.values())


def _nbytes(a: Any) -> int:
    return math.prod(a.shape) * ITEMSIZE[dtype_name(a)]


class _Tier:
    """Pipeline-compressed tokens of one (key spec, value spec): packed codes plus the history
    positions they hold, as runs ``[start, stop)`` in increasing order (time order)."""

    def __init__(self, key_quantizer: Any, value_quantizer: Any) -> None:
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.keys = _PackedHistory()
        self.values = _PackedHistory()
        self.runs: list[list[int]] = []

    @property
    def length(self) -> int:
        return self.keys.length

    def positions(self) -> list[int]:
        return [p for start, stop in self.runs for p in range(start, stop)]

    def add_positions(self, positions: list[int]) -> None:
        """Record that the tokens just appended sit at these (increasing) history positions."""
        for p in positions:
            if self.runs and self.runs[-1][1] == p:
                self.runs[-1][1] = p + 1
            else:
                self.runs.append([p, p + 1])

    def crop(self, history: int) -> None:
        """Keep only the tokens at history positions ``< history``."""
        kept, runs = 0, []
        for start, stop in self.runs:
            stop = min(stop, history)
            if stop > start:
                runs.append([start, stop])
                kept += stop - start
        self.runs = runs
        self.keys.crop(kept)
        self.values.crop(kept)

    def copy(self, clone) -> _Tier:
        new = _Tier(self.key_quantizer, self.value_quantizer)
        new.keys, new.values = self.keys.copy(clone), self.values.copy(clone)
        new.runs = [list(r) for r in self.runs]
        return new


def _payload_parts(
    result: Any, x: Any, quantizers: Any, stream: str
) -> list[tuple[QuantizedTensor, Any, list[int]]]:
    """The compressed tensors of ``result`` that store ``x (B, H, T, D)`` token by token, each
    with the quantizer that decodes it and the tokens (indices into ``T``) it holds.

    One payload of shape ``(B, H, T)`` holds every token; several (per-token routing, e.g.
    ``tiered`` with ``rank="token"``) come with ``result.info["token_index"]``: one increasing
    index list per payload, together a partition of ``range(T)``. Anything else cannot be read by
    the cache's attention.
    """
    payload = tuple(result.payload)
    lead, t = tuple(x.shape[:-2]), x.shape[-2]
    index = result.info.get("token_index")
    if index is None and len(payload) == 1:
        index = (range(t),)
    index = [list(i) for i in index] if index is not None else None
    if (
        index is None
        or len(index) != len(payload)
        or sorted(i for idx in index for i in idx) != list(range(t))
        or any(tuple(qt.shape) != (*lead, len(i)) for qt, i in zip(payload, index, strict=True))
    ):
        shapes = [tuple(qt.shape) for qt in payload]
        raise ValueError(
            f"the pipeline's {stream!r} result holds payload(s) of shape {shapes}; an LLM cache "
            f"can only store compressed tensors of shape {(*lead, 'T_i')} whose tokens "
            "result.info['token_index'] lists (one width per token, e.g. tiered with "
            f"rank='token'), or one of shape {(*lead, t)}"
        )
    parts = []
    for qt, idx in zip(payload, index, strict=True):
        quantizer = quantizers.get(qt.spec.d, qt.spec.n_bits)
        if quantizer.spec != qt.spec:
            raise ValueError(
                f"the pipeline's {stream!r} payload was made by a quantizer ({qt.spec}) that its "
                f"quantizer bank does not provide ({quantizer.spec}); the cache cannot decode it"
            )
        parts.append((qt, quantizer, idx))
    return parts


def _saved_tensor(arrays: dict[str, Any], prefix: str, quantizer: Any, dtype: str) -> Any:
    """The compressed tensor saved under ``prefix`` (``norms``, ``packed``, ...), validated."""
    named = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
    if "norms" not in named:
        raise ValueError(f"the saved layer has no {prefix}norms array")
    lead = tuple(named["norms"].shape)
    qt = QuantizedTensor(spec=quantizer.spec, shape=lead, dtype=dtype, **named)
    qt.validate()
    return qt


def _take_tokens(qt: QuantizedTensor, index: list[int], xp: ModuleType) -> QuantizedTensor:
    """The tokens ``index`` (along the last leading axis) of a compressed tensor."""
    if index == list(range(qt.shape[-1])):
        return qt
    at = xp.asarray(index, dtype=xp.int64, device=_xp.device_of(qt.norms))
    arrays = {name: xp.take(a, at, axis=len(qt.shape) - 1) for name, a in qt.arrays().items()}
    shape = (*qt.shape[:-1], len(index))
    return QuantizedTensor(spec=qt.spec, shape=shape, dtype=qt.dtype, **arrays)


class KVStore:
    """Sinks + packed history + recent window of one layer's keys and values.

    Args:
        config: a :class:`KVCacheConfig`.
        pipeline: an optional :class:`tqai.pipeline.CompressionPipeline`: tokens leaving the
            window are compressed by it instead of the config's quantizers (unless it skips
            ``layer``). ``None`` (default) is the plain path, untouched.
        layer: this store's attention layer index (what the pipeline's ``skip_layers`` and
            per-layer state are keyed by).

    Example:
        >>> import numpy as np
        >>> store = KVStore(KVCacheConfig(bits_k=4, bits_v=2, sink_tokens=2))
        >>> k = v = np.random.default_rng(0).standard_normal((1, 2, 10, 64)).astype(np.float32)
        >>> store.update(k, v)
        >>> out = store.attend(np.ones((1, 4, 10, 64), np.float32), scale=0.125, mask=None)
        >>> store.length, store.sink_length, store.history_length
        (10, 2, 8)
    """

    def __init__(
        self, config: KVCacheConfig, pipeline: Any = None, layer: int | None = None
    ) -> None:
        self.config = config
        self.layer = layer
        if pipeline is not None and not config.plain:
            raise ValueError(
                "a compression pipeline cannot be combined with center_keys, center_values, "
                "balance_keys or fractional bits (the pipeline codes whole vectors itself)"
            )
        # Only a pipeline that handles this layer is kept: a skipped layer runs the plain path.
        self.pipeline = pipeline if pipeline is not None and pipeline.handles(layer) else None
        self.tiers: dict[tuple[Any, Any], _Tier] = {}
        self.key_quantizer: Any = None
        self.value_quantizer: Any = None
        # Fitted codings (tqai.kvlayout) of a non-plain config; None until the history starts.
        self.key_coding: StreamCoding | None = None
        self.value_coding: StreamCoding | None = None
        self._query_sq: Any = None
        self._token_weights: Any = None
        self.head_dim: int | None = None
        self.xp: ModuleType | None = None
        self.sinks: tuple[Any, Any] | None = None
        self.window: tuple[Any, Any] | None = None
        self.pending: tuple[Any, Any] | None = None
        self.key_parts = [_PackedHistory()]
        self.value_parts = [_PackedHistory()]
        self.dtype: Any = None
        self.dtype_name: str | None = None
        #: Evaluation: commit staged tokens before attention reads them, and let each query see
        #: exactly what token-by-token decoding would (see :meth:`attend`).
        self.quantize_staged = False
        self._just_coded: tuple[Any, Any] | None = None

    @property
    def keys(self) -> _PackedHistory:
        """The packed key history (its first part when the channels are split)."""
        return self.key_parts[0]

    @property
    def values(self) -> _PackedHistory:
        """The packed value history (its first part when the channels are split)."""
        return self.value_parts[0]

    @property
    def plain(self) -> bool:
        """One history of whole vectors at one width each for K and V: single-history kernels
        (:meth:`attention_inputs`) can read it."""
        return self.config.plain and not self.tiers

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def sink_length(self) -> int:
        return 0 if self.sinks is None else self.sinks[0].shape[2]

    @property
    def window_length(self) -> int:
        return 0 if self.window is None else self.window[0].shape[2]

    @property
    def pending_length(self) -> int:
        return 0 if self.pending is None else self.pending[0].shape[2]

    @property
    def history_length(self) -> int:
        if not self.tiers:
            return self.keys.length
        return self.keys.length + sum(t.length for t in self.tiers.values())

    @property
    def length(self) -> int:
        """Tokens held (sinks + history + window + staged)."""
        return self.sink_length + self.history_length + self.window_length + self.pending_length

    def nbytes(self) -> dict[str, int]:
        """Bytes really held, by part: ``{"sinks", "codes", "window", "staged"}``."""
        full = [self.sinks, self.window, self.pending]
        sizes = [0 if p is None else _nbytes(p[0]) + _nbytes(p[1]) for p in full]
        codes = sum(h.nbytes() for h in self.key_parts + self.value_parts)
        for tier in self.tiers.values():
            codes += tier.keys.nbytes() + tier.values.nbytes()
        stats = sum(c.nbytes() for c in (self.key_coding, self.value_coding) if c is not None)
        return {
            "sinks": sizes[0],
            "codes": codes,
            "stats": stats,
            "window": sizes[1],
            "staged": sizes[2],
        }

    # ---- writing -------------------------------------------------------------------------
    def _initialize(self, keys: Any, xp: ModuleType) -> None:
        self.xp = xp
        self.dtype = keys.dtype
        self.dtype_name = dtype_name(keys)
        self.head_dim = keys.shape[-1]
        key_qs, value_qs = self.config.part_quantizers(self.head_dim)
        if self.config.plain:
            self.key_quantizer, self.value_quantizer = key_qs[0], value_qs[0]

    def update(self, keys: Any, values: Any) -> None:
        """Stage new tokens ``(B, H, T, D)``; they are committed by :meth:`attend`/:meth:`commit`."""
        xp = _xp.namespace(keys, values)
        if keys.ndim != 4 or tuple(keys.shape) != tuple(values.shape):
            raise ValueError(
                "keys and values must both be (batch, heads, tokens, head_dim), got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if self.xp is None:
            self._initialize(keys, xp)
        self.commit()
        self.pending = (keys, values)

    def commit(self) -> None:
        """Move staged tokens into the sinks, the window and the packed history."""
        if self.pending is None:
            return
        xp = self.xp
        keys, values = self.pending
        self.pending = None
        weights, self._token_weights = self._token_weights, None
        room = self.config.sink_tokens - self.sink_length
        if room > 0:
            take = min(room, keys.shape[2])
            weights = None if weights is None else weights[..., take:]
            head = (
                _kept(xp, keys[:, :, :take, ...], keys.shape[2]),
                _kept(xp, values[:, :, :take, ...], values.shape[2]),
            )
            self.sinks = (
                head
                if self.sinks is None
                else tuple(_cat(xp, [s, h], 2) for s, h in zip(self.sinks, head, strict=True))
            )
            keys, values = keys[:, :, take:, ...], values[:, :, take:, ...]
        if not keys.shape[2]:
            return
        if self.window is not None:
            keys = _cat(xp, [self.window[0], keys], 2)
            values = _cat(xp, [self.window[1], values], 2)
            weights = None
        window_of = keys.shape[2]  # the tokens the window below is sliced from
        overflow = keys.shape[2] - self.config.window
        if overflow > 0 and self.quantize_staged:
            self._just_coded = (keys[:, :, :overflow, ...], values[:, :, :overflow, ...])
        if overflow > 0 and self.pipeline is not None:
            self._commit_pipeline(keys[:, :, :overflow, ...], values[:, :, :overflow, ...])
            keys, values = keys[:, :, overflow:, ...], values[:, :, overflow:, ...]
        elif overflow > 0 and self.config.plain:
            self.keys.append_encoded(self.key_quantizer, keys[:, :, :overflow, ...], xp)
            self.values.append_encoded(self.value_quantizer, values[:, :, :overflow, ...], xp)
            keys, values = keys[:, :, overflow:, ...], values[:, :, overflow:, ...]
        elif overflow > 0:
            if self.key_coding is None:
                self._fit(keys, values, weights)
            pairs = (
                (self.key_parts, self.key_coding, keys),
                (self.value_parts, self.value_coding, values),
            )
            for parts, coding, x in pairs:
                for hist, qt in zip(
                    parts, coding.encode(x[:, :, :overflow, ...], xp=xp), strict=True
                ):
                    hist.append(qt, xp)
            keys, values = keys[:, :, overflow:, ...], values[:, :, overflow:, ...]
        self.window = (
            (_kept(xp, keys, window_of), _kept(xp, values, window_of)) if keys.shape[2] else None
        )

    def _fit(self, keys: Any, values: Any, weights: Any) -> None:
        """Fit the codings from the first tokens past the sinks (the prompt, window included);
        ``weights (B, H, T)``: the prompt's attention weights of these tokens, or None."""
        c, xp = self.config, self.xp
        self.key_coding = fit_stream(
            keys,
            c.bits_k,
            lambda d, b, p: c.make_quantizer("k", d, b, p),
            center=c.center_keys,
            weights=weights,
            query_sq=self._query_sq if c.balance_keys else None,
            xp=xp,
        )
        self.value_coding = fit_stream(
            values,
            c.bits_v,
            lambda d, b, p: c.make_quantizer("v", d, b, p),
            center=c.center_values,
            weights=weights,
            xp=xp,
        )
        self.key_parts = [_PackedHistory() for _ in self.key_coding.quantizers]
        self.value_parts = [_PackedHistory() for _ in self.value_coding.quantizers]
        self._query_sq = None

    def _commit_pipeline(self, keys: Any, values: Any) -> None:
        """Compress tokens leaving the window with the pipeline; file them by (key, value) spec.

        A token whose key and value went to widths ``(a, b)`` joins the tier of that pair, so
        with per-token routing in both streams a layer holds up to four tiers per base width.
        """
        xp, pipe = self.xp, self.pipeline
        res_k, res_v = pipe.compress_kv(keys, values, layer=self.layer)
        parts_k = _payload_parts(res_k, keys, pipe.quantizers, "k")
        parts_v = _payload_parts(res_v, values, pipe.quantizers, "v")
        start, n = self.history_length, keys.shape[2]
        where_k, where_v = [(0, 0)] * n, [(0, 0)] * n
        for where, parts in ((where_k, parts_k), (where_v, parts_v)):
            for i, (_, _, idx) in enumerate(parts):
                for local, t in enumerate(idx):
                    where[t] = (i, local)
        groups: dict[tuple[int, int], list[int]] = {}
        for t in range(n):
            groups.setdefault((where_k[t][0], where_v[t][0]), []).append(t)
        for (i, j), tokens in groups.items():
            qk, key_q, _ = parts_k[i]
            qv, value_q, _ = parts_v[j]
            tier = self.tiers.get((qk.spec, qv.spec))
            if tier is None:
                tier = self.tiers[(qk.spec, qv.spec)] = _Tier(key_q, value_q)
            tier.keys.append(_take_tokens(qk, [where_k[t][1] for t in tokens], xp), xp)
            tier.values.append(_take_tokens(qv, [where_v[t][1] for t in tokens], xp), xp)
            tier.add_positions([start + t for t in tokens])

    def _histories(self) -> list[CompressedHistory]:
        """What attention reads of the compressed tokens (pipeline tiers, or the one history)."""
        if self.tiers:
            return [
                CompressedHistory.plain(
                    t.keys.view(),
                    t.values.view(),
                    t.key_quantizer,
                    t.value_quantizer,
                    t.positions(),
                )
                for t in self.tiers.values()
                if t.length
            ]
        if not self.keys.length:
            return []
        if self.key_coding is None:
            return [
                CompressedHistory.plain(
                    self.keys.view(), self.values.view(), self.key_quantizer, self.value_quantizer
                )
            ]
        xp, kc, vc = self.xp, self.key_coding, self.value_coding
        return [
            CompressedHistory(
                kc.parts([h.view() for h in self.key_parts], xp=xp),
                vc.parts([h.view() for h in self.value_parts], xp=xp),
                key_mean=kc.mean,
                value_mean=vc.mean,
            )
        ]

    # ---- reading -------------------------------------------------------------------------
    def _suffix(self) -> tuple[Any, Any] | None:
        xp = self.xp
        parts = [p for p in (self.window, self.pending) if p is not None]
        if not parts:
            return None
        return (_cat(xp, [p[0] for p in parts], 2), _cat(xp, [p[1] for p in parts], 2))

    def attention_inputs(self) -> dict[str, Any]:
        """What attention reads, for fused kernels that take the reference's inputs.

        ``{"keys", "values"}``: the packed history (None before any), ``"prefix"``: the sinks,
        ``"suffix"``: window + staged tokens, ``"key_quantizer"``, ``"value_quantizer"``. A
        kernel that uses them must call :meth:`commit` afterwards, as :meth:`attend` does.

        Raises:
            ValueError: the store holds pipeline-compressed tokens (several packed histories) or
                uses centering, balancing or split channels (:attr:`plain` is False), which only
                :meth:`attend` reads.
        """
        if not self.plain:
            raise ValueError(
                "this store holds pipeline-compressed tokens or centered/balanced/split codes; "
                "read it with attend(), not a single-history kernel"
            )
        return {
            "keys": self.keys.view() if self.keys.length else None,
            "values": self.values.view() if self.values.length else None,
            "prefix": self.sinks,
            "suffix": self._suffix(),
            "key_quantizer": self.key_quantizer,
            "value_quantizer": self.value_quantizer,
        }

    def attend(
        self, query: Any, *, scale: float, mask: Any | None, softcap: float | None = None
    ) -> Any:
        """Attention of ``query (B, Hq, Tq, D)`` over everything held, then commit.

        ``mask``: boolean ``(B|1, 1|Hq, Tq, length)`` (True = attend) or None; ``softcap``:
        optional attention logit soft-capping (Gemma 2).
        """
        if self.xp is None:
            raise RuntimeError("attend() before any update(): the store holds no tokens")
        if self.quantize_staged and self.pending is not None:
            return self._attend_as_decode(query, scale=scale, mask=mask, softcap=softcap)
        self.observe(query, scale=scale)
        out = compressed_attention_multi(
            query,
            self._histories(),
            scale=scale,
            mask=mask,
            prefix=self.sinks,
            suffix=self._suffix(),
            chunk_size=self.config.chunk_size,
            softcap=softcap,
            xp=self.xp,
        )
        self.commit()
        return out

    def observe(self, query: Any, *, scale: float) -> None:
        """Record what the coding options fit from: the prompt's queries over the staged tokens.

        :meth:`attend` calls it; a backend that computes the prompt's attention itself (a fused
        kernel over the staged full-precision tokens) calls it before :meth:`commit`.
        """
        c = self.config
        if c.plain or self.key_coding is not None or self.pending is None:
            return
        if c.balance_keys:
            self._query_sq = self._query_mean_square(query)
        if (c.center_keys or c.center_values) and query.shape[2] == self.pending_length:
            self._token_weights = attention_weight_mass(
                query, self.pending[0], scale=scale, xp=self.xp
            )

    @property
    def holds_only_staged(self) -> bool:
        """Nothing committed yet: attention reads only the staged tokens, in full precision."""
        return self.pending is not None and self.length == self.pending_length

    def _attend_as_decode(
        self, query: Any, *, scale: float, mask: Any | None, softcap: float | None
    ) -> Any:
        """Attention of a chunk of staged tokens as token-by-token decoding would compute it.

        Decoding token ``t`` reads the tokens more than ``window`` positions back from the codes
        and the last ``window`` ones and itself in full precision. Here the chunk is committed
        first (so its tokens are coded exactly as decoding would code them), the tokens this
        commit coded are kept in full precision as well, and the mask picks, per query, the coded
        or the full-precision version of each of them by its distance.
        """
        xp, tq = self.xp, query.shape[2]
        self._just_coded = None
        self.commit()
        recent, self._just_coded = self._just_coded, None
        s, h, w = self.sink_length, self.history_length, self.window_length
        length = s + h + w
        n = 0 if recent is None else recent[0].shape[2]
        device = _xp.device_of(query)
        if mask is None:
            mask = xp.ones((1, 1, tq, length), dtype=xp.bool, device=device)
        positions = xp.arange(length - tq, length, device=device)
        dist = positions[:, None] - xp.arange(s + h - n, s + h, device=device)[None, :]
        coded = mask[..., s + h - n : s + h]
        mask = xp.concat(
            [
                mask[..., : s + h - n],
                coded & (dist > self.config.window),
                coded & (dist <= self.config.window),
                mask[..., s + h :],
            ],
            axis=-1,
        )
        parts = [p for p in (recent, self.window) if p is not None]
        suffix = None
        if parts:
            suffix = (_cat(xp, [p[0] for p in parts], 2), _cat(xp, [p[1] for p in parts], 2))
        return compressed_attention_multi(
            query,
            self._histories(),
            scale=scale,
            mask=mask,
            prefix=self.sinks,
            suffix=suffix,
            chunk_size=self.config.chunk_size,
            softcap=softcap,
            xp=xp,
        )

    def _query_mean_square(self, query: Any) -> Any:
        """``(B, Hkv, 1, D)`` mean squares of ``query (B, Hq, Tq, D)`` per KV head's group."""
        xp = self.xp
        q = _group(xp.astype(query, xp.float32), self.pending[0].shape[1], xp)
        return xp.mean(q * q, axis=2, keepdims=True)

    def dequantize(self) -> tuple[Any, Any]:
        """All tokens as ``(B, H, length, D)`` arrays (the ``full`` strategy and tests)."""
        xp = self.xp
        hist_k = hist_v = None
        if self.tiers:
            hist_k, hist_v = self._dequantize_tiers()
        elif self.keys.length and self.key_coding is not None:
            views = [[h.view() for h in parts] for parts in (self.key_parts, self.value_parts)]
            hist_k = xp.astype(self.key_coding.decode(views[0], xp=xp), self.dtype)
            hist_v = xp.astype(self.value_coding.decode(views[1], xp=xp), self.dtype)
        elif self.keys.length:
            hist_k = xp.astype(self.key_quantizer.dequantize(self.keys.view(), xp=xp), self.dtype)
            hist_v = xp.astype(
                self.value_quantizer.dequantize(self.values.view(), xp=xp), self.dtype
            )
        suffix = self._suffix() or (None, None)
        sinks = self.sinks or (None, None)
        return (
            _cat(xp, [sinks[0], hist_k, suffix[0]], 2),
            _cat(xp, [sinks[1], hist_v, suffix[1]], 2),
        )

    def _dequantize_tiers(self) -> tuple[Any, Any]:
        xp = self.xp
        parts_k, parts_v, positions = [], [], []
        for hist in self._histories():
            (key,), (value,) = hist.keys, hist.values
            parts_k.append(xp.astype(key.quantizer.dequantize(key.codes, xp=xp), self.dtype))
            parts_v.append(xp.astype(value.quantizer.dequantize(value.codes, xp=xp), self.dtype))
            positions += hist.positions
        if not positions:
            return None, None
        order = sorted(range(len(positions)), key=positions.__getitem__)
        index = xp.asarray(order, dtype=xp.int64, device=_xp.device_of(parts_k[0]))
        return (
            xp.take(_cat(xp, parts_k, 2), index, axis=2),
            xp.take(_cat(xp, parts_v, 2), index, axis=2),
        )

    # ---- editing -------------------------------------------------------------------------
    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (speculative decoding rolls back rejected ones)."""
        self.commit()
        if length < 0:
            length = max(0, self.length + length)
        if length >= self.length:
            return
        s = min(length, self.sink_length)
        if self.sinks is not None:
            self.sinks = (self.sinks[0][:, :, :s, ...], self.sinks[1][:, :, :s, ...]) if s else None
        rest = length - s
        h = min(rest, self.history_length)
        for hist in self.key_parts + self.value_parts:
            hist.crop(h)
        for tier in self.tiers.values():
            tier.crop(h)
        w = rest - h
        if self.window is not None:
            self.window = (
                (self.window[0][:, :, :w, ...], self.window[1][:, :, :w, ...]) if w else None
            )

    def __deepcopy__(self, memo: dict) -> KVStore:
        """An independent copy: arrays are copied; config, quantizers and namespace are shared."""
        new = KVStore.__new__(KVStore)
        new.__dict__.update(self.__dict__)
        if self.xp is None:
            new.key_parts, new.value_parts = [_PackedHistory()], [_PackedHistory()]
            new.tiers = {}
            return new
        xp = self.xp

        def clone(a: Any) -> Any:
            return xp.asarray(a, copy=True)

        for part in ("sinks", "window", "pending"):
            value = getattr(self, part)
            if value is not None:
                setattr(new, part, (clone(value[0]), clone(value[1])))
        # Codings are immutable (map_batch replaces them), so copies may share them.
        new.key_parts = [h.copy(clone) for h in self.key_parts]
        new.value_parts = [h.copy(clone) for h in self.value_parts]
        new.tiers = {spec: tier.copy(clone) for spec, tier in self.tiers.items()}
        return new

    def _history_arrays(self) -> dict[str, Any]:
        """The history's used buffers and the codings' statistics, by saved name."""
        arrays: dict[str, Any] = {}
        for stream, parts in (("k", self.key_parts), ("v", self.value_parts)):
            for p, hist in enumerate(parts):
                if hist.length:
                    prefix = f"history.{stream}" + (str(p) if p else "")
                    for name, a in hist.view().arrays().items():
                        arrays[f"{prefix}.{name}"] = a
        for stream, coding in (("k", self.key_coding), ("v", self.value_coding)):
            if coding is not None:
                for name, a in coding.arrays().items():
                    arrays[f"coding.{stream}.{name}"] = a
        return arrays

    def _segment_arrays(self) -> dict[str, Any]:
        arrays: dict[str, Any] = {}
        for part in ("sinks", "window"):
            value = getattr(self, part)
            if value is not None:
                arrays[f"{part}.k"], arrays[f"{part}.v"] = value
        return arrays

    def state(self) -> tuple[dict, dict[str, Any]]:
        """What a saved cache holds for this layer: ``(meta, arrays)`` (commits first).

        Only the used part of the history buffers is included, never the spare capacity; a
        fitted coding's statistics (means, scales, channel sets) are included. A store with a
        compression pipeline saves each tier (one ``(key spec, value spec)`` pair: its packed
        codes ``tier{i}.k.*`` / ``tier{i}.v.*`` and the specs in ``meta["tiers"]``) and
        ``tier_of``, a uint8 ``(history,)`` array naming each history position's tier; the
        pipeline's running state (scorer statistics, routing, monitor) is not part of it.
        """
        self.commit()
        meta = {
            "config": self.config.to_dict(),
            "head_dim": self.head_dim,
            "dtype": self.dtype_name,
            "sinks": self.sink_length,
            "history": self.history_length,
            "window": self.window_length,
        }
        arrays = {**self._segment_arrays(), **self._history_arrays()}
        if self.pipeline is not None:
            meta["tiers"], tier_arrays = self._tier_state()
            arrays.update(tier_arrays)
        return meta, arrays

    def _tier_state(self) -> tuple[list[dict], dict[str, Any]]:
        tiers = [t for t in self.tiers.values() if t.length]
        if len(tiers) > 255:
            raise ValueError(f"{len(tiers)} tiers do not fit the uint8 tier_of array (<= 255)")
        meta, arrays = [], {}
        tier_of = np.zeros(self.history_length, dtype=np.uint8)
        for i, tier in enumerate(tiers):
            meta.append(
                {
                    "k": asdict(tier.key_quantizer.spec),
                    "v": asdict(tier.value_quantizer.spec),
                    "length": tier.length,
                }
            )
            for stream, hist in (("k", tier.keys), ("v", tier.values)):
                for name, a in hist.view().arrays().items():
                    arrays[f"tier{i}.{stream}.{name}"] = a
            for start, stop in tier.runs:
                tier_of[start:stop] = i
        if tiers:
            device = _xp.device_of(arrays["tier0.k.norms"])
            arrays["tier_of"] = self.xp.asarray(tier_of, device=device)
        return meta, arrays

    @classmethod
    def from_state(
        cls,
        config: KVCacheConfig,
        meta: dict,
        arrays: dict[str, Any],
        pipeline: Any = None,
        layer: int | None = None,
    ) -> KVStore:
        """Rebuild a store from :meth:`state` output (arrays in the namespace to use).

        Args:
            config: the cache config the layer was saved with.
            meta, arrays: what :meth:`state` returned.
            pipeline, layer: the compression pipeline and layer index of the store to build
                (as for :class:`KVStore`); a layer saved with pipeline tiers needs one whose
                quantizers make the same specs.

        Raises:
            ValueError: the saved layer was made with another cache config, with (or without)
                a pipeline this store does not (does) run, with quantizers the pipeline does not
                provide, or its arrays do not match what the config codes.
        """
        if meta["config"] != config.to_dict():
            raise ValueError(
                "the saved cache was made with another tqai config: "
                f"saved {meta['config']}, requested {config.to_dict()}"
            )
        store = cls(config, pipeline, layer)
        if ("tiers" in meta) != (store.pipeline is not None):
            saved = "with" if "tiers" in meta else "without"
            now = "runs" if store.pipeline is not None else "does not run"
            raise ValueError(
                f"layer {layer} was saved {saved} a compression pipeline, but this cache {now} "
                "one there: load it into a model patched with the pipeline it was saved with"
            )
        if meta["head_dim"] is None or not arrays:  # nothing held (never filled, or cropped to 0)
            return store
        store.xp = _xp.namespace(*arrays.values())
        store.dtype_name = meta["dtype"]
        store.dtype = getattr(store.xp, meta["dtype"])
        store.head_dim = meta["head_dim"]
        key_qs, value_qs = config.part_quantizers(meta["head_dim"])
        if config.plain:
            store.key_quantizer, store.value_quantizer = key_qs[0], value_qs[0]
        for part in ("sinks", "window"):
            if f"{part}.k" in arrays:
                setattr(store, part, (arrays[f"{part}.k"], arrays[f"{part}.v"]))
        if meta.get("tiers"):
            store._load_tiers(meta, arrays)
            return store
        if not meta["history"]:
            return store
        if not config.plain:
            codings = []
            for stream, qs in (("k", key_qs), ("v", value_qs)):
                prefix = f"coding.{stream}."
                stats = {
                    k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)
                }
                codings.append(StreamCoding.from_arrays(qs, stats))
            store.key_coding, store.value_coding = codings
            store.key_parts = [_PackedHistory() for _ in key_qs]
            store.value_parts = [_PackedHistory() for _ in value_qs]
        for stream, parts, qs in (
            ("k", store.key_parts, key_qs),
            ("v", store.value_parts, value_qs),
        ):
            for p, (hist, q) in enumerate(zip(parts, qs, strict=True)):
                prefix = f"history.{stream}" + (str(p) if p else "") + "."
                hist.append(_saved_tensor(arrays, prefix, q, meta["dtype"]), store.xp)
        return store

    def _load_tiers(self, meta: dict, arrays: dict[str, Any]) -> None:
        """Rebuild the pipeline tiers of :meth:`_tier_state` (quantizers from the pipeline)."""
        if "tier_of" not in arrays:
            raise ValueError("the saved layer has tiers but no tier_of array")
        tier_of = _xp.to_host(arrays["tier_of"]).tolist()
        if len(tier_of) != meta["history"]:
            raise ValueError(
                f"the saved tier_of array has {len(tier_of)} entries for {meta['history']} "
                "history tokens"
            )
        bank = self.pipeline.quantizers
        for i, saved in enumerate(meta["tiers"]):
            quantizers = []
            for stream in ("k", "v"):
                q = bank.get(saved[stream]["d"], saved[stream]["n_bits"])
                if asdict(q.spec) != saved[stream]:
                    raise ValueError(
                        f"tier {i} of the saved layer was coded by {saved[stream]} ({stream!r}), "
                        f"but this pipeline's quantizer for that width is {asdict(q.spec)}"
                    )
                quantizers.append(q)
            tier = _Tier(*quantizers)
            tier.keys.append(
                _saved_tensor(arrays, f"tier{i}.k.", quantizers[0], meta["dtype"]), self.xp
            )
            tier.values.append(
                _saved_tensor(arrays, f"tier{i}.v.", quantizers[1], meta["dtype"]), self.xp
            )
            tier.add_positions([p for p, j in enumerate(tier_of) if j == i])
            if len(tier.positions()) != tier.length:
                raise ValueError(
                    f"tier {i} of the saved layer holds {tier.length} tokens but tier_of "
                    f"assigns it {len(tier.positions())}"
                )
            self.tiers[(quantizers[0].spec, quantizers[1].spec)] = tier

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (e.g. ``lambda a: a[indices]``) to the batch axis of every array."""
        self.commit()
        for part in ("sinks", "window"):
            value = getattr(self, part)
            if value is not None:
                setattr(self, part, (fn(value[0]), fn(value[1])))
        for hist in self.key_parts + self.value_parts:
            hist.map_batch(fn)
        if self.key_coding is not None:
            self.key_coding = self.key_coding.map_batch(fn)
            self.value_coding = self.value_coding.map_batch(fn)
        for tier in self.tiers.values():
            tier.keys.map_batch(fn)
            tier.values.map_batch(fn)

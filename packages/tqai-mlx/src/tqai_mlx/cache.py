"""``TqaiKVCache``: mlx-lm's cache protocol over tqai's :class:`~tqai.kvstore.KVStore`.

Why it is shaped like this: mlx-lm's caches are small flat classes behind a duck-typed protocol
(``update_and_fetch``, ``offset``, ``state``, ``make_mask``, ``trim``, ``nbytes``, ``empty``,
``size``; see ``mlx_lm/models/cache.py``), and every model calls
``mlx_lm.models.base.scaled_dot_product_attention(queries, keys, values, cache=..., scale=...,
mask=...)`` right after ``cache.update_and_fetch``. This class is one more such cache; all the
logic of what is kept how (sinks, packed codes, recent window, staged tokens) is the core's
KVStore, and all the math (attention read from the codes, TurboQuant arXiv:2504.19874, Section 4)
is :func:`tqai.attention.compressed_attention`. Nothing here computes anything.

How attention reaches the codes: for the ``compressed`` and ``residual`` strategies
``update_and_fetch`` only stages the new tokens and hands them back; ``tqai_mlx.patch`` has
replaced ``scaled_dot_product_attention`` by a dispatcher that sends a call whose ``cache`` is a
``TqaiKVCache`` to :meth:`TqaiKVCache.attend` (the codes, never a full-precision history) and any
other call to mlx-lm's original. The ``full`` strategy returns the dequantized history instead, so
mlx-lm's own attention runs on it: the reference path for tests.

mlx-lm traps kept in mind (STYLE.md 1.3): no attribute is named ``bits`` or ``group_size`` (the
base attention switches to its quantized kernel on ``hasattr(cache, "bits")``), there is no
``to_quantized`` (``kv_bits=`` would replace this cache), and ``mlx_lm.load_prompt_cache`` cannot
rebuild a class defined outside ``mlx_lm.models.cache``: use :mod:`tqai_mlx.prompt_cache`.

Shapes: ``(B, H, T, D)`` = batch, KV heads, tokens, head dim; queries ``(B, Hq, Tq, D)``.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
from mlx_lm.models import base as _base
from mlx_lm.models.base import create_causal_mask

from tqai.kvstore import KVCacheConfig, KVStore

__all__ = ["CACHE_FORMAT", "CACHE_FORMAT_VERSION", "KERNELS", "TqaiKVCache"]

CACHE_FORMAT = "tqai-mlx-kv-cache"
CACHE_FORMAT_VERSION = 1
KERNELS = ("reference", "metal")


def _routed() -> bool:
    return bool(getattr(_base.scaled_dot_product_attention, "_tqai_dispatch", False))


class TqaiKVCache:
    """One attention layer's TurboQuant-compressed K/V cache, in mlx-lm's cache protocol.

    Args:
        config: how K/V are kept (bits, sinks, window, strategy, rotation, ...); defaults to
            ``KVCacheConfig()`` (K4/V2, 4 sinks, ``compressed``).
        kernel: ``"reference"`` (MLX ops: the core's quantizers and
            :func:`tqai.attention.compressed_attention`; the default) or ``"metal"`` (the Metal
            kernels of :mod:`tqai_mlx.kernels.metal`: encode for TurboQuant_mse codes, fused
            decode attention for single-token steps without a mask; the rest stays MLX ops).

    Example:
        >>> import mlx.core as mx
        >>> cache = TqaiKVCache(KVCacheConfig(bits_k=4, bits_v=2, strategy="full"))
        >>> k = v = mx.random.normal((1, 2, 8, 32))
        >>> keys, values = cache.update_and_fetch(k, v)
        >>> cache.offset, tuple(keys.shape)
        (8, (1, 2, 8, 32))
    """

    def __init__(
        self,
        config: KVCacheConfig | None = None,
        *,
        kernel: str = "reference",
        pipeline: Any = None,
        layer: int | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if pipeline is not None and kernel != "reference":
            raise ValueError("a compression pipeline runs with kernel='reference' only")
        self.config = config if config is not None else KVCacheConfig()
        self.kernel = kernel
        self.store = KVStore(self.config, pipeline, layer)
        self._awaiting_attention = False
        self._restore_meta: dict[str, Any] | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TqaiKVCache(bits_k={c.bits_k}, bits_v={c.bits_v}, strategy={c.strategy!r}, "
            f"offset={self.offset})"
        )

    # ---- the protocol ---------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Tokens seen so far (the rope offset of the next token)."""
        return self.store.length

    @property
    def reads_codes(self) -> bool:
        """Whether attention is computed from the codes (True unless the strategy is ``full``)."""
        return self.config.strategy != "full"

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Add ``(B, H, T, D)`` keys/values; return what mlx-lm's attention call receives.

        ``full`` strategy: every held token, dequantized, ``(B, H, offset, D)`` (the new ones
        exact). Otherwise the new tokens themselves, staged: the dispatcher installed by
        ``tqai_mlx.patch`` ignores them and calls :meth:`attend`, which reads the codes.

        Raises:
            RuntimeError: the codes would never be read (tqai's dispatcher is not installed, or
                the previous tokens were never attended, i.e. the model's attention bypasses
                ``mlx_lm.models.base.scaled_dot_product_attention``).
        """
        if self.reads_codes:
            if not _routed():
                raise RuntimeError(
                    "TqaiKVCache is used but mlx-lm's attention is not routed to it: call "
                    "tqai_mlx.patch(model) first (it was never called, or unpatch() undid it)"
                )
            if self._awaiting_attention:
                raise RuntimeError(
                    "TqaiKVCache.update_and_fetch was called twice without attention reading the "
                    "cache: this model's attention does not call "
                    "mlx_lm.models.base.scaled_dot_product_attention, so tqai cannot serve it; "
                    "use cache_strategy='full' or skip_layers for it"
                )
        self.store.update(keys, values)
        if self.kernel == "metal":
            self._encode_on_metal()
        if not self.reads_codes:
            keys, values = self.store.dequantize()
            self.store.commit()
            return keys, values
        self._awaiting_attention = True
        return keys, values

    def _encode_on_metal(self) -> None:
        """Give the store Metal-encoding quantizers (TurboQuant_mse ones; QJL keys stay)."""
        from tqai_mlx.kernels.metal import MetalEncoder

        store = self.store
        for name in ("key_quantizer", "value_quantizer"):
            q = getattr(store, name)
            if q.spec.kind == "mse" and not isinstance(q, MetalEncoder):
                setattr(store, name, MetalEncoder(q))

    def attend(
        self,
        queries: mx.array,
        *,
        scale: float,
        mask: mx.array | str | None = None,
        sinks: mx.array | None = None,
    ) -> mx.array:
        """Attention of ``queries (B, Hq, Tq, D)`` over every held token, from the codes.

        Args:
            queries: the layer's queries after rope.
            scale: softmax scale.
            mask: mlx-lm's mask: ``None``, ``"causal"`` or a boolean array broadcastable to
                ``(B, Hq, Tq, offset)`` (True = attend). An additive (floating) mask is honored
                exactly by falling back to mlx's attention over the dequantized cache.
            sinks: learned attention-sink logits (gpt-oss); served by the same fallback.

        Returns:
            ``(B, Hq, Tq, D)`` in ``queries``' dtype. The staged tokens are committed afterwards.
        """
        self._awaiting_attention = False
        if sinks is not None or (isinstance(mask, mx.array) and mask.dtype != mx.bool_):
            keys, values = self.store.dequantize()
            self.store.commit()
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask, sinks=sinks
            )
        mask = self._boolean_mask(mask, queries.shape)
        if self.kernel == "metal" and mask is None:
            from tqai_mlx.kernels.metal import decode_attention, decode_supported

            if decode_supported(self.store, queries):
                out = decode_attention(queries, self.store, scale=scale, impl="metal")
                self.store.commit()
                return out
        return self.store.attend(queries, scale=scale, mask=mask)

    def _boolean_mask(self, mask: Any, q_shape: tuple[int, ...]) -> mx.array | None:
        """mlx-lm's mask as the core wants it: boolean ``(B|1, Hq|1, Tq, offset)`` or None."""
        b, hq, tq, _ = q_shape
        length = self.offset
        if mask is None:
            return None
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unknown mask {mask!r}; mlx-lm passes None, 'causal' or arrays")
            if tq == 1:
                return None
            return create_causal_mask(tq, length - tq)[None, None]
        if mask.ndim > 4 or mask.shape[-1] != length:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not cover the {length} cached tokens"
            )
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {q_shape}")
        return mx.broadcast_to(mask, (mask.shape[0], mask.shape[1], tq, length))

    def make_mask(
        self, N: int, return_array: bool = False, window_size: int | None = None
    ) -> mx.array | str | None:
        """The mask for ``N`` new tokens, mlx-lm's convention (``"causal"``, None or boolean)."""
        if window_size is not None or (return_array and N > 1):
            return create_causal_mask(N, self.offset, window_size=window_size)
        return None if N == 1 else "causal"

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (speculative decoding); returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self._awaiting_attention = False
        self.store.crop(self.offset - n)
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.store.length == 0

    @property
    def nbytes(self) -> int:
        """Bytes really held: full-precision sinks/window/staged tokens + packed code buffers."""
        return sum(self.store.nbytes().values())

    # ---- state ----------------------------------------------------------------------------
    @property
    def meta_state(self) -> tuple[str]:
        """``(json,)``: format, version, kernel and the core's per-layer metadata (strings only).

        The layer metadata is :meth:`tqai.kvstore.KVStore.state`'s: config, head dim, dtype and
        the sink/history/window token counts.
        """
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_FORMAT_VERSION,
            "kernel": self.kernel,
            "store": self.store.state()[0],
        }
        return (json.dumps(meta, sort_keys=True),)

    @meta_state.setter
    def meta_state(self, value: tuple[str, ...] | list[str]) -> None:
        try:
            meta = json.loads(value[0])
            fmt, version, store_meta = meta["format"], meta["version"], meta["store"]
            config = KVCacheConfig(**store_meta["config"])
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"not a TqaiKVCache meta_state: {exc}") from exc
        if fmt != CACHE_FORMAT or version != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported cache state {fmt!r} version {version}; this tqai-mlx reads "
                f"{CACHE_FORMAT!r} version {CACHE_FORMAT_VERSION}"
            )
        self.config = config
        self.kernel = meta["kernel"]
        self.store = KVStore(config)
        self._awaiting_attention = False
        self._restore_meta = store_meta

    @property
    def state(self) -> dict[str, mx.array]:
        """Every array held, by name: :meth:`tqai.kvstore.KVStore.state`'s arrays.

        Staged tokens are committed first (mlx-lm reads ``state`` only between forward passes,
        when nothing is staged); the code buffers are cut to the tokens held. With a
        compression pipeline: every width's codes and ``tier_of`` (which width holds each token).
        """
        return self.store.state()[1]

    @state.setter
    def state(self, arrays: dict[str, mx.array]) -> None:
        meta = self._restore_meta or self.store.state()[0]
        self._restore_meta = None
        self.store = KVStore.from_state(
            self.config, meta, dict(arrays), self.store.pipeline, self.store.layer
        )
        self._awaiting_attention = False

    @classmethod
    def from_state(cls, state: dict[str, mx.array], meta_state: tuple[str, ...]) -> TqaiKVCache:
        """Rebuild a cache from :attr:`state` and :attr:`meta_state` (mlx-lm's pattern)."""
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

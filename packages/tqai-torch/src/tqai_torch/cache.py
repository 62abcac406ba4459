"""The transformers KV cache that really stays compressed: ``TqaiLayer`` and ``TqaiCache``.

Why it is shaped like this: transformers' cache is a list of per-layer objects behind
``Cache.update(key_states, value_states, layer_idx)`` (transformers 5.x ``cache_utils``). Every
full-attention layer gets a :class:`TqaiLayer`, a thin adapter around the core's
:class:`tqai.kvstore.KVStore` (sinks + packed codes + optional full-precision window); all math is
in tqai-core. Sliding-window layers keep transformers' own ``DynamicSlidingWindowLayer``: they
hold at most one window of tokens, so compressing them saves little and the window must be
exact for the model's local attention (documented in the README).

How attention reads the codes: ``update`` stages the new tokens and returns them tagged with
their layer (``key_states._tqai_layer``); the ``"tqai"`` attention function registered in
transformers' ``AttentionInterface`` (:mod:`tqai_torch.attention`) finds the tag and computes
attention from the packed codes (chunked online softmax in the rotated domains), then commits the
new tokens. No dequantized copy of the history ever exists. The ``"full"`` strategy instead
returns the dequantized history from ``update`` and lets the model's original attention run: the
reference for tests.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from tqai.cachefile import read_cache_file, write_cache_file
from tqai.kvstore import KVCacheConfig, KVStore, check_pipeline, pipeline_config
from tqai.layer_bits import layer_configs

__all__ = ["TqaiCache", "TqaiLayer"]


def _left_padding(mask: torch.Tensor) -> torch.Tensor | bool | None:
    """What a one-query-token boolean mask ``(B|1, 1|H, 1, kv)`` asks of the fused kernel:
    ``None`` if every position is visible, the ``(B,)`` first visible positions if each
    sequence sees exactly the positions from one on (a left-padded batch), else ``False``
    (another pattern: the reference serves it). One device-to-host read per call."""
    rows = mask[:, :, -1, :]  # (B|1, 1|H, kv)
    kv = rows.shape[-1]
    visible = rows.sum(-1)  # (B|1, 1|H)
    start = kv - visible[:, :1]
    expected = torch.arange(kv, device=mask.device) >= start[:, :, None]
    ok, everything = torch.stack(
        [(rows == expected).all() & (visible > 0).all(), (visible == kv).all()]
    ).tolist()
    if not ok:
        return False
    return None if everything else start[:, 0]


def _is_causal_chunk(mask: torch.Tensor | None, kv: int) -> bool:
    """Whether a ``(B|1, 1|H, Tq, kv)`` boolean mask is plain causal attention of the last
    ``Tq`` positions over every earlier one (what the fused prefill kernel computes)."""
    if mask is None:
        return False
    tq = mask.shape[-2]
    rows = torch.arange(kv - tq, kv, device=mask.device)[:, None]
    expected = torch.arange(kv, device=mask.device)[None, :] <= rows
    return bool((mask == expected).all())


def _kernels_read(query: torch.Tensor, store: KVStore) -> bool:
    """Whether the Triton attention kernels can read this store for ``query``: CUDA, a history
    of plain MSE codes (1/2/3/4/8 bits, fp16 norms) that is not scored decode-exact, triton
    installed, and ``TQAI_KERNEL`` not ``reference``."""
    if os.environ.get("TQAI_KERNEL", "auto") == "reference":
        return False
    if not store.plain or store.quantize_staged or not query.is_cuda or not store.history_length:
        return False
    try:
        from tqai_torch.kernels.triton.decode_attention import supports
    except ImportError:  # no triton on this machine
        return False
    return supports(store.key_quantizer, store.value_quantizer, query.shape[-1])


def _use_fused_prefill(query: torch.Tensor, mask: torch.Tensor | None, store: KVStore) -> bool:
    """The Triton prefill kernels serve a chunk of 2 or more query tokens (speculative-decoding
    checks, chat turns, long prompts fed in chunks) continuing a store the kernels read
    (:func:`_kernels_read`), when the mask is plain causal: the tiled kernel for chunks of many
    query rows, the per-row decode path for few (``prefill_attention_triton``'s
    ``method="auto"``; ``benchmarks/bench_prefill.py`` has their times)."""
    if query.shape[2] < 2 or not _kernels_read(query, store):
        return False
    return _is_causal_chunk(mask, store.length)


def _use_fused_decode(
    query: torch.Tensor, mask: torch.Tensor | None, store: KVStore
) -> tuple[bool, torch.Tensor | None]:
    """Whether the Triton decode kernel serves, and the left padding it must apply: one query
    token over a store the kernels read (:func:`_kernels_read`), every position visible or a
    left-padded batch (and :func:`_fused_inputs` finds nothing it cannot read)."""
    no = (False, None)
    if query.shape[2] != 1 or not _kernels_read(query, store):
        return no
    valid_from = None if mask is None else _left_padding(mask)
    if valid_from is False:
        return no
    if valid_from is not None and valid_from.shape[0] != query.shape[0]:
        valid_from = valid_from.expand(query.shape[0])
    return True, valid_from


def _encode_with_triton(store: KVStore) -> None:
    """Give a CUDA store the fused Triton encode (one launch per K/V commit) for its
    TurboQuant_mse quantizers, unless ``TQAI_KERNEL=reference`` or triton is missing."""
    if os.environ.get("TQAI_KERNEL", "auto") == "reference":
        return
    try:
        from tqai_torch.kernels.triton.encode import TritonEncoder, supports
    except ImportError:  # no triton on this machine
        return
    for name in ("key_quantizer", "value_quantizer"):
        quantizer = getattr(store, name, None)
        wrapped = isinstance(quantizer, TritonEncoder)
        if quantizer is not None and not wrapped and supports(quantizer):
            setattr(store, name, TritonEncoder(quantizer))


_FUSED_INPUTS = frozenset(
    ("keys", "values", "prefix", "suffix", "key_quantizer", "value_quantizer")
)


_MAX_GROUP = 16  # query heads per KV head the fused kernel takes (rows of one program)


def _fused_inputs(store: KVStore, query_heads: int) -> dict | None:
    """The store's attention inputs if the fused kernel reads all of them, else None (then the
    reference runs): a store whose attention needs more than one packed history and plain
    full-precision segments (pipeline tiers, or any field the kernel does not know), or more
    than 16 query heads per KV head, is not served by it."""
    try:
        inputs = store.attention_inputs()
    except ValueError:
        return None
    if set(inputs) != _FUSED_INPUTS or inputs["keys"] is None:
        return None
    kv_heads = inputs["keys"].shape[1]
    if query_heads % kv_heads or query_heads // kv_heads > _MAX_GROUP:
        return None
    return inputs


class TqaiLayer(DynamicLayer):
    """One full-attention layer's compressed K/V (transformers ``CacheLayerMixin`` protocol).

    Args:
        config: the :class:`tqai.kvstore.KVCacheConfig` for this layer.
        device: where the codes are kept (None: wherever the keys are).
        pipeline: optional compression pipeline (see :class:`tqai.kvstore.KVStore`).
        layer: the layer index the pipeline sees.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(
        self,
        config: KVCacheConfig,
        device: str | torch.device | None = None,
        pipeline: Any = None,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.store = KVStore(config, pipeline, layer)
        self.awaiting_attention = False
        self.storage_device = None if device is None else torch.device(device)
        self._encoder_checked = False  # CUDA stores get the fused encode at their first update

    def __repr__(self) -> str:
        c = self.config
        return f"TqaiLayer(K{c.bits_k}/V{c.bits_v}, {c.strategy}, tokens={self.get_seq_length()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage new ``(B, H, T, D)`` tokens; return what the attention function needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_attention:
            raise RuntimeError(
                "a tqai cache was updated twice without attention reading it: the model does not "
                "use the 'tqai' attention implementation. Create the cache with "
                "tqai_torch.patch(model, ...) (or tqai.patch) and pass the cache it returns."
            )
        here = key_states.device
        if self.storage_device is not None and self.storage_device != here:
            self.store.update(
                key_states.to(self.storage_device), value_states.to(self.storage_device)
            )
        else:
            self.store.update(key_states, value_states)
        if not self._encoder_checked:
            self._encoder_checked = True
            if (self.storage_device or here).type == "cuda":
                _encode_with_triton(self.store)
        if self.config.strategy == "full":
            keys, values = self.store.dequantize()
            self.store.commit()
            return keys.to(here), values.to(here)
        self.awaiting_attention = True
        key_states._tqai_layer = self
        return key_states, value_states

    def attend(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention of ``query (B, Hq, Tq, D)`` over the held tokens; commits the staged ones.

        ``softcap``: attention logit soft-capping (Gemma 2), applied before the mask.
        """
        self.awaiting_attention = False
        if self.storage_device is not None and self.storage_device != query.device:
            here = query.device
            mask = None if mask is None else mask.to(self.storage_device)
            out = self.store.attend(
                query.to(self.storage_device), scale=scale, mask=mask, softcap=softcap
            )
            return out.to(here)
        if softcap is None and self._prompt_only(mask):
            # A fresh prompt: exact attention over full-precision tokens is torch's own SDPA
            # (fast, O(T) memory where the device allows); the store then codes the tokens.
            self.store.observe(query, scale=scale)
            keys, values = self.store.pending
            out = torch.nn.functional.scaled_dot_product_attention(
                query,
                keys.to(query.dtype),
                values.to(query.dtype),
                attn_mask=mask,
                scale=scale,
                enable_gqa=query.shape[1] != keys.shape[1],
            )
            self.store.commit()
            return out
        if softcap is None and _use_fused_prefill(query, mask, self.store):
            inputs = _fused_inputs(self.store, query.shape[1])
            if inputs is not None:
                from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

                out = prefill_attention_triton(query, scale=scale, **inputs)
                self.store.commit()
                return out
        inputs = None
        if softcap is None:
            fused, valid_from = _use_fused_decode(query, mask, self.store)
            if fused:
                inputs = _fused_inputs(self.store, query.shape[1])
        if inputs is not None:
            from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

            out = decode_attention_triton(query, scale=scale, valid_from=valid_from, **inputs)
            self.store.commit()
            return out
        return self.store.attend(query, scale=scale, mask=mask, softcap=softcap)

    def _prompt_only(self, mask: torch.Tensor | None) -> bool:
        """Only staged tokens to read, and every query row attends to at least one of them."""
        if not self.store.holds_only_staged or self.store.quantize_staged:
            return False
        return mask is None or bool(mask.any(-1).all())

    def get_seq_length(self) -> int:
        return self.store.length - self.store.pending_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        # the store holds the (shared, never deep-copied) pipeline; None for a skipped layer
        self.store = KVStore(self.config, self.store.pipeline, self.layer)
        self.awaiting_attention = False
        self.is_initialized = False
        self._encoder_checked = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end: ``-n`` removes ``n`` (transformers >= 5.2x); a value >= 0 is
        the legacy "keep this many" of earlier 5.x releases."""
        if tokens_to_remove < 0:
            self.store.crop(max(0, self.get_seq_length() + tokens_to_remove))
        else:
            self.store.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.map_batch(lambda a: a.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.map_batch(lambda a: a[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.map_batch(lambda a: a.index_select(0, beam_idx.to(a.device)))

    def offload(self) -> None:
        self.store.map_batch(lambda a: a.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self.store.map_batch(lambda a: a.to(self.device, non_blocking=True))

    def nbytes(self) -> dict[str, int]:
        """Bytes really held by this layer, by part (sinks, codes, window, staged)."""
        return self.store.nbytes()


class TqaiCache(DynamicCache):
    """A transformers cache whose full-attention layers keep only TurboQuant codes.

    Build it with :func:`tqai_torch.patch` (which also selects the ``"tqai"`` attention), or
    directly from a model config. Sliding-window layers and ``skip_layers`` use transformers'
    own layers, uncompressed.

    Args:
        model_config: the model's ``PretrainedConfig``.
        config: the :class:`tqai.kvstore.KVCacheConfig` of the compressed layers.
        skip_layers: indices of full-attention layers kept uncompressed.
        device: where the compressed layers keep their codes (and compute attention), e.g.
            ``"cpu"`` to hold the cache off a GPU; None keeps them where the model's keys are.
        pipeline: optional compression pipeline shared by every compressed layer (built by
            :func:`tqai.kvstore.build_cache_pipeline`); a cache with one saves its tiers and
            the pipeline's config (:meth:`save`), when that was built from a config dict.
        layer_bits: per-layer ``(bits_k, bits_v)`` (a list for every layer or a dict of
            overrides, see :func:`tqai.layer_bits.layer_configs`); None: ``config``'s everywhere.
    """

    def __init__(
        self,
        model_config: Any,
        config: KVCacheConfig,
        skip_layers: tuple[int, ...] = (),
        device: str | torch.device | None = None,
        pipeline: Any = None,
        layer_bits: Any = None,
    ) -> None:
        super().__init__(config=model_config)
        self.uses_pipeline = pipeline is not None
        self.pipeline = pipeline
        self.tqai_config = config
        self.skip_layers = tuple(skip_layers)
        self.device = device
        self.model_signature = model_signature(model_config)
        self._model_config = weakref.ref(model_config)  # shared by copies, never deep-copied
        if not self.layers:
            raise ValueError(
                "the model config describes no attention layers (num_hidden_layers / layer_types)"
            )
        configs = layer_configs(config, layer_bits, len(self.layers))
        self.layer_bits = None if layer_bits is None else [(c.bits_k, c.bits_v) for c in configs]
        for idx, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer and idx not in self.skip_layers:
                self.layers[idx] = TqaiLayer(configs[idx], device, pipeline, idx)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model_config = self._model_config()
        attn = getattr(model_config, "_attn_implementation", "tqai")
        if (
            self.tqai_config.strategy != "full"
            and isinstance(self.layers[layer_idx], TqaiLayer)
            and attn != "tqai"
        ):
            raise RuntimeError(
                "this tqai cache needs the model to use the 'tqai' attention implementation, but "
                f"it uses {attn!r}: create caches with "
                "tqai_torch.patch(model, ...) (or tqai.patch) and don't unpatch while using them"
            )
        sig = self.model_signature
        if (
            key_states.shape[1] != sig["num_key_value_heads"]
            or key_states.shape[-1] != sig["head_dim"]
        ):
            raise ValueError(
                f"this tqai cache was made for a model with {sig['num_key_value_heads']} KV heads "
                f"of size {sig['head_dim']} ({sig['model_type']}), but got key states of shape "
                f"{tuple(key_states.shape)}: a cache cannot be reused across models"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kw)

    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, TqaiLayer)]

    def quantize_staged(self, enabled: bool = True) -> None:
        """Evaluation mode: compress each forward pass's tokens before attention reads them.

        A chunk of tokens then attends to its own earlier tokens through the codes, exactly as
        token-by-token decoding would read them (each token also sees its own key and value
        coded, which decoding does not: slightly pessimistic). Perplexity measured in chunks
        this way is not flattered by the chunk's tokens being in full precision.
        """
        for idx in self.compressed_layers:
            self.layers[idx].store.quantize_staged = enabled

    def nbytes(self) -> int:
        """Bytes really held by the whole cache (compressed and uncompressed layers)."""
        return sum(sum(part.values()) for part in self.layer_nbytes())

    def layer_nbytes(self) -> list[dict[str, int]]:
        """Per layer: ``{"sinks", "codes", "window", "staged"}`` (compressed layers) or
        ``{"full": bytes}`` (uncompressed layers)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, TqaiLayer):
                out.append(layer.nbytes())
            else:
                held = (getattr(layer, "keys", None), getattr(layer, "values", None))
                size = sum(t.numel() * t.element_size() for t in held if t is not None)
                out.append({"full": size})
        return out

    def copy(self) -> TqaiCache:
        """An independent copy (reuse a prompt cache for several continuations safely)."""
        # The pipeline is the patched model's, shared as the layers' stores share it.
        memo = {} if self.pipeline is None else {id(self.pipeline): self.pipeline}
        return copy.deepcopy(self, memo)

    def save(self, path: str | os.PathLike) -> None:
        """Save the cache (codes stay compressed) to ``path`` in tqai's cache-file format.

        A cache with a compression pipeline saves every width's codes, which width holds each
        token, and the pipeline's config (what :meth:`load` checks); not the pipeline's running
        state (scorer statistics, routing, monitor), which stays with the patched model.

        Raises:
            ValueError: the pipeline was given as objects rather than a config dict of plugin
                names, so the file could not say which pipeline wrote it.
        """
        meta = {
            "backend": "torch",
            "model": self.model_signature,
            "config": self.tqai_config.to_dict(),
            "skip_layers": list(self.skip_layers),
            "layer_bits": None if self.layer_bits is None else [list(p) for p in self.layer_bits],
            "pipeline": pipeline_config(self.pipeline),
            "layers": [],
        }
        arrays: dict[str, torch.Tensor] = {}
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, TqaiLayer):
                layer_meta, layer_arrays = layer.store.state()
                meta["layers"].append({"kind": "tqai", **layer_meta})
            else:
                seen = getattr(layer, "cumulative_length", None)
                layer_meta = {"kind": type(layer).__name__, "cumulative_length": seen}
                layer_arrays = {}
                if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                    layer_arrays = {"k": layer.keys, "v": layer.values}
                meta["layers"].append(layer_meta)
            arrays.update({f"layer{idx}.{name}": a for name, a in layer_arrays.items()})
        write_cache_file(path, meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, device: Any = None) -> TqaiCache:
        """Load a cache saved by :meth:`save` for ``model`` (already patched with the same
        settings). Refuses a file made for another model or another tqai config."""
        from tqai_torch.patching import new_cache

        meta, arrays = read_cache_file(path)
        cache = new_cache(model)
        if meta.get("model") != cache.model_signature:
            raise ValueError(
                f"{path} was saved for another model: {meta.get('model')}, "
                f"this model is {cache.model_signature}"
            )
        layer_bits = None if cache.layer_bits is None else [list(p) for p in cache.layer_bits]
        if (
            meta.get("config") != cache.tqai_config.to_dict()
            or meta.get("skip_layers") != list(cache.skip_layers)
            or meta.get("layer_bits") != layer_bits
        ):
            raise ValueError(
                f"{path} was saved with another tqai config: {meta.get('config')} "
                f"(skip_layers {meta.get('skip_layers')}); this cache uses "
                f"{cache.tqai_config.to_dict()} (skip_layers {list(cache.skip_layers)})"
            )
        check_pipeline(path, meta.get("pipeline"), cache.pipeline)
        device = device if device is not None else next(model.parameters()).device

        def tensor(name: str) -> torch.Tensor:
            host, dtype = arrays[name]
            return torch.from_numpy(host.copy()).to(device=device, dtype=getattr(torch, dtype))

        for idx, (layer, layer_meta) in enumerate(zip(cache.layers, meta["layers"], strict=True)):
            prefix = f"layer{idx}."
            names = [n for n in arrays if n.startswith(prefix)]
            layer_arrays = {n[len(prefix) :]: tensor(n) for n in names}
            if isinstance(layer, TqaiLayer):
                layer.store = KVStore.from_state(
                    layer.config, layer_meta, layer_arrays, cache.pipeline, idx
                )
                layer._encoder_checked = False
                if layer_meta["head_dim"] is not None:
                    layer.lazy_initialization(*(2 * [next(iter(layer_arrays.values()))]))
                    layer.dtype = getattr(torch, layer_meta["dtype"])
            elif layer_arrays:
                layer.update(layer_arrays["k"], layer_arrays["v"])
                if layer_meta.get("cumulative_length") is not None:
                    layer.cumulative_length = layer_meta["cumulative_length"]
        return cache


def model_signature(model_config: Any) -> dict:
    """What a saved cache must match: architecture, layer count, heads and head dim."""
    text = model_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    return {
        "model_type": getattr(text, "model_type", ""),
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
    }

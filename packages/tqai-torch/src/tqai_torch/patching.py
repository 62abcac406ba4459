"""``patch(model, ...)`` / ``unpatch(model)`` for transformers causal language models.

Why it is shaped like this: patching changes exactly one thing on the model, its attention
implementation (``config._attn_implementation``), which becomes ``"tqai"``; the previous one is
remembered and used by the tqai attention for every call that does not read a tqai layer. All
checks happen here, at patch time, so a bad setting fails before ``generate`` starts.
``unpatch`` restores the previous implementation, after which the model computes bit-identical
outputs to one that was never patched.
"""

from __future__ import annotations

from typing import Any

import torch

from tqai.kvstore import STRATEGIES, KVCacheConfig, build_cache_pipeline
from tqai.layer_bits import layer_configs
from tqai.named_configs import resolve_patch_options
from tqai_torch.activations import apply_activation_compression, remove_activation_compression
from tqai_torch.attention import _FALLBACK_ATTR, ATTN_IMPLEMENTATION, register
from tqai_torch.cache import TqaiCache
from tqai_torch.chunked_attention import CHUNK_ATTR

__all__ = ["new_cache", "patch", "unpatch"]

_CONFIG_ATTR = "_tqai_cache_config"
_SKIP_ATTR = "_tqai_skip_layers"
_DEVICE_ATTR = "_tqai_cache_device"
_PIPELINE_ATTR = "_tqai_pipeline"
_LAYER_BITS_ATTR = "_tqai_layer_bits"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return config.get_text_config(decoder=True)


def _check_model(model: Any) -> Any:
    text = _text_config(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "encoder-decoder models are not supported: tqai compresses decoder self-attention "
            f"caches of causal LMs ({type(model).__name__})"
        )
    if not getattr(text, "num_hidden_layers", 0) or not getattr(text, "num_attention_heads", 0):
        raise ValueError(f"{type(model).__name__} has no attention layers to compress")
    if not getattr(model, "_supports_attention_backend", True) and not hasattr(
        model, "set_attn_implementation"
    ):
        raise ValueError(f"{type(model).__name__} does not use transformers' AttentionInterface")
    dtype = next(model.parameters()).dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"model dtype must be float32, float16 or bfloat16, got {dtype}")
    return text


def patch(
    model: Any,
    bits_k: float | None = None,
    bits_v: float | None = None,
    *,
    config: str | None = None,
    hidden_bits: int | None = None,
    ffn_bits: int | None = None,
    chunk_attention: bool = False,
    sink_tokens: int = 4,
    residual_window: int = 32,
    cache_strategy: str = "compressed",
    use_qjl: bool = False,
    rotation: str = "haar",
    seed: int = 0,
    norm_dtype: str = "float16",
    chunk_size: int = 1024,
    skip_layers: tuple[int, ...] | list[int] = (),
    device: str | torch.device | None = None,
    pipeline: Any = None,
    center_keys: bool = False,
    center_values: bool = False,
    balance_keys: bool = False,
    layer_bits: Any = None,
    from_pretrained: str | None = None,
) -> TqaiCache:
    """Make ``model`` read tqai caches and return a fresh one to pass to ``generate``.

    Args:
        model: a transformers causal LM (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, ...).
        bits_k, bits_v: bits per coordinate for keys and values (1..8; default K4/V2); a
            fraction such as 3.5 codes each head's highest-energy channels one bit higher.
        config: a named config (``"kv-only"``, ``"kv+hidden8"``, ``"kv+hidden6"``,
            ``"kv+ffn8"``, ``"all8"``, ``"all6"``, ``"aggressive"``; see
            :mod:`tqai.named_configs`): sets the KV bits and the activation compression.
        hidden_bits: compress every decoder layer's output hidden state at this many bits
            (:mod:`tqai_torch.activations`); None leaves it alone.
        ffn_bits: compress the FFN activations (the down projection's input) likewise
            (activation quantizers use ``rotation`` and ``seed`` too).
        chunk_attention: also compute the attention calls that do not read compressed codes
            (sliding-window and skipped layers, no-cache forwards) tile by tile with an online
            softmax in blocks of ``chunk_size`` (:mod:`tqai_torch.chunked_attention`): exact,
            memory O(chunk^2) instead of O(T^2); slower than a fused SDPA kernel.
        sink_tokens: leading tokens kept in full precision.
        residual_window: most recent tokens kept in full precision (default 32: on real
            SmolLM2-135M at 4096 tokens it takes K4/V2 from +13.6% to +2.1% perplexity for 0.1
            bit per coordinate; see the README's fidelity table); 0 codes every token.
        cache_strategy: ``"compressed"`` (attention from the codes), ``"residual"`` (with a
            KIVI-style full-precision recent window) or ``"full"`` (dequantize every step; the
            reference).
        use_qjl: keys with TurboQuant_prod (1 of ``bits_k`` bits is the QJL sign).
        rotation: ``"haar"``, ``"hadamard"`` or ``"rotor"``.
        seed, norm_dtype, chunk_size: see :class:`tqai.kvstore.KVCacheConfig`.
        skip_layers: layer indices kept uncompressed (e.g. the first and last layers).
        device: where compressed layers keep their codes and compute attention (e.g. ``"cpu"``
            for a model on a GPU); default: wherever the model's keys are.
        pipeline: ``None`` (the plain path, untouched) or a compression pipeline config dict
            (``{"monitor": "stability", "skip_layers": [0], ...}``, see :mod:`tqai.pipeline`)
            or a built ``CompressionPipeline``: built and validated once here
            (:func:`tqai.kvstore.build_cache_pipeline`), shared by every compressed layer.
            Strategies: ``tiered`` (built with ``rank="token"``: each token at one score-routed
            width) or none; the diffusion-step strategies (``delta``, ``delta2``, ``window``,
            ``cfg_sharing``) are refused (they belong to tqai-diffusers).
        center_keys, center_values: code keys/values minus their per-head mean over the prompt
            (exact; see :mod:`tqai.kvlayout`).
        balance_keys: move per-channel scales from keys to queries, fitted to the prompt.
        layer_bits: per-layer ``(bits_k, bits_v)``: a list with one pair per layer (e.g.
            :func:`tqai.layer_bits.fisher_layer_bits` of a ``tqai calibrate`` file) or a dict
            ``{layer: (bits_k, bits_v)}`` of overrides; other layers use ``bits_k``/``bits_v``.
        from_pretrained: a folder written by ``tqai convert`` (:mod:`tqai_torch.convert`): its
            options (per-layer widths and pipeline included) and prebuilt rotations/codebooks
            are used (no solving at start, no calibration read); no other option may be given
            with it.

    Returns:
        A :class:`TqaiCache`; pass it as ``cache=`` (``past_key_values=`` on transformers
        < 5.2x) to ``model.generate`` or a forward call. One cache per generation: use
        :func:`new_cache` (or ``cache.copy()`` of a filled prompt cache) for the next one.

    Example:
        >>> cache = patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
        >>> out = model.generate(**inputs, cache=cache, max_new_tokens=50)  # doctest: +SKIP
    """
    if from_pretrained is not None:
        from tqai.pretrained import explicit_options
        from tqai_torch.convert import patch_from_pretrained

        given = explicit_options(patch, locals())
        return patch_from_pretrained(model, from_pretrained, given=given)
    text = _check_model(model)
    bits_k, bits_v, activations = resolve_patch_options(
        config,
        bits_k=bits_k,
        bits_v=bits_v,
        hidden_bits=hidden_bits,
        ffn_bits=ffn_bits,
        rotation=rotation,
        seed=seed,
    )
    if cache_strategy not in STRATEGIES:
        raise ValueError(f"cache_strategy must be one of {STRATEGIES}, got {cache_strategy!r}")
    config = KVCacheConfig(  # the named config, if any, is resolved above
        bits_k=bits_k,
        bits_v=bits_v,
        sink_tokens=sink_tokens,
        residual_window=residual_window,
        strategy=cache_strategy,
        use_qjl=use_qjl,
        rotation=rotation,
        seed=seed,
        norm_dtype=norm_dtype,
        chunk_size=chunk_size,
        center_keys=center_keys,
        center_values=center_values,
        balance_keys=balance_keys,
    )
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if pipeline is not None and layer_bits is not None:
        raise ValueError("layer_bits cannot be combined with pipeline= (it sets its own widths)")
    for layer_config in {*layer_configs(config, layer_bits, text.num_hidden_layers)}:
        layer_config.part_quantizers(head_dim)  # fails now, not in generate
    pipe = build_cache_pipeline(
        pipeline, config, num_layers=text.num_hidden_layers, head_dims=(head_dim,)
    )
    skip = tuple(int(i) for i in skip_layers)
    bad = [i for i in skip if not 0 <= i < text.num_hidden_layers]
    if bad:
        raise ValueError(
            f"skip_layers must be layer indices in 0..{text.num_hidden_layers - 1}, got {bad}"
        )
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as ex:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda:0': {ex}"
            ) from None
    probe = TqaiCache(model.config, config, skip, layer_bits=layer_bits)
    if not probe.compressed_layers:
        kinds = sorted({type(layer).__name__ for layer in probe.layers})
        raise ValueError(
            f"{type(model).__name__} has no full-attention layer left to compress (its cache "
            f"layers are {kinds}, skip_layers={list(skip)}): tqai keeps sliding-window layers "
            "uncompressed, so patching would save nothing"
        )
    if not isinstance(chunk_attention, bool):
        raise ValueError(f"chunk_attention must be True or False, got {chunk_attention!r}")
    if activations is not None:
        apply_activation_compression(model, activations)  # checks the model before any hook
    else:
        remove_activation_compression(model)
    register()
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        setattr(model.config, _FALLBACK_ATTR, current or "sdpa")
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if chunk_attention:
        setattr(model.config, CHUNK_ATTR, chunk_size)
    elif hasattr(model.config, CHUNK_ATTR):
        delattr(model.config, CHUNK_ATTR)
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _SKIP_ATTR, skip)
    setattr(model, _DEVICE_ATTR, device)
    setattr(model, _PIPELINE_ATTR, pipe)
    setattr(model, _LAYER_BITS_ATTR, probe.layer_bits)
    return new_cache(model)


def new_cache(model: Any) -> TqaiCache:
    """A fresh, empty cache for a model already patched with :func:`patch`."""
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("the model is not patched: call tqai_torch.patch(model, ...) first")
    return TqaiCache(
        model.config,
        config,
        getattr(model, _SKIP_ATTR, ()),
        getattr(model, _DEVICE_ATTR, None),
        pipeline=getattr(model, _PIPELINE_ATTR, None),
        layer_bits=getattr(model, _LAYER_BITS_ATTR, None),
    )


def unpatch(model: Any) -> None:
    """Restore the model's own attention implementation (a no-op for an unpatched model)."""
    remove_activation_compression(model)
    if hasattr(getattr(model, "config", None), CHUNK_ATTR):
        delattr(model.config, CHUNK_ATTR)
    if getattr(model, _CONFIG_ATTR, None) is None:
        return
    fallback = getattr(model.config, _FALLBACK_ATTR, "sdpa")
    model.set_attn_implementation(fallback)
    delattr(model.config, _FALLBACK_ATTR)
    delattr(model, _CONFIG_ATTR)
    delattr(model, _SKIP_ATTR)
    delattr(model, _DEVICE_ATTR)
    for attr in (_PIPELINE_ATTR, _LAYER_BITS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)

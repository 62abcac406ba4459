"""``apply_tqai`` / ``remove_tqai``: tqai's hooks on a diffusers pipeline or transformer.

Why it is shaped like this: diffusers' own methods are applied as ``apply_<method>(module,
config)`` and registered in the module's ``HookRegistry``, which pipelines reset at the end of
every call. tqai does the same, with one :class:`~tqai_diffusers.TqaiConfig` for all its hooks
and everything checked before the first hook is registered (a bad config changes nothing).
``remove_tqai`` removes exactly what ``apply_tqai`` added: the hooks, and the registries and
``forward`` attributes that only the hooks had created, so the modules hold the same attributes
as before and compute bit-identical outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry

from tqai.pipeline import PipelineConfigError, build_pipeline
from tqai.pipeline.strategies.window import WindowStrategy
from tqai.registry import registry
from tqai_diffusers._blocks import attention_layers, default_adapter, transformers_of
from tqai_diffusers.config import TqaiConfig
from tqai_diffusers.hooks import HOOK_NAMES
from tqai_diffusers.hooks._state import ContextStates, TqaiStats
from tqai_diffusers.hooks.attention_reuse import _apply_attention_reuse_hook
from tqai_diffusers.hooks.kv_compression import _apply_kv_compression_hook

__all__ = ["apply_tqai", "get_stats", "remove_tqai"]

_APPLIED_ATTR = "_tqai_applied"


def _window_options(config: TqaiConfig) -> tuple[float, int | None]:
    """``(threshold, max_reuse)`` of the window strategy, validated by the core class."""
    try:
        window = WindowStrategy(**config.strategy_kwargs)
    except (TypeError, ValueError) as ex:
        raise ValueError(
            f"TqaiConfig.strategy_kwargs = {dict(config.strategy_kwargs)!r} does not fit "
            f"strategy 'window' (allowed keys: threshold, max_reuse): {ex}"
        ) from ex
    return window.threshold, window.max_reuse


def _plan(transformer: torch.nn.Module, config: TqaiConfig) -> dict[str, Any]:
    """Check everything for one transformer and say what to hook; registers nothing."""
    if getattr(transformer, _APPLIED_ATTR, None) is not None:
        raise ValueError(
            f"tqai is already applied to this {type(transformer).__name__}; call remove_tqai first"
        )
    adapter_name = config.adapter or default_adapter(transformer)
    adapter = registry("tqai.adapters").get(adapter_name)()
    layers = attention_layers(transformer, adapter_name)
    indices = {layer.index for layer in layers}
    bad = sorted(i for i in config.skip_layers if i not in indices)
    if bad:
        raise ValueError(
            f"TqaiConfig.skip_layers must be self-attention layer indices in "
            f"0..{max(indices)} of this {type(transformer).__name__}, got {bad}"
        )
    pipeline_config = config.pipeline_config(adapter_name, adapter.cfg_layout)
    shared = False
    if pipeline_config is not None:
        try:
            probe = build_pipeline(pipeline_config)
        except PipelineConfigError as ex:
            raise ValueError(f"TqaiConfig: {ex}") from ex
        for d in {layer.head_dim for layer in layers}:
            for bits in set(probe.bits.values()):
                probe.quantizers.get(d, bits)  # a head dim the quantizer cannot serve fails now
        shared = getattr(probe.strategy, "mode", None) == "split"
    window = _window_options(config) if config.strategy == "window" else None
    hooked = [layer for layer in layers if layer.index not in set(config.skip_layers)]
    return {
        "layers": hooked,
        "states": ContextStates(pipeline_config, shared=shared),
        "window": window,
    }


def _snapshot(modules: list[torch.nn.Module]) -> dict[int, tuple[bool, bool]]:
    """Per module: whether it already had a hook registry and an instance ``forward``."""
    return {id(m): ("_diffusers_hook" in vars(m), "forward" in vars(m)) for m in modules}


def apply_tqai(pipe_or_transformer: Any, config: TqaiConfig | None = None) -> None:
    """Compress K/V (and optionally reuse attention outputs) in a diffusers video transformer.

    Hooks every self-attention layer of the pipeline's transformer(s) (``transformer`` and, for
    Wan 2.2, ``transformer_2``) or of the transformer given: the keys and values pass through
    the core's TurboQuant pipeline with the configured strategy (delta, delta2 step sharing;
    cfg_sharing, split for WAN and batched for LTX; tiered; monitors), and with
    ``strategy="window"`` a layer whose input is still similar to its last computed step reuses
    that step's output (DiTFastAttn, arXiv:2406.08552). Hook state is per diffusers cache
    context and is reset by the pipeline at the end of each call, like diffusers' own caches.

    Args:
        pipe_or_transformer: a diffusers pipeline (``WanPipeline``, ``LTXPipeline``, ...) or a
            transformer (``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``, any
            diffusers transformer with standard attention modules).
        config: a :class:`~tqai_diffusers.TqaiConfig` (default: plain K4/V2 quantization).

    Raises:
        ValueError: a bad config (the message names the field and what is allowed), no
            self-attention layer the adapter recognises, fused QKV projections, or tqai applied
            already. Nothing is changed when it raises.
        TypeError: not a pipeline or transformer.

    Example:
        >>> from tqai_diffusers import TqaiConfig, apply_tqai, get_stats, remove_tqai
        >>> apply_tqai(pipe, TqaiConfig(bits_k=4, bits_v=4, strategy="delta"))  # doctest: +SKIP
        >>> video = pipe(prompt_embeds=embeds, num_inference_steps=15).frames  # doctest: +SKIP
        >>> get_stats(pipe).bits_per_coord  # doctest: +SKIP
        >>> remove_tqai(pipe)  # doctest: +SKIP
    """
    config = TqaiConfig() if config is None else config
    if not isinstance(config, TqaiConfig):
        raise TypeError(f"config must be a TqaiConfig, got {type(config).__name__}")
    transformers = transformers_of(pipe_or_transformer)
    plans = [(t, _plan(t, config)) for t in transformers]  # every check before any change
    for transformer, plan in plans:
        layers = plan["layers"]
        touched = [transformer]
        for layer in layers:
            touched += [layer.module, layer.key_module, layer.value_module]
        before = _snapshot(touched)
        stats = TqaiStats()
        states = plan["states"]
        for layer in layers:
            if states.pipeline_config is not None:
                for stream, module in (("k", layer.key_module), ("v", layer.value_module)):
                    _apply_kv_compression_hook(
                        module, states, stats, layer=layer.index, stream=stream,
                        head_dim=layer.head_dim,
                    )  # fmt: skip
            if plan["window"] is not None:
                threshold, max_reuse = plan["window"]
                _apply_attention_reuse_hook(
                    layer.module, states, stats, layer=layer.index, threshold=threshold,
                    max_reuse=max_reuse,
                )  # fmt: skip
        # New hooks stale the child-registry list diffusers caches for cache_context.
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        setattr(
            transformer,
            _APPLIED_ATTR,
            {"config": config, "stats": stats, "touched": touched, "before": before},
        )


def remove_tqai(pipe_or_transformer: Any) -> None:
    """Remove every tqai hook and restore the modules exactly (a no-op where none is applied)."""
    for transformer in transformers_of(pipe_or_transformer):
        applied = getattr(transformer, _APPLIED_ATTR, None)
        if applied is None:
            continue
        for module in applied["touched"]:
            hooks = getattr(module, "_diffusers_hook", None)
            if hooks is None:
                continue
            for name in HOOK_NAMES:
                hooks.remove_hook(name, recurse=False)
        for module in applied["touched"]:
            had_registry, had_forward = applied["before"][id(module)]
            hooks = getattr(module, "_diffusers_hook", None)
            if hooks is not None and not hooks.hooks and not had_registry:
                del module._diffusers_hook
                if not had_forward and "forward" in vars(module):
                    del module.forward
        if hasattr(transformer, "_diffusers_hook"):
            transformer._diffusers_hook.invalidate_child_registries_cache()
        delattr(transformer, _APPLIED_ATTR)


def get_stats(pipe_or_transformer: Any) -> TqaiStats:
    """The live :class:`~tqai_diffusers.hooks.TqaiStats` of a hooked transformer.

    For a pipeline, the stats of its first hooked transformer (``transformer``); pass
    ``pipe.transformer_2`` for Wan 2.2's second expert.

    Raises:
        ValueError: tqai is not applied.
    """
    for transformer in transformers_of(pipe_or_transformer):
        applied = getattr(transformer, _APPLIED_ATTR, None)
        if applied is not None:
            return applied["stats"]
    raise ValueError("tqai is not applied: call apply_tqai(pipe_or_transformer, config) first")

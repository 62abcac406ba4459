"""Activation compression hooks for transformers models (hidden states and FFN activations).

Why it is shaped like this: activations are compressed where the model makes them, with plain
torch hooks that leave the module tree and the weights untouched (the math is
:class:`tqai.activations.ActivationCompressor`):

- a forward hook on every decoder layer replaces its output hidden state (the tensor, or the
  first element of a tuple) with its TurboQuant reconstruction;
- a forward pre-hook on every FFN's down projection (``layer.mlp.down_proj``, the name shared by
  Llama, Qwen2/3, Mistral, Gemma 2/3 and Phi-3) replaces its input, the FFN activations.

The hook handles are kept on the model; :func:`remove_activation_compression` removes exactly
those, after which the model computes what it computed before.

Example:
    >>> from tqai.activations import ActivationConfig
    >>> apply_activation_compression(model, ActivationConfig(hidden_bits=8))  # doctest: +SKIP
    >>> remove_activation_compression(model)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from tqai.activations import ActivationCompressor, ActivationConfig

__all__ = [
    "activation_config",
    "apply_activation_compression",
    "decoder_layers",
    "ffn_down_projection",
    "remove_activation_compression",
]

_TQAI_ACTIVATION_HOOK = "_tqai_activation_hooks"
_TQAI_ACTIVATION_CONFIG = "_tqai_activation_config"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers`` or equivalent)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(
            f"{type(model).__name__} has no decoder `layers` ModuleList: activation "
            "compression needs a transformers decoder-only model"
        )
    return list(layers)


def ffn_down_projection(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    """The FFN down projection of decoder layer ``index`` (its input is the FFN activation)."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, torch.nn.Module):
        raise ValueError(
            f"decoder layer {index} ({type(layer).__name__}) has no `mlp.down_proj`: ffn_bits "
            "needs a gated or plain FFN with a down projection; leave ffn_bits=None"
        )
    return down


def _hidden_hook(compress: ActivationCompressor):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return compress(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (compress(output[0]), *output[1:])
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; expected a hidden-state "
            "tensor or a tuple starting with one"
        )

    return hook


def _ffn_pre_hook(compress: ActivationCompressor):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (compress(args[0]), *args[1:])

    return hook


def apply_activation_compression(model: torch.nn.Module, config: ActivationConfig) -> None:
    """Compress ``model``'s hidden states and/or FFN activations as ``config`` says.

    Replaces any activation compression already applied. Everything is checked before the first
    hook is added, so a model that cannot be served is left untouched.

    Args:
        model: a transformers causal LM.
        config: which streams at how many bits (a config with no stream removes the hooks).

    Raises:
        ValueError: the model has no decoder layers, or (with ``ffn_bits``) a layer has no
            ``mlp.down_proj``.
    """
    if not isinstance(config, ActivationConfig):
        raise TypeError(f"config must be a tqai.activations.ActivationConfig, got {config!r}")
    layers = decoder_layers(model)
    downs = (
        [ffn_down_projection(layer, i) for i, layer in enumerate(layers)]
        if config.ffn_bits is not None
        else []
    )
    remove_activation_compression(model)
    if not config.enabled:
        return
    handles = []
    hidden = config.compressor("hidden")
    if hidden is not None:
        handles += [layer.register_forward_hook(_hidden_hook(hidden)) for layer in layers]
    ffn = config.compressor("ffn")
    if ffn is not None:
        handles += [down.register_forward_pre_hook(_ffn_pre_hook(ffn)) for down in downs]
    setattr(model, _TQAI_ACTIVATION_HOOK, handles)
    setattr(model, _TQAI_ACTIVATION_CONFIG, config)


def remove_activation_compression(model: torch.nn.Module) -> None:
    """Remove the hooks :func:`apply_activation_compression` added (a no-op if there are none)."""
    for handle in getattr(model, _TQAI_ACTIVATION_HOOK, ()):
        handle.remove()
    for name in (_TQAI_ACTIVATION_HOOK, _TQAI_ACTIVATION_CONFIG):
        if name in vars(model):
            delattr(model, name)


def activation_config(model: torch.nn.Module) -> ActivationConfig | None:
    """The activation compression applied to ``model``, or None."""
    return getattr(model, _TQAI_ACTIVATION_CONFIG, None)

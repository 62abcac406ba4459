"""Activation compression for mlx-lm models (hidden states and FFN activations).

Why it is shaped like this: MLX modules have no forward hooks, and Python looks special methods
such as ``__call__`` up on the type, so an instance attribute cannot wrap a layer's call. Editing
the class would change every model of that family, and wrapping the layer in another module would
change the parameter tree (weight names). So each affected module gets a one-off subclass of its
own class whose ``__call__`` compresses, assigned to that instance's ``__class__``: the
parameters, their names and every other instance stay exactly as they were, and
:func:`remove_activation_compression` puts the original class back. The subclass keeps the
original ``__module__`` (tqai-mlx finds attention modules by the module their class lives in).

Compressed (the math is :class:`tqai.activations.ActivationCompressor`, on ``mlx.core`` arrays):

- ``hidden``: every decoder layer's (``model.layers[i]``) output hidden state;
- ``ffn``: the input of every FFN down projection (``layer.mlp.down_proj``).

Example:
    >>> from tqai.activations import ActivationConfig
    >>> apply_activation_compression(model, ActivationConfig(hidden_bits=8))  # doctest: +SKIP
    >>> remove_activation_compression(model)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from tqai.activations import ActivationCompressor, ActivationConfig
from tqai_mlx import _model

__all__ = [
    "activation_config",
    "apply_activation_compression",
    "check_activation_compression",
    "remove_activation_compression",
]

_ORIGINAL = "_tqai_original_class"
_applied: dict[int, tuple[ActivationConfig, list[nn.Module], weakref.finalize]] = {}
_lock = threading.RLock()


def _down_projection(layer: nn.Module, index: int) -> nn.Module:
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Module):
        raise ValueError(
            f"decoder layer {index} ({type(layer).__name__}) has no `mlp.down_proj`: ffn_bits "
            "needs an FFN with a down projection; leave ffn_bits=None"
        )
    return down


def _compress_output(compress: ActivationCompressor, output: Any, owner: nn.Module) -> Any:
    if isinstance(output, mx.array):
        return compress(output)
    if isinstance(output, tuple) and output and isinstance(output[0], mx.array):
        return (compress(output[0]), *output[1:])
    raise TypeError(
        f"{type(owner).__name__} returned {type(output).__name__}; expected a hidden-state array "
        "or a tuple starting with one"
    )


def _swap(module: nn.Module, compress: ActivationCompressor, *, on_input: bool) -> None:
    cls = type(module)

    if on_input:

        def __call__(self, x, *args, **kwargs):
            return cls.__call__(self, compress(x), *args, **kwargs)

    else:

        def __call__(self, *args, **kwargs):
            return _compress_output(compress, cls.__call__(self, *args, **kwargs), self)

    namespace = {"__call__": __call__, "__module__": cls.__module__, _ORIGINAL: cls}
    module.__class__ = type(f"Tqai{cls.__name__}", (cls,), namespace)


def _restore(module: nn.Module) -> None:
    original = type(module).__dict__.get(_ORIGINAL)
    if original is not None:
        module.__class__ = original


def check_activation_compression(
    model: nn.Module, config: ActivationConfig
) -> tuple[list[nn.Module], list[nn.Module]]:
    """The decoder layers and FFN down projections ``config`` needs; raises if there are none."""
    if not isinstance(config, ActivationConfig):
        raise TypeError(f"config must be a tqai.activations.ActivationConfig, got {config!r}")
    layers = _model.model_layers(model)
    downs = (
        [_down_projection(layer, i) for i, layer in enumerate(layers)]
        if config.ffn_bits is not None
        else []
    )
    return layers, downs


def apply_activation_compression(model: nn.Module, config: ActivationConfig) -> None:
    """Compress an mlx-lm model's hidden states and/or FFN activations as ``config`` says.

    Replaces any activation compression already applied; everything is checked first, so a model
    that cannot be served is left untouched.

    Raises:
        TypeError: ``config`` is not an ``ActivationConfig`` or ``model`` not an mlx module.
        ValueError: the model has no ``layers``, or (``ffn_bits``) a layer has no
            ``mlp.down_proj``.
    """
    layers, downs = check_activation_compression(model, config)
    with _lock:
        remove_activation_compression(model)
        if not config.enabled:
            return
        swapped = []
        hidden = config.compressor("hidden")
        if hidden is not None:
            for layer in layers:
                _swap(layer, hidden, on_input=False)
                swapped.append(layer)
        ffn = config.compressor("ffn")
        if ffn is not None:
            for down in downs:
                _swap(down, ffn, on_input=True)
                swapped.append(down)
        key = id(model)
        _applied[key] = (config, swapped, weakref.finalize(model, _applied.pop, key, None))


def remove_activation_compression(model: nn.Module) -> None:
    """Give every module :func:`apply_activation_compression` changed its own class back."""
    with _lock:
        entry = _applied.pop(id(model), None)
        if entry is None:
            return
        _, swapped, finalizer = entry
        finalizer.detach()
        for module in swapped:
            _restore(module)


def activation_config(model: nn.Module) -> ActivationConfig | None:
    """The activation compression applied to ``model``, or None."""
    entry = _applied.get(id(model))
    return None if entry is None else entry[0]

"""``tqai convert`` for transformers models, and ``patch(model, from_pretrained=DIR)``.

Why it is shaped like this: the options ``patch`` takes are validated and turned into
quantizers by ``patch`` itself, so converting runs ``patch`` once on the model (then ``unpatch``),
reads back what it set up (the cache config, the compressed layers, the activation config) and
writes every quantizer's rotation and codebook with :func:`tqai.pretrained.save_pretrained`.
``patch(model, from_pretrained=DIR)`` checks the folder and the model's fingerprint, records the
constants (:mod:`tqai.prebuilt`) and calls ``patch(model, **options)``: nothing is solved, and the
outputs are bit-identical to patching with the same options.

Example:
    >>> from tqai_torch.convert import convert
    >>> convert(model, "out/", config="all8")  # doctest: +SKIP
    >>> cache = tqai_torch.patch(model, from_pretrained="out/")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tqai.pretrained import check_fingerprint, load_pretrained, save_pretrained

__all__ = ["convert", "model_fingerprint", "patch_from_pretrained"]

_FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "layer_types",
)


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The model fields a converted folder depends on (shapes and layer types)."""
    from tqai_torch.patching import _text_config

    text = _text_config(model)
    out = {}
    for name in _FINGERPRINT_FIELDS:
        value = getattr(text, name, None)
        if name == "head_dim" and value is None and getattr(text, "num_attention_heads", 0):
            value = text.hidden_size // text.num_attention_heads
        out[name] = list(value) if isinstance(value, list | tuple) else value
    return out


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in options.items():
        if name == "pipeline" and value is not None:
            raise ValueError(
                "convert does not store pipeline= options yet (pipelines and their calibration "
                "files are not part of the converted folder); convert without pipeline="
            )
        if isinstance(value, torch.device):
            value = str(value)
        if isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def convert(model: Any, output: str | Path, **options: Any) -> Path:
    """Write ``model``'s tqai configuration for ``options`` into the folder ``output``.

    Args:
        model: a transformers causal LM.
        output: the folder to write (created if needed).
        **options: :func:`tqai_torch.patch` options (``config="all8"``, ``bits_k=3``, ...).

    Returns:
        The path of the written ``tqai_config.json``.

    Raises:
        ValueError / TypeError: whatever ``patch`` refuses, and ``pipeline=``.
    """
    from tqai_torch.activations import activation_config, decoder_layers, ffn_down_projection
    from tqai_torch.patching import _CONFIG_ATTR, patch, unpatch

    options = _jsonable(options)
    cache = patch(model, **options)
    try:
        config = getattr(model, _CONFIG_ATTR)
        fingerprint = model_fingerprint(model)
        head_dim = fingerprint["head_dim"]
        quantizers = [q for qs in config.part_quantizers(head_dim) for q in qs]
        activations = activation_config(model)
        if activations is not None:
            hidden = activations.compressor("hidden")
            if hidden is not None:
                quantizers.append(hidden.quantizer(fingerprint["hidden_size"]))
            ffn = activations.compressor("ffn")
            if ffn is not None:
                down = ffn_down_projection(decoder_layers(model)[0], 0)
                quantizers.append(ffn.quantizer(int(down.in_features)))
        compressed = set(cache.compressed_layers)
        layers = [
            {
                "index": i,
                "compressed": i in compressed,
                "cache_layer": type(layer).__name__,
                "head_dim": head_dim,
                "bits_k": config.bits_k if i in compressed else None,
                "bits_v": config.bits_v if i in compressed else None,
            }
            for i, layer in enumerate(cache.layers)
        ]
    finally:
        unpatch(model)
    return save_pretrained(
        output,
        backend="torch",
        options=options,
        model=fingerprint,
        layers=layers,
        quantizers=quantizers,
    )


def patch_from_pretrained(model: Any, directory: str | Path, *, given: list[str]) -> Any:
    """``patch(model, **options of the folder)`` with its constants prebuilt (no solving).

    Raises:
        ValueError: other options were given too (``given``), or the folder is unusable
            (:class:`tqai.pretrained.PretrainedError`: missing, corrupted, another model).
    """
    from tqai_torch.patching import patch

    if given:
        raise ValueError(
            f"from_pretrained= takes every option from the folder; got also {', '.join(given)} "
            "(convert again with those options instead)"
        )
    pre = load_pretrained(directory, backend="torch")
    check_fingerprint(pre.model, model_fingerprint(model), pre.path / "tqai_config.json")
    return patch(model, **pre.options)

"""``tqai convert`` for transformers models, and ``patch(model, from_pretrained=DIR)``.

Why it is shaped like this: the options ``patch`` takes are validated and turned into
quantizers by ``patch`` itself, so converting runs ``patch`` once on the model (then ``unpatch``),
reads back what it set up (the cache config, the per-layer widths, the compressed layers, the
pipeline, the activation config) and writes every quantizer's rotation and codebook with
:func:`tqai.pretrained.save_pretrained`. A Fisher calibration (``calibration=``, or the file of a
``fisher_static`` pipeline scorer) is checked against the model's layers and K/V heads and stored
with the folder; ``fisher_layer_bits=True`` turns it into stored per-layer widths.
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

from tqai.pretrained import (
    check_fingerprint,
    load_pretrained,
    pipeline_quantizers,
    save_pretrained,
)

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
        if isinstance(value, torch.device):
            value = str(value)
        if isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def convert(
    model: Any,
    output: str | Path,
    *,
    calibration: Any = None,
    fisher_layer_bits: bool = False,
    **options: Any,
) -> Path:
    """Write ``model``'s tqai configuration for ``options`` into the folder ``output``.

    Args:
        model: a transformers causal LM.
        output: the folder to write (created if needed).
        calibration: a ``tqai calibrate`` Fisher file (path) or a ``FisherCalibration``, measured
            on this model (``(num_hidden_layers, num_key_value_heads)``): stored in the folder.
        fisher_layer_bits: derive ``layer_bits`` from ``calibration`` with
            :func:`tqai.layer_bits.fisher_layer_bits`, the budgets being the mean widths
            ``bits_k`` / ``bits_v`` (or the named config's): at most the uniform setting's mean
            bits, moved to the layers whose keys / values the loss is most sensitive to.
        **options: :func:`tqai_torch.patch` options (``config="all8"``, ``bits_k=3``,
            ``layer_bits=...``, ``pipeline={...}`` as a plain JSON dict, ...).

    Returns:
        The path of the written ``tqai_config.json``.

    Raises:
        ValueError / TypeError: whatever ``patch`` refuses; a calibration of another shape than
            the model; ``fisher_layer_bits`` without ``calibration`` or with ``layer_bits``; a
            pipeline that is not plain JSON.
    """
    from tqai.layer_bits import layer_configs
    from tqai.pretrained import (
        check_calibration,
        fisher_options,
        load_calibration,
        pipeline_to_folder,
    )
    from tqai_torch.patching import _CONFIG_ATTR, _LAYER_BITS_ATTR, _PIPELINE_ATTR, patch, unpatch

    options = _jsonable(options)
    fingerprint = model_fingerprint(model)
    cal = None if calibration is None else load_calibration(calibration)
    stored_pipeline, cal = pipeline_to_folder(options.get("pipeline"), cal)
    if cal is not None:
        check_calibration(
            cal,
            num_layers=fingerprint["num_hidden_layers"],
            num_kv_heads=fingerprint["num_key_value_heads"] or fingerprint["num_attention_heads"],
        )
    derived = None
    if fisher_layer_bits:
        options["layer_bits"], derived = fisher_options(options, cal)
    cache = patch(model, **options)
    try:
        config = getattr(model, _CONFIG_ATTR)
        head_dim = fingerprint["head_dim"]
        per_layer = getattr(model, _LAYER_BITS_ATTR)
        configs = layer_configs(config, per_layer, len(cache.layers))
        quantizers = [
            q for c in dict.fromkeys(configs) for qs in c.part_quantizers(head_dim) for q in qs
        ]
        quantizers += pipeline_quantizers(getattr(model, _PIPELINE_ATTR), (head_dim,))
        quantizers += _activation_quantizers(model, fingerprint)
        compressed = set(cache.compressed_layers)
        layers = [
            {
                "index": i,
                "compressed": i in compressed,
                "cache_layer": type(layer).__name__,
                "head_dim": head_dim,
                "bits_k": c.bits_k if i in compressed else None,
                "bits_v": c.bits_v if i in compressed else None,
            }
            for i, (layer, c) in enumerate(zip(cache.layers, configs, strict=True))
        ]
    finally:
        unpatch(model)
    if per_layer is not None:  # one pair per layer: a dict's int keys would not survive JSON
        options["layer_bits"] = [list(p) for p in per_layer]
    if stored_pipeline is not None:
        options["pipeline"] = stored_pipeline
    return save_pretrained(
        output,
        backend="torch",
        options=options,
        model=fingerprint,
        layers=layers,
        quantizers=quantizers,
        calibration=cal,
        layer_bits_from=derived,
    )


def _activation_quantizers(model: Any, fingerprint: dict[str, Any]) -> list[Any]:
    """The hidden-state and FFN quantizers of the patched model's activation hooks."""
    from tqai_torch.activations import activation_config, decoder_layers, ffn_down_projection

    activations = activation_config(model)
    if activations is None:
        return []
    out = []
    hidden = activations.compressor("hidden")
    if hidden is not None:
        out.append(hidden.quantizer(fingerprint["hidden_size"]))
    ffn = activations.compressor("ffn")
    if ffn is not None:
        down = ffn_down_projection(decoder_layers(model)[0], 0)
        out.append(ffn.quantizer(int(down.in_features)))
    return out


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

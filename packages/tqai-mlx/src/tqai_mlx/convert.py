"""Converted folders for mlx-lm models: :func:`convert` and ``patch(model, from_pretrained=DIR)``.

Why it is shaped like this: the same as :mod:`tqai_torch.convert`, with mlx-lm's view of a model.
:func:`convert` runs :func:`tqai_mlx.patch` once (its validation, its quantizers), reads back the
cache config, the compressed layers and the activation config, unpatches and writes the folder
with :func:`tqai.pretrained.save_pretrained` (backend ``"mlx"``). The fingerprint is mlx-lm's
attention layout (:func:`tqai_mlx._model.describe`) plus the hidden and FFN widths. Calibration
files and ``pipeline=`` dicts are stored as for torch. Per-layer widths (``layer_bits``) are
refused while :func:`tqai_mlx.patch` has none: convert stores only what patch can take back.

Example:
    >>> convert(model, "out/", config="all8")  # doctest: +SKIP
    >>> cache = tqai_mlx.patch(model, from_pretrained="out/")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from tqai.pretrained import check_fingerprint, load_pretrained, save_pretrained
from tqai_mlx import _model

__all__ = ["convert", "model_fingerprint", "patch_from_pretrained"]


def _widths(model: Any) -> tuple[int | None, int | None]:
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None)
    ffn = getattr(args, "intermediate_size", None)
    return hidden, ffn


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The model fields a converted folder depends on (attention layout and widths)."""
    out = _model.describe(model)
    out["hidden_size"], out["intermediate_size"] = _widths(model)
    return out


def _num_kv_heads(fingerprint: dict[str, Any]) -> int | None:
    """The K/V head count of the model's attention layers (one value, or None if they differ)."""
    heads = {info["n_kv_heads"] for info in fingerprint["layers"] if info is not None}
    return heads.pop() if len(heads) == 1 else None


def convert(
    model: Any,
    output: str | Path,
    *,
    calibration: Any = None,
    fisher_layer_bits: bool = False,
    **options: Any,
) -> Path:
    """Write an mlx-lm model's tqai configuration for ``options`` into the folder ``output``.

    Args:
        model: an mlx-lm model.
        output: the folder (created if needed).
        calibration: a ``tqai calibrate`` Fisher file (path) or a ``FisherCalibration`` of this
            model's layers and K/V heads: stored in the folder (checksummed).
        fisher_layer_bits: per-layer widths from ``calibration``; refused while
            :func:`tqai_mlx.patch` has no ``layer_bits`` (as ``layer_bits=`` itself is).
        **options: :func:`tqai_mlx.patch` options (JSON-able; ``pipeline=`` as a plain dict).

    Returns:
        The path of the written ``tqai_config.json``.

    Raises:
        ValueError / TypeError: whatever ``patch`` refuses, per-layer widths, a calibration of
            another shape, a pipeline that is not plain JSON.
    """
    from tqai.layer_bits import layer_configs
    from tqai.pretrained import (
        check_calibration,
        fisher_options,
        load_calibration,
        pipeline_quantizers,
        pipeline_to_folder,
    )
    from tqai_mlx.activations import activation_config
    from tqai_mlx.patching import _patched, patch, unpatch

    if "layer_bits" not in inspect.signature(patch).parameters and (
        fisher_layer_bits or options.get("layer_bits") is not None
    ):
        raise ValueError(
            "tqai_mlx.patch has no layer_bits (per-layer widths are tqai-torch only for now), "
            "so convert --backend mlx cannot store them; convert without layer_bits / "
            "--fisher-layer-bits"
        )
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    fingerprint = model_fingerprint(model)
    cal = None if calibration is None else load_calibration(calibration)
    stored_pipeline, cal = pipeline_to_folder(options.get("pipeline"), cal)
    if cal is not None:
        check_calibration(
            cal, num_layers=fingerprint["num_layers"], num_kv_heads=_num_kv_heads(fingerprint)
        )
    derived = None
    if fisher_layer_bits:
        options["layer_bits"], derived = fisher_options(options, cal)
    patch(model, **options)
    try:
        state = _patched[id(model)]
        infos = fingerprint["layers"]
        configs = layer_configs(state.config, options.get("layer_bits"), len(infos))
        head_dims = sorted(
            {info["head_dim"] for info, on in zip(infos, state.compress, strict=True) if on}
        )
        quantizers = [
            q for c in dict.fromkeys(configs) for d in head_dims
            for qs in c.part_quantizers(d) for q in qs
        ]  # fmt: skip
        quantizers += pipeline_quantizers(state.pipeline, head_dims)
        activations = activation_config(model)
        hidden_d, ffn_d = _widths(model)
        if activations is not None:
            for stream, d in (("hidden", hidden_d), ("ffn", ffn_d)):
                compressor = activations.compressor(stream)
                if compressor is not None and d:
                    quantizers.append(compressor.quantizer(int(d)))
        layers = [
            {
                "index": i,
                "compressed": on,
                "cache_layer": "TqaiKVCache" if on else fingerprint["caches"][i],
                "head_dim": None if info is None else info["head_dim"],
                "bits_k": c.bits_k if on else None,
                "bits_v": c.bits_v if on else None,
            }
            for i, (info, on, c) in enumerate(zip(infos, state.compress, configs, strict=True))
        ]
    finally:
        unpatch(model)
    if options.get("layer_bits") is not None:  # a dict's int keys do not survive JSON
        options["layer_bits"] = [[c.bits_k, c.bits_v] for c in configs]
    if stored_pipeline is not None:
        options["pipeline"] = stored_pipeline
    return save_pretrained(
        output, backend="mlx", options=options, model=fingerprint, layers=layers,
        quantizers=quantizers, calibration=cal, layer_bits_from=derived,
    )  # fmt: skip


def patch_from_pretrained(model: Any, directory: str | Path, *, given: list[str]) -> list[Any]:
    """``patch(model, **options of the folder)`` with its constants prebuilt (no solving)."""
    from tqai_mlx.patching import patch

    if given:
        raise ValueError(
            f"from_pretrained= takes every option from the folder; got also {', '.join(given)} "
            "(convert again with those options instead)"
        )
    pre = load_pretrained(directory, backend="mlx")
    check_fingerprint(pre.model, model_fingerprint(model), pre.path / "tqai_config.json")
    return patch(model, **pre.options)

"""Converted folders for mlx-lm models: :func:`convert` and ``patch(model, from_pretrained=DIR)``.

Why it is shaped like this: the same as :mod:`tqai_torch.convert`, with mlx-lm's view of a model.
:func:`convert` runs :func:`tqai_mlx.patch` once (its validation, its quantizers), reads back the
cache config, the compressed layers and the activation config, unpatches and writes the folder
with :func:`tqai.pretrained.save_pretrained` (backend ``"mlx"``). The fingerprint is mlx-lm's
attention layout (:func:`tqai_mlx._model.describe`) plus the hidden and FFN widths.

Example:
    >>> convert(model, "out/", config="all8")  # doctest: +SKIP
    >>> cache = tqai_mlx.patch(model, from_pretrained="out/")  # doctest: +SKIP
"""

from __future__ import annotations

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


def convert(model: Any, output: str | Path, **options: Any) -> Path:
    """Write an mlx-lm model's tqai configuration for ``options`` into the folder ``output``.

    Args:
        model: an mlx-lm model.
        output: the folder (created if needed).
        **options: :func:`tqai_mlx.patch` options (JSON-able; ``pipeline=`` is refused).

    Returns:
        The path of the written ``tqai_config.json``.
    """
    from tqai_mlx.activations import activation_config
    from tqai_mlx.patching import _patched, patch, unpatch

    if options.get("pipeline") is not None:
        raise ValueError(
            "convert does not store pipeline= options yet (pipelines and their calibration "
            "files are not part of the converted folder); convert without pipeline="
        )
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    fingerprint = model_fingerprint(model)
    patch(model, **options)
    try:
        state = _patched[id(model)]
        config = state.config
        infos = fingerprint["layers"]
        head_dims = sorted(
            {info["head_dim"] for info, on in zip(infos, state.compress, strict=True) if on}
        )
        quantizers = [q for d in head_dims for qs in config.part_quantizers(d) for q in qs]
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
                "bits_k": config.bits_k if on else None,
                "bits_v": config.bits_v if on else None,
            }
            for i, (info, on) in enumerate(zip(infos, state.compress, strict=True))
        ]
    finally:
        unpatch(model)
    return save_pretrained(
        output, backend="mlx", options=options, model=fingerprint, layers=layers,
        quantizers=quantizers,
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

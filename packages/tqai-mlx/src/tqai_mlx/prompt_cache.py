"""Save and load a prompt cache that holds tqai layers (and mlx-lm's own caches beside them).

Why it is shaped like this: ``mlx_lm.models.cache.load_prompt_cache`` rebuilds classes with
``globals()[name]`` inside its own module, so it cannot load a class defined elsewhere; and a
compressed cache is only meaningful for the model and the settings it was made with. So the file
is tqai's own cache file (:mod:`tqai.cachefile`: versioned, SHA-256 checksummed, written
atomically, the same bytes on every backend), holding:

- per tqai layer, :meth:`tqai.kvstore.KVStore.state`: config, head dim, dtype, token counts, and
  the sinks, packed codes, norms and window, codes still packed;
- per mlx-lm layer (``RotatingKVCache`` of a sliding-window layer, a skipped ``KVCache``, ...),
  its ``state`` leaves: arrays as arrays, the rest (offsets, sizes) in the header;
- a fingerprint of the model (:func:`tqai_mlx._model.describe`) when ``model=`` is given;
- with a compression pipeline, each tqai layer's tiers (codes per width and ``tier_of``, see
  :meth:`tqai.kvstore.KVStore.state`) and the pipeline's config in ``meta["pipeline"]``; such a
  file loads only with ``model=`` patched with the same pipeline config (the pipeline's running
  state, e.g. scorer statistics, is not saved: it stays with the patched model).

Header ``meta``: ``{"backend": "mlx", "format": "tqai-mlx-prompt-cache", "version": 1,
"model": {...} | null, "metadata": {str: str}, "pipeline": {...} | null, "layers": [{"kind": "tqai", "kernel": ...,
**KVStore meta} | {"kind": <mlx-lm class>, "scalars": {...}, "arrays": [...], "empty":
"dict" | "list", "meta_state": [...]}]}``; arrays are named ``layer<i>.<name>``.

Loading checks the file (``TqaiFormatError``), and with ``model=`` also that the cache fits it:
the same model fingerprint, the same per-layer cache classes, and for tqai layers the same
:class:`~tqai.kvstore.KVCacheConfig` the model is patched with for that layer (its
``layer_bits`` widths included; ``ValueError`` naming the difference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as _mlx_cache

from tqai.cachefile import read_cache_file, write_cache_file
from tqai.container import TqaiFormatError
from tqai.kvstore import KVCacheConfig, KVStore, check_pipeline, pipeline_config
from tqai_mlx import _model
from tqai_mlx.cache import TqaiKVCache
from tqai_mlx.patching import is_patched, patch_layer_configs, patch_pipeline

__all__ = ["PROMPT_CACHE_FORMAT", "PROMPT_CACHE_VERSION", "load_cache", "save_cache"]

PROMPT_CACHE_FORMAT = "tqai-mlx-prompt-cache"
PROMPT_CACHE_VERSION = 1
_TQAI = "tqai"


def _layer_entry(i: int, c: Any) -> tuple[dict[str, Any], dict[str, mx.array]]:
    if isinstance(c, TqaiKVCache):
        meta, arrays = c.store.state()
        return {"kind": _TQAI, "kernel": c.kernel, **meta}, arrays
    if not hasattr(c, "state"):
        raise TypeError(f"layer {i}: {type(c).__name__} is not an mlx-lm cache (no state)")
    state = c.state
    leaves = tree_flatten(state)
    arrays = {k: v for k, v in leaves if isinstance(v, mx.array)}
    scalars = {k: v for k, v in leaves if not isinstance(v, mx.array)}
    for k, v in scalars.items():
        if v is not None and not isinstance(v, bool | int | float | str):
            raise TypeError(f"layer {i}: {type(c).__name__} state entry {k!r} is {v!r}")
    entry = {
        "kind": type(c).__name__,
        "scalars": scalars,
        "arrays": sorted(arrays),
        "empty": "dict" if isinstance(state, dict) else "list",
        "meta_state": list(getattr(c, "meta_state", ()) or ()),
    }
    return entry, arrays


def save_cache(
    path: str | Path,
    cache: list[Any],
    *,
    model: Any = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a prompt cache (tqai and mlx-lm layers) to a tqai cache file.

    Args:
        path: the file to write (atomically).
        cache: the per-layer cache list (from ``tqai_mlx.patch`` or ``make_prompt_cache``).
        model: the model the cache belongs to; its fingerprint is stored so that loading can
            refuse another model even when the layer shapes happen to agree.
        metadata: extra ``str -> str`` entries stored with the cache.

    Returns:
        The path written.

    Example:
        >>> save_cache("prompt.tqai", cache, model=model)  # doctest: +SKIP
        >>> cache = load_cache("prompt.tqai", model=model)  # doctest: +SKIP
    """
    layers, tensors = [], {}
    pipelines = [c.store.pipeline for c in cache if isinstance(c, TqaiKVCache)]
    pipeline = next((p for p in pipelines if p is not None), None)
    if model is not None and patch_pipeline(model) is not None:
        pipeline = patch_pipeline(model)
    for i, c in enumerate(cache):
        entry, arrays = _layer_entry(i, c)
        layers.append(entry)
        tensors.update({f"layer{i}.{k}": v for k, v in arrays.items()})
    meta = {
        "backend": "mlx",
        "format": PROMPT_CACHE_FORMAT,
        "version": PROMPT_CACHE_VERSION,
        "model": None if model is None else _model.describe(model),
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        "pipeline": pipeline_config(pipeline),
        "layers": layers,
    }
    return write_cache_file(path, meta, tensors)


def _to_mlx(host: Any, dtype: str) -> mx.array:
    return mx.array(host).astype(mx.bool_ if dtype == "bool" else getattr(mx, dtype))


def _rebuild(i: int, entry: dict[str, Any], arrays: dict[str, mx.array], pipeline: Any) -> Any:
    kind = entry["kind"]
    if kind == _TQAI:
        config = KVCacheConfig(**entry["config"])
        c = TqaiKVCache(config, kernel=entry.get("kernel", "reference"), pipeline=pipeline, layer=i)
        c.store = KVStore.from_state(config, entry, arrays, pipeline, i)
        return c
    leaves = [(k, arrays[k]) for k in entry["arrays"]] + list(entry["scalars"].items())
    # tree_unflatten wants the leaves in their original order: numeric keys sort as numbers.
    leaves.sort(
        key=lambda kv: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in kv[0].split(".")]
    )
    state = tree_unflatten(leaves) if leaves else ({} if entry["empty"] == "dict" else [])
    cls = getattr(_mlx_cache, kind, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_state"):
        raise TqaiFormatError(f"layer {i}: unknown cache class {kind!r}")
    obj = cls.from_state(state)
    if entry["meta_state"]:
        obj.meta_state = tuple(entry["meta_state"])
    return obj


def _check_fits(meta: dict[str, Any], cache: list[Any], model: Any) -> None:
    """Raise ``ValueError`` when a loaded cache does not belong to ``model`` as patched now."""
    saved = meta["model"]
    if saved is not None:
        now = _model.describe(model)
        diffs = [
            f"{k}: saved {saved.get(k)!r}, model {now[k]!r}" for k in now if saved.get(k) != now[k]
        ]
        if diffs:
            raise ValueError("the cache was saved for another model: " + "; ".join(diffs))
    expected = model.make_cache()
    if len(expected) != len(cache):
        raise ValueError(
            f"the cache has {len(cache)} layers but the model makes {len(expected)} caches"
        )
    layers = _model.model_layers(model)
    args = getattr(model, "args", None)
    configs = patch_layer_configs(model)
    for i, (got, want) in enumerate(zip(cache, expected, strict=True)):
        if type(got) is not type(want):
            hint = ""
            if isinstance(got, TqaiKVCache) and not is_patched(model):
                hint = " (patch the model with tqai_mlx.patch first, with the same settings)"
            raise ValueError(
                f"layer {i}: the cache holds a {type(got).__name__} but the model makes a "
                f"{type(want).__name__}{hint}"
            )
        if isinstance(got, TqaiKVCache) and got.config != configs[i]:
            theirs, ours = got.config.to_dict(), configs[i].to_dict()
            diffs = [
                f"{k}={theirs[k]!r} (model: {ours[k]!r})" for k in ours if theirs[k] != ours[k]
            ]
            raise ValueError(
                f"layer {i}: the cache was made with other settings: {', '.join(diffs)}"
            )
        info = _model.layer_info(_model.attention_module(layers[i]), args)
        have = _heads_and_dim(got)
        for field, saved_value, value in zip(
            ("kv_heads", "head_dim"), have, (info.n_kv_heads, info.head_dim), strict=True
        ):
            if None not in (saved_value, value) and saved_value != value:
                raise ValueError(
                    f"layer {i}: the cache has {field}={saved_value} but the model has {value}"
                )


def _heads_and_dim(cache: Any) -> tuple[int | None, int | None]:
    """``(kv_heads, head_dim)`` of a loaded layer cache, as far as its arrays tell."""
    if isinstance(cache, TqaiKVCache):
        arrays = list(cache.store.state()[1].values())
        spec = cache.store.key_quantizer
        heads = int(arrays[0].shape[1]) if arrays else None
        return heads, None if spec is None else spec.spec.d
    keys = getattr(cache, "keys", None)
    if isinstance(keys, mx.array) and keys.ndim == 4:
        return int(keys.shape[1]), int(keys.shape[3])
    return None, None


def load_cache(
    path: str | Path, model: Any = None, *, return_metadata: bool = False
) -> list[Any] | tuple[list[Any], dict[str, str]]:
    """Read a prompt cache written by :func:`save_cache`.

    Args:
        path: the file.
        model: when given, the cache is checked against it (fingerprint, layer classes, patch
            settings, head shapes) before it is returned.
        return_metadata: also return the ``metadata`` given to :func:`save_cache`.

    Returns:
        The per-layer cache list (and the metadata dict when ``return_metadata``).

    Raises:
        TqaiFormatError: not a tqai mlx prompt cache, another version, truncated or corrupted.
        ValueError: the cache does not fit ``model`` (another model, layer layout or settings,
            or another compression pipeline config), or it was saved with a pipeline and no
            ``model`` is given to take the pipeline from.
    """
    meta, stored = read_cache_file(path)
    if meta.get("format") != PROMPT_CACHE_FORMAT or meta.get("backend") != "mlx":
        raise TqaiFormatError(
            f"{path}: a tqai cache file, but not an mlx-lm prompt cache (backend "
            f"{meta.get('backend')!r}); load it with the backend that saved it"
        )
    if meta.get("version") != PROMPT_CACHE_VERSION:
        raise TqaiFormatError(
            f"{path}: prompt-cache version {meta.get('version')}; this tqai-mlx reads "
            f"{PROMPT_CACHE_VERSION}"
        )
    saved = meta.get("pipeline")
    if saved is not None and model is None:
        raise ValueError(
            f"{path} was saved with a compression pipeline ({saved}): pass model=, patched with "
            "that pipeline, to load it (the pipeline codes the tokens that follow)"
        )
    pipeline = None if model is None else patch_pipeline(model)
    if model is not None:
        check_pipeline(path, saved, pipeline)
    cache = []
    for i, entry in enumerate(meta["layers"]):
        prefix = f"layer{i}."
        arrays = {
            name[len(prefix) :]: _to_mlx(host, dtype)
            for name, (host, dtype) in stored.items()
            if name.startswith(prefix)
        }
        cache.append(_rebuild(i, entry, arrays, pipeline))
    if model is not None:
        _check_fits(meta, cache, model)
    return (cache, dict(meta["metadata"])) if return_metadata else cache

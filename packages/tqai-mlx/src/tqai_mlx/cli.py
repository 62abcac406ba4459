"""The mlx-lm side of ``tqai run`` / ``tqai compare`` / ``tqai eval ppl`` (``--backend mlx``).

Why it is shaped like this: there is one set of ``tqai`` commands, defined in
:mod:`tqai_torch.cli` (registered through the ``tqai.commands`` entry point); with
``--backend mlx`` they call the plain functions here and print the results the same way as for
torch. So this module holds no command-line code: it loads a local mlx-lm model folder,
generates greedily through a prompt cache from :func:`tqai_mlx.patch`, measures the cache, and
computes perplexity through the cache exactly as :func:`tqai_torch.evaluate.perplexity` does
(prefill the first half of each window, score the rest in chunks that attend to the cache).

Nothing heavy is imported at module import time: mlx and mlx-lm are imported inside the
functions (:func:`check_installed` says clearly when they are missing).

Example:
    >>> from tqai_mlx import cli
    >>> model, tokenizer = cli.load("/path/to/mlx-model")  # doctest: +SKIP
    >>> cache = tqai_mlx.patch(model, bits_k=4, bits_v=2)  # doctest: +SKIP
    >>> tokens, seconds = cli.generate(model, tokenizer, "Hello", 32, cache)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "bos_token_id",
    "check_installed",
    "compare",
    "encode",
    "generate",
    "kv_bytes",
    "load",
    "perplexity",
    "resolve_model",
    "run",
]

_DTYPES = ("float32", "float16", "bfloat16")


def check_installed() -> None:
    """Raise ``ImportError`` with an install hint when mlx or mlx-lm is missing."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as ex:
        raise ImportError(
            f"the mlx backend needs mlx and mlx-lm ({ex}); install them with "
            "`pip install 'tqai-mlx[lm]'`"
        ) from ex


def resolve_model(model: str | Path) -> Path:
    """A local mlx-lm model folder, or a tqai model name built by :mod:`tqai_torch.models`.

    Args:
        model: a folder holding ``config.json``, the safetensors weights and the tokenizer files,
            or a name such as ``smollm2-135m`` / ``gemma3-270m`` (needs tqai-torch installed).

    Returns:
        The folder.

    Raises:
        ValueError: neither an existing model folder nor a name that can be built here. Nothing is
            ever fetched from the Hugging Face hub.
    """
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is a folder but has no config.json (not a model)")
        return path
    name = str(model)
    try:
        from tqai_torch.models import MODELS, local_model_dir
    except ImportError:
        raise ValueError(
            f"not a local folder: {name!r}; pass a local mlx-lm model folder (building the "
            "named models smollm2-135m / gemma3-270m needs tqai-torch installed)"
        ) from None
    if name not in MODELS:
        raise ValueError(f"not a local folder and not one of {sorted(MODELS)}: {name!r}")
    return local_model_dir(name)


def load(model: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """Load an mlx-lm model and its tokenizer from a local folder (or a tqai model name).

    Args:
        model: see :func:`resolve_model`.
        dtype: the compute dtype the weights are cast to: ``float32``, ``float16`` or
            ``bfloat16`` (mlx-lm computes in the stored dtype; Gemma 3 overflows in float16).

    Returns:
        ``(model, tokenizer)`` as ``mlx_lm.load`` returns them.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    check_installed()
    folder = resolve_model(model)
    import mlx.core as mx
    import mlx_lm

    loaded, tokenizer = mlx_lm.load(str(folder))
    loaded.set_dtype(getattr(mx, dtype))
    return loaded, tokenizer


def encode(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids: through the chat template when the tokenizer has one (as torch's run)."""
    if getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 128,
    cache: list[Any] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> tuple[list[int], float]:
    """Greedy generation with ``mlx_lm.stream_generate`` through ``cache``.

    Args:
        model, tokenizer: from :func:`load`.
        prompt: the user prompt (chat template applied when there is one).
        max_new_tokens: at most this many new tokens (generation stops at EOS).
        cache: the prompt cache (``tqai_mlx.patch(model)`` or ``make_prompt_cache(model)``);
            ``None`` makes one with ``make_prompt_cache`` (tqai caches while the model is patched).
        on_text: called with each new piece of text (streaming output).

    Returns:
        ``(new token ids without the EOS, seconds for prefill and decode)``.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    if cache is None:
        cache = make_prompt_cache(model)
    ids = mx.array(encode(tokenizer, prompt))
    tokens: list[int] = []
    start = time.perf_counter()
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=max_new_tokens, prompt_cache=cache
    ):
        if response.finish_reason != "stop":  # the last response of an EOS stop holds the EOS
            tokens.append(int(response.token))
        if on_text is not None and response.text:
            on_text(response.text)
    return tokens, time.perf_counter() - start


def kv_bytes(cache: Sequence[Any]) -> int:
    """Bytes the per-layer cache list holds for its tokens (not mlx-lm's unused preallocation)."""
    from tqai_mlx.cache import TqaiKVCache

    total = 0
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if isinstance(c, TqaiKVCache) or keys is None or values is None or keys.ndim != 4:
            total += int(c.nbytes)
            continue
        held = min(int(c.size()), keys.shape[2])  # KVCache / RotatingKVCache buffers grow in steps
        total += (keys.nbytes + values.nbytes) * held // max(keys.shape[2], 1)
    return total


def _coords(model: Any, length: int) -> int:
    """K and V coordinates ``length`` tokens represent over all attention layers."""
    from tqai_mlx import _model

    args = getattr(model, "args", None)
    coords = 0
    for layer in _model.model_layers(model):
        info = _model.layer_info(_model.attention_module(layer), args)
        if info.n_kv_heads and info.head_dim:
            coords += 2 * info.n_kv_heads * info.head_dim * length
    return coords


def _config(config: Any) -> Any:
    """A ``CacheConfig`` (or anything with ``bits_k``, ``name`` and ``options()``) or a string."""
    if not isinstance(config, str):
        return config
    try:
        from tqai_torch.evaluate import parse_config
    except ImportError:
        raise ImportError(
            "config names such as 'K4/V2' are parsed by tqai-torch (tqai_torch.evaluate."
            "parse_config); install tqai-torch or pass a CacheConfig-like object"
        ) from None
    return parse_config(config)


def perplexity(
    model: Any,
    ids: Sequence[int],
    config: Any,
    *,
    context: int = 2048,
    prefix: int | None = None,
    chunk: int = 128,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
    on_window: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Perplexity of the continuation of each window, every scored token read through the cache.

    Mirrors :func:`tqai_torch.evaluate.perplexity`: each window of ``context`` tokens (BOS first
    when given) is split, the first ``prefix`` tokens (default ``context // 2``) are prefilled
    into a fresh cache, then the rest is scored in chunks of ``chunk`` tokens, each chunk
    attending to everything before it as the cache holds it, its own tokens included (they are
    compressed before attention reads them, as in token-by-token decoding).

    Args:
        model: an mlx-lm model (patched here for tqai configs, unpatched at the end).
        ids: token ids of the text.
        config: ``tqai_torch.evaluate.CacheConfig`` (``bits_k=None`` = the mlx-lm baseline) or
            its string form (``"baseline"``, ``"K4/V2"``, ``"K4/V2 residual128"``, ...).
        context, prefix, chunk, max_windows, bos_token_id, on_window: as in tqai-torch.

    Returns:
        ``{"ppl", "nll", "tokens", "kv_bytes", "kv_bits_per_coord"}`` (cache of the last window).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from tqai_mlx.patching import patch, unpatch

    config = _config(config)
    prefix = context // 2 if prefix is None else prefix
    if not 0 < prefix < context:
        raise ValueError(f"prefix must be in 1..context-1 ({context - 1}), got {prefix}")
    patched = config.bits_k is not None
    if patched:
        patch(model, **config.options())
    body = context - (bos_token_id is not None)
    n = len(ids) // body
    n = n if max_windows is None else min(n, max_windows)
    nll, tokens, held, coords = 0.0, 0, 0, 0
    try:
        for w in range(n):
            window = list(ids[w * body : (w + 1) * body])
            if bos_token_id is not None:
                window = [bos_token_id, *window]
            window = mx.array(window)[None]
            cache = make_prompt_cache(model)  # tqai caches while patched
            last = model(window[:, :prefix], cache=cache)[:, -1:]
            for layer_cache in cache:  # later chunks read their own tokens from the codes
                if hasattr(layer_cache, "store"):
                    layer_cache.store.quantize_staged = True
            for start in range(prefix, context, chunk):
                piece = window[:, start : start + chunk]
                step = model(piece, cache=cache)
                # The logits predicting the piece: the one before it, then all but its last.
                logits = mx.concatenate([last, step[:, :-1]], axis=1)[0].astype(mx.float32)
                target = mx.take_along_axis(logits, piece[0][:, None], axis=-1)[:, 0]
                nll += (mx.logsumexp(logits, axis=-1) - target).sum().item()
                tokens += piece.shape[1]
                last = step[:, -1:]
            held, coords = kv_bytes(cache), _coords(model, context)
            if on_window is not None:
                on_window()
    finally:
        if patched:
            unpatch(model)
    if not tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {body}")
    return {
        "ppl": math.exp(nll / tokens),
        "nll": nll,
        "tokens": tokens,
        "kv_bytes": held,
        "kv_bits_per_coord": 8 * held / coords if coords else float("nan"),
    }


def bos_token_id(model: Any, tokenizer: Any) -> int | None:
    """The BOS id to prepend to perplexity windows: Gemma needs it (as in tqai-torch's eval)."""
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", ""
    )
    return tokenizer.bos_token_id if "gemma" in str(model_type) else None


def run(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    bits_k: int | None = None,
    bits_v: int | None = None,
    config: str | None = None,
    max_new_tokens: int = 128,
    no_tqai: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate with the compressed cache (or the plain one with ``no_tqai``), streaming text.

    ``config`` is a named config (:mod:`tqai.named_configs`); ``bits_k``/``bits_v`` default to
    its bits, or K4/V2.

    Returns:
        ``{"tokens": [...], "seconds": float, "kv_bytes": int}``.
    """
    from mlx_lm.models.cache import make_prompt_cache

    from tqai_mlx.patching import patch, unpatch

    if no_tqai:
        cache = make_prompt_cache(model)
    else:
        cache = patch(model, bits_k=bits_k, bits_v=bits_v, config=config)
    try:
        tokens, seconds = generate(model, tokenizer, prompt, max_new_tokens, cache, on_text)
    finally:
        unpatch(model)
    return {"tokens": tokens, "seconds": seconds, "kv_bytes": kv_bytes(cache)}


def compare(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    bits_k: int = 4,
    bits_v: int = 2,
    max_new_tokens: int = 64,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Greedy generation with mlx-lm's cache, then with tqai's.

    Returns:
        ``(baseline, tqai)``, each ``{"tokens", "text", "seconds", "kv_bytes"}``.
    """
    from mlx_lm.models.cache import make_prompt_cache

    from tqai_mlx.patching import patch, unpatch

    def one(cache: list[Any]) -> dict[str, Any]:
        tokens, seconds = generate(model, tokenizer, prompt, max_new_tokens, cache)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return {"tokens": tokens, "text": text, "seconds": seconds, "kv_bytes": kv_bytes(cache)}

    unpatch(model)
    base = one(make_prompt_cache(model))
    cache = patch(model, bits_k=bits_k, bits_v=bits_v)
    try:
        ours = one(cache)
    finally:
        unpatch(model)
    return base, ours

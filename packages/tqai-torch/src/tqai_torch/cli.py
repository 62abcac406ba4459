"""``tqai run`` / ``tqai compare`` / ``tqai eval ppl`` for transformers models.

Registered under the ``tqai.commands`` entry-point group; the core CLI calls :func:`register`
at start-up. Nothing heavy is imported until a command runs, so ``tqai info`` stays fast.

``--model`` takes a local model folder or one of the real models the project fetches itself
(``smollm2-135m``, ``gemma3-270m``; see :mod:`tqai_torch.models`); nothing is read from a hub.

``--backend mlx`` runs the same commands with mlx-lm on a local MLX model folder (or the same
names): the work is done by the plain functions of :mod:`tqai_mlx.cli` (imported only then), and
the results are printed here, identically for both backends.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]

_MODEL_HELP = "local model folder, or smollm2-135m / gemma3-270m (fetched into the tqai cache)"


class Backend(StrEnum):
    """The library a command runs the model with."""

    torch = "torch"
    mlx = "mlx"


_BACKEND = typer.Option(
    Backend.torch,
    "--backend",
    case_sensitive=False,
    help="torch (transformers) or mlx (mlx-lm, a local MLX model folder)",
)
"""The ``--backend`` option of every command (read only, so one instance serves them all)."""


def _mlx() -> Any:
    """:mod:`tqai_mlx.cli`, or a usage error saying what to install."""
    try:
        import tqai_mlx.cli as mlx_cli

        mlx_cli.check_installed()
    except ImportError as ex:
        raise typer.BadParameter(
            f"--backend mlx needs tqai-mlx with mlx-lm (pip install 'tqai-mlx[lm]'): {ex}",
            param_hint="--backend",
        ) from None
    return mlx_cli


def _load_mlx(mlx_cli: Any, model: str, dtype: str) -> tuple[Any, Any]:
    try:
        return mlx_cli.load(model, dtype)
    except ValueError as ex:
        raise typer.BadParameter(str(ex), param_hint="--model") from None


def load_model_option(model: str, dtype: str) -> tuple[Any, Any]:
    """``--model`` / ``--dtype`` of the torch commands -> ``(model, tokenizer)``, offline.

    ``model`` is a local folder or a name of :data:`tqai_torch.models.MODELS` (fetched and built
    into the tqai cache on first use); bad values are usage errors naming the option.
    """
    import torch

    from tqai_torch.models import MODELS, load_model

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise typer.BadParameter(f"not a torch dtype: {dtype!r}", param_hint="--dtype")
    if model in MODELS:
        return load_model(model, dtype=torch_dtype)
    path = Path(model)
    if not path.is_dir():
        raise typer.BadParameter(
            f"not a local folder and not one of {sorted(MODELS)}: {model!r}", param_hint="--model"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return loaded.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def _check_bits(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 8:
        raise typer.BadParameter(f"must be in 1..8, got {value}")
    return value


def _inputs(tokenizer: Any, prompt: str) -> Any:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


def _generate(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, cache: Any, streamer: Any = None
) -> tuple[Any, float]:
    import torch

    from tqai_torch.evaluate import cache_keyword

    inputs = _inputs(tokenizer, prompt)
    kwargs = {} if cache is None else {cache_keyword(model): cache}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **kwargs,
        )
    seconds = time.perf_counter() - start
    return out[0, inputs["input_ids"].shape[1] :], seconds


def _kv_bytes(cache: Any, model: Any) -> int:
    from tqai_torch.evaluate import _cache_size

    return _cache_size(cache, model)[0]


def _check_config(value: str | None) -> str | None:
    from tqai.named_configs import NAMED_CONFIGS

    if value is not None and value not in NAMED_CONFIGS:
        raise typer.BadParameter(f"must be one of {', '.join(NAMED_CONFIGS)}, got {value!r}")
    return value


def run(
    prompt: str = typer.Argument(..., help="the prompt"),
    model: str = typer.Option("smollm2-135m", help=_MODEL_HELP),
    bits_k: int = typer.Option(None, callback=_check_bits, help="key bits, 1..8 (default 4)"),
    bits_v: int = typer.Option(None, callback=_check_bits, help="value bits, 1..8 (default 2)"),
    config: str = typer.Option(
        None,
        callback=_check_config,
        help="named config: kv-only, kv+hidden8, kv+hidden6, kv+ffn8, all8, all6, aggressive",
    ),
    max_new_tokens: int = typer.Option(128, min=1),
    no_tqai: bool = typer.Option(False, "--no-tqai", help="generate with the plain cache"),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16"),
    backend: Backend = _BACKEND,
) -> None:
    """Generate from a prompt, streaming the text, with the compressed cache."""
    from tqai.named_configs import resolve_patch_options

    try:
        resolve_patch_options(config, bits_k=bits_k, bits_v=bits_v)
    except ValueError as ex:
        raise typer.BadParameter(str(ex), param_hint="--config") from None
    if backend is Backend.mlx:
        mlx_cli = _mlx()
        loaded, tokenizer = _load_mlx(mlx_cli, model, dtype)
        out = mlx_cli.run(
            loaded,
            tokenizer,
            prompt,
            bits_k=bits_k,
            bits_v=bits_v,
            config=config,
            max_new_tokens=max_new_tokens,
            no_tqai=no_tqai,
            on_text=lambda piece: typer.echo(piece, nl=False),
        )
        _report(len(out["tokens"]), out["seconds"], out["kv_bytes"])
        return
    from transformers import DynamicCache, TextStreamer

    import tqai_torch

    loaded, tokenizer = load_model_option(model, dtype)
    if no_tqai:
        cache = DynamicCache(config=loaded.config)
    else:
        cache = tqai_torch.patch(loaded, bits_k=bits_k, bits_v=bits_v, config=config)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    tokens, seconds = _generate(loaded, tokenizer, prompt, max_new_tokens, cache, streamer)
    _report(len(tokens), seconds, _kv_bytes(cache, loaded))
    tqai_torch.unpatch(loaded)


def _report(n_tokens: int, seconds: float, kv_bytes: int) -> None:
    typer.echo(
        f"\n[{n_tokens} tokens, {n_tokens / seconds:.1f} tokens/s, "
        f"KV cache {kv_bytes / 1024:.1f} KiB]",
        err=True,
    )


def compare(
    prompt: str = typer.Argument(..., help="the prompt"),
    model: str = typer.Option("smollm2-135m", help=_MODEL_HELP),
    bits_k: int = typer.Option(4, callback=_check_bits, help="key bits, 1..8"),
    bits_v: int = typer.Option(2, callback=_check_bits, help="value bits, 1..8"),
    max_new_tokens: int = typer.Option(64, min=1),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16"),
    backend: Backend = _BACKEND,
) -> None:
    """Baseline and compressed cache side by side: text, tokens/s, KV bytes, first divergence."""
    if backend is Backend.mlx:
        mlx_cli = _mlx()
        loaded, tokenizer = _load_mlx(mlx_cli, model, dtype)
        base, ours = mlx_cli.compare(
            loaded, tokenizer, prompt, bits_k=bits_k, bits_v=bits_v, max_new_tokens=max_new_tokens
        )
        _print_compare(f"{model} (mlx)", bits_k, bits_v, base, ours)
        return
    from transformers import DynamicCache

    import tqai_torch

    loaded, tokenizer = load_model_option(model, dtype)
    base_cache = DynamicCache(config=loaded.config)
    base, base_s = _generate(loaded, tokenizer, prompt, max_new_tokens, base_cache)
    cache = tqai_torch.patch(loaded, bits_k=bits_k, bits_v=bits_v)
    try:
        ours, ours_s = _generate(loaded, tokenizer, prompt, max_new_tokens, cache)
    finally:
        tqai_torch.unpatch(loaded)

    def result(tokens: Any, seconds: float, cache: Any) -> dict[str, Any]:
        return {
            "tokens": tokens.tolist(),
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "seconds": seconds,
            "kv_bytes": _kv_bytes(cache, loaded),
        }

    _print_compare(
        model, bits_k, bits_v, result(base, base_s, base_cache), result(ours, ours_s, cache)
    )


def _print_compare(
    title: str, bits_k: int, bits_v: int, base: dict[str, Any], ours: dict[str, Any]
) -> None:
    """The compare table; ``base`` / ``ours``: ``{"tokens", "text", "seconds", "kv_bytes"}``."""
    from rich.console import Console
    from rich.table import Table

    a, b = base["tokens"], ours["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    table = Table(title=f"{title}: baseline vs tqai K{bits_k}/V{bits_v}", show_lines=True)
    for col in ("", "baseline", f"tqai K{bits_k}/V{bits_v}"):
        table.add_column(col, overflow="fold")
    table.add_row("text", base["text"], ours["text"])
    table.add_row("tokens/s", f"{len(a) / base['seconds']:.1f}", f"{len(b) / ours['seconds']:.1f}")
    base_kv, ours_kv = base["kv_bytes"], ours["kv_bytes"]
    ratio = f" ({ours_kv / base_kv:.2f}x)" if base_kv else ""
    table.add_row("KV bytes", f"{base_kv:,}", f"{ours_kv:,}{ratio}")
    table.add_row(
        "first divergent token",
        "",
        "none" if same is None else f"{same} of {min(len(a), len(b))}",
    )
    Console().print(table)


eval_app = typer.Typer(help="Quality evaluation through the cache.", no_args_is_help=True)


@eval_app.command("ppl")
def eval_ppl(
    configs: list[str] = typer.Argument(
        None, help="configs such as K8/V8 K4/V2 'K4/V2+qjl' 'K4/V2 residual128' (baseline always)"
    ),
    model: str = typer.Option("smollm2-135m", help=_MODEL_HELP),
    text: Path = typer.Option(None, help="a UTF-8 text file (default: the fixed Shakespeare set)"),
    context: int = typer.Option(2048, min=16, help="tokens per window"),
    windows: int = typer.Option(2, min=1, help="windows to evaluate"),
    chunk: int = typer.Option(128, min=1, help="tokens scored per forward pass"),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16"),
    backend: Backend = _BACKEND,
) -> None:
    """Perplexity of the baseline and each config, every token scored through the cache."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tqai_torch.evaluate import parse_config

    try:
        parsed = [parse_config(c) for c in ["baseline", *(configs or ["K8/V8", "K4/V2"])]]
    except ValueError as ex:
        raise typer.BadParameter(str(ex), param_hint="CONFIGS") from None
    if text is None:
        from tqai.assets import shakespeare_text

        source = shakespeare_text()
    else:
        source = text.read_text(encoding="utf-8")
    if backend is Backend.mlx:
        mlx_cli = _mlx()
        loaded, tokenizer = _load_mlx(mlx_cli, model, dtype)
        ids = tokenizer.encode(source, add_special_tokens=False)
        bos = mlx_cli.bos_token_id(loaded, tokenizer)
        perplexity = mlx_cli.perplexity
    else:
        from tqai_torch.evaluate import perplexity

        loaded, tokenizer = load_model_option(model, dtype)
        ids = tokenizer(source, return_tensors="pt", add_special_tokens=False).input_ids[0]
        bos = tokenizer.bos_token_id if "gemma" in loaded.config.model_type else None
    results = []
    with Progress() as progress:
        task = progress.add_task("perplexity", total=len(parsed) * windows)
        for config in parsed:
            r = perplexity(
                loaded,
                ids,
                config,
                context=context,
                chunk=chunk,
                max_windows=windows,
                bos_token_id=bos,
                on_window=lambda: progress.advance(task),
            )
            results.append((config.name, r))
    base = results[0][1]["ppl"]
    where = f"{model} (mlx)" if backend is Backend.mlx else model
    table = Table(title=f"{where}: perplexity, {windows} x {context} tokens, through the cache")
    for col in ("config", "ppl", "vs baseline", "KV bits/coord"):
        table.add_column(col, justify="right")
    for name, r in results:
        table.add_row(
            name,
            f"{r['ppl']:.3f}",
            f"{100 * (r['ppl'] / base - 1):+.2f}%",
            f"{r['kv_bits_per_coord']:.2f}",
        )
    Console().print(table)


def _pipeline_option(value: str | None) -> dict[str, Any] | None:
    """``--pipeline``: a JSON object, inline or in a file."""
    import json

    if value is None:
        return None
    text = value
    if not value.lstrip().startswith(("{", "[")):  # JSON inline, else a file
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as ex:
            raise typer.BadParameter(
                f"not a JSON object and not a readable file: {ex}", param_hint="--pipeline"
            ) from None
    try:
        parsed = json.loads(text)
    except ValueError as ex:
        raise typer.BadParameter(
            f"must be a JSON object or a JSON file such as pipeline.json ({ex})",
            param_hint="--pipeline",
        ) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter(
            f"must be a JSON object, got {type(parsed).__name__}", param_hint="--pipeline"
        )
    return parsed


def convert(
    model: str = typer.Option("smollm2-135m", help=_MODEL_HELP),
    output: Path = typer.Option(..., "--output", help="folder to write the tqai configuration to"),
    config: str = typer.Option(
        None,
        callback=_check_config,
        help="named config: kv-only, kv+hidden8, kv+hidden6, kv+ffn8, all8, all6, aggressive",
    ),
    bits_k: int = typer.Option(None, callback=_check_bits, help="key bits, 1..8 (default 4)"),
    bits_v: int = typer.Option(None, callback=_check_bits, help="value bits, 1..8 (default 2)"),
    hidden_bits: int = typer.Option(None, callback=_check_bits, help="hidden-state bits, 1..8"),
    ffn_bits: int = typer.Option(None, callback=_check_bits, help="FFN activation bits, 1..8"),
    rotation: str = typer.Option("haar", help="haar, hadamard or rotor"),
    seed: int = typer.Option(0, min=0, help="rotation seed"),
    sink_tokens: int = typer.Option(4, min=0),
    residual_window: int = typer.Option(32, min=0),
    chunk_attention: bool = typer.Option(False, "--chunk-attention"),
    calibration: Path = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="a `tqai calibrate` Fisher JSON file of this model, stored in the folder",
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="measure the Fisher calibration here (torch; the shipped Shakespeare text)",
    ),
    calibration_samples: int = typer.Option(8, min=1, help="--calibrate: windows of text"),
    calibration_tokens: int = typer.Option(512, min=2, help="--calibrate: tokens per window"),
    fisher_layer_bits: bool = typer.Option(
        False,
        "--fisher-layer-bits",
        help="per-layer widths from the calibration, mean = --bits-k/--bits-v (or the config's)",
    ),
    pipeline: str = typer.Option(
        None, help="compression pipeline: a JSON object, inline or in a file (tqai.pipeline)"
    ),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16"),
    backend: Backend = _BACKEND,
) -> None:
    """Write the model's tqai configuration (options, per-layer widths, pipeline, rotations,
    codebooks, calibration) into a folder, so that tqai.patch(model, from_pretrained=DIR) starts
    without solving anything."""
    import json

    from tqai.named_configs import resolve_patch_options

    try:
        resolve_patch_options(
            config, bits_k=bits_k, bits_v=bits_v, hidden_bits=hidden_bits, ffn_bits=ffn_bits
        )
    except ValueError as ex:
        raise typer.BadParameter(str(ex), param_hint="--config") from None
    if calibrate and calibration is not None:
        raise typer.BadParameter("give --calibration FILE or --calibrate, not both")
    if fisher_layer_bits and not (calibrate or calibration is not None):
        raise typer.BadParameter(
            "needs a calibration: --calibration FILE or --calibrate",
            param_hint="--fisher-layer-bits",
        )
    options = {
        "config": config,
        "bits_k": bits_k,
        "bits_v": bits_v,
        "hidden_bits": hidden_bits,
        "ffn_bits": ffn_bits,
        "rotation": rotation,
        "seed": seed,
        "sink_tokens": sink_tokens,
        "residual_window": residual_window,
        "chunk_attention": chunk_attention,
        "pipeline": _pipeline_option(pipeline),
    }
    options = {k: v for k, v in options.items() if v is not None}
    if backend is Backend.mlx:
        if calibrate:
            raise typer.BadParameter(
                "calibration runs torch backward passes; with --backend mlx run `tqai calibrate "
                "--model ... -o FILE` and pass --calibration FILE",
                param_hint="--calibrate",
            )
        mlx_cli = _mlx()
        loaded, _ = _load_mlx(mlx_cli, model, dtype)
        from tqai_mlx.convert import convert as convert_model
    else:
        from tqai_torch.convert import convert as convert_model

        loaded, tokenizer = load_model_option(model, dtype)
    cal: Any = calibration
    if calibrate:
        from tqai_torch.calibrate import calibrate_fisher, shakespeare_windows

        windows = shakespeare_windows(tokenizer, calibration_samples, calibration_tokens)
        cal = calibrate_fisher(
            loaded, tokenizer, windows, None, max_tokens=calibration_tokens, model_name=model
        )
    try:
        path = convert_model(
            loaded, output, calibration=cal, fisher_layer_bits=fisher_layer_bits, **options
        )
    except ValueError as ex:
        raise typer.BadParameter(str(ex)) from None
    doc = json.loads(path.read_text(encoding="utf-8"))
    compressed = [layer for layer in doc["layers"] if layer["compressed"]]
    typer.echo(
        f"wrote {path.parent}: {len(doc['constants']['entries'])} constants, "
        f"{len(compressed)}/{len(doc['layers'])} layers compressed"
    )
    if doc["calibration"] is not None:
        record = doc["calibration"]
        typer.echo(
            f"calibration: {record['file']} ({record['num_layers']} layers x "
            f"{record['num_kv_heads']} K/V heads)"
        )
    if "layer_bits" in doc["options"]:
        widths = " ".join(f"{layer['bits_k']}/{layer['bits_v']}" for layer in compressed)
        typer.echo(f"per-layer K/V bits: {widths}")


def register(app: typer.Typer) -> None:
    """Add ``run``, ``compare``, ``eval`` and ``convert`` to the ``tqai`` CLI."""
    app.command("convert")(convert)
    app.command("run")(run)
    app.command("compare")(compare)
    app.add_typer(eval_app, name="eval")

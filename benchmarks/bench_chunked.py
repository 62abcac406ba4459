"""Chunked attention (online softmax) against plain attention and torch's fused SDPA, one layer.

A causal prefill of T tokens for one attention layer at SmolLM2-135M's shapes (9 query heads,
3 KV heads, head_dim 64, fp32). Providers:

- ``reference``: :func:`tqai.attention.attention_reference` in torch ops (builds the T x T scores);
- ``chunked``: :func:`tqai.chunked_attention.chunked_attention` in torch ops (chunk 512);
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (fused; on CPU torch picks its
  flash-attention CPU kernel for causal fp32 attention).

Each (provider, T) runs in a fresh process; ``peak`` is the growth of the process's peak
resident memory over what it held after creating the inputs (CPU: its high-water mark reset
there, glibc's mmap threshold fixed, ``_common.peak_rss_env``), or
``torch.cuda.max_memory_allocated`` minus the inputs (CUDA). Time is the median of a few runs.
Writes benchmarks/results/chunked_<device>.json.

    python benchmarks/bench_chunked.py [--device cpu|cuda] [--contexts 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from _common import (
    machine,
    peak_rss_bytes,
    peak_rss_env,
    print_table,
    reset_peak_rss,
    write_json,
)

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 9, 3, 64, 512
PROVIDERS = ("reference", "chunked", "torch")


def _run(provider: str, context: int, device: str, repeats: int) -> dict:
    from tqai.attention import attention_reference
    from tqai.chunked_attention import chunked_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, context, HEAD_DIM, generator=g).to(device)
    k = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g).to(device)
    v = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g).to(device)
    scale = HEAD_DIM**-0.5
    mask = torch.ones(context, context, dtype=torch.bool, device=device).tril()[None, None]

    def call() -> torch.Tensor:
        if provider == "reference":
            return attention_reference(q, k, v, scale=scale, mask=mask)
        if provider == "chunked":
            return chunked_attention(q, k, v, scale=scale, mask=mask, chunk_size=CHUNK)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        )

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # the inputs' creation may have peaked higher than they hold
        base = peak_rss_bytes()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = call()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        provider, context = args.child[0], int(args.child[1])
        print(json.dumps(_run(provider, context, args.device, args.repeats)))
        return
    rows = []
    for context in args.contexts:
        for provider in PROVIDERS:
            cmd = [sys.executable, __file__, "--device", args.device, "--repeats",
                   str(args.repeats), "--child", provider, str(context)]  # fmt: skip
            done = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env=peak_rss_env()
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"provider": provider, "context": context, "chunk": CHUNK, **r})
            print(rows[-1], flush=True)
    info = machine()
    if args.device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(0)
    print_table(
        f"causal prefill attention, one layer ({HEADS} q heads, {KV_HEADS} kv heads, d={HEAD_DIM})"
        f", {args.device}",
        ["provider", "context", "ms", "peak MiB"],
        [[r["provider"], r["context"], r["seconds"] * 1e3, r["peak_bytes"] / 2**20] for r in rows],
    )
    name = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(0).lower()
    name = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    write_json(f"chunked_{name}.json", {"machine": info, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()

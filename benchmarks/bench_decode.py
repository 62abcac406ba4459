"""Decode attention, one layer-step: PyTorch SDPA over bf16 K/V vs tqai over packed codes.

Shape of issue 5's reference measurement: batch 1, one query token, 32 query heads, 8 KV heads,
head_dim 128, bf16, contexts 4K/32K/128K. Providers:

- ``torch``: ``scaled_dot_product_attention`` over the full bf16 cache (GQA, no repeat);
- ``reference``: tqai's core attention from the packed codes (``KVStore.attend``, torch ops,
  chunked online softmax, K4/V2) - the reference the fused kernels must match;
- ``triton``: the fused decode kernel (``tqai_torch.kernels.triton.decode_attention``, CUDA).

Also reports the bytes each provider's cache holds and the effective read bandwidth. Writes
benchmarks/results/decode_<device>.json and prints the table.

    python benchmarks/bench_decode.py [--contexts 4096 32768 131072] [--device cuda]
"""

from __future__ import annotations

import argparse
import re

import torch
from _common import machine, print_table, write_json

from tqai.kvstore import KVCacheConfig, KVStore

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _time(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    import time

    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits-k", type=int, default=4)
    parser.add_argument("--bits-v", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--block-n", type=int, default=None, help="triton: tokens per block")
    parser.add_argument("--no-json", action="store_true", help="print only (tuning runs)")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    rows = []
    for context in args.contexts:
        k = torch.randn(1, KV_HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
        sdpa = _time(
            lambda k=k, v=v, q=q: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, enable_gqa=True
            ),
            device,
            args.repeat,
        )
        base_bytes = 2 * k.numel() * k.element_size()
        store = KVStore(KVCacheConfig(bits_k=args.bits_k, bits_v=args.bits_v))
        for start in range(0, context, 8192):
            store.update(k[:, :, start : start + 8192], v[:, :, start : start + 8192])
            store.commit()
        del k, v
        ours = _time(
            lambda store=store, q=q: store.attend(q, scale=HEAD_DIM**-0.5, mask=None),
            device,
            max(3, args.repeat // 4),
        )
        ours_bytes = sum(store.nbytes().values())
        measured = [("torch", sdpa, base_bytes), ("reference", ours, ours_bytes)]
        if device == "cuda":
            from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

            inputs = store.attention_inputs()
            fused = _time(
                lambda q=q, inputs=inputs: decode_attention_triton(
                    q, scale=HEAD_DIM**-0.5, block_n=args.block_n, **inputs
                ),
                device,
                args.repeat,
            )
            measured.append(("triton", fused, ours_bytes))
        for provider, seconds, held in measured:
            rows.append(
                {
                    "provider": provider,
                    "config": "bf16" if provider == "torch" else f"K{args.bits_k}/V{args.bits_v}",
                    "context": context,
                    "seconds": seconds,
                    "cache_bytes": held,
                    "gb_per_s": held / seconds / 1e9,
                }
            )
        del store
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {r["context"]: r["seconds"] for r in rows if r["provider"] == "torch"}
    info = machine()
    card = torch.cuda.get_device_name() if device == "cuda" else info["cpu"]
    info["device"] = card
    print_table(
        f"decode attention, 1 query, {Q_HEADS}/{KV_HEADS} heads x {HEAD_DIM}, on {card}",
        ["provider", "config", "context", "us", "cache MiB", "GB/s", "vs torch"],
        [
            [
                r["provider"],
                r["config"],
                r["context"],
                f"{r['seconds'] * 1e6:.1f}",
                f"{r['cache_bytes'] / 2**20:.1f}",
                f"{r['gb_per_s']:.0f}",
                f"{base[r['context']] / r['seconds']:.3f}x",
            ]
            for r in rows
        ],
    )
    if args.no_json:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    write_json(f"decode_{slug}.json", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()

"""Chunk attention over a compressed history: where the fused prefill kernel pays.

A chunk of ``C`` new query tokens (a chat turn, a speculative-decoding check, a prompt fed in
chunks) attends to a packed K4/V2 history of ``T`` tokens plus itself, causally. Providers:

- ``torch``: SDPA over the bf16 history + chunk (what an uncompressed cache runs);
- ``reference``: tqai's core attention from the packed codes (``compressed_attention``, what
  ``KVStore.attend`` runs: the history dequantized block by block, online softmax, torch ops);
- ``triton``: the fused kernel (``tqai_torch.kernels.triton.prefill_attention``: the decode
  kernel with one row per query token, the history shared).

Shape: batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16. The fused kernel re-reads the
history for every query token, so its time grows with ``C``; the reference's grows much less:
the table says where they cross (the cache uses the kernel up to that chunk size).

Writes benchmarks/results/prefill_<card>.json and prints the table (CUDA only).

    python benchmarks/bench_prefill.py [--contexts 4096 32768] [--chunks 4 16 64 256]
"""

from __future__ import annotations

import argparse
import re

import torch
from _common import machine, print_table, write_json
from bench_decode import HEAD_DIM, KV_HEADS, Q_HEADS, _time

from tqai.attention import compressed_attention
from tqai.kvstore import KVCacheConfig, KVStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the fused kernel is CUDA-only)")
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    torch.manual_seed(0)
    scale = HEAD_DIM**-0.5
    rows = []
    for context in args.contexts:
        k = torch.randn(1, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        store = KVStore(KVCacheConfig(bits_k=4, bits_v=2))
        for start in range(0, context, 8192):
            store.update(k[:, :, start : start + 8192], v[:, :, start : start + 8192])
            store.commit()
        for chunk in args.chunks:
            q = torch.randn(1, Q_HEADS, chunk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            kc = torch.randn(1, KV_HEADS, chunk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            kv_len = context + chunk
            causal = (
                torch.arange(kv_len, device="cuda")[None, :]
                <= torch.arange(context, kv_len, device="cuda")[:, None]
            )[None, None]
            full_k, full_v = torch.cat([k, kc], 2), torch.cat([v, kc], 2)
            sdpa = _time(
                lambda q=q, a=full_k, b=full_v, m=causal: (
                    torch.nn.functional.scaled_dot_product_attention(
                        q, a, b, attn_mask=m, enable_gqa=True
                    )
                ),
                "cuda",
                args.repeat,
            )

            trial = store.__deepcopy__({})
            trial.update(kc, kc)  # staged: the suffix ends with the chunk, as in the cache
            inputs = trial.attention_inputs()
            ref = _time(
                lambda q=q, m=causal, i=inputs: compressed_attention(q, scale=scale, mask=m, **i),
                "cuda",
                max(3, args.repeat // 3),
            )
            fused = _time(
                lambda q=q, i=inputs: prefill_attention_triton(q, scale=scale, **i),
                "cuda",
                args.repeat,
            )
            del trial, inputs
            for provider, seconds in (("torch", sdpa), ("reference", ref), ("triton", fused)):
                rows.append(
                    {"provider": provider, "context": context, "chunk": chunk, "seconds": seconds}
                )
        del k, v, store
        torch.cuda.empty_cache()
    info = machine()
    card = torch.cuda.get_device_name()
    info["device"] = card
    base = {(r["context"], r["chunk"]): r["seconds"] for r in rows if r["provider"] == "torch"}
    print_table(
        f"chunk attention over a K4/V2 history, {Q_HEADS}/{KV_HEADS} heads x {HEAD_DIM}, on {card}",
        ["provider", "context", "chunk", "us", "vs torch"],
        [
            [
                r["provider"],
                r["context"],
                r["chunk"],
                f"{r['seconds'] * 1e6:.1f}",
                f"{base[(r['context'], r['chunk'])] / r['seconds']:.3f}x",
            ]
            for r in rows
        ],
    )
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    write_json(f"prefill_{slug}.json", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()

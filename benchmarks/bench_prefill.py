"""Chunk attention over a compressed history: where the fused prefill kernel pays.

A chunk of ``C`` new query tokens (a chat turn, a speculative-decoding check, a prompt fed in
chunks) attends to a packed K4/V2 history of ``T`` tokens plus itself, causally. Providers:

- ``torch``: SDPA over the bf16 history + chunk with the causal mask (what an uncompressed
  cache runs);
- ``reference``: tqai's core attention from the packed codes (``compressed_attention``, what
  ``KVStore.attend`` runs: the history dequantized block by block, online softmax, torch ops);
- ``triton``: ``tqai_torch.kernels.triton.prefill_attention`` as the cache calls it
  (``method="auto"``: the tiled kernel, or the per-row path for chunks of few query rows);
- ``tiled``: the tiled kernel forced (each history block read once per tile of query rows);
- ``rows``: the per-row path forced (the decode kernel with one row per query token: the
  history read once per token, split over programs).

Each kernel's output is checked against the reference (relative L2 error, ``rel_err`` in the
JSON) wherever the reference runs (``--reference-max-chunk``).

Shape: batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16. ``--sweep`` also times the
tiled kernel at several ``(block_m, block_n, num_warps)`` settings (providers
``tiled m{block_m}-n{block_n}-w{num_warps}``).

Writes benchmarks/results/prefill_<card>.json and prints the table (CUDA only).

    python benchmarks/bench_prefill.py [--contexts 4096 32768] [--chunks 4 16 64 256 1024 4096]
        [--providers torch reference triton tiled rows] [--sweep]
"""

from __future__ import annotations

import argparse
import re

import torch
from _common import machine, print_table, write_json
from bench_decode import HEAD_DIM, KV_HEADS, Q_HEADS, _time

from tqai.attention import compressed_attention
from tqai.kvstore import KVCacheConfig, KVStore

PROVIDERS = ("torch", "reference", "triton", "tiled", "rows")
SWEEP = ((64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8), (64, 64, 8), (128, 128, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument(
        "--reference-max-chunk",
        type=int,
        default=4096,
        help="longest chunk the (slow) reference is run and checked against",
    )
    parser.add_argument("--sweep", action="store_true", help="time tiled block settings too")
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
            trial = store.__deepcopy__({})
            trial.update(kc, kc)  # staged: the suffix ends with the chunk, as in the cache
            inputs = trial.attention_inputs()
            timed = {}  # provider -> (seconds, output or None)
            if "torch" in args.providers:
                full_k, full_v = torch.cat([k, kc], 2), torch.cat([v, kc], 2)
                timed["torch"] = (
                    _time(
                        lambda q=q, a=full_k, b=full_v, m=causal: (
                            torch.nn.functional.scaled_dot_product_attention(
                                q, a, b, attn_mask=m, enable_gqa=True
                            )
                        ),
                        "cuda",
                        args.repeat,
                    ),
                    None,
                )
                del full_k, full_v
            ref = None
            if "reference" in args.providers and chunk <= args.reference_max_chunk:

                def run_ref(q=q, m=causal, i=inputs):
                    return compressed_attention(q, scale=scale, mask=m, **i)

                timed["reference"] = (_time(run_ref, "cuda", max(3, args.repeat // 3)), None)
                ref = run_ref().float()
            kernels = {
                "triton": {},
                "tiled": {"method": "tiled"},
                "rows": {"method": "rows"},
            }
            kernels = {n: o for n, o in kernels.items() if n in args.providers}
            if args.sweep:
                for bm, bn, nw in SWEEP:
                    kernels[f"tiled m{bm}-n{bn}-w{nw}"] = {
                        "method": "tiled",
                        "block_m": bm,
                        "block_n": bn,
                        "num_warps": nw,
                    }
            for name, options in kernels.items():

                def run(q=q, i=inputs, o=options):
                    return prefill_attention_triton(q, scale=scale, **i, **o)

                timed[name] = (_time(run, "cuda", args.repeat), run())
            for provider, (seconds, out) in timed.items():
                row = {"provider": provider, "context": context, "chunk": chunk}
                row["seconds"] = seconds
                if out is not None and ref is not None:
                    row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
                rows.append(row)
            del trial, inputs, timed, ref
            torch.cuda.empty_cache()
        del k, v, store
        torch.cuda.empty_cache()
    info = machine()
    card = torch.cuda.get_device_name()
    info["device"] = card
    base = {(r["context"], r["chunk"]): r["seconds"] for r in rows if r["provider"] == "torch"}

    def versus(r: dict) -> str:
        t = base.get((r["context"], r["chunk"]))
        return "-" if t is None else f"{t / r['seconds']:.3f}x"

    print_table(
        f"chunk attention over a K4/V2 history, {Q_HEADS}/{KV_HEADS} heads x {HEAD_DIM}, on {card}",
        ["provider", "context", "chunk", "us", "vs torch", "rel err"],
        [
            [
                r["provider"],
                r["context"],
                r["chunk"],
                f"{r['seconds'] * 1e6:.1f}",
                versus(r),
                f"{r['rel_err']:.1e}" if "rel_err" in r else "-",
            ]
            for r in rows
        ],
    )
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    write_json(f"prefill_{slug}.json", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()

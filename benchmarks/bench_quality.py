"""Perplexity of the real SmolLM2-135M on Shakespeare, every scored token read through the cache.

Each window of ``--context`` tokens: the first half is prefilled into the cache, the second half
is scored in chunks of 128 tokens, each attending to history as the cache holds it (see
tqai_torch.evaluate). Configs: baseline, K8/V8, K4/V4, K4/V2, K3/V2, K2/V2, K4/V2+qjl, and the
peer transformers ``QuantizedCache`` (fp8 backend; quanto/hqq are not installed here). Writes
benchmarks/results/quality.json rows {"model", "config", "ppl", "baseline_ppl",
"kv_bits_per_coord"} (bits counted from the bytes the cache really holds) and prints the table.

    python benchmarks/bench_quality.py [--context 2048] [--windows 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, print_table, write_json

from tqai.assets import shakespeare_text
from tqai_torch.evaluate import parse_config, perplexity
from tqai_torch.models import load_model

CONFIGS = ["baseline", "K8/V8", "K4/V4", "K4/V2", "K3/V2", "K2/V2", "K4/V2+qjl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--no-peer", action="store_true", help="skip the QuantizedCache peer")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenizer(shakespeare_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows, base = [], None
    runs = [(c, None) for c in args.configs]
    if not args.no_peer:
        from transformers import QuantizedCache

        runs.append(
            ("QuantizedCache fp8", lambda: QuantizedCache(backend="fp8", config=model.config))
        )
    for name, factory in runs:
        config = parse_config("baseline" if factory is not None else name)
        start = time.perf_counter()
        r = perplexity(
            model, ids, config, context=args.context, max_windows=args.windows, make_cache=factory
        )
        if base is None:
            base = r["ppl"]
        rows.append(
            {
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)",
                "config": name,
                "ppl": r["ppl"],
                "baseline_ppl": base,
                "kv_bits_per_coord": r["kv_bits_per_coord"],
                "tokens_scored": r["tokens"],
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"{name}: ppl {r['ppl']:.4f} ({r['kv_bits_per_coord']:.2f} bits/coord)", flush=True)
    info = machine()
    print_table(
        f"SmolLM2-135M perplexity, Shakespeare, {args.windows} x {args.context} tokens "
        "(second half of each window scored through the cache)",
        ["config", "ppl", "vs baseline", "KV bits/coord"],
        [
            [
                r["config"],
                f"{r['ppl']:.3f}",
                f"{100 * (r['ppl'] / r['baseline_ppl'] - 1):+.2f}%",
                f"{r['kv_bits_per_coord']:.2f}",
            ]
            for r in rows
        ],
    )
    write_json(
        "quality.json",
        {"machine": info, "context": args.context, "windows": args.windows, "rows": rows},
    )


if __name__ == "__main__":
    main()

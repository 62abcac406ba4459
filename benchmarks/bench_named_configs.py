"""Perplexity cost of each named config on the real SmolLM2-135M, scored through the cache.

The named configs (tqai.named_configs) compress the KV cache and, for all but kv-only, the hidden
states between decoder layers and/or the FFN activations (quantize-dequantize with TurboQuant_mse,
tqai.activations). Perplexity is measured as in bench_fidelity.py (tqai_torch.evaluate): the
first half of each window is prefilled, the rest scored in chunks of 128 tokens that the cache
compresses before attention reads them (each token sees what token-by-token decoding would), with
the activation hooks active for every forward pass. Writes benchmarks/results/named_configs.json.

    python benchmarks/bench_named_configs.py [--context 1024] [--windows 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, print_table, write_json

from tqai.assets import shakespeare_text
from tqai.named_configs import NAMED_CONFIGS
from tqai_torch.evaluate import parse_config, perplexity
from tqai_torch.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["baseline", *NAMED_CONFIGS])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenizer(shakespeare_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows, base = [], None
    for name in args.configs:
        config = parse_config(name)
        start = time.perf_counter()
        r = perplexity(model, ids, config, context=args.context, max_windows=args.windows)
        base = r["ppl"] if base is None else base
        named = NAMED_CONFIGS.get(name)
        rows.append(
            {
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)",
                "config": name,
                "kv": "fp32"
                if named is None
                else f"K{named.bits_k}/V{named.bits_v} residual{config.residual_window}",
                "hidden_bits": None if named is None else named.hidden_bits,
                "ffn_bits": None if named is None else named.ffn_bits,
                "ppl": r["ppl"],
                "baseline_ppl": base,
                "kv_bits_per_coord": r["kv_bits_per_coord"],
                "tokens_scored": r["tokens"],
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"{name}: ppl {r['ppl']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(
        f"SmolLM2-135M perplexity per named config, {args.windows} x {args.context} tokens",
        ["config", "KV", "hidden", "FFN", "ppl", "vs baseline"],
        [
            [
                r["config"],
                r["kv"],
                r["hidden_bits"] or "-",
                r["ffn_bits"] or "-",
                f"{r['ppl']:.3f}",
                f"{100 * (r['ppl'] / r['baseline_ppl'] - 1):+.2f}%",
            ]
            for r in rows
        ],
    )
    write_json(
        "named_configs.json",
        {"machine": machine(), "context": args.context, "windows": args.windows, "rows": rows},
    )


if __name__ == "__main__":
    main()

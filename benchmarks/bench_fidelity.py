"""Fidelity ablation: perplexity through the real cache, each coding option alone and combined.

Real SmolLM2-135M and Gemma-3-270M (fetched from PyPI packages, see tqai.assets) on the
Shakespeare text. Each window of ``--context`` tokens: the first ``--prefix`` tokens are
prefilled into the cache, the rest is scored in chunks that are committed before attention reads
them, so every scored token sees exactly what token-by-token decoding would: its last
``residual_window`` tokens and itself in full precision, everything older from the codes
(``KVStore.quantize_staged``; a core test checks the equality with decoding step by step).

Bits per coordinate are counted from the bytes the compressed layers use (codes, norms, sinks,
window, fitted statistics) over the coordinates they represent, with the full-precision sink and
window tokens at 16 bits as a bfloat16 model holds them (the model runs in float32 here for
exact CPU arithmetic; ``bits_per_coord_fp32_run`` is what this run held); Gemma-3's sliding-window layers
are not compressed (exact) and not counted. The KIVI-style peer (benchmarks/_kivi.py) is counted
from its format. Rows are merged into benchmarks/results/fidelity.json by (model, config,
context): {"model", "config", "context", "bits_per_coord", "ppl", "baseline_ppl", ...}.

    python benchmarks/bench_fidelity.py --model smollm2-135m --context 4096 --prefix 3584
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import RESULTS, machine, print_table, write_json
from _kivi import KiviCache

from tqai.assets import shakespeare_text
from tqai_torch.evaluate import parse_config, perplexity
from tqai_torch.models import load_model

ABLATION = [
    "baseline",
    "K4/V2 sinks0",
    "K4/V2",
    "K4/V2 center-k",
    "K4/V2 center-v",
    "K4/V2 center",
    "K4/V2 balance",
    "K4.5/V2",
    "K4/V2.5",
    "K4/V2+qjl",
    "K4/V2 residual32",
    "K4/V2 center residual32",
    "K4/V3 center residual32",
    "K4/V4 residual32",
    "kivi K3/V2",
    "kivi K4/V3",
    "kivi K4/V4",
]
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}


def _run(model, tokenizer, ids, name: str, args) -> dict:
    bos = tokenizer.bos_token_id if "gemma" in model.config.model_type else None
    common = {
        "context": args.context,
        "prefix": args.prefix,
        "chunk": args.chunk,
        "max_windows": args.windows,
        "bos_token_id": bos,
    }
    if name.startswith("kivi "):
        spec = parse_config(name.removeprefix("kivi "))
        bits = (int(spec.bits_k), int(spec.bits_v))
        return perplexity(
            model,
            ids,
            parse_config("baseline"),
            make_cache=lambda: KiviCache(model.config, *bits),
            **common,
        )
    return perplexity(model, ids, parse_config(name), **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=None, help="default: context // 2")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=ABLATION)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    ids = tokenizer(shakespeare_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    path = RESULTS / "fidelity.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
    label = MODELS[args.model]
    prefix = args.prefix or args.context // 2
    configs = ["baseline", *[c for c in args.configs if c != "baseline"]]
    if "baseline" not in args.configs:  # reuse a stored baseline of the same windows
        stored = [
            r["ppl"]
            for r in payload["rows"]
            if (r["model"], r["config"], r["context"], r["prefix"])
            == (label, "baseline", args.context, prefix)
        ]
        if stored:
            base, configs = stored[0], configs[1:]
    rows = []
    for name in configs:
        start = time.perf_counter()
        r = _run(model, tokenizer, ids, name, args)
        if name == "baseline":
            base = r["ppl"]
        row = {
            "model": label,
            "config": name,
            "context": args.context,
            "prefix": prefix,
            # as a bfloat16 model holds it (this fp32 run holds sinks/window at 32 bits)
            "bits_per_coord": r["kv_bits_per_coord_16"],
            "bits_per_coord_fp32_run": r["kv_bits_per_coord"],
            "ppl": r["ppl"],
            "baseline_ppl": base,
            "tokens_scored": r["tokens"],
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"{label} ctx {args.context} {name:28s} ppl {r['ppl']:.4f} "
            f"({100 * (r['ppl'] / base - 1):+.2f}%) bits {row['bits_per_coord']:.3f}",
            flush=True,
        )
        keys = {(x["model"], x["config"], x["context"]) for x in rows}
        if path.exists():  # merge with what other runs wrote meanwhile
            payload = json.loads(path.read_text())
        kept = [x for x in payload["rows"] if (x["model"], x["config"], x["context"]) not in keys]
        payload = {"machine": machine(), "rows": kept + rows}
        write_json("fidelity.json", payload)
    print_table(
        f"{label} perplexity through the cache, Shakespeare, {args.windows} x {args.context} "
        f"tokens (last {args.context - prefix} of each scored)",
        ["config", "bits/coord", "ppl", "vs baseline"],
        [
            [
                r["config"],
                f"{r['bits_per_coord']:.2f}",
                f"{r['ppl']:.3f}",
                f"{100 * (r['ppl'] / r['baseline_ppl'] - 1):+.2f}%",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()

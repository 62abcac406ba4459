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

Per-layer widths: a config ending in ``fisher`` (half-bit grid) or ``fisher-int`` (whole bits)
spreads its K and V widths over the compressed layers by each layer's Fisher information times
its states' energy, from a ``tqai calibrate`` file given with ``--fisher``
(:func:`tqai.layer_bits.fisher_layer_bits`); ``fisher-grad`` / ``fisher-grad-int`` by the Fisher
information alone. The mean width per stream stays the config's; the row records the widths.

    python benchmarks/bench_fidelity.py --model smollm2-135m --context 4096 --prefix 3584
    # benchmarks/calibration/smollm2_fisher.json was made so (works the benchmark never scores):
    tqai calibrate --model smollm2-135m --plays twelfth_night,as_you_like_it --samples 8 \
        --max-tokens 512 -o benchmarks/calibration/smollm2_fisher.json
    python benchmarks/bench_fidelity.py --fisher benchmarks/calibration/smollm2_fisher.json \
        --configs "K4/V2 residual32 fisher"
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import RESULTS, machine, print_table, write_json
from _kivi import KiviCache

from tqai.assets import shakespeare_text
from tqai.layer_bits import fisher_layer_bits
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
    "K4.25/V3.25 center-k residual32",
    "kivi K3/V2",
    "kivi K4/V3",
    "kivi K4/V4",
]
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}


# config suffix -> (sensitivity weight, width step of the grid)
FISHER_GRIDS = {
    "fisher": ("fisher_energy", 0.5),
    "fisher-int": ("fisher_energy", 1),
    "fisher-grad": ("fisher", 0.5),
    "fisher-grad-int": ("fisher", 1),
}


def _config(model, name: str, fisher: Path | None):
    """The evaluated ``CacheConfig`` of a row name; a ``FISHER_GRIDS`` suffix spreads the widths
    over the compressed layers by the Fisher file (same mean width per stream)."""
    words = name.split()
    grids = [w for w in words if w in FISHER_GRIDS]
    if not grids:
        return parse_config(name)
    if fisher is None:
        raise SystemExit(f"config {name!r} spreads widths by Fisher information: give --fisher")
    from tqai.pipeline.scorers.fisher_static import FisherCalibration

    base = parse_config(" ".join(w for w in words if w not in FISHER_GRIDS))
    text = model.config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    weight, step = FISHER_GRIDS[grids[-1]]
    pairs = fisher_layer_bits(
        FisherCalibration.load(fisher),
        base.bits_k,
        base.bits_v,
        layers=full,
        weight=weight,
        step=step,
    )
    return replace(base, layer_bits=tuple(pairs), label=name)


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
    return perplexity(model, ids, _config(model, name, args.fisher), **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=None, help="default: context // 2")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=ABLATION)
    parser.add_argument(
        "--fisher",
        type=Path,
        default=None,
        help="tqai calibrate file for configs ending in fisher[-int] / fisher-grad[-int]",
    )
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
            "windows": args.windows,
            "seconds": time.perf_counter() - start,
        }
        if FISHER_GRIDS.keys() & set(name.split()):
            layer_bits = _config(model, name, args.fisher).layer_bits
            row["layer_bits"] = [None if p is None else list(p) for p in layer_bits]
            row["fisher_file"] = args.fisher.name
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

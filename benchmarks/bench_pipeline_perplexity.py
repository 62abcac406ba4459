"""Pipeline strategies on a real model: score-routed tiered widths vs plain TurboQuant, perplexity.

Real SmolLM2-135M on the Shakespeare text, measured as bench_fidelity measures (decode-exact:
each window's first ``--prefix`` tokens are prefilled, the rest is scored in chunks committed
before attention reads them, so every scored token sees what token-by-token decoding would).

Configs at matched budgets (the pipeline's ``tiered`` strategy uses widths ``n_bits + 1`` and
``n_bits - 1`` of each stream's base width, one width per token, see
:mod:`tqai.pipeline.strategies.tiered`):

- plain ``K4/V2`` and ``K3/V3``: 3.0 code bits per coordinate on average;
- ``tiered`` at 25% high on base K4/V3 (keys 5|3 bits, values 4|2 bits: 3.5 and 2.5 on average)
  and at 50% high on base K4/V2 (keys 5|3, values 3|1: 4 and 2): 3.0 code bits as well;
- plain ``K4/V3`` (3.5 code bits) as the next budget up.

Scorers: ``palm`` (EMA novelty), ``fisher_static`` (offline Fisher weights per layer and head,
from ``tqai calibrate --skip-tokens N`` where N is every token the windows score, so the
calibration never sees the scored text) and the runtime ``fisher`` proxy (token energy) as a
control. Bits per coordinate count every byte the compressed layers hold (codes, norms, the
uint8 ``tier_of`` width map of tiered caches, sinks and window at 16 bits as a bfloat16 model
holds them). ``high share`` is the share of history tokens stored at the high width. Each
window starts from a fresh cache and a reset pipeline. Rows are merged into
benchmarks/results/pipeline_perplexity.json by (model, config, context, residual_window).

    python benchmarks/bench_pipeline_perplexity.py --context 1024 --windows 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, machine, print_table, write_json

import tqai_torch
from tqai.assets import shakespeare_text
from tqai_torch.evaluate import CacheConfig, parse_config, perplexity
from tqai_torch.models import load_model

MODEL = "SmolLM2-135M"
PLAIN = [("K4/V2", 4, 2), ("K3/V3", 3, 3), ("K4/V3", 4, 3)]
TIERED = [(0.25, 4, 3), (0.5, 4, 2)]  # (fraction, base bits_k, base bits_v)
SCORERS = ["palm", "fisher_static", "fisher"]


def _calibration(skip: int) -> Path:
    """The Fisher calibration file, written by ``tqai calibrate`` on text not scored here."""
    path = RESULTS / "calibration" / f"fisher_smollm2-135m_skip{skip}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        command = [
            str(Path(sys.executable).parent / "tqai"),
            "calibrate",
            "--model",
            "smollm2-135m",
            "--output",
            str(path),
            "--skip-tokens",
            str(skip),
        ]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    return path


def _configs(calibration: Path) -> list[dict]:
    out = [
        {"config": name, "bits_k": k, "bits_v": v, "scorer": None, "fraction": None}
        for name, k, v in PLAIN
    ]
    for scorer in SCORERS:
        for fraction, k, v in TIERED:
            pipeline = {
                "scorer": scorer,
                "strategy": "tiered",
                "strategy_kwargs": {"fraction": fraction},
            }
            if scorer == "fisher_static":
                pipeline["scorer_kwargs"] = {"path": str(calibration)}
            widths = f"K{k + 1}|{k - 1} V{v + 1}|{v - 1}"
            out.append(
                {
                    "config": f"{scorer}+tiered {fraction:.0%} {widths}",
                    "bits_k": k,
                    "bits_v": v,
                    "scorer": scorer,
                    "fraction": fraction,
                    "pipeline": pipeline,
                }
            )
    return out


def _high_share(cache) -> tuple[float | None, float | None]:
    """Share of history tokens at each stream's high width (None for plain caches)."""
    shares = []
    for stream in (0, 1):
        high = total = 0
        for idx in cache.compressed_layers:
            store = cache.layers[idx].store
            if not store.tiers:
                return None, None
            top = max(spec[stream].n_bits for spec in store.tiers)
            for spec, tier in store.tiers.items():
                total += tier.length
                high += tier.length if spec[stream].n_bits == top else 0
        shares.append(high / total if total else None)
    return shares[0], shares[1]


def _run(model, ids, spec: dict, args) -> dict:
    tqai_torch.patch(
        model,
        bits_k=spec["bits_k"],
        bits_v=spec["bits_v"],
        sink_tokens=4,
        residual_window=args.residual_window,
        pipeline=spec.get("pipeline"),
    )
    caches = []

    def make_cache():
        cache = tqai_torch.new_cache(model)
        if cache.pipeline is not None:
            cache.pipeline.reset()  # every window starts afresh, as the plain caches do
        caches.append(cache)
        return cache

    try:
        result = perplexity(
            model,
            ids,
            CacheConfig(bits_k=spec["bits_k"], bits_v=spec["bits_v"], label=spec["config"]),
            context=args.context,
            prefix=args.prefix,
            chunk=args.chunk,
            max_windows=args.windows,
            make_cache=make_cache,
        )
    finally:
        tqai_torch.unpatch(model)
    result["high_share_k"], result["high_share_v"] = _high_share(caches[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=None, help="default: context // 2")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--residual-window", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="config names to run")
    args = parser.parse_args()
    args.prefix = args.prefix or args.context // 2
    torch.set_grad_enabled(False)
    calibration = _calibration(skip=args.context * args.windows)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenizer(shakespeare_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    path = RESULTS / "pipeline_perplexity.json"
    stored = json.loads(path.read_text())["rows"] if path.exists() else []
    same = [
        r["baseline_ppl"]
        for r in stored
        if (r["context"], r["prefix"], r["tokens_scored"])
        == (args.context, args.prefix, args.windows * (args.context - args.prefix))
    ]
    if same:  # the uncompressed baseline of these windows does not depend on the config
        base = same[0]
        print(f"baseline ppl {base:.4f} (stored)", flush=True)
    else:
        start = time.perf_counter()
        base = perplexity(
            model,
            ids,
            parse_config("baseline"),
            context=args.context,
            prefix=args.prefix,
            chunk=args.chunk,
            max_windows=args.windows,
        )["ppl"]
        print(f"baseline ppl {base:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    rows = []
    for spec in _configs(calibration):
        if args.only and spec["config"] not in args.only:
            continue
        start = time.perf_counter()
        r = _run(model, ids, spec, args)
        row = {
            "model": MODEL,
            "context": args.context,
            "prefix": args.prefix,
            "residual_window": args.residual_window,
            "config": spec["config"],
            "scorer": spec["scorer"],
            "fraction": spec["fraction"],
            "bits_k": spec["bits_k"],
            "bits_v": spec["bits_v"],
            "bits_per_coord": r["kv_bits_per_coord_16"],
            "ppl": r["ppl"],
            "baseline_ppl": base,
            "high_share_k": r["high_share_k"],
            "high_share_v": r["high_share_v"],
            "tokens_scored": r["tokens"],
            "calibration": (
                str(calibration.relative_to(RESULTS)) if spec["scorer"] == "fisher_static" else None
            ),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"{spec['config']:36s} ppl {r['ppl']:.4f} ({100 * (r['ppl'] / base - 1):+.2f}%) "
            f"bits {row['bits_per_coord']:.3f} high share K {row['high_share_k']} "
            f"V {row['high_share_v']} ({row['seconds']:.1f} s)",
            flush=True,
        )
        keys = {(x["model"], x["config"], x["context"], x["residual_window"]) for x in rows}
        payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
        kept = [
            x
            for x in payload["rows"]
            if (x["model"], x["config"], x["context"], x["residual_window"]) not in keys
        ]
        write_json("pipeline_perplexity.json", {"machine": machine(), "rows": kept + rows})
    print_table(
        f"{MODEL} perplexity, pipeline tiered vs plain, Shakespeare, {args.windows} x "
        f"{args.context} tokens (last {args.context - args.prefix} scored), window "
        f"{args.residual_window}",
        ["config", "bits/coord", "ppl", "vs baseline", "high share K", "high share V"],
        [
            [
                r["config"],
                f"{r['bits_per_coord']:.3f}",
                f"{r['ppl']:.3f}",
                f"{100 * (r['ppl'] / r['baseline_ppl'] - 1):+.2f}%",
                "-" if r["high_share_k"] is None else f"{r['high_share_k']:.3f}",
                "-" if r["high_share_v"] is None else f"{r['high_share_v']:.3f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()

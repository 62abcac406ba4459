"""One self-contained HTML page from benchmarks/results/*.json: plots and tables.

Sections: quality vs bits (perplexity through the cache, named configs, codec distortion), memory
vs context (CPU and CUDA), attention speed vs context per card (decode step, chunked prefill),
pipeline NMSE, codec throughput. Plots are drawn with matplotlib (Agg) and embedded as base64
PNG ``<img>`` elements; the page loads nothing else (no scripts, fonts or styles from outside),
so it can be opened from disk or attached anywhere. Every plot and table names the machine its
numbers came from. A results file that is absent leaves its section out; an unknown one gets a
plain table.

    python benchmarks/report.py [--results DIR] [--output build/report/index.html]
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent
Row = dict[str, Any]

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
figure { margin: 1em 0; } img.plot { max-width: 100%; border: 1px solid #eee; }
figcaption, p.machine { color: #555; font-size: 0.85em; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value)


def table(columns: Sequence[tuple[str, Callable[[Row], Any]]], rows: Sequence[Row]) -> str:
    """An HTML table; numbers right-aligned, text left-aligned."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    body = []
    for row in rows:
        cells = []
        for _, get in columns:
            value = get(row)
            cls = "" if isinstance(value, int | float) else ' class="text"'
            cells.append(f"<td{cls}>{html.escape(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _key(name: str) -> Callable[[Row], Any]:
    return lambda row: row.get(name)


def figure(fig: Any, caption: str, ident: str) -> str:
    """``fig`` as an embedded PNG ``<figure>`` (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><img class="plot" id="{ident}" alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption>'
        "</figure>"
    )


def machine(doc: Any) -> str:
    """A one-line description of where a results file was measured."""
    m = doc.get("machine") if isinstance(doc, dict) else None
    if not isinstance(m, dict):
        return ""
    where = m.get("device") or m.get("cpu")
    parts = [str(where)] if where else []
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    parts.extend(str(m[key]) for key in ("os", "python", "date") if m.get(key))
    return f'<p class="machine">Measured on: {html.escape(", ".join(parts))}.</p>'


def _rows(doc: Any) -> list[Row]:
    rows = doc.get("rows", []) if isinstance(doc, dict) else doc
    return [r for r in rows if isinstance(r, dict)]


def _change(row: Row) -> Any:
    ppl, base = row.get("ppl"), row.get("baseline_ppl")
    return None if ppl is None or not base else f"{100 * (ppl / base - 1):+.2f}%"


# ---- sections -------------------------------------------------------------------------------
def section_quality(docs: dict[str, Any]) -> str:
    parts = []
    doc = docs.get("quality")
    if doc is not None:
        rows = _rows(doc)
        fig, ax = plt.subplots(figsize=(7, 4))
        for row in rows:
            ax.scatter(row["kv_bits_per_coord"], row["ppl"])
            ax.annotate(row["config"], (row["kv_bits_per_coord"], row["ppl"]), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV bits per coordinate (bytes the cache holds)")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity through the cache vs KV bits")
        ax.grid(alpha=0.3)
        parts.append(figure(fig, "Perplexity vs KV bits per coordinate", "plot-quality"))
        parts.append(
            table(
                [
                    ("config", _key("config")),
                    ("KV bits/coord", _key("kv_bits_per_coord")),
                    ("perplexity", _key("ppl")),
                    ("change", _change),
                ],
                rows,
            )
        )
        parts.append(machine(doc))
    doc = docs.get("named_configs")
    if doc is not None:
        rows = _rows(doc)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [r["config"] for r in rows]
        ax.bar(names, [r["ppl"] for r in rows], color="#4c72b0")
        ax.set_ylabel("perplexity")
        ax.set_title("Named configs: KV + activation compression")
        ax.tick_params(axis="x", rotation=30)
        parts.append(figure(fig, "Perplexity per named config", "plot-named-configs"))
        parts.append(
            table(
                [
                    ("config", _key("config")),
                    ("KV", _key("kv")),
                    ("hidden bits", lambda r: r.get("hidden_bits") or "-"),
                    ("FFN bits", lambda r: r.get("ffn_bits") or "-"),
                    ("perplexity", _key("ppl")),
                    ("change", _change),
                ],
                rows,
            )
        )
        parts.append(machine(doc))
    doc = docs.get("distortion")
    if doc is not None:
        rows = [r for r in _rows(doc) if r.get("quantizer") == "mse"]
        fig, ax = plt.subplots(figsize=(7, 4))
        by_rotation = defaultdict(list)
        for r in rows:
            by_rotation[r["rotation"]].append(r)
        for rotation, rs in by_rotation.items():
            rs.sort(key=lambda r: r["bits"])
            ax.plot([r["bits"] for r in rs], [r["measured"] for r in rs], "o-", label=rotation)
        if rows:
            ref = sorted({(r["bits"], r["theory"], r["lower_bound"]) for r in rows})
            ax.plot([b for b, _, _ in ref], [t for _, t, _ in ref], "k--", label="theory")
            ax.plot([b for b, _, _ in ref], [lb for _, _, lb in ref], "k:", label="4^-b bound")
        ax.set_yscale("log")
        ax.set_xlabel("bits per coordinate")
        ax.set_ylabel("MSE distortion")
        ax.set_title("TurboQuant_mse distortion vs bits (d=128)")
        ax.legend()
        ax.grid(alpha=0.3)
        parts.append(figure(fig, "Codec distortion vs bits", "plot-distortion"))
        parts.append(machine(doc))
    return _section("Quality vs bits", parts)


def section_memory(docs: dict[str, Any]) -> str:
    parts = []
    for name, title in (("memory", "CPU"), ("memory_cuda", "CUDA")):
        doc = docs.get(name)
        if doc is None:
            continue
        rows = _rows(doc)
        fig, ax = plt.subplots(figsize=(7, 4))
        by_config = defaultdict(list)
        for r in rows:
            by_config[r["config"]].append(r)
        base = sorted({(r["context"], r["baseline_cache_bytes"]) for r in rows})
        ax.plot([c for c, _ in base], [b / 2**20 for _, b in base], "k--", label="baseline")
        for config, rs in by_config.items():
            rs.sort(key=lambda r: r["context"])
            ax.plot([r["context"] for r in rs], [r["cache_bytes"] / 2**20 for r in rs], "o-",
                    label=config)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("cache MiB")
        ax.set_title(f"KV cache bytes held vs context ({title})")
        ax.legend()
        ax.grid(alpha=0.3)
        parts.append(figure(fig, f"Memory vs context, {title}", f"plot-{name}"))
        parts.append(
            table(
                [
                    ("context", _key("context")),
                    ("config", _key("config")),
                    ("cache MiB", lambda r: r["cache_bytes"] / 2**20),
                    ("baseline MiB", lambda r: r["baseline_cache_bytes"] / 2**20),
                    ("peak MiB", lambda r: r["peak_bytes"] / 2**20),
                    ("baseline peak MiB", lambda r: r["baseline_peak_bytes"] / 2**20),
                ],
                rows,
            )
        )
        parts.append(machine(doc))
    return _section("Memory vs context", parts)


def _speed_plot(doc: Any, name: str, title: str, ylabel: str, scale: float, key: str) -> str:
    rows = _rows(doc)
    fig, ax = plt.subplots(figsize=(7, 4))
    by_provider = defaultdict(list)
    for r in rows:
        by_provider[r["provider"]].append(r)
    for provider, rs in by_provider.items():
        rs.sort(key=lambda r: r["context"])
        ax.plot([r["context"] for r in rs], [r[key] * scale for r in rs], "o-", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return figure(fig, title, f"plot-{name}")


def section_speed(docs: dict[str, Any]) -> str:
    parts = []
    for name in sorted(n for n in docs if n.startswith("decode_")):
        doc = docs[name]
        card = (doc.get("machine") or {}).get("device") or name.removeprefix("decode_")
        parts.append(f"<h3>Decode step, {html.escape(str(card))}</h3>")
        parts.append(_speed_plot(doc, name, f"Decode attention per step ({card})",
                                 "microseconds", 1e6, "seconds"))  # fmt: skip
        parts.append(
            table(
                [
                    ("provider", _key("provider")),
                    ("config", _key("config")),
                    ("context", _key("context")),
                    ("microseconds", lambda r: r["seconds"] * 1e6),
                    ("cache MiB", lambda r: r["cache_bytes"] / 2**20),
                ],
                _rows(doc),
            )
        )
        parts.append(machine(doc))
    for name in sorted(n for n in docs if n.startswith("attention_")):
        doc = docs[name]
        rows = _rows(doc)
        card = (rows[0].get("card") if rows else None) or name.removeprefix("attention_")
        parts.append(f"<h3>Decode attention vs SDPA, {html.escape(str(card))}</h3>")
        for batch in sorted({r["batch"] for r in rows}):
            rs = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
            fig, ax = plt.subplots(figsize=(7, 4))
            sdpa = sorted({(r["context"], r["sdpa_us"]) for r in rs})
            ax.plot([c for c, _ in sdpa], [u for _, u in sdpa], "k--o", label="SDPA bf16")
            for config in sorted({r["config"] for r in rs}):
                cs = [r for r in rs if r["config"] == config]
                ax.plot([r["context"] for r in cs], [r["tqai_us"] for r in cs], "o-",
                        label=f"tqai {config}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("microseconds per layer call")
            ax.set_title(f"Decode attention, batch {batch} ({card})")
            ax.legend()
            ax.grid(alpha=0.3)
            caption = f"Decode attention vs SDPA, batch {batch}, {card}"
            parts.append(figure(fig, caption, f"plot-{name}-b{batch}"))
        parts.append(
            table(
                [
                    ("config", _key("config")),
                    ("batch", _key("batch")),
                    ("context", _key("context")),
                    ("SDPA us", _key("sdpa_us")),
                    ("tqai us", _key("tqai_us")),
                    ("speedup", lambda r: f"{r['sdpa_us'] / r['tqai_us']:.2f}x"),
                ],
                rows,
            )
        )
        parts.append(machine(doc))
    for name in sorted(n for n in docs if n.startswith("chunked_")):
        doc = docs[name]
        card = (doc.get("machine") or {}).get("device") or doc.get("device") or name
        parts.append(f"<h3>Chunked prefill attention, {html.escape(str(card))}</h3>")
        parts.append(_speed_plot(doc, name, f"Causal prefill attention, one layer ({card})",
                                 "milliseconds", 1e3, "seconds"))  # fmt: skip
        parts.append(
            table(
                [
                    ("provider", _key("provider")),
                    ("context", _key("context")),
                    ("ms", lambda r: r["seconds"] * 1e3),
                    ("peak MiB", lambda r: r["peak_bytes"] / 2**20),
                ],
                _rows(doc),
            )
        )
        parts.append(machine(doc))
    return _section("Attention speed vs context, per card", parts)


def section_pipeline(docs: dict[str, Any]) -> str:
    doc = docs.get("pipeline")
    if doc is None:
        return ""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in _rows(doc):
        if r.get("baseline_nmse"):
            groups[(r["scorer"], r["strategy"])].append(r["nmse"] / r["baseline_nmse"])
    summary = [
        {"scorer": s, "strategy": t, "mean": sum(v) / len(v), "best": min(v), "worst": max(v)}
        for (s, t), v in groups.items()
    ]
    strategies = sorted({r["strategy"] for r in summary})
    scorers = sorted({r["scorer"] for r in summary})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(scorers))
    for i, scorer in enumerate(scorers):
        values = {r["strategy"]: r["mean"] for r in summary if r["scorer"] == scorer}
        xs = [j + i * width for j in range(len(strategies))]
        ax.bar(xs, [values.get(s, float("nan")) for s in strategies], width, label=scorer)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(strategies))], strategies)
    ax.set_ylabel("NMSE / plain TurboQuant_mse")
    ax.set_title("Pipeline strategies: NMSE relative to plain quantization (mean over profiles)")
    ax.legend(fontsize=8)
    parts = [
        figure(fig, "Pipeline NMSE per scorer and strategy", "plot-pipeline"),
        table(
            [
                ("scorer", _key("scorer")),
                ("strategy", _key("strategy")),
                ("NMSE / plain (mean)", _key("mean")),
                ("best", _key("best")),
                ("worst", _key("worst")),
            ],
            summary,
        ),
        machine(doc),
    ]
    return _section("Pipeline NMSE", parts)


def section_other(docs: dict[str, Any], known: set[str]) -> str:
    parts = []
    for name in sorted(set(docs) - known):
        rows = _rows(docs[name])
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(table([(k, _key(k)) for k in keys], rows))
        parts.append(machine(docs[name]))
    return _section("Other results", parts)


def _section(title: str, parts: list[str]) -> str:
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def render(results: Path) -> str:
    """The whole page for the results folder ``results``."""
    docs = {}
    for path in sorted(results.glob("*.json")):
        docs[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    if not docs:
        raise ValueError(f"no results (*.json) in {results}")
    known = {"quality", "named_configs", "distortion", "memory", "memory_cuda", "pipeline"}
    known |= {n for n in docs if n.startswith(("decode_", "chunked_", "attention_"))}
    body = [
        section_quality(docs),
        section_memory(docs),
        section_speed(docs),
        section_pipeline(docs),
        section_other(docs, known),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>tqai benchmark report</title>"
        f"<style>{_STYLE}</style></head><body><h1>tqai benchmark report</h1>"
        f"<p>Generated from {len(docs)} results files in benchmarks/results.</p>"
        f"{''.join(body)}</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--output", type=Path, default=ROOT.parent / "build/report/index.html")
    args = parser.parse_args(argv)
    page = render(args.results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output} ({len(page) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

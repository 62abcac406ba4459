"""Regenerate the results tables of README.md from benchmarks/results/*.json.

Each table lives between two marker comments named after a results file's stem::

    <!-- results:distortion:start -->
    (generated: do not edit by hand)
    <!-- results:distortion:end -->

Only the text between markers is rewritten; the rest of the README is left byte for byte. Known
files have their own renderer (``distortion``, ``codec_*``, ``fidelity``, ``qjl``, ``memory``, ...); any other
file gets a generic table whose columns are the row keys. Every table is followed by the machine
the numbers came from, when the file records one.

Usage::

    python scripts/update_readme.py            # rewrite README.md, print what changed
    python scripts/update_readme.py --check    # exit 1 if README.md is out of date
    python scripts/update_readme.py --readme PATH --results DIR

Exit status 1 also when the README has a marker for a results file that does not exist, or a
start marker without its end marker. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RENDERERS", "main", "render", "update"]

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.\-]+):(?P<kind>start|end) -->")

Row = dict[str, Any]
# A column: (header, function of the row giving the cell, right-aligned).
Column = tuple[str, Callable[[Row], Any], bool]


class ReadmeError(Exception):
    """The README or a results file cannot be processed."""


def _num(value: Any, digits: int = 4) -> str:
    """Format a cell: floats to ``digits`` significant digits, big numbers with separators."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10_000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _cell(value: Any) -> str:
    return _num(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    head = "| " + " | ".join(name for name, _, _ in columns) + " |"
    rule = "| " + " | ".join("---:" if right else "---" for _, _, right in columns) + " |"
    body = ["| " + " | ".join(_cell(get(row)) for _, get, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _key(name: str) -> Callable[[Row], Any]:
    return lambda row: row.get(name)


def _varying(rows: Sequence[Row], *names: str) -> list[Column]:
    """Columns for keys that take more than one value across the rows (else they add nothing)."""
    return [
        (name, _key(name), False)
        for name in names
        if len({json.dumps(row.get(name), sort_keys=True) for row in rows}) > 1
    ]


def _mib(name: str) -> Callable[[Row], Any]:
    def get(row: Row) -> Any:
        value = row.get(name)
        return None if value is None else value / 2**20

    return get


def _ratio(num: str, den: str) -> Callable[[Row], Any]:
    def get(row: Row) -> Any:
        a, b = row.get(num), row.get(den)
        return None if a is None or not b else a / b

    return get


def _machine(doc: Any) -> str:
    """One line naming the machine the numbers came from ("" if the file records none)."""
    machine = doc.get("machine") if isinstance(doc, dict) else None
    if not isinstance(machine, dict):
        return ""
    parts = []
    if machine.get("gpu"):
        parts.append(str(machine["gpu"]))
    if machine.get("cpu"):
        cores = machine.get("cores")
        parts.append(f"{machine['cpu']}" + (f" ({cores} cores)" if cores else ""))
    parts.extend(str(machine[k]) for k in ("os",) if machine.get(k))
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("date"):
        parts.append(str(machine["date"]))
    return "Measured on: " + ", ".join(parts) + "." if parts else ""


def _rows(doc: Any) -> list[Row]:
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReadmeError("expected a JSON list of row objects, or an object with a 'rows' list")
    return rows


def render_distortion(doc: Any) -> str:
    """Distortion of the quantizers: measured vs theory, the paper's value and the lower bound."""
    rows = _rows(doc)
    columns: list[Column] = [
        ("quantizer", _key("quantizer"), False),
        ("rotation", _key("rotation"), False),
        ("d", _key("d"), True),
        ("bits", _key("bits"), True),
        ("measured", _key("measured"), True),
        ("theory", _key("theory"), True),
        ("paper", _key("paper"), True),
        ("lower bound", _key("lower_bound"), True),
    ]
    note = f"{_num(doc['n_vectors'])} vectors per row." if "n_vectors" in doc else ""
    return _join(_table(columns, rows), note, _machine(doc))


def render_codec(doc: Any) -> str:
    """Codec throughput: vectors encoded and decoded per second, per namespace."""
    rows = _rows(doc)
    columns: list[Column] = [
        *_varying(rows, "provider"),
        ("namespace", _key("namespace"), False),
        ("rotation", _key("rotation"), False),
        *[(n, _key(n), True) for n, _, _ in _varying(rows, "d")],
        ("bits", _key("bits"), True),
        ("encode vectors/s", _key("encode_vectors_per_s"), True),
        ("decode vectors/s", _key("decode_vectors_per_s"), True),
    ]
    return _join(_table(columns, rows), _machine(doc))


def _change(row: Row) -> Any:
    ppl, base = row.get("ppl"), row.get("baseline_ppl")
    return None if ppl is None or not base else f"{100 * (ppl / base - 1):+.2f}%"


# The fidelity goal (issue 4): at this context, within +max_change% at <= bits per coordinate,
# and ahead of the KIVI-style peer at the same budget.
FIDELITY_GOALS = ((4096, 3.5, 2.0), (4096, 4.5, 0.5))


def _pct(row: Row) -> float:
    return 100 * (row["ppl"] / row["baseline_ppl"] - 1)


def _described(row: Row | None) -> str:
    if row is None:
        return "not measured"
    return f"{row['config']}: {_pct(row):+.2f}% at {row['bits_per_coord']:.2f} bits"


def _goal_rows(rows: Sequence[Row]) -> list[Row]:
    """Per model and goal: the best measured tqai config within the budget, the KIVI-style peer
    at the budget, and whether the goal is met (within the change and ahead of the peer)."""
    out = []
    for model in sorted({r.get("model", "") for r in rows}):
        for context, budget, limit in FIDELITY_GOALS:
            fits = [
                r
                for r in rows
                if (r.get("model"), r.get("context")) == (model, context)
                and r.get("config") != "baseline"
                and r.get("bits_per_coord", math.inf) <= budget + 1e-9
            ]
            ours = [r for r in fits if not r["config"].startswith("kivi ")]
            peers = [r for r in fits if r["config"].startswith("kivi ")]
            best = min(ours, key=_pct, default=None)
            peer = max(peers, key=lambda r: r["bits_per_coord"], default=None)
            met = best is not None and _pct(best) <= limit
            ahead = best is not None and (peer is None or _pct(best) < _pct(peer))
            out.append(
                {
                    "model": model,
                    "goal": f"<= {budget:g} bits, <= +{limit:g}% at {context}",
                    "best tqai": _described(best),
                    "KIVI-style peer": _described(peer),
                    "met": "yes" if met and ahead else "no",
                }
            )
    return out


def render_fidelity(doc: Any) -> str:
    """Perplexity through the cache per model, context and configuration, against baseline;
    then the goal status, derived from the same rows."""
    rows = sorted(
        _rows(doc),
        key=lambda r: (
            r.get("model", ""),
            r.get("context", 0),
            r.get("config") != "baseline",
            r.get("config", "").startswith("kivi "),
            r.get("bits_per_coord", 0),
            r.get("config", ""),
        ),
    )
    columns: list[Column] = [
        ("model", _key("model"), False),
        ("context", _key("context"), True),
        ("config", _key("config"), False),
        ("bits/coord", _key("bits_per_coord"), True),
        ("perplexity", _key("ppl"), True),
        ("baseline", _key("baseline_ppl"), True),
        ("change", _change, True),
    ]
    goals = [(n, _key(n), False) for n in ("model", "goal", "best tqai", "KIVI-style peer", "met")]
    status = "Goal status (best measured row within the budget; met = within the change and ahead "
    status += "of the KIVI-style peer at that budget):"
    return _join(_table(columns, rows), status, _table(goals, _goal_rows(rows)), _machine(doc))


def render_qjl(doc: Any) -> str:
    """Score bias, score noise and attention error of MSE vs QJL keys at equal widths."""
    columns: list[Column] = [
        ("keys", _key("quantizer"), False),
        ("bits", _key("bits"), True),
        ("score slope", _key("score_slope"), True),
        ("score noise / spread", _key("score_noise"), True),
        ("attention output error", _key("attention_error"), True),
    ]
    return _join(_table(columns, _rows(doc)), _machine(doc))


def render_memory(doc: Any) -> str:
    """Cache bytes and peak memory per context length and configuration, against the baseline."""
    rows = _rows(doc)
    columns: list[Column] = [
        *[(n, _key(n), False) for n, _, _ in _varying(rows, "device")],
        ("context", _key("context"), True),
        ("config", _key("config"), False),
        ("cache MiB", _mib("cache_bytes"), True),
        ("baseline cache MiB", _mib("baseline_cache_bytes"), True),
        ("cache ratio", _ratio("cache_bytes", "baseline_cache_bytes"), True),
        ("peak MiB", _mib("peak_bytes"), True),
        ("baseline peak MiB", _mib("baseline_peak_bytes"), True),
    ]
    return _join(_table(columns, rows), _machine(doc))


def render_pipeline(doc: Any) -> str:
    """Pipeline NMSE: per (scorer, strategy), the mean over profiles of NMSE / plain NMSE."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in _rows(doc):
        groups.setdefault((str(row.get("scorer")), str(row.get("strategy"))), []).append(row)
    summary = []
    for (scorer, strategy), rows in groups.items():
        ratios = [r["nmse"] / r["baseline_nmse"] for r in rows if r.get("baseline_nmse")]
        bits = [r["bits_per_coord"] for r in rows if r.get("bits_per_coord") is not None]
        summary.append(
            {
                "scorer": scorer,
                "strategy": strategy,
                "profiles": len(rows),
                "nmse_ratio": sum(ratios) / len(ratios) if ratios else None,
                "best": min(ratios) if ratios else None,
                "worst": max(ratios) if ratios else None,
                "bits": sum(bits) / len(bits) if bits else None,
            }
        )
    columns: list[Column] = [
        ("scorer", _key("scorer"), False),
        ("strategy", _key("strategy"), False),
        ("profiles", _key("profiles"), True),
        ("NMSE / plain (mean)", _key("nmse_ratio"), True),
        ("best", _key("best"), True),
        ("worst", _key("worst"), True),
        ("bits/coord", _key("bits"), True),
    ]
    note = "Below 1 is better than plain TurboQuant_mse at the same base bits."
    return _join(_table(columns, summary), note, _machine(doc))


def render_pipeline_perplexity(doc: Any) -> str:
    """Real-model perplexity of pipeline (tiered) caches against plain widths, per budget."""
    rows = sorted(_rows(doc), key=lambda r: (r.get("context", 0), r.get("residual_window", 0)))

    def share(name: str) -> Callable[[Row], Any]:
        return lambda r: "-" if r.get(name) is None else f"{r[name]:.3f}"

    columns: list[Column] = [
        ("context", _key("context"), True),
        ("window", _key("residual_window"), True),
        ("config", _key("config"), False),
        ("bits/coord", _key("bits_per_coord"), True),
        ("perplexity", _key("ppl"), True),
        ("baseline", _key("baseline_ppl"), True),
        ("change", _change, True),
        ("high share K", share("high_share_k"), True),
        ("high share V", share("high_share_v"), True),
    ]
    models = {str(r.get("model")) for r in rows}
    note = f"Model: {models.pop()}." if len(models) == 1 and rows and rows[0].get("model") else ""
    return _join(_table(columns, rows), note, _machine(doc))


def _speed_vs_torch(rows: Sequence[Row], keys: tuple[str, ...] = ("context",)) -> Callable:
    """A column: torch SDPA's seconds for the row's ``keys`` (its context, ...) over the row's."""
    base = {
        tuple(r.get(k) for k in keys): r["seconds"] for r in rows if r.get("provider") == "torch"
    }

    def speed(row: Row) -> Any:
        ref = base.get(tuple(row.get(k) for k in keys))
        return None if not ref else f"{ref / row['seconds']:.3g}x"

    return speed


def _card(doc: Any) -> str:
    device = doc.get("machine", {}).get("device") if isinstance(doc, dict) else None
    return f"Card: {device}." if device else ""


def render_decode(doc: Any) -> str:
    """Decode attention per layer-step: microseconds, bytes held, speed relative to torch SDPA."""
    rows = _rows(doc)
    speed = _speed_vs_torch(rows)
    columns: list[Column] = [
        ("provider", _key("provider"), False),
        ("config", _key("config"), False),
        ("context", _key("context"), True),
        ("microseconds", lambda r: r["seconds"] * 1e6, True),
        ("cache MiB", _mib("cache_bytes"), True),
        ("speed vs torch SDPA", speed, True),
    ]
    return _join(_table(columns, rows), _card(doc), _machine(doc))


def render_vae_memory(doc: Any) -> str:
    """VAE decode peak memory per video size, baseline vs ``optimize_vae_memory``."""
    rows = _rows(doc)
    base = {r["frames"]: r["peak_bytes"] for r in rows if r.get("config") == "baseline"}

    def reduction(row: Row) -> Any:
        ref = base.get(row.get("frames"))
        return None if not ref or not row.get("peak_bytes") else f"{ref / row['peak_bytes']:.3g}x"

    columns: list[Column] = [
        ("frames", _key("frames"), True),
        ("size", lambda r: f"{r.get('height')}x{r.get('width')}", False),
        ("config", _key("config"), False),
        ("peak MiB", _mib("peak_bytes"), True),
        ("reduction", reduction, True),
        ("seconds", _key("seconds"), True),
    ]
    notes = [f"{k}: {doc[k]}." for k in ("vae", "peak") if isinstance(doc, dict) and doc.get(k)]
    return _join(_table(columns, rows), " ".join(notes), _machine(doc))


def render_video(doc: Any) -> str:
    """Video generation per model and config: time, speed-up, memory, final-latent error."""
    rows = _rows(doc)
    columns: list[Column] = [
        ("model", _key("model"), False),
        ("config", _key("config"), False),
        ("seconds", _key("seconds"), True),
        ("speed-up", _key("speedup"), True),
        ("peak MiB", _mib("peak_bytes"), True),
        ("final-latent rel. error", _key("rel_error"), True),
        ("K/V bits/coord", _key("bits_per_coord"), True),
        ("reused", _key("reuse"), True),
    ]
    note = str(doc.get("note", "")) if isinstance(doc, dict) else ""
    note = f"{note.rstrip('.')}." if note else ""
    device = doc.get("machine", {}).get("device") if isinstance(doc, dict) else None
    card = f"Device: {device}." if device else ""
    return _join(_table(columns, rows), " ".join(p for p in (note, card) if p), _machine(doc))


def render_prefill(doc: Any) -> str:
    """Chunk attention over a compressed history: microseconds and speed vs torch SDPA."""
    rows = _rows(doc)
    columns: list[Column] = [
        ("provider", _key("provider"), False),
        ("history", _key("context"), True),
        ("chunk", _key("chunk"), True),
        ("us", lambda r: r["seconds"] * 1e6, True),
        ("speed vs torch SDPA", _speed_vs_torch(rows, ("context", "chunk")), True),
    ]
    if any("rel_err" in row for row in rows):  # runs since the tiled kernel check their output
        columns.append(("rel. error vs reference", _key("rel_err"), True))
    return _join(_table(columns, rows), _card(doc), _machine(doc))


def render_chunked(doc: Any) -> str:
    """Chunked attention vs plain attention vs fused SDPA: milliseconds and peak memory."""
    rows = _rows(doc)
    speed = _speed_vs_torch(rows)
    columns: list[Column] = [
        ("provider", _key("provider"), False),
        ("context", _key("context"), True),
        ("ms", lambda r: r["seconds"] * 1e3, True),
        ("peak MiB", _mib("peak_bytes"), True),
        ("speed vs torch SDPA", speed, True),
    ]
    return _join(_table(columns, rows), _card(doc), _machine(doc))


def render_named_configs(doc: Any) -> str:
    """Perplexity per named config (KV + activation compression) against the baseline."""
    rows = _rows(doc)
    columns: list[Column] = [
        ("config", _key("config"), False),
        ("KV", _key("kv"), False),
        ("hidden bits", lambda r: r.get("hidden_bits") or "-", True),
        ("FFN bits", lambda r: r.get("ffn_bits") or "-", True),
        ("perplexity", _key("ppl"), True),
        ("change", _change, True),
    ]
    models = {str(r.get("model")) for r in rows}
    note = f"Model: {models.pop()}." if len(models) == 1 and rows and rows[0].get("model") else ""
    return _join(_table(columns, rows), note, _machine(doc))


def render_attention(doc: Any) -> str:
    """Decode attention on a GPU (bench_attention): SDPA vs tqai per layer-call, GB/s, roofline."""
    rows = _rows(doc)
    roof = doc.get("copy_gbps") if isinstance(doc, dict) else None
    columns: list[Column] = [
        ("config", _key("config"), False),
        ("batch", _key("batch"), True),
        ("context", _key("context"), True),
        ("SDPA bf16 us", lambda r: r["sdpa_us"], True),
        ("tqai us", lambda r: r["tqai_us"], True),
        ("speedup", _speedup("sdpa_us", "tqai_us"), True),
        ("tqai GB/s", lambda r: round(r["tqai_gbps"]), True),
    ]
    if roof:
        columns.append(
            ("% of copy roofline", lambda r: f"{100 * r['tqai_gbps'] / roof:.0f}%", True)
        )
    if any("tqai_after_us" in r for r in rows):
        columns += [
            ("SDPA us, after a writer", _key("sdpa_after_us"), True),
            ("tqai us, after a writer", _key("tqai_after_us"), True),
            ("speedup, after a writer", _speedup("sdpa_after_us", "tqai_after_us"), True),
        ]
    card = rows[0].get("card") if rows else None
    notes = []
    if card:
        notes.append(f"Card: {card}.")
    if isinstance(doc, dict) and doc.get("method"):
        roof_note = f" Roofline: device-to-device copy, {roof:.0f} GB/s." if roof else ""
        notes.append(f"Timing: {doc['method']}.{roof_note}")
    if isinstance(doc, dict) and doc.get("segments"):
        notes.append(f"Segments: {doc['segments']}.")
    return _join(_table(columns, rows), " ".join(notes), _machine(doc))


def _speedup(num: str, den: str) -> Callable[[Row], Any]:
    return lambda r: None if r.get(den) is None else f"{r[num] / r[den]:.2f}x"


def _speed(name: str) -> Callable[[Row], Any]:
    return lambda r: None if r.get(name) is None else f"{r[name]:.2f}x"


def render_generate(doc: Any) -> str:
    """End-to-end greedy decode (bench_generate): ms/token, speed and peak memory vs baseline."""
    rows = _rows(doc)
    base = {r["context"]: r["ms_per_token"] for r in rows if r.get("config") == "baseline"}

    def speed(row: Row) -> Any:
        ref = base.get(row.get("context"))
        return None if not ref else f"{ref / row['ms_per_token']:.2f}x"

    def gib(name: str) -> Callable[[Row], Any]:
        return lambda r: None if r.get(name) is None else round(r[name], 2)

    columns: list[Column] = [
        ("config", _key("config"), False),
        ("context", _key("context"), True),
        ("batch", _key("batch"), True),
        ("ms/token", _key("ms_per_token"), True),
        ("tokens/s", _key("tokens_per_s"), True),
        ("speed vs baseline", speed, True),
        *(
            [
                ("interleaved ms/token", _key("interleaved_median_ms"), True),
                ("speed, interleaved", _speed("interleaved_speed"), True),
            ]
            if any("interleaved_median_ms" in r for r in rows)
            else []
        ),
        ("peak GiB", gib("peak_gib"), True),
        ("decode peak GiB", gib("decode_peak_gib"), True),
        ("cache MiB", _mib("cache_bytes"), True),
    ]
    notes = [_card(doc)]
    if isinstance(doc, dict):
        notes += [
            f"{k.capitalize()}: {doc[k]}." for k in ("model", "baseline", "method") if doc.get(k)
        ]
    return _join(_table(columns, rows), " ".join(n for n in notes if n), _machine(doc))


def render_generic(doc: Any) -> str:
    """Any other results file: one column per row key, in order of first appearance."""
    rows = _rows(doc)
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    columns: list[Column] = [
        (name, _key(name), any(isinstance(r.get(name), int | float) for r in rows))
        for name in names
    ]
    extras = []
    if isinstance(doc, dict):
        extras = [
            f"{k}: {_num(v)}"
            for k, v in doc.items()
            if k not in ("rows", "machine") and not isinstance(v, list | dict)
        ]
    note = "; ".join(extras) + "." if extras else ""
    return _join(_table(columns, rows), note, _machine(doc))


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


RENDERERS: dict[str, Callable[[Any], str]] = {
    "distortion": render_distortion,
    "codec_*": render_codec,
    "fidelity": render_fidelity,
    "qjl": render_qjl,
    "memory*": render_memory,
    "pipeline": render_pipeline,
    "pipeline_perplexity": render_pipeline_perplexity,
    "decode_*": render_decode,
    "vae_memory_*": render_vae_memory,
    "video_*": render_video,
    "chunked_*": render_chunked,
    "prefill_*": render_prefill,
    "named_configs": render_named_configs,
    "attention_*": render_attention,
    "generate_*": render_generate,
}
"""Renderer per results-file stem; a key ending in ``*`` matches stems with that prefix."""


def render(name: str, doc: Any) -> str:
    """The markdown for results file ``name`` (its stem), chosen from :data:`RENDERERS`."""
    for pattern, renderer in RENDERERS.items():
        if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
            return renderer(doc)
    return render_generic(doc)


def update(readme: str, results: Path) -> tuple[str, list[str], list[str]]:
    """Rewrite every marked section of ``readme`` from ``results``.

    Args:
        readme: The README text.
        results: The folder of ``NAME.json`` files.

    Returns:
        ``(new_text, changed, unchanged)``: the names of the sections whose text changed and of
        those already current.

    Raises:
        ReadmeError: A start marker lacks its end, a marker names a missing file, or a file
            cannot be read.
    """
    out: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    missing: list[str] = []
    pos = 0  # copied up to here
    while (start := MARKER.search(readme, pos)) is not None:
        name, kind = start["name"], start["kind"]
        if kind != "start":
            raise ReadmeError(f"end marker for {name!r} without a start marker")
        end_tag = f"<!-- results:{name}:end -->"
        end = readme.find(end_tag, start.end())
        if end < 0:
            raise ReadmeError(f"start marker for {name!r} without {end_tag}")
        out.append(readme[pos : start.end()])
        old = readme[start.end() : end]
        path = results / f"{name}.json"
        if not path.is_file():
            missing.append(name)
            new = old
        else:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                new = f"\n{render(name, doc)}\n"
            except (ValueError, ReadmeError) as exc:
                raise ReadmeError(f"{path}: {exc}") from exc
            (changed if new != old else unchanged).append(name)
        out.append(new + end_tag)
        pos = end + len(end_tag)
    out.append(readme[pos:])
    if missing:
        raise ReadmeError(
            "README has markers for results that do not exist in "
            f"{results}: {', '.join(f'{m}.json' for m in missing)}"
        )
    return "".join(out), changed, unchanged


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--check", action="store_true", help="exit 1 if README is out of date")
    args = parser.parse_args(argv)

    if not args.readme.is_file():
        print(f"error: {args.readme} does not exist", file=sys.stderr)
        return 1
    with open(args.readme, encoding="utf-8", newline="") as handle:  # keep line endings as-is
        text = handle.read()
    try:
        new, changed, unchanged = update(text, args.results)
    except ReadmeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sections = set(changed) | set(unchanged)
    unmarked = sorted(p.stem for p in args.results.glob("*.json") if p.stem not in sections)
    if args.check:
        if changed:
            print(f"{args.readme} is out of date: {', '.join(changed)}", file=sys.stderr)
            print("run: python scripts/update_readme.py", file=sys.stderr)
            return 1
        print(f"{args.readme} is up to date ({len(unchanged)} sections)")
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8", newline="") as handle:
            handle.write(new)
    for name in changed:
        print(f"updated: {name}")
    for name in unchanged:
        print(f"unchanged: {name}")
    for name in unmarked:
        print(f"not in README (no marker): {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

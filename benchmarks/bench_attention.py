"""Decode attention on a CUDA GPU: PyTorch SDPA over bf16 K/V vs tqai's fused Triton kernel.

Shape of issue 5: one query token per sequence, 32 query heads, 8 KV heads, head_dim 128, bf16,
contexts 4K..128K, batch 1 and 8; tqai configs K4/V2, K4/V4, K3/V2 (TurboQuant_mse, haar
rotations, fp16 norms; histories quantized by the core quantizer, the same codes a cache holds).

How it is timed (benchmarks/NOTES.md says why): a decode step runs attention once per layer,
each layer over its own cache, so the timed unit is a CUDA graph that calls the op over ``n``
different copies of the cache (``n`` chosen so that the copies together exceed the 50 MB L2
several times over), cycling over them to at least ``MIN_CALLS`` calls; the graph is replayed
and the time divided by the calls. Both providers are timed the same way, back to back and
after a small kernel writing the query (``*_after_us``: the (writer, call) pairs' graph minus
the writers'; back to back, tqai's fast path overlaps each call's staging with the previous
call's merge through programmatic dependent launch, which a model's own kernels do not
allow). Host (Python) overhead is not in these numbers; the eager per-call time of one call is
reported separately (``eager`` in the JSON).

The tqai calls carry what the cache passes: ``--sinks`` (4) full-precision tokens before the
packed history and ``--window`` (33: the 32-token window and the staged token) after it, bf16;
the history is the rest of the context, and SDPA reads the same number of tokens.

``tqai_gbps`` counts the bytes the kernel must read: packed codes and fp16 norms of K and V
(plus nothing else of size). The roofline is a device-to-device copy measured in the same run
(bytes read + written over time).

Also the encode throughput, core quantizer vs the fused Triton encode (K and V of one decode-sized and one
prefill-sized append). Writes ``benchmarks/results/attention_<card>.json``; prints the table.

    python benchmarks/bench_attention.py [--contexts 4096 ...] [--batches 1 8] [--tune]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import re

import torch
from _common import machine, print_table, write_json

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention
from tqai.container import QuantizedTensor
from tqai_torch.patching import patch

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CONFIGS = {"K4/V2": (4, 2), "K4/V4": (4, 4), "K3/V2": (3, 2)}
L2_BYTES = 50 * 2**20
TARGET_BYTES = 8 * L2_BYTES  # copies of a cache per timed graph: at least this much in total
# calls per timed graph (cycling over the copies): a replay's own launch latency, counted once
# per replay, stays a small share of each call (a graph of one call counted it whole)
MIN_CALLS = 32


def _events_ms(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def graph_us(calls: list, replays: int = 20) -> float:
    """Median microseconds per call of ``calls`` (each a no-arg fn) run back to back in a graph."""
    for fn in calls:  # warm-up: compile, allocate workspaces outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
        with torch.cuda.graph(graph, stream=stream):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    per_replay = _events_ms(graph.replay, replays)
    return _median(per_replay) * 1e3 / len(calls)


def cycle(copies: list) -> list:
    """The copies repeated in turn to at least MIN_CALLS entries (one timed graph's calls)."""
    return [copies[i % len(copies)] for i in range(max(len(copies), MIN_CALLS))]


def after_writer_us(calls: list, writers: list) -> float:
    """Median microseconds per call of ``calls`` when each follows a small kernel that writes
    its query (as a model's RoPE does): the graph of (writer, call) pairs minus the graph of the
    writers alone. Back-to-back calls of one kernel can overlap (programmatic dependent launch:
    the fast path stages its constants during the previous call's merge); after a foreign
    kernel they cannot, so this is the time a call costs inside a model's step."""
    pairs = [lambda w=w, c=c: (w(), c()) for w, c in zip(writers, calls, strict=True)]
    return graph_us(pairs) - graph_us(writers)


def eager_us(calls: list, repeat: int = 30) -> float:
    """Median microseconds of one call launched from Python (host overhead included)."""
    times = []
    for i in range(repeat):
        fn = calls[i % len(calls)]
        times += _events_ms(fn, 1)
    return _median(times) * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median(_events_ms(lambda: dst.copy_(src), 20))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def quantize_chunked(quantizer, x: torch.Tensor, chunk: int = 16384) -> QuantizedTensor:
    """Core quantizer over ``(B, H, T, D)`` in token chunks (bounded temporary memory)."""
    parts = [quantizer.quantize(x[:, :, s : s + chunk]) for s in range(0, x.shape[2], chunk)]
    packed = torch.cat([p.packed for p in parts], 2)
    norms = torch.cat([p.norms for p in parts], 2)
    return QuantizedTensor(
        spec=quantizer.spec, shape=tuple(norms.shape), dtype=parts[0].dtype,
        packed=packed, norms=norms,
    )  # fmt: skip


def clone_qt(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(
        spec=qt.spec, shape=qt.shape, dtype=qt.dtype, packed=qt.packed.clone(),
        norms=qt.norms.clone(),
    )  # fmt: skip


def qt_bytes(qt: QuantizedTensor) -> int:
    return qt.packed.numel() + qt.norms.numel() * qt.norms.element_size()


# what the cache holds in full precision by default (tqai_torch.patch): its sink tokens, and
# its window plus the token being decoded (staged)
_PATCH_DEFAULTS = inspect.signature(patch).parameters
SINKS = _PATCH_DEFAULTS["sink_tokens"].default
WINDOW = _PATCH_DEFAULTS["residual_window"].default + 1


def tokens_per_split(context: int, batch: int, per_sm: float, block_n: int) -> int:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    want = max(1, math.ceil(per_sm * sms / (batch * KV_HEADS)))
    return max(4 * block_n, math.ceil(context / want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--tune", action="store_true", help="sweep block/warps/splits, no JSON")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU times (tune runs)")
    parser.add_argument(
        "--sinks", type=int, default=SINKS, help="full-precision tokens before the history"
    )
    parser.add_argument(
        "--window", type=int, default=WINDOW, help="full-precision tokens after the history"
    )
    args = parser.parse_args()
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    roof = copy_bandwidth()
    print(f"{card}: device-to-device copy {roof:.0f} GB/s (read + write)")
    scale = HEAD_DIM**-0.5
    quantizers = {}
    for bits in {b for c in args.configs for b in CONFIGS[c]}:
        quantizers[("k", bits)] = TurboQuantMSE(HEAD_DIM, bits, seed=0)
        quantizers[("v", bits)] = TurboQuantMSE(HEAD_DIM, bits, seed=1)
    rows, eager, checks, tune_rows = [], [], [], []
    for batch in args.batches:
        for context in args.contexts:
            shape = (batch, KV_HEADS, context, HEAD_DIM)
            k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            qs = [
                torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                for _ in range(4)
            ]
            sources = [q.clone() for q in qs]  # the writers' inputs (a kernel, not a memcpy)
            writes = [
                lambda q=qs[i % 4], src=sources[i % 4]: torch.mul(src, 1.0, out=q)
                for i in range(max(64, MIN_CALLS))
            ]
            kv_bytes = 2 * k.numel() * k.element_size()
            n = max(1, min(32, math.ceil(TARGET_BYTES / kv_bytes)))
            copies = [(k, v)] + [(k.clone(), v.clone()) for _ in range(n - 1)]
            sdpa_calls = [
                lambda q=qs[i % 4], kk=kk, vv=vv: torch.nn.functional.scaled_dot_product_attention(
                    q, kk, vv, enable_gqa=True
                )
                for i, (kk, vv) in enumerate(cycle(copies))
            ]
            sdpa = graph_us(sdpa_calls)
            sdpa_after = after_writer_us(sdpa_calls, writes[: len(sdpa_calls)])
            sdpa_eager = eager_us(sdpa_calls)
            del copies, sdpa_calls
            # what the cache passes: sinks and the window + staged tokens in full precision
            stop = context - args.window
            segments = {
                "prefix": (k[:, :, : args.sinks].clone(), v[:, :, : args.sinks].clone()),
                "suffix": (k[:, :, stop:].clone(), v[:, :, stop:].clone()),
            }
            codes = {}
            for name in args.configs:
                bk, bv = CONFIGS[name]
                if ("k", bk) not in codes:
                    codes[("k", bk)] = quantize_chunked(
                        quantizers[("k", bk)], k[:, :, args.sinks : stop]
                    )
                if ("v", bv) not in codes:
                    codes[("v", bv)] = quantize_chunked(
                        quantizers[("v", bv)], v[:, :, args.sinks : stop]
                    )
            del k, v
            torch.cuda.empty_cache()
            for name in args.configs:
                bk, bv = CONFIGS[name]
                kq, vq = quantizers[("k", bk)], quantizers[("v", bv)]
                keys, values = codes[("k", bk)], codes[("v", bv)]
                nbytes = qt_bytes(keys) + qt_bytes(values)
                n = max(1, min(64, math.ceil(TARGET_BYTES / nbytes)))
                hist = [(keys, values)] + [(clone_qt(keys), clone_qt(values)) for _ in range(n - 1)]
                if batch == 1 and context == min(args.contexts):
                    ref = compressed_attention(
                        qs[0].float(), keys, values, kq, vq, scale=scale, **segments
                    )
                    out = decode_attention_triton(
                        qs[0], keys, values, kq, vq, scale=scale, **segments
                    )
                    rel = ((out.float() - ref).norm() / ref.norm()).item()
                    checks.append({"config": name, "context": context, "rel_err": rel})
                settings = [(None, None, None)]  # the library's defaults
                if args.tune:
                    settings = [
                        (bn, nw, ps) for bn in (64, 128) for nw in (4, 8) for ps in (2.0, 4.0)
                    ]
                for block_n, warps, per_sm in settings:
                    tps = (
                        None
                        if per_sm is None
                        else tokens_per_split(context, batch, per_sm, block_n)
                    )
                    options = {
                        "scale": scale,
                        "block_n": block_n,
                        "tokens_per_split": tps,
                        **segments,
                    }
                    calls = [
                        functools.partial(
                            decode_attention_triton,
                            qs[i % 4],
                            kk,
                            vv,
                            kq,
                            vq,
                            num_warps=warps,
                            **options,
                        )
                        for i, (kk, vv) in enumerate(cycle(hist))
                    ]
                    ours = graph_us(calls)
                    if args.profile and (block_n, warps, per_sm) == settings[0]:
                        profile_kernels(calls, f"{name} batch {batch} context {context}")
                    if args.tune:
                        tune_rows.append(
                            [name, batch, context, block_n, warps, per_sm, f"{ours:.1f}",
                             f"{nbytes / ours / 1e3:.0f}"]
                        )  # fmt: skip
                        continue
                    ours_after = after_writer_us(calls, writes[: len(calls)])
                    ours_eager = eager_us(calls)
                    rows.append(
                        {
                            "card": card,
                            "context": context,
                            "batch": batch,
                            "config": name,
                            "sdpa_us": sdpa,
                            "tqai_us": ours,
                            "tqai_gbps": nbytes / ours / 1e3,
                            "sdpa_after_us": sdpa_after,
                            "tqai_after_us": ours_after,
                        }
                    )
                    eager.append(
                        {"context": context, "batch": batch, "config": name,
                         "sdpa_us": sdpa_eager, "tqai_us": ours_eager, "bytes": nbytes}
                    )  # fmt: skip
                del hist
            del codes
            torch.cuda.empty_cache()
    if args.tune:
        print_table(
            f"tuning on {card}",
            ["config", "batch", "context", "block_n", "warps", "programs/SM", "us", "GB/s"],
            tune_rows,
        )
        return
    encode = encode_throughput(quantizers)
    table = []
    for r, e in zip(rows, eager, strict=True):
        table.append(
            [r["config"], r["batch"], r["context"], f"{r['sdpa_us']:.1f}", f"{r['tqai_us']:.1f}",
             f"{r['sdpa_us'] / r['tqai_us']:.2f}x", f"{r['tqai_gbps']:.0f}",
             f"{100 * r['tqai_gbps'] / roof:.0f}%", f"{r['sdpa_after_us']:.1f}",
             f"{r['tqai_after_us']:.1f}", f"{r['sdpa_after_us'] / r['tqai_after_us']:.2f}x",
             f"{e['sdpa_us']:.1f}", f"{e['tqai_us']:.1f}"]
        )  # fmt: skip
    print_table(
        f"decode attention, {Q_HEADS}/{KV_HEADS} heads x {HEAD_DIM}, bf16, on {card} "
        f"(CUDA-graph time per layer-call; roofline = copy {roof:.0f} GB/s)",
        ["config", "batch", "context", "sdpa us", "tqai us", "speedup", "tqai GB/s",
         "% roofline", "sdpa after-writer us", "tqai after-writer us", "speedup after writer",
         "sdpa eager us", "tqai eager us"],
        table,
    )  # fmt: skip
    print_table(
        f"encode K and V (core quantizer vs fused Triton encode, eager) on {card}",
        ["path", "tokens", "K bits", "V bits", "us", "tokens/s", "GB/s in"],
        [[e["path"], e["tokens"], e["bits_k"], e["bits_v"], f"{e['us']:.1f}",
          f"{e['tokens_per_s']:.3g}", f"{e['gbps']:.1f}"] for e in encode],
    )  # fmt: skip
    for c in checks:
        print(
            f"check {c['config']} at {c['context']}: relative error vs core reference {c['rel_err']:.2e}"
        )
    if args.no_json:
        return
    info = machine()
    info["device"] = card
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    write_json(
        f"attention_{slug}.json",
        {
            "machine": info,
            "copy_gbps": roof,
            "method": (
                f"CUDA graph of at least {MIN_CALLS} calls over per-layer cache copies (L2-cold), "
                "median per call; back to back, and after a small kernel writing the query (the "
                "pairs' graph minus the writers')"
            ),
            "segments": (
                f"{args.sinks} sink and {args.window} window tokens in bf16 around the packed "
                "history (as the cache passes them), SDPA over the same number of tokens"
            ),
            "rows": rows,
            "eager": eager,
            "encode": encode,
            "checks": checks,
        },
    )


def profile_kernels(calls: list, title: str) -> None:
    """Per-kernel device time of one pass over ``calls`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for fn in calls:
            fn()
        torch.cuda.synchronize()
    print(title, f"({len(calls)} calls)")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=40)
    )


def encode_throughput(quantizers: dict) -> list[dict]:
    """K and V of a decode append (1 token) and a prefill append (4096 tokens), batch 1, by the
    core quantizer (torch ops, with its input checks) and by the fused Triton encode."""
    from tqai_torch.kernels.triton.encode import quantize_triton

    out = []
    for tokens in (1, 4096):
        for bk, bv in sorted({CONFIGS[c] for c in CONFIGS}):
            if ("k", bk) not in quantizers or ("v", bv) not in quantizers:
                continue
            k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            kq, vq = quantizers[("k", bk)], quantizers[("v", bv)]
            paths = {
                "core": lambda k=k, v=v, kq=kq, vq=vq: (kq.quantize(k), vq.quantize(v)),
                "triton": lambda k=k, v=v, kq=kq, vq=vq: (
                    quantize_triton(k, kq),
                    quantize_triton(v, vq),
                ),
            }
            for path, run in paths.items():
                run()
                us = _median(_events_ms(run, 20)) * 1e3
                bytes_in = 2 * k.numel() * k.element_size()
                out.append(
                    {"path": path, "tokens": tokens, "bits_k": bk, "bits_v": bv, "us": us,
                     "tokens_per_s": tokens / us * 1e6, "gbps": bytes_in / us / 1e3}
                )  # fmt: skip
    return out


if __name__ == "__main__":
    main()

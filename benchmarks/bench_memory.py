"""KV-cache memory at 1K..32K tokens: measured cache bytes and peak process memory, CPU.

The cache is filled through the real transformers cache objects (``DynamicCache`` for the
baseline, ``TqaiCache`` for tqai) at the shapes of SmolLM2-135M (30 layers, 3 KV heads,
head_dim 64, bf16), 1024 tokens per step, then one decode step of attention is run on every
layer (tqai: from the packed codes). Each (context, config) runs in a fresh subprocess and
reports:

- ``cache_bytes``: the bytes the cache object holds (tensor storage actually allocated);
- ``peak_bytes``: on CPU the subprocess's peak resident memory minus its resident memory just
  before the cache was created (its high-water mark reset there; the subprocesses run with
  glibc's mmap threshold fixed, ``_common.peak_rss_env``); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before; i.e. everything the
  cache and the attention needed.

Writes benchmarks/results/memory.json rows {"context", "config", "cache_bytes",
"baseline_cache_bytes", "peak_bytes", "baseline_peak_bytes"} and prints the table.

    python benchmarks/bench_memory.py [--contexts 1024 2048 4096 8192 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import (
    machine,
    peak_rss_bytes,
    peak_rss_env,
    print_table,
    reset_peak_rss,
    write_json,
)

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 30, 3, 9, 64
CONFIGS = {"baseline": None, "K8/V8": (8, 8), "K4/V4": (4, 4), "K4/V2": (4, 2), "K3/V2": (3, 2)}
STEP = 1024  # tokens per cache update (8192 on CUDA, where the fill is launch-bound)


def measure(context: int, config: str, device: str = "cpu") -> dict:
    """Fill a cache to ``context`` tokens and run one decode step (inside this process)."""
    import torch
    from transformers import DynamicCache, LlamaConfig

    torch.manual_seed(0)
    model_config = LlamaConfig(
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_size=Q_HEADS * HEAD_DIM,
        vocab_size=64,
    )
    model_config._attn_implementation = "tqai"
    bits = CONFIGS[config]
    # Import and warm up everything first, so the measured peak is the cache and its work only.
    from tqai.kvstore import KVCacheConfig, KVStore
    from tqai_torch.cache import TqaiCache

    new = {"dtype": torch.bfloat16, "device": device}
    warm = KVStore(KVCacheConfig(bits_k=4, bits_v=2))
    tiny = torch.randn(1, KV_HEADS, 8, HEAD_DIM, **new)
    warm.update(tiny, tiny)
    warm.attend(torch.randn(1, Q_HEADS, 8, HEAD_DIM, **new), scale=1.0, mask=None)
    torch.nn.functional.scaled_dot_product_attention(tiny, tiny, tiny)
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = peak_rss_bytes()
    if bits is None:
        cache = DynamicCache(config=model_config)
    else:
        from tqai.kvstore import KVCacheConfig
        from tqai_torch.cache import TqaiCache

        cache = TqaiCache(model_config, KVCacheConfig(bits_k=bits[0], bits_v=bits[1]))
    query = torch.randn(1, Q_HEADS, 1, HEAD_DIM, **new)
    step = STEP if device == "cpu" else 8 * STEP
    for start in range(0, context, step):
        n = min(step, context - start)
        for layer in range(LAYERS):
            k = torch.randn(1, KV_HEADS, n, HEAD_DIM, **new)
            v = torch.randn(1, KV_HEADS, n, HEAD_DIM, **new)
            cache.update(k, v, layer)
            if bits is not None:
                cache.layers[layer].store.commit()
                cache.layers[layer].awaiting_attention = False
    with torch.no_grad():
        for layer in range(LAYERS):
            k = torch.randn(1, KV_HEADS, 1, HEAD_DIM, **new)
            keys, values = cache.update(k, k, layer)
            if bits is None:
                torch.nn.functional.scaled_dot_product_attention(
                    query, keys, values, enable_gqa=True
                )
            else:
                cache.layers[layer].attend(query, None, HEAD_DIM**-0.5)
    if bits is None:
        held = sum(
            (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            for layer in cache.layers
        )
    else:
        held = cache.nbytes()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - before
    return {"cache_bytes": held, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--measure", nargs=2, metavar=("CONTEXT", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(int(args.measure[0]), args.measure[1], args.device)))
        return

    rows = []
    for context in args.contexts:
        results = {}
        for config in CONFIGS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(context),
                    config,
                    "--device",
                    args.device,
                ],
                check=True,
                capture_output=True,
                text=True,
                env=peak_rss_env(),
            )
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["baseline"]
        for config, r in results.items():
            if config == "baseline":
                continue
            rows.append(
                {
                    "context": context,
                    "config": config,
                    "cache_bytes": r["cache_bytes"],
                    "baseline_cache_bytes": base["cache_bytes"],
                    "peak_bytes": r["peak_bytes"],
                    "baseline_peak_bytes": base["peak_bytes"],
                }
            )
    info = machine()
    where = info["cpu"]
    if args.device == "cuda":
        import torch

        where = info["gpu"] = torch.cuda.get_device_name()
    print_table(
        f"KV cache memory, SmolLM2-135M shapes (30 layers x 3 KV heads x 64, bf16), {where}",
        ["context", "config", "cache MiB", "baseline MiB", "ratio", "peak MiB", "baseline peak"],
        [
            [
                r["context"],
                r["config"],
                f"{r['cache_bytes'] / 2**20:.2f}",
                f"{r['baseline_cache_bytes'] / 2**20:.2f}",
                f"{r['cache_bytes'] / r['baseline_cache_bytes']:.3f}",
                f"{r['peak_bytes'] / 2**20:.1f}",
                f"{r['baseline_peak_bytes'] / 2**20:.1f}",
            ]
            for r in rows
        ],
    )
    name = "memory.json" if args.device == "cpu" else f"memory_{args.device}.json"
    write_json(
        name, {"machine": info, "device": args.device, "model_shape": "smollm2-135m", "rows": rows}
    )


if __name__ == "__main__":
    main()

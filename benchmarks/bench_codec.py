"""Encode and decode throughput of the reference TurboQuant_mse codec, per backend, on CPU.

Providers: ``reference`` through each array namespace that is installed (numpy, torch, mlx.core).
Rows: d=128, b=3 and b=4, Haar and Hadamard rotations, batches of 16384 float32 vectors. Reports
vectors/s for quantize (rotate + nearest centroid + pack + norm) and dequantize, and writes
benchmarks/results/codec_<machine>.json.

    python benchmarks/bench_codec.py [--n-vectors 16384] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib
import re
import time

import numpy as np
from _common import machine, print_table, write_json

from tqai import TurboQuantMSE


def _namespaces() -> dict:
    found = {"numpy": (np, lambda a: a, lambda a: a)}
    try:
        torch = importlib.import_module("torch")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        found["torch"] = (torch, torch.from_numpy, lambda a: a)
    except ImportError:
        pass
    try:
        mx = importlib.import_module("mlx.core")
        mx.set_default_device(mx.cpu)
        found["mlx.core"] = (mx, mx.array, lambda a: mx.eval(a.packed, a.norms) or a)
    except ImportError:
        pass
    return found


def _best_time(fn, repeat: int) -> float:
    fn()  # warm-up (constants moved to the device, kernels compiled)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-vectors", type=int, default=16_384)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    d = 128
    x_host = np.random.default_rng(0).standard_normal((args.n_vectors, d)).astype(np.float32)
    rows = []
    for name, (lib, to_lib, sync) in _namespaces().items():
        x = to_lib(x_host)
        for rotation in ("haar", "hadamard"):
            for n_bits in (3, 4):
                q = TurboQuantMSE(d, n_bits, rotation=rotation)
                qt = sync(q.quantize(x))

                def decode(q=q, qt=qt, lib=lib, name=name):
                    out = q.dequantize(qt)
                    if name == "mlx.core":
                        lib.eval(out)
                    return out

                enc = _best_time(lambda q=q, x=x, sync=sync: sync(q.quantize(x)), args.repeat)
                dec = _best_time(decode, args.repeat)
                rows.append(
                    {
                        "provider": "reference",
                        "namespace": name,
                        "version": getattr(lib, "__version__", ""),
                        "rotation": rotation,
                        "d": d,
                        "bits": n_bits,
                        "n_vectors": args.n_vectors,
                        "encode_vectors_per_s": args.n_vectors / enc,
                        "decode_vectors_per_s": args.n_vectors / dec,
                    }
                )
    info = machine()
    print_table(
        f"tqai codec throughput on CPU ({info['cpu']}, {info['cores']} cores), d={d}",
        ["namespace", "rotation", "bits", "encode vec/s", "decode vec/s"],
        [
            [
                r["namespace"],
                r["rotation"],
                r["bits"],
                f"{r['encode_vectors_per_s']:,.0f}",
                f"{r['decode_vectors_per_s']:,.0f}",
            ]
            for r in rows
        ],
    )
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40]
    write_json(f"codec_cpu_{slug}.json", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()

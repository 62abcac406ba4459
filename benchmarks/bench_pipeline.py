"""Pipeline playground on synthetic streams: NMSE and bits actually spent, every scorer x strategy.

Each profile is a stream of ``--steps`` tensors of shape ``(2, H, T, D)`` (batch 2: an
unconditional/conditional pair where the profile has one), fed to a pipeline layer after layer
the way a cache or hook would call it. Profiles imitate model tensors:

- LLM-like, tokens independent from step to step (each step brings new tokens):
  ``llm_keys`` (a few outlier channels, as RoPE'd keys have, plus an attention-sink token),
  ``llm_values`` (isotropic, mildly varying token norms), ``heavy_tail`` (log-normal token norms).
- Video-DiT-like, the same tokens recomputed every denoising step on a spatially smooth
  ``8 x 16`` latent grid, CFG halves close to each other: ``dit_static`` (rho = 0.995 between
  steps), ``dit_correlated`` (rho = 0.95), ``dit_drift`` (steady linear motion plus noise).

For every row, ``nmse`` is ``sum ||x_hat - x||^2 / sum ||x||^2`` over the whole stream,
``bits_per_coord`` counts every stored bit (codes, norms, masks, mode and reuse flags) over every
coordinate, and ``baseline_nmse`` / ``baseline_bits_per_coord`` are the plain TurboQuant_mse
quantizer at the same base width on the same data. Strategies that never read scores (delta,
delta2, window, cfg_sharing: ``"scores_used": false``) give the same result whatever the scorer,
so they run once per profile and that result fills every scorer's row. Writes
benchmarks/results/pipeline.json.

    python benchmarks/bench_pipeline.py [--bits 3] [--steps 6] [--heads 2] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import machine, print_table, write_json
from rich.progress import Progress

from tqai import TurboQuantMSE
from tqai.pipeline import build_pipeline
from tqai.pipeline.scorers.fisher_static import FisherCalibration
from tqai.registry import registry

SCORERS = ("palm", "snr", "fisher", "fisher_static", "sheaf", "bsa")
STRATEGIES = ("tiered", "delta", "delta2", "window", "cfg_sharing")
GRID = (1, 8, 16)  # (frames, height, width) of the DiT-like profiles: T = 128


def _smooth(x: np.ndarray, grid: tuple[int, int, int], passes: int = 2) -> np.ndarray:
    """Average each token with its lattice neighbours (a spatially smooth latent)."""
    shape = x.shape
    cube = x.reshape(*shape[:-2], *grid[1:], shape[-1])
    for _ in range(passes):
        padded = np.pad(cube, [(0, 0)] * (cube.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")
        cube = (
            padded[..., 1:-1, 1:-1, :]
            + padded[..., :-2, 1:-1, :]
            + padded[..., 2:, 1:-1, :]
            + padded[..., 1:-1, :-2, :]
            + padded[..., 1:-1, 2:, :]
        ) / 5.0
    out = cube.reshape(shape)
    return out / out.std()


def _llm(kind: str) -> Callable[[np.random.Generator, tuple, int], list[np.ndarray]]:
    def make(rng: np.random.Generator, shape: tuple, steps: int) -> list[np.ndarray]:
        d = shape[-1]
        stream = []
        for _ in range(steps):
            x = rng.standard_normal(shape)
            if kind == "llm_keys":
                scale = np.ones(d)
                scale[rng.choice(d, 4, replace=False)] = 8.0
                x = x * scale
                x[..., 0, :] *= 10.0  # an attention-sink token
            elif kind == "llm_values":
                x = x * np.exp(0.3 * rng.standard_normal((*shape[:-1], 1)))
            else:
                x = x * np.exp(1.0 * rng.standard_normal((*shape[:-1], 1)))
            stream.append(x)
        return stream

    return make


def _dit(kind: str) -> Callable[[np.random.Generator, tuple, int], list[np.ndarray]]:
    rho = {"dit_static": 0.995, "dit_correlated": 0.95, "dit_drift": 0.999}[kind]

    def make(rng: np.random.Generator, shape: tuple, steps: int) -> list[np.ndarray]:
        half = (1, *shape[1:])
        base = _smooth(rng.standard_normal(half), GRID)
        cfg = _smooth(rng.standard_normal(half), GRID)
        motion = _smooth(rng.standard_normal(half), GRID) * 0.15
        stream, x = [], base
        for t in range(steps):
            if t:
                noise = _smooth(rng.standard_normal(half), GRID)
                x = rho * x + math.sqrt(1 - rho**2) * noise
            frame = x + t * motion if kind == "dit_drift" else x
            pair = np.concatenate([frame, frame + 0.1 * cfg])  # unconditional, conditional
            stream.append(pair)
        return stream

    return make


PROFILES = {
    "llm_keys": ("independent", _llm("llm_keys")),
    "llm_values": ("independent", _llm("llm_values")),
    "heavy_tail": ("independent", _llm("heavy_tail")),
    "dit_static": ("correlated", _dit("dit_static")),
    "dit_correlated": ("correlated", _dit("dit_correlated")),
    "dit_drift": ("correlated", _dit("dit_drift")),
}


def _calibration(path: Path, heads: int, layers: int, rng: np.random.Generator) -> Path:
    """A synthetic Fisher calibration (per-head weights spread over 10x) for fisher_static."""
    weights = np.exp(rng.uniform(0, math.log(10), (2, layers, heads)))
    return FisherCalibration(k=weights[0], v=weights[1], model="synthetic").save(path)


def _run(config: dict, stream: list[np.ndarray], layers: int) -> tuple[float, float]:
    """Feed the stream through a pipeline, every step to every layer; ``(nmse, bits/coord)``."""
    pipe = build_pipeline(config)
    err = energy = 0.0
    bits = coords = 0
    for step, x in enumerate(stream):
        for layer in range(layers):
            res = pipe.compress(x, layer=layer, stream="k", step=step)
            err += float(np.sum((res.reconstruction.astype(np.float64) - x) ** 2))
            energy += float(np.sum(x.astype(np.float64) ** 2))
            bits += res.bits
            coords += res.n_coords
    return err / energy, bits / coords


def _baseline(stream: list[np.ndarray], n_bits: int) -> tuple[float, float]:
    q = TurboQuantMSE(stream[0].shape[-1], n_bits)
    err = energy = 0.0
    bits = coords = 0
    for x in stream:
        qt = q.quantize(x)
        err += float(np.sum((q.dequantize(qt).astype(np.float64) - x) ** 2))
        energy += float(np.sum(x.astype(np.float64) ** 2))
        bits += 8 * qt.nbytes
        coords += x.size
    return err / energy, bits / coords


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3, help="base bit width (bits_k)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="T (128 = the DiT grid)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1, help="layers each step passes through")
    args = parser.parse_args()
    shape = (2, args.heads, args.tokens, args.head_dim)
    if args.tokens != math.prod(GRID):
        raise SystemExit(f"--tokens must be {math.prod(GRID)} (the DiT profiles' grid)")

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        cal = _calibration(
            Path(tmp) / "fisher.json", args.heads, args.layers, np.random.default_rng(1)
        )
        scorer_kwargs = {"fisher_static": {"path": str(cal)}, "sheaf": {"grid": GRID}}
        scorer_kwargs["snr"] = {"num_steps": args.steps}
        task = progress.add_task("scorer x strategy x profile", total=len(PROFILES) * 30)
        for p_index, (profile, (temporal, make)) in enumerate(PROFILES.items()):
            stream = [
                x.astype(np.float32)
                for x in make(np.random.default_rng(p_index), shape, args.steps)
            ]
            base_nmse, base_bits = _baseline(stream, args.bits)
            for strategy in STRATEGIES:
                uses_scores = registry("tqai.strategies").get(strategy).needs_scores
                for scorer in SCORERS:
                    config = {
                        "scorer": scorer,
                        "scorer_kwargs": scorer_kwargs.get(scorer, {}),
                        "strategy": strategy,
                        "bits_k": args.bits,
                    }
                    if uses_scores or scorer == SCORERS[0]:
                        nmse, bits = _run(config, stream, args.layers)
                    # else: the strategy never reads scores, so every scorer gives this result.
                    rows.append(
                        {
                            "scorer": scorer,
                            "strategy": strategy,
                            "profile": profile,
                            "temporal": temporal,
                            "nmse": nmse,
                            "bits_per_coord": bits,
                            "baseline_nmse": base_nmse,
                            "baseline_bits_per_coord": base_bits,
                            "scores_used": uses_scores,
                        }
                    )
                    progress.advance(task)
    elapsed = time.perf_counter() - started

    table = []
    for profile in PROFILES:
        for strategy in STRATEGIES:
            cells = {
                r["scorer"]: r for r in rows if (r["profile"], r["strategy"]) == (profile, strategy)
            }
            first = cells[SCORERS[0]]
            table.append(
                [
                    profile,
                    strategy,
                    first["baseline_nmse"],
                    *(cells[s]["nmse"] / cells[s]["baseline_nmse"] for s in SCORERS),
                    f"{min(c['bits_per_coord'] for c in cells.values()):.3f}"
                    f"-{max(c['bits_per_coord'] for c in cells.values()):.3f}"
                    if len({round(c["bits_per_coord"], 6) for c in cells.values()}) > 1
                    else f"{first['bits_per_coord']:.3f}",
                    f"{first['baseline_bits_per_coord']:.3f}",
                ]
            )
    print_table(
        f"Pipeline NMSE relative to plain TurboQuant_mse at {args.bits} bits "
        f"(<1 = better); shape {shape}, {args.steps} steps x {args.layers} layers; "
        f"{machine()['cpu']}",
        ["profile", "strategy", "plain nmse", *SCORERS, "bits/coord", "plain bits/coord"],
        table,
    )
    write_json(
        "pipeline.json",
        {
            "machine": machine(),
            "settings": {
                "bits": args.bits,
                "shape": list(shape),
                "steps": args.steps,
                "layers": args.layers,
                "quantizer": "mse",
                "seconds": round(elapsed, 1),
            },
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

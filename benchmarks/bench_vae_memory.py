"""Peak memory of a video VAE decode, before and after ``tqai_diffusers.optimize_vae_memory``.

The VAE is diffusers' ``AutoencoderKLWan`` at its default config, which is the Wan 2.1 VAE
(also the VAE of Wan 2.2 A14B; 127M parameters), with random weights: memory depends on the
architecture and the shapes, not on the weight values. It decodes a ``num_frames x height x
width`` video's latents (``(1, 16, (frames - 1) / 4 + 1, height / 8, width / 8)``, fp32). Each
config runs in a fresh subprocess, which reports:

- ``peak_bytes``: on CPU, the process's peak resident memory during the decode minus its
  resident memory just before it (``VmHWM`` reset through ``/proc/self/clear_refs`` after the
  model and the latents exist, then read after the decode); on CUDA,
  ``torch.cuda.max_memory_allocated`` during the decode minus the memory allocated before it;
- ``seconds``: the decode's wall time.

Writes benchmarks/results/vae_memory_<device>.json and prints the table.

    python benchmarks/bench_vae_memory.py [--frames 5 81] [--height 480] [--width 832]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("baseline", "optimize_vae_memory")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(config: str, frames: int, height: int, width: int, device: str) -> dict:
    """Decode once in this process and report the decode's peak memory and time."""
    import torch
    from diffusers import AutoencoderKLWan

    from tqai_diffusers import optimize_vae_memory

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval().to(device)
    if config == "optimize_vae_memory":
        optimize_vae_memory(vae)
    latent_frames = (frames - 1) // 4 + 1
    z = torch.randn(1, vae.config.z_dim, latent_frames, height // 8, width // 8, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(z).sample
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "frames": frames,
        "height": height,
        "width": width,
        "latent_shape": list(z.shape),
        "video_bytes": video.numel() * video.element_size(),
        "peak_bytes": peak - before,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[5])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        config, frames = args.child[0], int(args.child[1])
        print(json.dumps(measure(config, frames, args.height, args.width, device)))
        return
    from _common import machine, print_table, write_json

    rows = []
    for frames in args.frames:
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--child", config, str(frames), "--device", device]
            cmd += ["--height", str(args.height), "--width", str(args.width)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    info = machine()
    card = torch.cuda.get_device_name() if device == "cuda" else info["cpu"]
    info["device"] = card
    info["torch_threads"] = torch.get_num_threads()
    base = {r["frames"]: r["peak_bytes"] for r in rows if r["config"] == "baseline"}
    table = [
        [
            r["frames"],
            f"{r['height']}x{r['width']}",
            r["config"],
            r["peak_bytes"] / 2**20,
            base[r["frames"]] / max(r["peak_bytes"], 1),
            r["seconds"],
        ]
        for r in rows
    ]
    print_table(
        f"Wan 2.1 VAE decode peak memory on {card} (random weights, fp32)",
        ["frames", "size", "config", "peak MiB", "reduction", "seconds"],
        table,
    )
    peak_kind = "cuda max_memory_allocated" if device == "cuda" else "process VmHWM - VmRSS"
    slug = re.sub(r"[^a-z0-9]+", "-", ("cuda " if device == "cuda" else "cpu ") + card.lower())
    write_json(
        f"vae_memory_{slug.strip('-')[:40]}.json",
        {
            "machine": info,
            "vae": "AutoencoderKLWan default config (Wan 2.1 VAE), random weights, fp32",
            "peak": peak_kind,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

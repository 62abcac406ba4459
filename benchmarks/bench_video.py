"""Video DiT generation with tqai: time, peak memory and final-latent error vs the baseline.

Runs the diffusers pipelines themselves (``WanPipeline``, ``LTXPipeline``) with random weights at
the real transformer configs (Wan 2.2 TI2V 5B: 30 layers, 24 heads x 128, ffn 14336, 48 latent
channels, VAE 4x16x16; LTX-Video 2B: diffusers' ``LTXVideoTransformer3DModel`` defaults, 28
layers, 32 heads x 64, 128 latent channels, VAE 8x32x32), bf16, classifier-free guidance on
(Wan: two transformer calls per step; LTX: one 2B batch), 15 steps, ``output_type="latent"`` (the
VAE is not run here: ``bench_vae_memory.py`` measures it). Prompt embeddings are random
(``(1, 512, 4096)`` for Wan's umT5, ``(1, 128, 4096)`` for LTX's T5), the same for every config,
and every run starts from the same seeded noise, so the final latents are comparable.

For each model: one warm-up generation (2 steps), the baseline, then each tqai config
(:class:`tqai_diffusers.TqaiConfig`, applied with ``apply_tqai`` and removed with ``remove_tqai``
after its run). Per run:

- ``seconds``: wall time of the generation (CUDA synchronized);
- ``peak_bytes``: CUDA ``max_memory_allocated`` during the generation minus the memory allocated
  before it (CPU: the process's ``VmHWM`` minus ``VmRSS`` before it);
- ``rel_error``: ``||latent - baseline latent|| / ||baseline latent||`` of the final latents;
- ``bits_per_coord``: K/V bits stored per coordinate (tqai's stats), ``reuse``: the fraction of
  window-hooked attention calls whose output was reused.

Random weights mean the errors say how far each config moves *this* network's trajectory, not
how a trained model's video looks; timings and memory depend on shapes only.

Writes benchmarks/results/video_<card>.json (``--tiny``: video_tiny_<cpu>.json, tiny configs for
checking the script end to end on a CPU) and prints a table.

    python benchmarks/bench_video.py                        # CUDA, real configs
    python benchmarks/bench_video.py --models wan --frames 49   # a shorter clip
    python benchmarks/bench_video.py --tiny                 # CPU, tiny configs, seconds
    python benchmarks/bench_video.py --device cpu --layers 1 --steps 2 --frames 5 \
        --height 128 --width 128                            # real widths, 1 layer: a check
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

# Wan 2.2 TI2V-5B transformer (diffusers WanTransformer3DModel config).
WAN22_5B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
# LTX-Video 2B: diffusers' LTXVideoTransformer3DModel defaults, spelled out.
LTX_2B = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "cross_attention_dim": 2048,
    "num_layers": 28,
    "caption_channels": 4096,
}
TINY_WAN = {
    **WAN22_5B,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 8,
    "out_channels": 8,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
TINY_LTX = {
    **LTX_2B,
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "num_layers": 2,
    "caption_channels": 32,
}
# Real runs: (frames, height, width, text tokens), each model's long-clip setting (Wan 2.2 TI2V
# 5B: 121 frames at 1280x704, 27,280 video tokens; LTX-Video: 161 frames at 1216x704, 17,556
# tokens); tiny runs: small videos, short prompts.
SHAPES = {"wan": (121, 704, 1280, 512), "ltx": (161, 704, 1216, 128)}
TINY_SHAPES = {"wan": (9, 64, 64, 16), "ltx": (17, 64, 64, 16)}


def configs() -> dict[str, Any]:
    from tqai_diffusers import TqaiConfig

    return {
        "K4/V4": TqaiConfig(bits_k=4, bits_v=4),
        "K4/V2": TqaiConfig(bits_k=4, bits_v=2),
        "delta K4/V4": TqaiConfig(bits_k=4, bits_v=4, strategy="delta"),
        "delta2 K4/V4": TqaiConfig(bits_k=4, bits_v=4, strategy="delta2"),
        "cfg_sharing K4/V4": TqaiConfig(bits_k=4, bits_v=4, strategy="cfg_sharing"),
        "window 0.99": TqaiConfig(
            strategy="window",
            strategy_kwargs={"threshold": 0.99, "max_reuse": 2},
            compress_kv=False,
        ),
        "window 0.95": TqaiConfig(
            strategy="window",
            strategy_kwargs={"threshold": 0.95, "max_reuse": 2},
            compress_kv=False,
        ),
        "window 0.99 + K4/V4": TqaiConfig(
            bits_k=4,
            bits_v=4,
            strategy="window",
            strategy_kwargs={"threshold": 0.99, "max_reuse": 2},
        ),
    }


def build(
    model: str, *, tiny: bool, device: str, dtype: torch.dtype, layers: int | None = None
) -> Any:
    """A pipeline with a random-weight transformer at the real (or tiny) config.

    The VAE is a small stand-in with the real latent channels and compression factors: the
    pipeline reads them to size the latents; it is never run (``output_type="latent"``).
    """
    import diffusers

    torch.manual_seed(0)
    if model == "wan":
        config = dict(TINY_WAN if tiny else WAN22_5B)
        config["num_layers"] = layers or config["num_layers"]
        with torch.device(device):
            transformer = diffusers.WanTransformer3DModel(**config)
        z = config["in_channels"]
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            latents_mean=[0.0] * z, latents_std=[1.0] * z, scale_factor_spatial=16,
        )  # fmt: skip
        pipe = diffusers.WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=vae,
            scheduler=diffusers.UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
            ),
            transformer=transformer.to(dtype).eval(),
            expand_timesteps=True,  # Wan 2.2 TI2V: per-token timesteps
        )
    else:
        config = dict(TINY_LTX if tiny else LTX_2B)
        config["num_layers"] = layers or config["num_layers"]
        with torch.device(device):
            transformer = diffusers.LTXVideoTransformer3DModel(**config)
        c = config["in_channels"]
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=c, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4, patch_size_t=1,
        )  # fmt: skip
        pipe = diffusers.LTXPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer.to(dtype).eval(),
        )
    pipe.vae.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, config


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def generate(pipe: Any, model: str, shape: tuple, steps: int, device: str, dtype: torch.dtype):
    """One generation; returns ``(final latents, seconds, peak bytes)``."""
    frames, height, width, tokens = shape
    text = pipe.transformer.config.text_dim if model == "wan" else None
    text = text or pipe.transformer.config.caption_channels
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, tokens, text, generator=gen).to(device, dtype)
    negative = torch.randn(1, tokens, text, generator=gen).to(device, dtype)
    kwargs: dict[str, Any] = {
        "prompt_embeds": prompt,
        "negative_prompt_embeds": negative,
        "height": height,
        "width": width,
        "num_frames": frames,
        "num_inference_steps": steps,
        "output_type": "latent",
        "generator": torch.Generator(device).manual_seed(0),
    }
    if model == "ltx":
        mask = torch.ones(1, tokens, device=device)
        kwargs |= {"prompt_attention_mask": mask, "negative_prompt_attention_mask": mask}
        kwargs["guidance_scale"] = 3.0
    else:
        kwargs["guidance_scale"] = 5.0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_bytes("VmRSS")
    start = time.perf_counter()
    latents = pipe(**kwargs).frames
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_bytes("VmHWM") - before
    return latents.float(), time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["wan", "ltx"], choices=["wan", "ltx"])
    parser.add_argument("--configs", nargs="+", default=None, help="names from configs()")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (fp32)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument(
        "--layers", type=int, default=None, help="override num_layers (quick checks; no JSON)"
    )
    parser.add_argument("--no-json", action="store_true", help="print only")
    args = parser.parse_args()
    from _common import RESULTS, machine, print_table, write_json

    from tqai_diffusers import apply_tqai, get_stats, remove_tqai

    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("the full-size benchmark needs a CUDA GPU; use --tiny to check it on a CPU")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.layers is not None:
        args.no_json = True  # a shortened model is a check, not a result
    table = configs()
    names = args.configs or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(table)}")
    rows, models = [], {}
    for model in args.models:
        frames, height, width, tokens = (TINY_SHAPES if args.tiny else SHAPES)[model]
        shape = (args.frames or frames, args.height or height, args.width or width, tokens)
        pipe, config = build(model, tiny=args.tiny, device=device, dtype=dtype, layers=args.layers)
        models[model] = {"transformer": config, "frames_height_width_text": list(shape)}
        generate(pipe, model, shape, 2, device, dtype)  # warm-up
        base, base_s, base_peak = generate(pipe, model, shape, args.steps, device, dtype)
        models[model]["latent_shape"] = list(base.shape)
        rows.append(
            {"model": model, "config": "baseline", "seconds": base_s, "peak_bytes": base_peak,
             "rel_error": 0.0, "speedup": 1.0, "bits_per_coord": None, "reuse": None}
        )  # fmt: skip
        print(rows[-1], flush=True)
        for name in names:
            apply_tqai(pipe, table[name])
            try:
                latents, seconds, peak = generate(pipe, model, shape, args.steps, device, dtype)
                stats = get_stats(pipe)
            finally:
                remove_tqai(pipe)
            err = float((latents - base).norm() / base.norm())
            bpc, reuse = stats.bits_per_coord, stats.reuse_fraction
            rows.append(
                {
                    "model": model,
                    "config": name,
                    "seconds": seconds,
                    "peak_bytes": peak,
                    "rel_error": err,
                    "speedup": base_s / seconds,
                    "bits_per_coord": None if bpc != bpc else bpc,
                    "reuse": None if reuse != reuse else reuse,
                }
            )
            print(rows[-1], flush=True)
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    info = machine()
    card = torch.cuda.get_device_name() if device == "cuda" else f"{info['cpu']} (CPU)"
    info["device"] = card
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    import diffusers

    info["diffusers"] = diffusers.__version__
    title = "TINY random configs" if args.tiny else "real configs, random weights"
    title += f", {dtype}"
    cells = [
        [r["model"], r["config"], r["seconds"], r["speedup"], r["peak_bytes"] / 2**20,
         r["rel_error"], r["bits_per_coord"], r["reuse"]]
        for r in rows
    ]  # fmt: skip
    print_table(
        f"video generation, {args.steps} steps, {title}, on {card}",
        ["model", "config", "seconds", "speedup", "peak MiB", "rel error", "bits/coord", "reuse"],
        cells,
    )
    if args.no_json:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")[:40]
    name = f"video_tiny_{slug}.json" if args.tiny else f"video_{slug}.json"
    # a run of some models keeps the other models' rows of an earlier run
    earlier = RESULTS / name
    if earlier.exists():
        old = json.loads(earlier.read_text())
        if old.get("steps") == args.steps and old.get("dtype") == str(dtype):
            rows = [r for r in old["rows"] if r["model"] not in models] + rows
            models = {**{k: v for k, v in old["models"].items() if k not in models}, **models}
    write_json(
        name,
        {
            "machine": info,
            "tiny": args.tiny,
            "note": (
                "TINY configs on a CPU: checks the benchmark end to end; the numbers say "
                "nothing about real model sizes"
                if args.tiny
                else "real transformer configs with random weights"
            ),
            "steps": args.steps,
            "dtype": str(dtype),
            "models": models,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

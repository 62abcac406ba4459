"""``optimize_vae_memory``: decode long videos in spatial tiles, batch slices and time chunks.

Why it is shaped like this: after denoising, a video pipeline decodes the whole latent video at
once, and a video VAE's decoder activations at full resolution dwarf the latents (the Wan 2.1
VAE's last stages run 96-384 channels at full frame size over 4-frame chunks), so the decode is
where a long clip's memory peaks. diffusers' video VAEs can already decode piecewise; this turns
every such option on with sizes that keep the peak flat in the frame size:

- **slicing**: one batch element at a time (``enable_slicing``);
- **tiling**: overlapping spatial tiles, blended at the seams (``enable_tiling``; for VAEs
  whose tiling also has a time axis, e.g. LTX, temporal tiles too);
- **temporal chunks**: frame-wise decoding where the VAE has the switch
  (``use_framewise_decoding``: LTX, HunyuanVideo, CogVideoX). The Wan VAE always decodes one
  latent frame at a time through its causal-convolution cache, in tiles as well.

Tiles overlap and are blended, so a tiled decode differs slightly from a whole-frame decode at
the seams (diffusers' own tiling; the overlap is ``tile_size - tile_stride`` pixels).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["optimize_vae_memory"]


def _vae_of(pipe_or_vae: Any) -> torch.nn.Module:
    vae = pipe_or_vae if isinstance(pipe_or_vae, torch.nn.Module) else None
    if vae is None:
        vae = getattr(pipe_or_vae, "vae", None)
    if not isinstance(vae, torch.nn.Module) or not hasattr(vae, "decode"):
        raise TypeError(
            "expected a diffusers pipeline with a 'vae' component or a diffusers VAE, got "
            f"{type(pipe_or_vae).__name__}"
        )
    return vae


def optimize_vae_memory(
    pipe_or_vae: Any,
    *,
    tile_size: int = 256,
    tile_stride: int = 192,
    tile_frames: int = 16,
    tile_frames_stride: int = 8,
) -> dict[str, Any]:
    """Make the VAE decode piecewise so that long, large videos do not spike memory.

    Args:
        pipe_or_vae: a diffusers pipeline (its ``vae``) or a VAE (``AutoencoderKLWan``,
            ``AutoencoderKLLTXVideo``, ...).
        tile_size: spatial tile height and width in pixels.
        tile_stride: distance between tile origins in pixels (``< tile_size``: they overlap and
            are blended).
        tile_frames, tile_frames_stride: temporal tile length and stride in frames, for VAEs
            whose tiling has a time axis (LTX).

    Returns:
        What was enabled: ``{"slicing": bool, "tiling": {option: value}, "framewise": bool}``.

    Raises:
        TypeError: not a pipeline with a VAE, nor a VAE.
        ValueError: a tile size or stride that is not a positive int, or a stride larger than
            its tile.

    Example:
        >>> optimize_vae_memory(pipe)  # doctest: +SKIP
        {'slicing': True, 'tiling': {'tile_sample_min_height': 256, ...}, 'framewise': False}
    """
    for name, value in (
        ("tile_size", tile_size),
        ("tile_stride", tile_stride),
        ("tile_frames", tile_frames),
        ("tile_frames_stride", tile_frames_stride),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tile_stride > tile_size:
        raise ValueError(f"tile_stride ({tile_stride}) must not exceed tile_size ({tile_size})")
    if tile_frames_stride > tile_frames:
        raise ValueError(
            f"tile_frames_stride ({tile_frames_stride}) must not exceed tile_frames ({tile_frames})"
        )
    vae = _vae_of(pipe_or_vae)
    done: dict[str, Any] = {"slicing": False, "tiling": {}, "framewise": False}
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        done["slicing"] = True
    if hasattr(vae, "enable_tiling"):
        wanted = {
            "tile_sample_min_height": tile_size,
            "tile_sample_min_width": tile_size,
            "tile_sample_stride_height": tile_stride,
            "tile_sample_stride_width": tile_stride,
            "tile_sample_min_num_frames": tile_frames,
            "tile_sample_stride_num_frames": tile_frames_stride,
        }
        accepted = inspect.signature(vae.enable_tiling).parameters
        options = {k: v for k, v in wanted.items() if k in accepted}
        vae.enable_tiling(**options)
        done["tiling"] = options
    if hasattr(vae, "use_framewise_decoding"):
        vae.use_framewise_decoding = True
        done["framewise"] = True
    return done

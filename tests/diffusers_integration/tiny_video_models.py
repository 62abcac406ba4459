"""Tiny random-weight WAN and LTX pipelines for the diffusers tests (built from configs).

A few thousand parameters each, CPU, well under a second per generation. There is no text
encoder: generations pass ``prompt_embeds``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TEXT_DIM = 16


def tiny_wan_transformer(num_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip


def tiny_wan_pipeline(*, two_experts: bool = False) -> diffusers.WanPipeline:
    extra = {}
    if two_experts:
        extra = {"transformer_2": tiny_wan_transformer(), "boundary_ratio": 0.5}
    pipe = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=tiny_wan_transformer(),
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx_pipeline() -> diffusers.LTXPipeline:
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=TEXT_DIM,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    pipe = diffusers.LTXPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def run_wan(pipe: diffusers.WanPipeline, steps: int = 4, **kwargs: object) -> torch.Tensor:
    """Final latents ``(1, 4, 2, 4, 4)`` of a 5-frame 32x32 generation with CFG (2 calls/step)."""
    return pipe(
        prompt_embeds=embeds(1),
        negative_prompt_embeds=embeds(2),
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


def run_ltx(pipe: diffusers.LTXPipeline, steps: int = 4, **kwargs: object) -> torch.Tensor:
    """Final packed latents ``(1, 192, 8)`` of a 9-frame 32x32 generation, CFG batched."""
    mask = torch.ones(1, 8)
    return pipe(
        prompt_embeds=embeds(1),
        prompt_attention_mask=mask,
        negative_prompt_embeds=embeds(2),
        negative_prompt_attention_mask=mask,
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=3.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())

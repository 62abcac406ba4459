"""``optimize_vae_memory``: piecewise VAE decode on tiny random Wan and LTX VAEs."""

from __future__ import annotations

import pytest
import torch
from tiny_video_models import relative_error, tiny_ltx_pipeline, tiny_wan_pipeline, tiny_wan_vae

from tqai_diffusers import optimize_vae_memory

pytestmark = pytest.mark.integration


def _decoder_inputs(vae: torch.nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    vae.decoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_wan_vae_decodes_in_small_tiles_frame_by_frame():
    z = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 latent frames
    whole_vae, tiled_vae = tiny_wan_vae().eval(), tiny_wan_vae().eval()
    whole_inputs, tiled_inputs = _decoder_inputs(whole_vae), _decoder_inputs(tiled_vae)
    done = optimize_vae_memory(tiled_vae, tile_size=32, tile_stride=16)
    assert done == {
        "slicing": True,
        "tiling": {
            "tile_sample_min_height": 32,
            "tile_sample_min_width": 32,
            "tile_sample_stride_height": 16,
            "tile_sample_stride_width": 16,
        },
        "framewise": False,
    }
    with torch.no_grad():
        whole = whole_vae.decode(z).sample
        tiled = tiled_vae.decode(z).sample
    assert whole_inputs == [(1, 4, 1, 8, 8)] * 2  # one latent frame at a time, whole frame
    # 4 x 4 tiles of at most 4 x 4 latents (32 px / 8), each decoded frame by frame.
    assert len(tiled_inputs) == 16 * 2
    assert max(s[-1] for s in tiled_inputs) == 4
    assert max(s[-2] for s in tiled_inputs) == 4
    assert tiled.shape == whole.shape
    assert torch.isfinite(tiled).all()
    assert relative_error(tiled, whole) < 0.5  # seams are blended, not identical


def test_slicing_decodes_one_batch_element_at_a_time():
    vae = tiny_wan_vae().eval()
    inputs = _decoder_inputs(vae)
    optimize_vae_memory(vae)  # 256 px tiles: this 64 px video is not tiled
    with torch.no_grad():
        vae.decode(torch.randn(2, 4, 1, 8, 8))
    assert [s[0] for s in inputs] == [1, 1]


def test_pipeline_with_ltx_vae_gets_temporal_tiles_and_framewise_decoding():
    pipe = tiny_ltx_pipeline()
    done = optimize_vae_memory(pipe, tile_frames=8, tile_frames_stride=4)
    assert done["framewise"] is True
    assert (pipe.vae.use_framewise_decoding, pipe.vae.use_tiling, pipe.vae.use_slicing) == (
        True,
        True,
        True,
    )
    assert done["tiling"]["tile_sample_min_num_frames"] == 8
    assert pipe.vae.tile_sample_stride_num_frames == 4


def test_wan_pipeline_vae_is_found():
    pipe = tiny_wan_pipeline()
    optimize_vae_memory(pipe)
    assert pipe.vae.use_tiling is True
    assert pipe.vae.tile_sample_min_height == 256


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_size": 0}, "tile_size must be a positive int"),
        ({"tile_stride": 300}, r"tile_stride \(300\) must not exceed tile_size \(256\)"),
        ({"tile_frames": 4, "tile_frames_stride": 8}, "tile_frames_stride"),
    ],
)
def test_bad_tile_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize_vae_memory(tiny_wan_vae(), **kwargs)


def test_not_a_vae():
    with pytest.raises(TypeError, match="'vae' component"):
        optimize_vae_memory(object())

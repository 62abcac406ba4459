"""``patch_mps_compatibility``: every op's output dtype is audited with a torch dispatch mode.

MPS itself is not needed: the property is "no float64 tensor is produced", checked on CPU for
every intermediate of a full generation (transformer, scheduler, VAE decode).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_video_models import embeds, tiny_ltx_pipeline, tiny_wan_pipeline
from torch.utils._python_dispatch import TorchDispatchMode

from tqai_diffusers import patch_mps_compatibility

pytestmark = pytest.mark.integration


class _Float64Audit(TorchDispatchMode):
    """Counts, per aten op, the float64 tensors it produced."""

    def __init__(self) -> None:
        super().__init__()
        self.float64: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else (out,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                self.float64[str(func)] += 1
        return out


def _ltx2_rope() -> torch.nn.Module:
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    return LTX2AudioVideoRotaryPosEmbed(dim=48, num_attention_heads=2)


def _rope_call(rope: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    coords = rope.prepare_video_coords(1, 3, 4, 4, device=torch.device("cpu"))
    return rope(coords)


def test_ltx2_rope_computes_in_float64_until_patched():
    rope = _ltx2_rope()
    with _Float64Audit() as before:
        reference = _rope_call(rope)
    assert sum(before.float64.values()) > 0  # LTX-2's default: double-precision RoPE
    report = patch_mps_compatibility(rope)
    assert report == {"double_precision_off": [""], "cast_to_float32": []}
    with _Float64Audit() as after:
        patched = _rope_call(rope)
    assert after.float64 == Counter()
    for a, b in zip(patched, reference, strict=True):
        assert a.dtype == b.dtype
        # float32 frequencies (theta**x up to 1e4) shift the phases: cos/sin move by < 1e-3
        # here (measured 9.4e-4), the price of running on MPS at all.
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
        assert not torch.equal(a, b)


def test_float64_parameters_and_buffers_are_cast():
    model = torch.nn.Linear(4, 4).double()
    model.register_buffer("table", torch.ones(3, dtype=torch.float64))
    report = patch_mps_compatibility(model)
    assert sorted(report["cast_to_float32"]) == ["bias", "table", "weight"]
    assert {p.dtype for p in model.parameters()} | {model.table.dtype} == {torch.float32}


def test_wan_generation_has_no_float64_on_the_device_after_patching():
    pipe = tiny_wan_pipeline()
    report = patch_mps_compatibility(pipe)
    assert report == {"double_precision_off": [], "cast_to_float32": []}
    with _Float64Audit() as audit:
        video = pipe(
            prompt_embeds=embeds(1), negative_prompt_embeds=embeds(2), height=32, width=32,
            num_frames=5, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
        ).frames  # fmt: skip
    assert video.dtype == torch.float32
    # The only float64 tensor is the scheduler's numpy sigmas, wrapped on the host by
    # torch.from_numpy and cast to float32 in the same expression (set_timesteps).
    assert audit.float64 == Counter({"aten.lift_fresh.default": 1})


def test_ltx_generation_has_no_float64_at_all():
    pipe = tiny_ltx_pipeline()
    patch_mps_compatibility(pipe)
    mask = torch.ones(1, 8)
    with _Float64Audit() as audit:
        pipe(
            prompt_embeds=embeds(1), prompt_attention_mask=mask, negative_prompt_embeds=embeds(2),
            negative_prompt_attention_mask=mask, height=32, width=32, num_frames=9,
            num_inference_steps=2, guidance_scale=3.0, output_type="pt",
        )  # fmt: skip
    assert audit.float64 == Counter()


def test_not_a_pipeline():
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        patch_mps_compatibility(object())

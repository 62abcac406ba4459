"""The Triton decode kernel matches the core reference (run on a CUDA machine; skipped in CI)."""

from __future__ import annotations

import pytest
import torch

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention

pytestmark = pytest.mark.gpu

CASES = [
    # (B, Hq, Hkv, T, D, bits_k, bits_v, sinks, window)
    (1, 32, 8, 4096, 128, 4, 2, 4, 0),
    (2, 9, 3, 1000, 64, 4, 2, 4, 7),  # SmolLM2 heads, irregular length
    (1, 4, 1, 333, 128, 8, 4, 0, 0),  # MQA
    (3, 8, 8, 77, 64, 2, 1, 2, 3),  # MHA, tiny history
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_matches_reference(case, dtype):
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    b, hq, hkv, t, d, bk, bv, s, w = case
    gen = torch.Generator(device="cuda").manual_seed(sum(case))
    new = {"device": "cuda", "generator": gen}
    q = torch.randn(b, hq, 1, d, **new).to(dtype)
    k = torch.randn(b, hkv, t, d, **new).to(dtype)
    v = torch.randn(b, hkv, t, d, **new).to(dtype)
    kq = TurboQuantMSE(d, bk, rotation="hadamard", seed=1)
    vq = TurboQuantMSE(d, bv, seed=2)
    keys, values = kq.quantize(k[:, :, s : t - w]), vq.quantize(v[:, :, s : t - w])
    prefix = (k[:, :, :s], v[:, :, :s])
    suffix = (k[:, :, t - w :], v[:, :, t - w :])
    kwargs = {"scale": d**-0.5, "prefix": prefix, "suffix": suffix}
    ref = compressed_attention(q.float(), keys, values, kq, vq, **kwargs)
    out = decode_attention_triton(q, keys, values, kq, vq, tokens_per_split=256, **kwargs)
    assert out.dtype == dtype
    # The kernel computes in fp32 and rounds once to the output dtype: within that rounding.
    err = (out.float() - ref).abs().max().item()
    rounding = (ref.to(dtype).float() - ref).abs().max().item()
    assert err <= 2 * rounding + 1e-5, (err, rounding)

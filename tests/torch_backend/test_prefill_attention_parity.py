"""The Triton chunked-prefill attention matches the core reference (causal chunk mask).

On a CUDA GPU (marked ``gpu``), or on the CPU under ``TRITON_INTERPRET=1`` (see triton_interpret).
"""

from __future__ import annotations

import pytest
import torch

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention

triton = pytest.importorskip("triton")
from triton_interpret import DEVICE, INTERPRET, MARKS  # noqa: E402

pytestmark = MARKS

CASES = [
    # (B, Hq, Hkv, history, D, bits_k, bits_v, sinks, window, chunk)
    (1, 32, 8, 3000, 128, 4, 2, 4, 32, 64),  # Llama-3 heads, the default window
    (2, 9, 3, 500, 64, 4, 4, 4, 5, 17),  # SmolLM2 heads, irregular sizes, batch 2
    (1, 8, 8, 100, 96, 3, 2, 0, 0, 9),  # MHA, no sinks, no window
]


def _inputs(case, seed):
    b, hq, hkv, t, d, bk, bv, s, w, c = case
    if INTERPRET:
        t, hq, c = min(t, 96), min(hq, 2 * hkv), min(c, 5)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    new = {"device": DEVICE, "generator": gen}
    total = s + t + w + c
    q = torch.randn(b, hq, c, d, **new).to(torch.bfloat16)
    k = torch.randn(b, hkv, total, d, **new).to(torch.bfloat16) * 2.0
    v = torch.randn(b, hkv, total, d, **new).to(torch.bfloat16)
    kq = TurboQuantMSE(d, bk, seed=seed)
    vq = TurboQuantMSE(d, bv, seed=seed + 1)
    keys, values = kq.quantize(k[:, :, s : s + t]), vq.quantize(v[:, :, s : s + t])
    kwargs = {
        "scale": d**-0.5,
        "prefix": (k[:, :, :s], v[:, :, :s]),
        "suffix": (k[:, :, s + t :], v[:, :, s + t :]),
    }
    rows = torch.arange(c, device=DEVICE)[:, None] + (total - c)
    mask = (torch.arange(total, device=DEVICE)[None, :] <= rows)[None, None]
    return q, keys, values, kq, vq, kwargs, mask


@pytest.mark.parametrize("index", range(len(CASES)))
def test_prefill_attention_matches_reference(index):
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, mask = _inputs(CASES[index], seed=index + 5)
    ref = compressed_attention(q.float(), keys, values, kq, vq, mask=mask, **kwargs)
    out = prefill_attention_triton(q, keys, values, kq, vq, **kwargs)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    rounding = ((ref.to(q.dtype).float() - ref).norm() / ref.norm()).item()
    assert rel <= 2 * rounding + 3e-3, (rel, rounding)
    # each row is causal: the first query token does not see the chunk's later tokens
    first = compressed_attention(
        q[:, :, :1].float(), keys, values, kq, vq, mask=mask[:, :, :1], **kwargs
    )
    torch.testing.assert_close(out[:, :, :1].float(), first, atol=2e-2, rtol=2e-2)


def test_prefill_attention_refuses_a_suffix_without_the_chunk():
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, _ = _inputs(CASES[2], seed=1)
    kwargs["suffix"] = None
    with pytest.raises(ValueError, match="suffix must end with the chunk"):
        prefill_attention_triton(q, keys, values, kq, vq, **kwargs)

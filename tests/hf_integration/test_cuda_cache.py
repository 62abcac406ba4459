"""The transformers cache on a CUDA GPU (skipped where there is none, e.g. in CI)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai_torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eight_bits_generates_the_same_tokens_on_cuda(dtype):
    model = build("llama").to("cuda", dtype)
    ids = torch.randint(3, 128, (2, 24), device="cuda", generator=None)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        base = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        cache = tqai_torch.patch(model, bits_k=8, bits_v=8)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kw(cache), **kwargs)
    tqai_torch.unpatch(model)
    assert torch.equal(out, base)
    assert all(t.device.type == "cuda" for t in cache.layers[0].store.keys.buffers.values())


def test_compressed_equals_full_strategy_on_cuda():
    model = build("qwen3").to("cuda", torch.bfloat16)
    ids = torch.randint(3, 128, (1, 40), device="cuda")
    logits = {}
    for strategy in ("compressed", "full"):
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, cache_strategy=strategy)
        with torch.no_grad():
            model(ids[:, :30], **cache_kw(cache))
            logits[strategy] = model(ids[:, 30:], **cache_kw(cache)).logits.float()
        tqai_torch.unpatch(model)
    torch.testing.assert_close(logits["compressed"], logits["full"], atol=5e-2, rtol=5e-2)


def test_bfloat16_logits_stay_close_at_eight_bits_on_cuda():
    """In bf16 greedy tokens of a random tiny model can flip on rounding alone; logits can't move."""
    model = build("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(3, 128, (2, 24), device="cuda")
    with torch.no_grad():
        base = model(ids).logits.float()
        cache = tqai_torch.patch(model, bits_k=8, bits_v=8, sink_tokens=0)
        model(ids[:, :16], **cache_kw(cache))
        out = model(ids[:, 16:], **cache_kw(cache)).logits.float()
    tqai_torch.unpatch(model)
    rel = (out - base[:, 16:]).norm() / base[:, 16:].norm()
    assert rel < 2e-2, rel.item()


def test_left_padded_batch_decodes_through_the_kernel_like_the_reference(monkeypatch):
    """A batch of prompts of different lengths (left padding): the fused kernel serves the
    decode steps (with per-sequence first positions) and gives the reference's logits."""
    from tqai_torch.kernels.triton import decode_attention

    model = build("llama").to("cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, 128, (3, 80), device="cuda", generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :13] = 0  # sequence 1 is 67 tokens long, sequence 2 is 20
    attention[2, :60] = 0
    steps = torch.randint(3, 128, (3, 6), device="cuda", generator=gen)
    calls = []
    kernel = decode_attention.decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs.get("valid_from"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_attention_triton", spy)
    logits = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("TQAI_KERNEL", "auto" if mode == "triton" else "reference")
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, residual_window=8)
        mask, out = attention, []
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kw(cache))
            for i in range(steps.shape[1]):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step = model(steps[:, i : i + 1], attention_mask=mask, **cache_kw(cache))
                out.append(step.logits.float())
        tqai_torch.unpatch(model)
        logits[mode] = torch.cat(out, dim=1)
    assert calls
    assert all(v.tolist() == [0, 13, 60] for v in calls)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("method", "chunk"), [("rows", 12), ("tiled", 12), ("tiled", 300)], ids=lambda x: str(x)
)
def test_prompt_continuing_a_compressed_cache_uses_the_prefill_kernel(monkeypatch, method, chunk):
    """A chunk on a cache that holds a history (a speculative-decoding check, a short turn, a
    long prompt fed in chunks) is served by the fused prefill kernel and gives the reference's
    logits, through either of its methods (``method="auto"`` is steered through its row
    threshold)."""
    from tqai_torch.kernels.triton import prefill_attention

    monkeypatch.setattr(prefill_attention, "TILED_MIN_ROWS", 1 if method == "tiled" else 1 << 30)
    model = build("llama").to("cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(3, 128, (1, 80 + chunk), device="cuda", generator=gen)
    calls = []
    kernel = prefill_attention.prefill_attention_triton
    rows = prefill_attention._prefill_by_rows
    by_rows = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    def spy_rows(*args, **kwargs):
        by_rows.append(args[0].shape)
        return rows(*args, **kwargs)

    monkeypatch.setattr(prefill_attention, "prefill_attention_triton", spy)
    monkeypatch.setattr(prefill_attention, "_prefill_by_rows", spy_rows)
    logits = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("TQAI_KERNEL", "auto" if mode == "triton" else "reference")
        cache = tqai_torch.patch(model, bits_k=4, bits_v=2, residual_window=8)
        with torch.no_grad():
            model(ids[:, :80], **cache_kw(cache))
            logits[mode] = model(ids[:, 80:], **cache_kw(cache)).logits.float()
        tqai_torch.unpatch(model)
    assert calls
    assert all(shape[2] == chunk for shape in calls)
    assert len(by_rows) == (len(calls) if method == "rows" else 0)
    torch.testing.assert_close(logits["triton"], logits["reference"], atol=3e-2, rtol=3e-2)

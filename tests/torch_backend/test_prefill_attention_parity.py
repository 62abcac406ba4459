"""The Triton chunked-prefill attention matches the core reference (causal chunk mask).

Both methods: the tiled kernel (``method="tiled"``, each history block read once per tile of
query rows) and the decode kernel with one row per query token (``method="rows"``).

On a CUDA GPU (marked ``gpu``), or on the CPU under ``TRITON_INTERPRET=1`` (see triton_interpret),
where the sizes are capped so that each case takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention

triton = pytest.importorskip("triton")
from triton_interpret import DEVICE, INTERPRET, MARKS  # noqa: E402

pytestmark = MARKS

# (B, Hq, Hkv, history, D, bits_k, bits_v, sinks, window, chunk)
CASES = [
    (1, 32, 8, 3000, 128, 4, 2, 4, 32, 64),  # Llama-3 heads, the default window
    (2, 9, 3, 500, 64, 4, 4, 4, 5, 17),  # SmolLM2 heads, irregular sizes, batch 2
    (1, 8, 8, 100, 96, 3, 2, 0, 0, 9),  # MHA, no sinks, no window
]

# the tiled kernel: chunks of several tiles (rows C * G > block_m), histories not a multiple of
# the block, every head dim and bit width the decode kernel serves, with and without sinks/window
TILED_CASES = [
    (1, 32, 8, 3000, 128, 4, 2, 4, 32, 64),  # Llama-3 heads: 256 rows, 2 tiles of 128
    (1, 32, 8, 2000, 128, 4, 2, 4, 32, 300),  # 1200 rows: 10 tiles, the last partial
    (2, 9, 3, 500, 64, 4, 4, 4, 5, 17),  # SmolLM2 heads (G = 3), batch 2
    (1, 8, 8, 100, 96, 3, 2, 0, 0, 9),  # MHA, no sinks, no window, K3/V2
    (1, 8, 1, 777, 80, 8, 3, 2, 7, 50),  # MQA-like G = 8, K8/V3, head dim 80
    (2, 4, 1, 1000, 256, 2, 1, 4, 16, 40),  # head dim 256, K2/V1, batch 2
    (1, 16, 4, 1111, 128, 4, 4, 0, 32, 200),  # K4/V4, window without sinks
    (1, 4, 1, 513, 64, 4, 2, 4, 0, 130),  # sinks without window, 520 rows
    (1, 4, 4, 300, 64, 4, 2, 2, 3, 1),  # a one-token chunk
    (1, 4, 2, 68, 16, 4, 2, 4, 8, 12),  # head dim 16 (a tiny model's), one tile
    (1, 4, 2, 100, 32, 4, 4, 4, 8, 300),  # head dim 32, several tiles
]

# (block_m, block_n, num_warps) besides the defaults
BLOCKS = [(16, 128, 4), (64, 32, 4), (128, 64, 8), (32, 16, 2)]


def _inputs(case, seed, dtype=torch.bfloat16, interpret_caps=(96, 5, True)):
    b, hq, hkv, t, d, bk, bv, s, w, c = case
    if INTERPRET:
        max_t, max_c, fewer_heads = interpret_caps
        t, c = min(t, max_t), min(c, max_c)
        if fewer_heads:
            hq = min(hq, 2 * hkv)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    new = {"device": DEVICE, "generator": gen}
    total = s + t + w + c
    q = torch.randn(b, hq, c, d, **new).to(dtype)
    k = torch.randn(b, hkv, total, d, **new).to(dtype) * 2.0
    v = torch.randn(b, hkv, total, d, **new).to(dtype)
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


def _check(q, keys, values, kq, vq, kwargs, mask, **options):
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    ref = compressed_attention(q.float(), keys, values, kq, vq, mask=mask, **kwargs)
    out = prefill_attention_triton(q, keys, values, kq, vq, **kwargs, **options)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    rounding = ((ref.to(q.dtype).float() - ref).norm() / ref.norm()).item()
    assert rel <= 2 * rounding + 3e-3, (rel, rounding)
    # each row is causal: the first query token does not see the chunk's later tokens
    first = compressed_attention(
        q[:, :, :1].float(), keys, values, kq, vq, mask=mask[:, :, :1], **kwargs
    )
    torch.testing.assert_close(out[:, :, :1].float(), first, atol=2e-2, rtol=2e-2)
    return rel


@pytest.mark.parametrize("index", range(len(CASES)))
def test_prefill_by_rows_matches_reference(index):
    _check(*_inputs(CASES[index], seed=index + 5), method="rows")


@pytest.mark.parametrize("index", range(len(TILED_CASES)))
def test_tiled_prefill_matches_reference(index):
    inputs = _inputs(TILED_CASES[index], seed=index + 11, interpret_caps=(300, 70, False))
    _check(*inputs, method="tiled")


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: "m{}-n{}-w{}".format(*b))
def test_tiled_prefill_block_sizes(blocks):
    block_m, block_n, num_warps = blocks
    inputs = _inputs(TILED_CASES[7], seed=3, interpret_caps=(257, 70, False))
    _check(*inputs, method="tiled", block_m=block_m, block_n=block_n, num_warps=num_warps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_tiled_prefill_other_dtypes(dtype):
    inputs = _inputs(TILED_CASES[2], seed=4, dtype=dtype, interpret_caps=(150, 40, False))
    _check(*inputs, method="tiled")


@pytest.mark.parametrize("lookup", ["auto", "gather"])
def test_tiled_prefill_lookups(lookup):
    """Byte-permute lookups (CUDA: 2-bit values, symmetric 4-bit keys) and gathers agree."""
    inputs = _inputs(TILED_CASES[0], seed=6, interpret_caps=(200, 40, False))
    _check(*inputs, method="tiled", lookup=lookup)


def test_auto_method_serves_both_sizes():
    """``method="auto"`` (the cache's call) is right whichever kernel it picks."""
    _check(*_inputs(TILED_CASES[0], seed=8, interpret_caps=(150, 3, True)))
    _check(*_inputs(TILED_CASES[1], seed=9, interpret_caps=(150, 40, False)))


def test_tiled_prefill_reads_views():
    """A history view into a larger (growable) buffer and a transposed query are read in place
    with their strides."""
    from tqai.attention import slice_tokens

    q, keys, values, kq, vq, kwargs, mask = _inputs(
        (2, 8, 2, 200, 64, 4, 2, 2, 4, 30), seed=12, interpret_caps=(200, 30, False)
    )
    keys, values = slice_tokens(keys, 0, 150), slice_tokens(values, 0, 150)
    assert not keys.packed.is_contiguous()
    n_suffix = kwargs["suffix"][0].shape[2]
    kwargs["prefix"] = tuple(t[:, :, :0] for t in kwargs["prefix"])  # empty sinks: absent
    total = 150 + n_suffix
    c = q.shape[2]
    rows = torch.arange(c, device=DEVICE)[:, None] + (total - c)
    mask = (torch.arange(total, device=DEVICE)[None, :] <= rows)[None, None]
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hq, C, D) with C outermost
    assert not q.is_contiguous()
    _check(q, keys, values, kq, vq, kwargs, mask, method="tiled")


def test_prefill_attention_refuses_a_suffix_without_the_chunk():
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, _ = _inputs(CASES[2], seed=1)
    kwargs["suffix"] = None
    with pytest.raises(ValueError, match="suffix must end with the chunk"):
        prefill_attention_triton(q, keys, values, kq, vq, **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"valid_until": None}, "serves plain causal chunks"),
        ({"block_m": 48}, "block_m must be one of"),
        ({"block_n": 256}, "block_n must be one of"),
        ({"num_warps": 3}, "num_warps must be one of"),
        ({"method": "split"}, "method must be one of"),
        ({"lookup": "prmt"}, "lookup must be one of"),
    ],
)
def test_prefill_attention_refuses_bad_options(options, message):
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, _ = _inputs(CASES[2], seed=1)
    with pytest.raises(ValueError, match=message):
        prefill_attention_triton(q, keys, values, kq, vq, **kwargs, **options)


def test_prefill_attention_refuses_wide_settings_for_small_head_dims():
    """Head dims <= 32 returned wrong values at 128 rows / 8 warps on the H100: refused."""
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, _ = _inputs(TILED_CASES[-2], seed=1)
    with pytest.raises(ValueError, match="block_m must be <= 64 and num_warps <= 4"):
        prefill_attention_triton(
            q, keys, values, kq, vq, method="tiled", block_m=128, num_warps=8, **kwargs
        )


def test_prefill_attention_refuses_mismatched_segments():
    from tqai_torch.kernels.triton.prefill_attention import prefill_attention_triton

    q, keys, values, kq, vq, kwargs, _ = _inputs(CASES[1], seed=1)
    k, v = kwargs["prefix"]
    kwargs["prefix"] = (k[:, :1], v[:, :1])  # one KV head of three
    with pytest.raises(ValueError, match="prefix keys must be"):
        prefill_attention_triton(q, keys, values, kq, vq, method="tiled", **kwargs)

"""The Triton decode kernel matches the core reference.

Runs on a CUDA GPU (marked ``gpu``: skipped in CI), or on the CPU through Triton's interpreter
when ``TRITON_INTERPRET=1`` is set and triton is installed (then the tensors live on the CPU).
"""

from __future__ import annotations

import pytest
import torch

from tqai import TurboQuantMSE
from tqai.attention import compressed_attention
from tqai.packing import pack_bits, unpack_bits

triton = pytest.importorskip("triton")
from kernel_parity import check_kernel_output  # noqa: E402
from triton_interpret import DEVICE, INTERPRET, MARKS  # noqa: E402

pytestmark = MARKS

CASES = [
    # (B, Hq, Hkv, T, D, bits_k, bits_v, sinks, window)
    (1, 32, 8, 4096, 128, 4, 2, 4, 0),  # the benchmark's shape
    (1, 32, 8, 1100, 128, 3, 2, 4, 1),  # K3/V2, one staged token
    (1, 32, 8, 700, 128, 4, 4, 0, 0),  # K4/V4, no segments
    (2, 9, 3, 1000, 64, 4, 2, 4, 7),  # SmolLM2 heads, irregular length
    (3, 8, 1, 333, 80, 8, 3, 0, 2),  # MQA (G = 8), head_dim 80
    (3, 8, 8, 77, 96, 2, 1, 2, 3),  # MHA (G = 1), head_dim 96, tiny history
    (1, 4, 2, 129, 256, 1, 8, 1, 0),  # head_dim 256
    (1, 4, 2, 90, 16, 4, 2, 1, 2),  # head_dim 16 (fewer dims than one chunk of the rotation)
]


def _interpreted(case):
    """The interpreter is slow: the same shapes with at most 160 history tokens."""
    b, hq, hkv, t, d, bk, bv, s, w = case
    return (b, hq, hkv, min(t, 160 + s + w), d, bk, bv, s, w)


def _case_inputs(case, dtype, seed):
    b, hq, hkv, t, d, bk, bv, s, w = case
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    new = {"device": DEVICE, "generator": gen}
    q = torch.randn(b, hq, 1, d, **new).to(dtype)
    k = torch.randn(b, hkv, t, d, **new).to(dtype) * 2.0
    v = torch.randn(b, hkv, t, d, **new).to(dtype)
    kq = TurboQuantMSE(d, bk, rotation="hadamard", seed=seed)
    vq = TurboQuantMSE(d, bv, seed=seed + 1)
    keys, values = kq.quantize(k[:, :, s : t - w]), vq.quantize(v[:, :, s : t - w])
    prefix = (k[:, :, :s], v[:, :, :s])
    suffix = (k[:, :, t - w :], v[:, :, t - w :])
    return q, keys, values, kq, vq, {"scale": d**-0.5, "prefix": prefix, "suffix": suffix}


@pytest.mark.parametrize("index", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_matches_reference(index, dtype):
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    case = _interpreted(CASES[index]) if INTERPRET else CASES[index]
    q, keys, values, kq, vq, kwargs = _case_inputs(case, dtype, seed=index + 3)
    ref = compressed_attention(q.float(), keys, values, kq, vq, **kwargs)
    out = decode_attention_triton(
        q, keys, values, kq, vq, tokens_per_split=64 if INTERPRET else 128, **kwargs
    )
    check_kernel_output(out, ref, dtype)
    # the default split heuristic and a whole-history program give the same function
    out2 = decode_attention_triton(q, keys, values, kq, vq, **kwargs)
    check_kernel_output(out2, ref, dtype)
    out3 = decode_attention_triton(q, keys, values, kq, vq, tokens_per_split=1 << 20, **kwargs)
    check_kernel_output(out3, ref, dtype)
    # centroids gathered from memory instead of byte-permuted from registers (same function)
    out4 = decode_attention_triton(q, keys, values, kq, vq, lookup="gather", **kwargs)
    check_kernel_output(out4, ref, dtype)


LEFT_PADDED = [
    # (B, Hq, Hkv, T, D, bits_k, bits_v, sinks, window), then each sequence's first position
    ((3, 32, 8, 1500, 128, 4, 2, 4, 3), (0, 2, 700)),  # pads in the sinks / in the history
    ((2, 9, 3, 400, 64, 4, 4, 0, 1), (5, 390)),  # a whole split hidden; most of the history
    ((2, 8, 2, 300, 64, 3, 2, 4, 6), (298, 0)),  # only the window left to see
]


@pytest.mark.parametrize("index", range(len(LEFT_PADDED)))
def test_decode_attention_left_padded_batch(index):
    """``valid_from`` gives what the reference gives with the left-padding mask."""
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    case, starts = LEFT_PADDED[index]
    case = _interpreted(case) if INTERPRET else case
    q, keys, values, kq, vq, kwargs = _case_inputs(case, torch.bfloat16, seed=index + 11)
    total = case[3]
    starts = torch.tensor([min(s, total - 1) for s in starts], device=DEVICE)
    mask = (torch.arange(total, device=DEVICE)[None, :] >= starts[:, None])[:, None, None, :]
    ref = compressed_attention(q.float(), keys, values, kq, vq, mask=mask, **kwargs)
    for split in (64, None):
        out = decode_attention_triton(
            q, keys, values, kq, vq, valid_from=starts, tokens_per_split=split, **kwargs
        )
        check_kernel_output(out, ref, torch.bfloat16)


def test_decode_attention_refuses_bad_valid_from():
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    q, keys, values, kq, vq, kwargs = _case_inputs((2, 8, 2, 100, 64, 4, 2, 0, 1), torch.float16, 1)
    with pytest.raises(ValueError, match="valid_from must be a \\(2,\\) integer tensor"):
        decode_attention_triton(
            q, keys, values, kq, vq, valid_from=torch.zeros(3, device=DEVICE), **kwargs
        )


def test_decode_attention_reads_a_history_view():
    """A view into a larger (growable) buffer is read in place with its strides."""
    from tqai.attention import slice_tokens
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    q, keys, values, kq, vq, kwargs = _case_inputs((2, 8, 2, 200, 64, 4, 2, 0, 1), torch.float16, 1)
    keys_view, values_view = slice_tokens(keys, 0, 150), slice_tokens(values, 0, 150)
    assert not keys_view.packed.is_contiguous()
    ref = compressed_attention(q.float(), keys_view, values_view, kq, vq, **kwargs)
    out = decode_attention_triton(q, keys_view, values_view, kq, vq, **kwargs)
    check_kernel_output(out, ref, torch.float16)


def test_group_layout_matches_packing():
    """The kernel reads whole packing groups: code ``8 j + i`` is bits ``[b i, b i + b)`` of the
    little-endian integer in bytes ``[b j, b j + b)`` of a row (the layout of tqai.packing)."""
    from tqai_torch.kernels.triton.decode_attention import group_layout

    gen = torch.Generator().manual_seed(0)
    for bits in (1, 2, 3, 4, 8):
        for d in (64, 80, 96, 128):
            codes = torch.randint(0, 2**bits, (5, d), generator=gen, dtype=torch.int64)
            packed = pack_bits(codes, bits).to(torch.int64)
            wp, wr = group_layout(bits, d)
            assert wr == packed.shape[1] // bits
            assert wp >= wr
            assert 8 * wp >= 16
            weights = torch.tensor([1 << (8 * k) for k in range(bits)])
            groups = (packed.reshape(5, wr, bits) * weights).sum(-1)
            for dim in range(d):
                j, i = divmod(dim, 8)
                got = (groups[:, j] >> (bits * i)) & (2**bits - 1)
                assert torch.equal(got, codes[:, dim]), (bits, d, dim)
            assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, d).to(torch.int64), codes)


def test_decode_attention_refuses_bad_input():
    from tqai_torch.kernels.triton.decode_attention import decode_attention_triton

    q, keys, values, kq, vq, kwargs = _case_inputs((1, 4, 2, 40, 64, 4, 2, 0, 0), torch.float16, 2)
    with pytest.raises(ValueError, match="one token"):
        decode_attention_triton(q.expand(1, 4, 2, 64), keys, values, kq, vq, **kwargs)
    with pytest.raises(ValueError, match="keys"):
        decode_attention_triton(q, None, values, kq, vq, **kwargs)
    vq5 = TurboQuantMSE(64, 5, seed=3)
    values5 = vq5.quantize(torch.randn(1, 2, 40, 64, device=DEVICE))
    with pytest.raises(ValueError, match="quantizer"):
        decode_attention_triton(q, keys, values5, kq, vq5, **kwargs)
    with pytest.raises(ValueError, match="lookup"):
        decode_attention_triton(q, keys, values, kq, vq, lookup="table", **kwargs)

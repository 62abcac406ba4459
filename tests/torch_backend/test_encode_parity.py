"""The fused Triton encode matches ``TurboQuantMSE.quantize`` (the core reference).

On a CUDA GPU (marked ``gpu``), or on the CPU under ``TRITON_INTERPRET=1`` (see triton_interpret).
Codes may differ from the reference only where a rotated coordinate is within float32 rounding
of a codebook boundary (the kernel's rotation rounds differently): the test bounds how many codes
differ and checks that every differing code is a neighbour of the reference's one.
"""

from __future__ import annotations

import pytest
import torch

from tqai import TurboQuantMSE, TurboQuantProd

triton = pytest.importorskip("triton")
from triton_interpret import DEVICE, MARKS  # noqa: E402

pytestmark = MARKS

CASES = [
    # (shape, bits, rotation)
    ((1, 8, 300, 128), 4, "haar"),
    ((1, 8, 300, 128), 2, "hadamard"),
    ((2, 3, 77, 64), 3, "haar"),
    ((3, 2, 33, 80), 8, "rotor"),
    ((2, 2, 41, 96), 1, "haar"),
    ((1, 2, 19, 256), 4, "hadamard"),
    ((5, 13), 2, "haar"),  # d not a multiple of 8
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_matches_reference(case, dtype):
    from tqai_torch.kernels.triton.encode import quantize_triton

    shape, bits, rotation = case
    gen = torch.Generator(device=DEVICE).manual_seed(bits + shape[-1])
    x = (torch.randn(shape, device=DEVICE, generator=gen) * 3).to(dtype)
    x[..., 0, :] = 0  # zero vectors: norm 0, codes of the zero unit vector
    q = TurboQuantMSE(shape[-1], bits, rotation=rotation, seed=5)
    ref = q.quantize(x)
    got = quantize_triton(x, q)
    assert got.spec == ref.spec
    assert got.shape == ref.shape
    assert got.dtype == ref.dtype
    assert got.packed.shape == ref.packed.shape
    # the same float32 formula; the sum of squares may round differently by one float32 ulp,
    # which can move the fp16 norm by at most one fp16 ulp
    assert torch.allclose(got.norms.float(), ref.norms.float(), rtol=2**-10, atol=0)
    codes, ref_codes = q.codes(got).int(), q.codes(ref).int()
    differ = codes != ref_codes
    assert differ.float().mean().item() <= 1e-3, differ.float().mean().item()
    assert bool(((codes - ref_codes).abs() <= 1).all())  # ties: a neighbouring cell only
    # where the codes agree the packed bits are the reference's bit for bit
    if not bool(differ.any()):
        assert torch.equal(got.packed, ref.packed)
    err = (q.dequantize(got).float() - q.dequantize(ref).float()).norm() / x.float().norm()
    assert err.item() <= 1e-2


def test_encode_writes_in_place_into_a_history_slice():
    """``out=`` views into a preallocated (B, H, capacity, .) buffer are written in place."""
    from tqai_torch.kernels.triton.encode import quantize_triton

    q = TurboQuantMSE(64, 4, seed=1)
    x = torch.randn(2, 3, 10, 64, device=DEVICE)
    packed = torch.full((2, 3, 32, 32), 7, dtype=torch.uint8, device=DEVICE)
    norms = torch.full((2, 3, 32), -1.0, dtype=torch.float16, device=DEVICE)
    out = quantize_triton(x, q, out=(packed[:, :, 5:15], norms[:, :, 5:15]))
    ref = q.quantize(x)
    assert out.packed.data_ptr() == packed[:, :, 5:15].data_ptr()
    assert torch.allclose(norms[:, :, 5:15].float(), ref.norms.float(), rtol=2**-10, atol=0)
    agree = (q.codes(out) == q.codes(ref)).float().mean().item()
    assert agree >= 0.999
    assert bool((packed[:, :, :5] == 7).all() and (packed[:, :, 15:] == 7).all())  # untouched
    assert bool((norms[:, :, :5] == -1).all() and (norms[:, :, 15:] == -1).all())


@pytest.mark.skipif(DEVICE != "cuda", reason="counts the kernels compiled for a CUDA device")
def test_encode_at_every_token_offset_compiles_one_kernel(monkeypatch):
    """A history's next token lies at any offset: its outputs' alignment is not specialized on,
    so a growing history never compiles the encode again (mid-generation), and each offset holds
    the reference's codes. (A Triton that cannot turn the specialization off compiles one more
    kernel, for the aligned offsets, and no other.)"""
    from tqai_torch.kernels.triton import launch
    from tqai_torch.kernels.triton.encode import _UNALIGNED, _encode_kernel, quantize_triton

    monkeypatch.setattr(launch, "_DIRECT", False)  # every call through Triton's own binder
    q = TurboQuantMSE(128, 4, seed=2)
    packed = torch.zeros(1, 2, 16, 64, dtype=torch.uint8, device="cuda")
    norms = torch.zeros(1, 2, 16, dtype=torch.float16, device="cuda")
    x = torch.randn(1, 2, 16, 128, device="cuda")
    compiled = _encode_kernel.device_caches[torch.cuda.current_device()][0]
    quantize_triton(x[:, :, :1], q, out=(packed[:, :, :1], norms[:, :, :1]))
    kernels = len(compiled)
    for t in range(1, 16):
        quantize_triton(
            x[:, :, t : t + 1], q, out=(packed[:, :, t : t + 1], norms[:, :, t : t + 1])
        )
    assert len(compiled) == kernels + (0 if _UNALIGNED else 1)
    ref = q.quantize(x)
    assert torch.allclose(norms.float(), ref.norms.float(), rtol=2**-10, atol=0)
    got = type(ref)(spec=ref.spec, shape=ref.shape, dtype=ref.dtype, packed=packed, norms=norms)
    assert (q.codes(got) == q.codes(ref)).float().mean().item() >= 0.999


def test_encode_refuses_bad_input():
    from tqai_torch.kernels.triton.encode import quantize_triton

    q = TurboQuantMSE(64, 4)
    with pytest.raises(ValueError, match="shape"):
        quantize_triton(torch.randn(3, 32, device=DEVICE), q)
    bad = (torch.empty(3, 8, dtype=torch.uint8, device=DEVICE), torch.empty(3))
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="out"):
        quantize_triton(x, q, out=bad)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_triton(x, q, check=True)


def test_triton_encoder_wraps_a_quantizer():
    """The wrapper the CUDA cache installs: fused encode on CUDA tensors, the wrapped quantizer
    everywhere else, every other attribute the wrapped quantizer's."""
    from tqai_torch.kernels.triton.encode import TritonEncoder

    inner = TurboQuantMSE(64, 4, seed=3)
    enc = TritonEncoder(inner)
    assert enc.spec == inner.spec
    assert enc.codebook is inner.codebook
    x = torch.randn(2, 3, 10, 64, device=DEVICE)
    qt = enc.quantize(x)
    ref = inner.quantize(x)
    assert qt.packed.shape == ref.packed.shape
    agree = (qt.packed == ref.packed).float().mean().item()
    assert agree > 0.99, agree
    torch.testing.assert_close(enc.dequantize(qt), inner.dequantize(ref), atol=0.2, rtol=0.0)
    with pytest.raises(ValueError, match="not served by the fused encode"):
        TritonEncoder(TurboQuantProd(64, 4, seed=0))  # QJL keys: the reference encodes them


@pytest.mark.skipif(DEVICE != "cuda", reason="the cache installs the fused encode on CUDA only")
def test_cuda_cache_encodes_with_the_kernel(monkeypatch):
    from tqai.kvstore import KVCacheConfig
    from tqai_torch.cache import TqaiLayer
    from tqai_torch.kernels.triton.encode import TritonEncoder

    k = torch.randn(1, 2, 40, 64, device="cuda")
    layer = TqaiLayer(KVCacheConfig(bits_k=4, bits_v=2))
    layer.update(k, k)
    assert isinstance(layer.store.key_quantizer, TritonEncoder)
    monkeypatch.setenv("TQAI_KERNEL", "reference")
    layer = TqaiLayer(KVCacheConfig(bits_k=4, bits_v=2))
    layer.update(k, k)
    assert not isinstance(layer.store.key_quantizer, TritonEncoder)


def test_triton_encoder_writes_in_place_only_where_it_encodes_fused():
    """``quantize_into`` (the store's in-place append) writes only on the fused path."""
    from tqai_torch.kernels.triton.encode import TritonEncoder

    enc = TritonEncoder(TurboQuantMSE(64, 4, seed=3))
    x = torch.randn(1, 2, 3, 64)  # CPU: the wrapped quantizer's path, nothing written
    arrays = {"packed": torch.zeros(1, 2, 3, 32, dtype=torch.uint8), "norms": torch.zeros(1, 2, 3)}
    assert not enc.quantize_into(x, arrays)
    assert not arrays["packed"].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="the cache installs the fused encode on CUDA only")
def test_cuda_store_appends_the_kernel_codes_in_place(monkeypatch):
    """Decode-step commits write the kernel's codes straight into the history: the same bytes
    as quantizing into a new tensor and copying it there."""
    from tqai.kvstore import KVCacheConfig
    from tqai_torch.cache import TqaiLayer
    from tqai_torch.kernels.triton.encode import TritonEncoder

    def run():
        gen = torch.Generator(device="cuda").manual_seed(7)
        layer = TqaiLayer(KVCacheConfig(bits_k=4, bits_v=2, residual_window=3))
        for t in (40, 1, 1, 1, 300, 1):
            k = torch.randn(1, 2, t, 64, device="cuda", generator=gen)
            layer.update(k, -k)
            layer.attend(k, None, 0.125)  # as the attention function does: commits the tokens
        return layer.store

    original = TritonEncoder.quantize_into
    wrote, declined = [], []

    def counted(self, x, arrays):
        wrote.append(original(self, x, arrays))
        return wrote[-1]

    monkeypatch.setattr(TritonEncoder, "quantize_into", counted)
    direct = run()
    assert wrote
    assert all(wrote)  # every commit after the first went straight into the buffers
    monkeypatch.setattr(
        TritonEncoder, "quantize_into", lambda self, x, a: declined.append(1) and False
    )
    copied = run()
    assert declined  # offered, declined: quantized into new tensors, then copied
    for ha, hb in ((direct.keys, copied.keys), (direct.values, copied.values)):
        assert ha.length == hb.length
        for name, buf in ha.buffers.items():
            assert torch.equal(buf[:, :, : ha.length], hb.buffers[name][:, :, : hb.length])

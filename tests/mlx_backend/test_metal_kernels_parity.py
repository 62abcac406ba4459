"""The Metal kernels of tqai_mlx against the MLX-ops paths they mirror.

On machines without Metal (these CPU machines) only the launchers run, with the MLX-ops twin in
the kernel's place; the ``metal`` tests compare the kernels themselves and skip elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from tqai.kvstore import KVCacheConfig, KVStore  # noqa: E402
from tqai.packing import unpack_bits  # noqa: E402
from tqai.quantizers import TurboQuantMSE  # noqa: E402
from tqai.testing import xp_assert_close, xp_assert_equal  # noqa: E402
from tqai_mlx.kernels.metal import (  # noqa: E402
    MetalEncoder,
    decode_attention,
    decode_supported,
    encode_metal,
)

CASES = [
    # bits_k, bits_v, sinks, window, hq, hkv, d, batch, history, extra
    pytest.param(4, 2, 4, 0, 4, 2, 32, 1, 40, {}, id="k4v2-gqa"),
    pytest.param(3, 3, 0, 5, 8, 1, 36, 2, 23, {"rotation": "hadamard"}, id="k3v3-mqa-d36"),
    pytest.param(8, 8, 2, 0, 2, 2, 128, 1, 300, {"norm_dtype": "float32"}, id="k8v8-d128"),
    pytest.param(1, 1, 1, 3, 6, 3, 100, 1, 17, {"rotation": "rotor"}, id="k1v1-d100"),
]


def _store(bits_k, bits_v, sinks, window, hkv, d, batch, history, extra, *, rng):
    config = KVCacheConfig(
        bits_k=bits_k, bits_v=bits_v, sink_tokens=sinks, residual_window=window, **extra
    )
    store = KVStore(config)
    k = mx.array(rng.standard_normal((batch, hkv, history, d)).astype(np.float32))
    v = mx.array(rng.standard_normal((batch, hkv, history, d)).astype(np.float32))
    store.update(k, v)
    store.commit()
    step = mx.array(rng.standard_normal((batch, hkv, 1, d)).astype(np.float32))
    store.update(step, -step)  # a staged token, as during a decode step
    return store


@pytest.mark.parametrize(
    ("bits_k", "bits_v", "sinks", "window", "hq", "hkv", "d", "batch", "history", "extra"), CASES
)
def test_decode_attention_launcher_matches_reference(
    bits_k, bits_v, sinks, window, hq, hkv, d, batch, history, extra
):
    """The launcher with the MLX-ops twin == compressed_attention over the same store."""
    rng = np.random.default_rng(bits_k * 100 + d)
    store = _store(bits_k, bits_v, sinks, window, hkv, d, batch, history, extra, rng=rng)
    q = mx.array(rng.standard_normal((batch, hq, 1, d)).astype(np.float32))
    assert decode_supported(store, q)
    out = decode_attention(q, store, scale=d**-0.5, impl="ops")
    ref = store.attend(q, scale=d**-0.5, mask=None)
    xp_assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_decode_supported_refuses_what_the_kernel_does_not_cover():
    rng = np.random.default_rng(0)
    q = mx.zeros((1, 2, 1, 32))
    store = _store(4, 2, 0, 0, 2, 32, 1, 8, {"use_qjl": True}, rng=rng)
    assert not decode_supported(store, q)
    store = _store(4, 2, 0, 0, 2, 32, 1, 8, {}, rng=rng)
    assert not decode_supported(store, mx.zeros((1, 2, 3, 32)))
    assert not decode_supported(KVStore(KVCacheConfig()), q)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(q, store, scale=1.0, impl="cuda")


def test_metal_encoder_delegates_everything_but_quantize():
    q = TurboQuantMSE(32, 3)
    enc = MetalEncoder(q)
    assert enc.spec is q.spec
    assert enc.rotation is q.rotation
    assert enc.dequantize.__self__ is q


# ---- on Metal --------------------------------------------------------------------------------
@pytest.mark.metal
@pytest.mark.parametrize("d", [32, 36, 64, 100, 128])
@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 8])
def test_encode_metal_matches_reference(d, n_bits):
    rng = np.random.default_rng(d + n_bits)
    quantizer = TurboQuantMSE(d, n_bits, rotation="hadamard")
    # An irregular token count and a strided (non-contiguous) view.
    x = mx.array(rng.standard_normal((3, 77, 2 * d)).astype(np.float32))[..., ::2]
    got = encode_metal(x, quantizer)
    want = quantizer.quantize(x)
    assert got.spec == want.spec
    assert got.shape == want.shape
    xp_assert_close(got.norms, want.norms, rtol=1e-3)
    codes_got = unpack_bits(got.packed, n_bits, d)
    codes_want = unpack_bits(want.packed, n_bits, d)
    mismatch = mx.mean((codes_got != codes_want).astype(mx.float32)).item()
    assert mismatch < 1e-3, f"{mismatch:.2%} of codes differ (only boundary ties may)"
    if mismatch == 0:
        xp_assert_equal(got.packed, want.packed)


@pytest.mark.metal
@pytest.mark.parametrize(
    ("bits_k", "bits_v", "sinks", "window", "hq", "hkv", "d", "batch", "history", "extra"), CASES
)
def test_decode_attention_metal_matches_reference(
    bits_k, bits_v, sinks, window, hq, hkv, d, batch, history, extra
):
    rng = np.random.default_rng(bits_k * 100 + d)
    store = _store(bits_k, bits_v, sinks, window, hkv, d, batch, history, extra, rng=rng)
    q = mx.array(rng.standard_normal((batch, hq, 1, d)).astype(np.float32))
    kernel = decode_attention(q, store, scale=d**-0.5, impl="metal")
    ops = decode_attention(q, store, scale=d**-0.5, impl="ops")
    reference = store.attend(q, scale=d**-0.5, mask=None)  # compressed_attention, MLX ops
    # The core reference computes in float32 only (no fp64 reference exists for
    # assert_parity's rule), so the bound is float32 summation-order noise over <= 300 tokens.
    xp_assert_close(kernel, ops, rtol=1e-4, atol=1e-5)
    xp_assert_close(kernel, reference, rtol=1e-4, atol=1e-5)

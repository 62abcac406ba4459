"""Named configs and the activation codec (quantize-dequantize along the last axis)."""

from __future__ import annotations

import numpy as np
import pytest

from tqai._xp import to_host
from tqai.activations import ActivationCompressor, ActivationConfig
from tqai.codebooks import codebook_distortion, lloyd_max_codebook
from tqai.named_configs import NAMED_CONFIGS, named_config, resolve_patch_options
from tqai.testing import make_array

EXPECTED = {
    "kv-only": (4, 2, None, None),
    "kv+hidden8": (4, 2, 8, None),
    "kv+hidden6": (4, 2, 6, None),
    "kv+ffn8": (4, 2, None, 8),
    "all8": (4, 2, 8, 8),
    "all6": (4, 2, 6, 6),
    "aggressive": (3, 2, 6, 6),
}


def test_named_configs_are_the_specified_table():
    got = {n: (c.bits_k, c.bits_v, c.hidden_bits, c.ffn_bits) for n, c in NAMED_CONFIGS.items()}
    assert got == EXPECTED


@pytest.mark.parametrize("name", list(EXPECTED))
def test_resolve_named_config(name):
    bits_k, bits_v, hidden, ffn = EXPECTED[name]
    k, v, act = resolve_patch_options(name, bits_k=None, bits_v=None)
    assert (k, v) == (bits_k, bits_v)
    if hidden is None and ffn is None:
        assert act is None
    else:
        assert (act.hidden_bits, act.ffn_bits) == (hidden, ffn)


def test_resolve_without_name_defaults_and_explicit_options():
    assert resolve_patch_options(None, bits_k=None, bits_v=None) == (4, 2, None)
    k, v, act = resolve_patch_options(None, bits_k=3, bits_v=3, ffn_bits=5)
    assert (k, v, act.hidden_bits, act.ffn_bits) == (3, 3, None, 5)
    # Agreeing explicit options are allowed with a name.
    assert resolve_patch_options("aggressive", bits_k=3, bits_v=None)[0] == 3


def test_resolve_refuses_contradictions_and_unknown_names():
    with pytest.raises(ValueError, match=r"contradicts.*bits_k=4 \(the config says 3\)"):
        resolve_patch_options("aggressive", bits_k=4, bits_v=None)
    with pytest.raises(ValueError, match=r"config must be one of \['kv-only'"):
        named_config("all4")
    with pytest.raises(ValueError, match=r"hidden_bits must be in 1\.\.8"):
        ActivationConfig(hidden_bits=9)
    with pytest.raises(ValueError, match="stream must be one of"):
        ActivationConfig(hidden_bits=8).bits("attn")


@pytest.mark.parametrize("n_bits", [2, 6, 8])
def test_activation_codec_error_matches_theory(xp, n_bits):
    d = 96
    x = np.random.default_rng(n_bits).standard_normal((3, 200, d)).astype(np.float32) * 7
    y = ActivationCompressor(n_bits=n_bits, seed=3)(make_array(xp, x))
    assert y.shape == x.shape
    assert y.dtype == make_array(xp, x).dtype
    y = to_host(y)
    nmse = np.sum((y - x) ** 2) / np.sum(x**2)
    theory = codebook_distortion(lloyd_max_codebook(d, n_bits))
    assert 0.8 * theory < nmse < 1.2 * theory


def test_activation_codec_keeps_half_precision_dtype():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float16)
    y = ActivationCompressor(n_bits=8)(x)
    assert y.dtype == np.float16
    assert np.max(np.abs(y.astype(np.float32) - x)) < 0.1


def test_activation_streams_use_their_own_seeds():
    config = ActivationConfig(hidden_bits=8, ffn_bits=6, seed=5)
    hidden, ffn = config.compressor("hidden"), config.compressor("ffn")
    assert (hidden.n_bits, hidden.seed, ffn.n_bits, ffn.seed) == (8, 5, 6, 6)
    assert ActivationConfig(ffn_bits=8).compressor("hidden") is None

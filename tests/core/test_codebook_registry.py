"""Per-head-type codebook registry: lookup order, defaults, quantizers, JSON save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tqai._xp import to_host
from tqai.codebook_registry import (
    FORMAT,
    FORMAT_VERSION,
    CodebookKey,
    CodebookRegistry,
    CodebookRegistryError,
)
from tqai.codebooks import Codebook, lloyd_max_codebook
from tqai.quantizers import TurboQuantMSE, TurboQuantProd
from tqai.registry import PluginNotFoundError
from tqai.rotor_quantizer import RotorQuantizer
from tqai.solvers.attention_aware import attention_aware_codebook
from tqai.solvers.cmaes import cmaes_codebook
from tqai.testing import make_array, xp_assert_equal

D = 64


def _custom(n_bits: int = 2, scale: float = 0.9, kind: str = "custom", d: int = D) -> Codebook:
    lm = lloyd_max_codebook(d, n_bits)
    c = lm.centroids * scale
    return Codebook(centroids=c, boundaries=(c[1:] + c[:-1]) / 2, d=d, n_bits=n_bits, kind=kind)


def test_default_is_lloyd_max_for_every_head_type():
    reg = CodebookRegistry()
    for head_type in ("key", "value", "hidden"):
        cb = reg.get(head_type, D, 3)
        assert cb.kind == "lloyd_max"
        np.testing.assert_array_equal(cb.centroids, lloyd_max_codebook(D, 3).centroids)
    assert len(reg) == 0


def test_keys_and_values_get_their_own_codebooks():
    reg = CodebookRegistry()
    key_cb = _custom(kind="attention_aware")
    reg.set("key", key_cb)
    assert reg.get("key", D, 2) is key_cb
    assert reg.get("value", D, 2).kind == "lloyd_max"
    assert reg.get("key", D, 3).kind == "lloyd_max"  # another bit width: default
    assert reg.get("key", 32, 2).kind == "lloyd_max"  # another size: default


def test_most_specific_codebook_wins():
    reg = CodebookRegistry()
    every = reg.set("key", _custom(kind="every"))
    reg.set("key", _custom(kind="layer3"), layer=3)
    reg.set("key", _custom(kind="head1"), head=1)
    reg.set("key", _custom(kind="layer3head1"), layer=3, head=1)
    assert reg.get("key", D, 2, layer=3, head=1).kind == "layer3head1"
    assert reg.get("key", D, 2, layer=3, head=0).kind == "layer3"
    assert reg.get("key", D, 2, layer=0, head=1).kind == "head1"
    assert reg.get("key", D, 2, layer=0, head=0).kind == "every"
    assert reg.get("key", D, 2).kind == "every"
    reg.remove(every)
    assert reg.get("key", D, 2).kind == "lloyd_max"
    assert reg.lookup("key", D, 2) is None


def test_solve_uses_the_codebook_plugins_and_stores_the_result():
    reg = CodebookRegistry()
    cb = reg.solve("key", 32, 2, "cmaes", layer=1, max_evals=50)
    assert cb.kind == "cmaes"
    assert reg.get("key", 32, 2, layer=1) is cb
    assert CodebookKey(head_type="key", d=32, n_bits=2, layer=1) in reg


def test_another_default_solver():
    reg = CodebookRegistry(default="fuzzy_cmeans")
    assert reg.get("value", 32, 2).kind == "fuzzy_cmeans"
    assert reg.get("value", 32, 2) is reg.get("key", 32, 2)  # solved once, cached


def test_unknown_default_solver_names_the_plugins():
    with pytest.raises(PluginNotFoundError, match=r"available: .*lloyd_max"):
        CodebookRegistry(default="no_such_solver").get("key", D, 2)


def test_quantizer_uses_the_registry_codebook():
    reg = CodebookRegistry()
    key_cb = _custom(n_bits=3, kind="cmaes")
    reg.set("key", key_cb)
    keys = reg.quantizer("key", D, 3, seed=5)
    values = reg.quantizer("value", D, 3, seed=5)
    assert isinstance(keys, TurboQuantMSE)
    assert keys.codebook is key_cb
    assert (keys.spec.codebook, values.spec.codebook) == ("cmaes", "lloyd_max")
    assert values.spec == TurboQuantMSE(D, 3, seed=5).spec

    x = np.random.default_rng(0).standard_normal((32, D)).astype(np.float32)
    qt = keys.quantize(x)
    expected = key_cb.centroids[keys.codes(qt)] * qt.norms.astype(np.float64)[:, None]
    np.testing.assert_allclose(keys.dequantize_rotated(qt), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="codebook='lloyd_max' vs 'cmaes'"):
        values.dequantize(qt)


def test_quantizer_prod_and_rotor_kinds():
    reg = CodebookRegistry()
    reg.set("key", _custom(n_bits=2, kind="cmaes"))
    prod = reg.quantizer("key", D, 3, kind="prod")  # MSE stage: 2 bits
    assert isinstance(prod, TurboQuantProd)
    assert (prod.codebook.kind, prod.spec.codebook) == ("cmaes", "cmaes")
    rotor = reg.quantizer("key", D, 2, kind="rotor", seed=1)
    assert isinstance(rotor, RotorQuantizer)
    assert rotor.spec.codebook == "cmaes"
    one_bit = reg.quantizer("key", D, 1, kind="prod")  # no MSE stage, no codebook
    assert one_bit.codebook is None
    assert one_bit.spec.codebook == "lloyd_max"


def test_quantizer_codes_are_identical_on_every_backend(xp):
    reg = CodebookRegistry()
    reg.set("key", _custom(n_bits=3, kind="cmaes"))
    norm_dtype = "float16" if hasattr(xp, "float16") else "float32"
    q = reg.quantizer("key", D, 3, norm_dtype=norm_dtype, seed=2)
    x_host = np.random.default_rng(1).standard_normal((4, 8, D)).astype(np.float32)
    reference = reg.quantizer("key", D, 3, norm_dtype=norm_dtype, seed=2).quantize(x_host)
    qt = q.quantize(make_array(xp, x_host))
    xp_assert_equal(qt.packed, make_array(xp, to_host(reference.packed)))


def test_attention_aware_key_codebook_helps_attention_through_the_quantizer():
    """End to end: real keys through TurboQuantMSE (Haar), softmax KL vs the exact scores."""
    reg = CodebookRegistry()
    reg.set("key", attention_aware_codebook(D, 1, num_samples=1024))
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((512, 32, D))
    queries = rng.standard_normal((512, D))
    queries *= 2.0 / np.linalg.norm(queries, axis=-1, keepdims=True)  # logit std ~ 2 per key

    def kl(quantizer) -> float:
        approx = quantizer.dequantize(quantizer.quantize(keys), dtype=np.float64)
        exact_logits = np.einsum("qnd,qd->qn", keys, queries)
        approx_logits = np.einsum("qnd,qd->qn", approx, queries)
        log_p = exact_logits - np.logaddexp.reduce(exact_logits, axis=-1, keepdims=True)
        log_q = approx_logits - np.logaddexp.reduce(approx_logits, axis=-1, keepdims=True)
        return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))

    aware = kl(reg.quantizer("key", D, 1, norm_dtype="float32"))
    mse = kl(reg.quantizer("value", D, 1, norm_dtype="float32"))
    assert aware < 0.99 * mse, (aware, mse)


def test_json_round_trip_is_exact(tmp_path):
    reg = CodebookRegistry(default="lloyd_max")
    reg.set("key", cmaes_codebook(D, 3, objective=lambda c: float(np.sum(c.centroids**2))))
    reg.set("value", _custom(n_bits=4, kind="fuzzy_cmeans"), layer=2, head=5)
    reg.set("hidden", _custom(n_bits=1, kind="custom", d=32))
    path = tmp_path / "codebooks.json"
    reg.save(path)
    loaded = CodebookRegistry.load(path)
    assert loaded == reg
    for (key, cb), (key2, cb2) in zip(reg.items(), loaded.items(), strict=True):
        assert key == key2
        assert cb.kind == cb2.kind
        np.testing.assert_array_equal(cb.centroids, cb2.centroids)
        np.testing.assert_array_equal(cb.boundaries, cb2.boundaries)
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == (FORMAT, FORMAT_VERSION)


def _valid() -> dict:
    reg = CodebookRegistry()
    reg.set("key", _custom(n_bits=1, kind="cmaes"))
    return reg.to_dict()


def _with(**changes):
    data = _valid()
    data["entries"][0].update(changes.pop("entry", {}))
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "must be a JSON object"),
        (_with(format="tqai.other"), "not a tqai codebook registry"),
        (_with(version=FORMAT_VERSION + 1), "newer than this tqai reads"),
        (_with(version="1"), "version must be a positive integer"),
        (_with(extra=1), "unknown top-level fields"),
        (_with(default=""), "default must be a codebook solver name"),
        (_with(entries={}), "entries must be a list"),
        (_with(entry={"centroids": [-0.1, 0.0, 0.1]}), r"entry 0 .*centroids must be a list of 2"),
        (_with(entry={"centroids": [0.1, -0.1]}), "entry 0 .*strictly increasing"),
        (_with(entry={"centroids": [-0.1, "0.1"]}), "only numbers"),
        (_with(entry={"centroids": [-0.1, float("nan")]}), "finite"),
        (_with(entry={"boundaries": [0.5]}), "between its two centroids"),
        (_with(entry={"n_bits": 9}), r"entry 0 .*n_bits must be in 1..8"),
        (_with(entry={"d": 1}), "d must be an integer >= 2"),
        (_with(entry={"head_type": ""}), "head_type must be a non-empty string"),
        (_with(entry={"layer": -1}), "layer must be a non-negative integer"),
        (_with(entry={"kind": 3}), "kind must be a non-empty solver name"),
        (_with(entry={"bits": 2}), r"unknown fields \['bits'\]"),
    ],
)
def test_from_dict_rejects_malformed_data(data, match):
    with pytest.raises(CodebookRegistryError, match=match):
        CodebookRegistry.from_dict(data)


def test_duplicate_entries_and_bad_json_are_named(tmp_path):
    data = _valid()
    data["entries"].append(dict(data["entries"][0]))
    with pytest.raises(CodebookRegistryError, match="entry 1: duplicate key"):
        CodebookRegistry.from_dict(data)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(CodebookRegistryError, match=r"broken\.json: .*not valid JSON"):
        CodebookRegistry.load(path)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda r: r.set("key", "lloyd_max"), TypeError, "must be a tqai.codebooks.Codebook"),
        (lambda r: r.set("", _custom()), ValueError, "head_type"),
        (lambda r: r.set("key", _custom(), layer=-2), ValueError, "layer"),
        (lambda r: r.get("key", D, 0), ValueError, "n_bits"),
        (lambda r: r.get("key", D, 2, head=1.5), ValueError, "head"),
        (lambda r: r.remove(CodebookKey(head_type="key", d=D, n_bits=2)), KeyError, "no codebook"),
        (lambda r: r.quantizer("key", D, 2, kind="nope"), PluginNotFoundError, "nope"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(CodebookRegistry())

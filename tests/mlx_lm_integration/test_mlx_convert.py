"""Converted folders for mlx-lm models: patch(from_pretrained=DIR) solves nothing, same outputs;
pipelines and calibrations stored; per-layer widths only as far as mlx patch takes them."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.models import llama  # noqa: E402

import tqai.codebooks  # noqa: E402
import tqai.rotations  # noqa: E402
import tqai_mlx  # noqa: E402
from tqai import prebuilt  # noqa: E402
from tqai.pipeline.scorers.fisher_static import FisherCalibration  # noqa: E402
from tqai.pretrained import PretrainedError  # noqa: E402
from tqai_mlx.convert import convert  # noqa: E402
from tqai_mlx.patching import patch_config  # noqa: E402

pytestmark = pytest.mark.integration


def _model(intermediate: int = 100):
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=intermediate,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
        head_dim=16,
    )  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _run(model, cache):
    ids = mx.array(np.random.default_rng(1).integers(3, 128, (1, 17)))
    return [np.array(model(ids[:, :-1], cache=cache)), np.array(model(ids[:, -1:], cache=cache))]


@pytest.fixture
def fresh():
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()
    yield
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()


@pytest.mark.parametrize(
    "options",
    [
        {"config": "all6"},
        {"bits_k": 3, "bits_v": 3, "rotation": "rotor", "seed": 2},
        {
            "bits_k": 3,
            "bits_v": 2,
            "residual_window": 0,  # the monitor sees codes at once; its low threshold adds bits
            "pipeline": {"monitor": "stability", "monitor_kwargs": {"threshold": 1e-6}},
        },
    ],
)
def test_from_pretrained_is_identical_without_solving(tmp_path, monkeypatch, fresh, options):
    model = _model()
    want = _run(model, tqai_mlx.patch(model, **options))
    tqai_mlx.unpatch(model)
    convert(model, tmp_path, **options)
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["backend"] == "mlx"
    assert doc["options"] == json.loads(json.dumps(options))
    assert [layer["compressed"] for layer in doc["layers"]] == [True, True]
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("solved a constant that the converted folder holds")

    monkeypatch.setattr(tqai.codebooks, "solve_lloyd_max", refuse)
    monkeypatch.setattr(tqai.rotations, "_haar_matrix", refuse)
    fresh_model = _model()
    got = _run(fresh_model, tqai_mlx.patch(fresh_model, from_pretrained=tmp_path))
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    tqai_mlx.unpatch(fresh_model)


def test_mismatched_model_or_backend_is_refused(tmp_path, fresh):
    model = _model()
    convert(model, tmp_path, config="kv-only")
    with pytest.raises(PretrainedError, match="intermediate_size: folder 100, model 120"):
        tqai_mlx.patch(_model(120), from_pretrained=tmp_path)
    with pytest.raises(ValueError, match="got also bits_v"):
        tqai_mlx.patch(model, from_pretrained=tmp_path, bits_v=4)
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    doc["backend"] = "torch"
    (tmp_path / "tqai_config.json").write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="written for the 'torch' backend, not 'mlx'"):
        tqai_mlx.patch(model, from_pretrained=tmp_path)
    assert not tqai_mlx.is_patched(model)


def _calibration(layers: int = 2) -> FisherCalibration:
    k = np.arange(1.0, 1.0 + 2 * layers).reshape(layers, 2)
    return FisherCalibration(k=k, v=k[::-1].copy(), model="tiny-mlx-llama")


def test_calibration_is_stored_checked_and_verified(tmp_path, fresh):
    model = _model()
    with pytest.raises(
        ValueError, match=r"calibration has 3 layers x 2 K/V heads, the model 2 x 2"
    ):
        convert(model, tmp_path, calibration=_calibration(3))
    source = _calibration().save(tmp_path / "fisher.json")
    out = tmp_path / "converted"
    convert(model, out, calibration=source, bits_k=3)
    doc = json.loads((out / "tqai_config.json").read_text())
    assert doc["calibration"]["num_layers"] == 2
    assert doc["calibration"]["layer_bits_from"] is None
    stored = FisherCalibration.load(out / "tqai_calibration.json")
    assert np.array_equal(stored.k, _calibration().k)
    tqai_mlx.patch(model, from_pretrained=out)
    assert patch_config(model).bits_k == 3
    tqai_mlx.unpatch(model)
    copy = out / "tqai_calibration.json"
    copy.write_text(copy.read_text() + " ")
    with pytest.raises(PretrainedError, match="does not match the SHA-256"):
        tqai_mlx.patch(model, from_pretrained=out)
    (out / "tqai_calibration.json").unlink()
    with pytest.raises(PretrainedError, match=r"tqai_calibration\.json is missing"):
        tqai_mlx.patch(model, from_pretrained=out)
    assert not tqai_mlx.is_patched(model)


def test_per_layer_widths_follow_what_mlx_patch_takes(tmp_path, fresh):
    model = _model()
    pairs = [(3, 2), (5, 3)]
    if "layer_bits" not in inspect.signature(tqai_mlx.patch).parameters:
        with pytest.raises(TypeError, match="layer_bits"):
            tqai_mlx.patch(model, layer_bits=pairs)
        with pytest.raises(ValueError, match=r"tqai_mlx\.patch has no layer_bits"):
            convert(model, tmp_path, layer_bits=pairs)
        with pytest.raises(ValueError, match=r"tqai_mlx\.patch has no layer_bits"):
            convert(model, tmp_path, calibration=_calibration(), fisher_layer_bits=True)
        assert not (tmp_path / "tqai_config.json").exists()
        return
    want = _run(model, tqai_mlx.patch(model, layer_bits=pairs))
    tqai_mlx.unpatch(model)
    convert(model, tmp_path, layer_bits=pairs)
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["options"]["layer_bits"] == [list(p) for p in pairs]
    assert [(la["bits_k"], la["bits_v"]) for la in doc["layers"]] == pairs
    got = _run(model, tqai_mlx.patch(model, from_pretrained=tmp_path))
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    tqai_mlx.unpatch(model)

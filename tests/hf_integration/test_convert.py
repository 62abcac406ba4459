"""``tqai convert`` / ``patch(model, from_pretrained=DIR)``: no solving, bit-identical outputs,
per-layer widths, pipelines and Fisher calibrations stored and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai.codebooks
import tqai.layer_bits
import tqai.rotations
import tqai_torch
from tqai import prebuilt
from tqai.layer_bits import fisher_layer_bits
from tqai.pipeline.scorers.fisher_static import FisherCalibration
from tqai.pretrained import PretrainedError
from tqai_torch.convert import convert

pytestmark = pytest.mark.integration

# head_dim 16 and intermediate 100 have no shipped codebook table: they are solved normally.
SHAPE = {"intermediate_size": 100}


def _run(model, cache) -> list[torch.Tensor]:
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = model(ids[:, :-2], **cache_kw(cache)).logits
        second = model(ids[:, -2:], **cache_kw(cache)).logits
    return [first, second]


@pytest.fixture
def fresh_constants():
    """Forget every computed or recorded rotation/codebook, before and after."""
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()
    yield
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()


def _forbid_solving(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("solved a constant that the converted folder holds")

    monkeypatch.setattr(tqai.codebooks, "solve_lloyd_max", refuse)
    monkeypatch.setattr(tqai.rotations, "_haar_matrix", refuse)


def _jsonable(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "options",
    [
        {"config": "all8"},
        {"bits_k": 3, "bits_v": 2, "hidden_bits": 5, "rotation": "hadamard", "seed": 3},
        {"config": "kv+ffn8", "rotation": "rotor", "sink_tokens": 2, "chunk_attention": True},
        {"bits_k": 4, "bits_v": 4, "use_qjl": True, "skip_layers": [0]},
        {"bits_k": 4, "bits_v": 2, "layer_bits": [(3, 2), (5, 3)], "residual_window": 0},
        {
            "bits_k": 3,
            "bits_v": 2,
            "residual_window": 0,  # the monitor sees codes at once; its low threshold adds bits
            "pipeline": {
                "monitor": "stability",
                "monitor_kwargs": {"threshold": 1e-6},
                "skip_layers": [0],
            },
        },
        {"bits_k": 2, "bits_v": 2, "rotation": "hadamard", "pipeline": {"monitor": "lyapunov"}},
        {  # tiered: the high and low widths (keys 4|2, values 3|1) are stored too
            "bits_k": 3,
            "bits_v": 2,
            "residual_window": 0,
            "pipeline": {"scorer": "fisher", "strategy": "tiered"},
        },
    ],
)
def test_patch_from_pretrained_is_bit_identical_without_solving(
    tmp_path, monkeypatch, fresh_constants, options
):
    model = build("llama", **SHAPE)
    want = _run(model, tqai_torch.patch(model, **options))
    tqai_torch.unpatch(model)
    convert(model, tmp_path, **options)
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["options"] == _jsonable(options)
    assert len(doc["layers"]) == 2
    assert doc["calibration"] is None
    assert not (tmp_path / "tqai_calibration.json").exists()
    fresh = build("llama", **SHAPE)
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()
    _forbid_solving(monkeypatch)
    got = _run(fresh, tqai_torch.patch(fresh, from_pretrained=tmp_path))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    tqai_torch.unpatch(fresh)


def test_converted_folder_of_a_named_config_records_per_layer_settings(tmp_path):
    model = build("gemma3")
    convert(model, tmp_path, config="aggressive")
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    layers = doc["layers"]
    assert [layer["compressed"] for layer in layers] == [False, True, False, True]
    assert {layer["bits_k"] for layer in layers if layer["compressed"]} == {3}
    assert doc["model"]["layer_types"] == model.config.layer_types
    kinds = {(e["what"], e["d"], e.get("n_bits")) for e in doc["constants"]["entries"]}
    assert ("codebook", 64, 6) in kinds  # the hidden stream (hidden_size 64, 6 bits)
    assert ("codebook", 96, 6) in kinds  # the FFN stream (intermediate 96)


def test_corrupted_or_mismatched_folders_are_refused(tmp_path, fresh_constants):
    model = build("llama", **SHAPE)
    with pytest.raises(PretrainedError, match=r"has no tqai_config\.json"):
        tqai_torch.patch(model, from_pretrained=tmp_path / "missing")
    convert(model, tmp_path, config="kv+hidden8")
    with pytest.raises(ValueError, match="got also bits_k"):
        tqai_torch.patch(model, from_pretrained=tmp_path, bits_k=3)
    other = build("llama", intermediate_size=120)
    with pytest.raises(PretrainedError, match=r"another model \(intermediate_size: folder 100"):
        tqai_torch.patch(other, from_pretrained=tmp_path)
    blob = tmp_path / "tqai_constants.npz"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="does not match the SHA-256"):
        tqai_torch.patch(model, from_pretrained=tmp_path)
    config = tmp_path / "tqai_config.json"
    doc = json.loads(config.read_text())
    doc["version"] = 99
    config.write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="version 99"):
        tqai_torch.patch(model, from_pretrained=tmp_path)
    config.write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        tqai_torch.patch(model, from_pretrained=tmp_path)
    assert model.config._attn_implementation != "tqai"  # nothing was patched


def test_misshaped_constants_are_refused(tmp_path, fresh_constants):
    import hashlib
    import io

    model = build("llama", **SHAPE)
    convert(model, tmp_path, config="kv-only")
    blob = tmp_path / "tqai_constants.npz"
    with np.load(blob) as npz:
        arrays = {k: npz[k] for k in npz.files}
    name = next(k for k in arrays if k.startswith("rotation/"))
    arrays[name] = arrays[name][:-1]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob.write_bytes(buffer.getvalue())
    config = tmp_path / "tqai_config.json"
    doc = json.loads(config.read_text())
    doc["constants"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    config.write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="missing or misshaped"):
        tqai_torch.patch(model, from_pretrained=tmp_path)


def _calibration():
    """Fisher weights (2 layers x 2 K/V heads) with unit state energies, as ``tqai calibrate``
    writes them: layer 1 is the sensitive one for keys, layer 0 for values."""
    k = np.array([[1.0, 1.5], [12.0, 9.0]])
    v = np.array([[8.0, 10.0], [1.0, 0.5]])
    ones = np.ones((2, 2)).tolist()
    meta = {"prompts": 1, "k_energy": ones, "v_energy": ones}
    return FisherCalibration(k=k, v=v, model="tiny-llama", meta=meta)


def test_dict_layer_bits_are_stored_one_pair_per_layer(tmp_path, fresh_constants):
    model = build("llama", **SHAPE)
    want = _run(model, tqai_torch.patch(model, layer_bits={1: (3.5, 2)}))
    tqai_torch.unpatch(model)
    convert(model, tmp_path, layer_bits={1: (3.5, 2)})
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["options"]["layer_bits"] == [[4, 2], [3.5, 2]]
    assert [(la["bits_k"], la["bits_v"]) for la in doc["layers"]] == [(4, 2), (3.5, 2)]
    got = _run(model, tqai_torch.patch(model, from_pretrained=tmp_path))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    tqai_torch.unpatch(model)


def test_fisher_layer_bits_are_stored_and_used_without_the_calibration(
    tmp_path, monkeypatch, fresh_constants
):
    cal = _calibration()
    cal_file = cal.save(tmp_path / "fisher.json")
    pairs = fisher_layer_bits(cal, 4, 2)
    assert len(set(pairs)) == 2  # the two layers get different widths
    model = build("llama", **SHAPE)
    want = _run(model, tqai_torch.patch(model, bits_k=4, bits_v=2, layer_bits=pairs))
    tqai_torch.unpatch(model)
    out = tmp_path / "converted"
    convert(model, out, calibration=cal_file, fisher_layer_bits=True, bits_k=4, bits_v=2)
    doc = json.loads((out / "tqai_config.json").read_text())
    assert doc["options"]["layer_bits"] == _jsonable(pairs)
    assert [(la["bits_k"], la["bits_v"]) for la in doc["layers"]] == pairs
    record = doc["calibration"]
    assert record["file"] == "tqai_calibration.json"
    assert record["layer_bits_from"] == {"method": "fisher_layer_bits", "bits_k": 4, "bits_v": 2}
    assert (record["num_layers"], record["num_kv_heads"], record["model"]) == (2, 2, "tiny-llama")
    stored = FisherCalibration.load(out / "tqai_calibration.json")
    assert np.array_equal(stored.k, cal.k)
    assert np.array_equal(stored.v, cal.v)

    def no_reading(*args, **kwargs):
        raise AssertionError("from_pretrained read the calibration again")

    monkeypatch.setattr(FisherCalibration, "load", no_reading)
    monkeypatch.setattr(tqai.layer_bits, "fisher_layer_bits", no_reading)
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()
    _forbid_solving(monkeypatch)
    fresh = build("llama", **SHAPE)
    cache = tqai_torch.patch(fresh, from_pretrained=out)
    assert cache.layer_bits == pairs
    got = _run(fresh, cache)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    tqai_torch.unpatch(fresh)


def test_fisher_budget_follows_the_named_config(tmp_path):
    cal = _calibration()
    convert(build("llama"), tmp_path, calibration=cal, fisher_layer_bits=True, config="aggressive")
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["calibration"]["layer_bits_from"]["bits_k"] == 3  # aggressive is K3/V2
    assert doc["options"]["layer_bits"] == _jsonable(fisher_layer_bits(cal, 3, 2))


def test_calibration_alone_is_stored_and_uniform_widths_kept(tmp_path):
    convert(build("llama"), tmp_path, calibration=_calibration(), bits_k=3)
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert "layer_bits" not in doc["options"]
    assert doc["calibration"]["layer_bits_from"] is None
    assert tqai_torch.patch(build("llama"), from_pretrained=tmp_path).layer_bits is None


def test_bad_calibration_options_are_refused(tmp_path):
    model = build("llama")
    with pytest.raises(
        ValueError, match=r"calibration has 3 layers x 2 K/V heads, the model 2 x 2"
    ):
        convert(
            model, tmp_path, calibration=FisherCalibration(k=np.ones((3, 2)), v=np.ones((3, 2)))
        )
    with pytest.raises(ValueError, match="fisher_layer_bits=True needs calibration="):
        convert(model, tmp_path, fisher_layer_bits=True)
    with pytest.raises(ValueError, match="either layer_bits= or fisher_layer_bits=True"):
        convert(
            model, tmp_path, calibration=_calibration(), fisher_layer_bits=True,
            layer_bits=[(4, 2), (4, 2)],
        )  # fmt: skip
    with pytest.raises(ValueError, match="calibrate` JSON file path or a FisherCalibration"):
        convert(model, tmp_path, calibration=42)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tqai.fisher"}')
    with pytest.raises(ValueError, match="missing required key"):
        convert(model, tmp_path, calibration=bad)
    assert not (tmp_path / "tqai_config.json").exists()


def test_missing_or_edited_calibration_is_refused(tmp_path, fresh_constants):
    model = build("llama")
    convert(model, tmp_path, calibration=_calibration(), fisher_layer_bits=True)
    stored = tmp_path / "tqai_calibration.json"
    text = stored.read_text()
    stored.write_text(text.replace("12.0", "13.0"))
    with pytest.raises(PretrainedError, match=r"tqai_calibration\.json does not match the SHA-256"):
        tqai_torch.patch(model, from_pretrained=tmp_path)
    stored.unlink()
    with pytest.raises(PretrainedError, match=r"tqai_calibration\.json is missing"):
        tqai_torch.patch(model, from_pretrained=tmp_path)
    assert model.config._attn_implementation != "tqai"


def test_pipelines_that_cannot_be_stored_are_refused(tmp_path):
    from tqai.pipeline import build_pipeline
    from tqai.pipeline.monitors.stability import StabilityMonitor

    model = build("llama")
    with pytest.raises(ValueError, match="plugin names, numbers, lists and dicts only"):
        convert(model, tmp_path, pipeline={"monitor": StabilityMonitor()})
    with pytest.raises(ValueError, match="pass the dict it was built from"):
        convert(model, tmp_path, pipeline=build_pipeline({"monitor": "stability"}))
    joint = {"scorer": "palm", "strategy": "tiered", "strategy_kwargs": {"rank": "joint"}}
    with pytest.raises(ValueError, match="not supported by the LLM KV caches"):  # patch's own
        convert(model, tmp_path, pipeline=joint)
    assert not (tmp_path / "tqai_config.json").exists()

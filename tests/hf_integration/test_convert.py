"""``tqai convert`` / ``patch(model, from_pretrained=DIR)``: no solving, bit-identical outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_tiny_models import build, cache_kw

import tqai.codebooks
import tqai.rotations
import tqai_torch
from tqai import prebuilt
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


@pytest.mark.parametrize(
    "options",
    [
        {"config": "all8"},
        {"bits_k": 3, "bits_v": 2, "hidden_bits": 5, "rotation": "hadamard", "seed": 3},
        {"config": "kv+ffn8", "rotation": "rotor", "sink_tokens": 2, "chunk_attention": True},
        {"bits_k": 4, "bits_v": 4, "use_qjl": True, "skip_layers": [0]},
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
    assert doc["options"] == {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    assert len(doc["layers"]) == 2
    assert doc["calibration"] is None
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


def test_convert_refuses_pipelines(tmp_path):
    with pytest.raises(ValueError, match="does not store pipeline"):
        convert(build("llama"), tmp_path, pipeline={"monitor": "stability"})

"""The converted-folder format: constants round-trip into tqai.prebuilt and are used as-is;
calibration files and pipeline configs are stored, checked and restored."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tqai.codebooks
import tqai.rotations
from tqai import TurboQuantMSE, TurboQuantProd, prebuilt
from tqai.pipeline import build_pipeline
from tqai.pipeline.scorers.fisher_static import FisherCalibration, FisherStaticScorer
from tqai.pretrained import (
    CALIBRATION_FILE,
    PretrainedError,
    check_calibration,
    check_fingerprint,
    load_calibration,
    load_pretrained,
    pipeline_to_folder,
    save_pretrained,
)


@pytest.fixture
def fresh():
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()
    yield
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()


def _quantizers():
    return [
        TurboQuantMSE(20, 3, rotation="haar", seed=4),
        TurboQuantMSE(24, 5, rotation="hadamard", seed=1),  # odd part 3: a Haar factor
        TurboQuantMSE(29, 2, rotation="rotor", seed=2),
        TurboQuantProd(20, 1, seed=7),  # no codebook at 1 bit
    ]


def test_constants_round_trip_and_replace_solving(tmp_path, monkeypatch, fresh):
    x = np.random.default_rng(0).standard_normal((50, 29)).astype(np.float32)
    qs = _quantizers()
    want = [q.quantize(x[:, : q.spec.d]) for q in qs]
    save_pretrained(
        tmp_path, backend="numpy", options={"a": 1}, model={"d": 3}, layers=[], quantizers=qs
    )
    prebuilt.clear()
    tqai.codebooks.lloyd_max_codebook.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("solved")

    monkeypatch.setattr(tqai.codebooks, "solve_lloyd_max", refuse)
    monkeypatch.setattr(tqai.rotations, "_haar_matrix", refuse)
    pre = load_pretrained(tmp_path, backend="numpy")
    assert (pre.options, pre.model) == ({"a": 1}, {"d": 3})
    for q, w in zip(_quantizers(), want, strict=True):
        got = q.quantize(x[:, : q.spec.d])
        assert np.array_equal(got.packed, w.packed)
        assert np.array_equal(got.norms, w.norms)


def test_load_refuses_another_backend_and_reports_fingerprint_fields(tmp_path, fresh):
    save_pretrained(
        tmp_path, backend="mlx", options={}, model={}, layers=[], quantizers=_quantizers()[:1]
    )
    with pytest.raises(PretrainedError, match="written for the 'mlx' backend, not 'torch'"):
        load_pretrained(tmp_path, backend="torch")
    with pytest.raises(PretrainedError, match=r"head_dim: folder 64, model 128; layers: folder 2"):
        check_fingerprint({"head_dim": 64, "layers": 2}, {"head_dim": 128, "layers": 3}, tmp_path)
    check_fingerprint({"a": 1}, {"a": 1}, tmp_path)


def test_unsorted_codebook_is_refused(tmp_path, fresh):
    import hashlib
    import io

    save_pretrained(
        tmp_path, backend="numpy", options={}, model={}, layers=[], quantizers=_quantizers()[:1]
    )
    with np.load(tmp_path / "tqai_constants.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["codebook/20/3"] = arrays["codebook/20/3"][::-1].copy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (tmp_path / "tqai_constants.npz").write_bytes(buffer.getvalue())
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    doc["constants"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / "tqai_config.json").write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="misshaped or unsorted"):
        load_pretrained(tmp_path)
    assert prebuilt.centroids(20, 3) is None  # nothing recorded from a bad folder


def _fisher(scale: float = 1.0) -> FisherCalibration:
    return FisherCalibration(
        k=np.array([[1.0, 2.0], [3.0, 0.5]]) * scale, v=np.array([[1.0, 1.0], [2.0, 4.0]])
    )


def _save(tmp_path, **kwargs):
    args = {"backend": "numpy", "options": {}, "model": {}, "layers": [], "quantizers": []}
    return save_pretrained(tmp_path, **{**args, **kwargs})


def test_fisher_static_pipeline_reads_the_folder_copy(tmp_path, fresh):
    source = _fisher().save(tmp_path / "fisher.json")
    pipeline = {
        "scorer": "fisher_static",
        "scorer_kwargs": {"path": str(source), "token_energy": False},
        "strategy": "tiered",
        "bits_k": 3,
    }
    stored, cal = pipeline_to_folder(pipeline)
    assert stored["scorer_kwargs"] == {"path": CALIBRATION_FILE, "token_energy": False}
    assert pipeline["scorer_kwargs"]["path"] == str(source)  # the caller's dict is untouched
    folder = tmp_path / "converted"
    _save(folder, options={"pipeline": stored}, calibration=cal)
    source.unlink()  # the folder holds its own copy
    pre = load_pretrained(folder)
    restored = pre.options["pipeline"]
    assert restored["scorer_kwargs"]["path"] == str(folder / CALIBRATION_FILE)
    assert pre.calibration == folder / CALIBRATION_FILE
    scorer = build_pipeline(restored).scorer
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    want = FisherStaticScorer(calibration=_fisher(), token_energy=False)
    for layer in (0, 1):
        assert np.array_equal(scorer.score(x, layer=layer), want.score(x, layer=layer))


def test_pipeline_and_calibration_must_agree(tmp_path):
    path = _fisher().save(tmp_path / "fisher.json")
    pipeline = {"scorer": "fisher_static", "scorer_kwargs": {"path": str(path)}}
    stored, cal = pipeline_to_folder(pipeline, _fisher())
    assert stored["scorer_kwargs"]["path"] == CALIBRATION_FILE
    assert np.array_equal(cal.k, _fisher().k)
    with pytest.raises(ValueError, match="another calibration than calibration="):
        pipeline_to_folder(pipeline, _fisher(scale=2.0))
    with pytest.raises(ValueError, match="plugin names, numbers, lists and dicts only"):
        pipeline_to_folder({"scorer": "fisher_static", "scorer_kwargs": {"calibration": cal}})
    assert pipeline_to_folder(None, cal) == (None, cal)
    plain = {"monitor": "stability", "skip_layers": (0, 2)}
    assert pipeline_to_folder(plain) == ({"monitor": "stability", "skip_layers": [0, 2]}, None)


def test_calibration_record_is_checked(tmp_path, fresh):
    _save(tmp_path, calibration=_fisher(), layer_bits_from={"method": "fisher_layer_bits"})
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    assert doc["calibration"]["layer_bits_from"] == {"method": "fisher_layer_bits"}
    assert load_pretrained(tmp_path).calibration == tmp_path / CALIBRATION_FILE
    pipeline = {"scorer": "fisher_static", "scorer_kwargs": {"path": CALIBRATION_FILE}}
    doc["options"] = {"pipeline": pipeline}
    doc["calibration"] = None
    (tmp_path / "tqai_config.json").write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="the folder records no calibration"):
        load_pretrained(tmp_path)
    doc["calibration"] = "tqai_calibration.json"
    (tmp_path / "tqai_config.json").write_text(json.dumps(doc))
    with pytest.raises(PretrainedError, match="'calibration' must be null or a record"):
        load_pretrained(tmp_path)


def test_converting_again_without_calibration_removes_the_old_file(tmp_path):
    _save(tmp_path, calibration=_fisher())
    assert (tmp_path / CALIBRATION_FILE).is_file()
    _save(tmp_path)
    assert not (tmp_path / CALIBRATION_FILE).exists()
    assert load_pretrained(tmp_path).calibration is None


def test_a_version_1_folder_still_reads(tmp_path, fresh):
    _save(tmp_path, options={"bits_k": 3})
    doc = json.loads((tmp_path / "tqai_config.json").read_text())
    doc["version"] = 1
    (tmp_path / "tqai_config.json").write_text(json.dumps(doc))
    assert load_pretrained(tmp_path).options == {"bits_k": 3}


def test_calibration_shape_is_checked_against_the_model():
    check_calibration(_fisher(), num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"2 layers x 2 K/V heads, the model 30 x 3"):
        check_calibration(_fisher(), num_layers=30, num_kv_heads=3)
    with pytest.raises(ValueError, match="calibrate` JSON file path or a FisherCalibration"):
        load_calibration({"k": [[1.0]]})

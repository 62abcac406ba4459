"""The converted-folder format: constants round-trip into tqai.prebuilt and are used as-is."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tqai.codebooks
import tqai.rotations
from tqai import TurboQuantMSE, TurboQuantProd, prebuilt
from tqai.pretrained import PretrainedError, check_fingerprint, load_pretrained, save_pretrained


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

"""The compressed-tensor byte format: round trips on every backend, corruption is refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tqai import QuantizedTensor, QuantizerSpec, TqaiFormatError, TurboQuantMSE, TurboQuantProd
from tqai._xp import namespace, namespace_name, to_host
from tqai.testing import make_array


def _blob(kind: str = "mse", **kwargs) -> tuple[bytes, QuantizedTensor]:
    cls = TurboQuantMSE if kind == "mse" else TurboQuantProd
    q = cls(24, 3, seed=4, **kwargs)
    qt = q.quantize(np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32))
    return qt.to_bytes(), qt


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_serialization_round_trip_on_every_backend(xp, kind):
    blob, qt = _blob(kind, norm_dtype="float32")
    back = QuantizedTensor.from_bytes(blob, xp=xp)
    assert back.spec == qt.spec
    assert back.shape == qt.shape
    assert back.dtype == qt.dtype
    for name, arr in qt.arrays().items():
        got = back.arrays()[name]
        assert namespace_name(namespace(got)) == namespace_name(xp)
        np.testing.assert_array_equal(to_host(got), arr, err_msg=name)
    assert back.to_bytes() == blob  # every backend writes the same bytes it read


@given(
    kind=st.sampled_from(["mse", "prod"]),
    d=st.integers(2, 70),
    n_bits=st.integers(1, 8),
    rows=st.integers(1, 4),
    norm_dtype=st.sampled_from(["float16", "float32"]),
)
def test_serialization_round_trip_property(kind, d, n_bits, rows, norm_dtype):
    cls = TurboQuantMSE if kind == "mse" else TurboQuantProd
    q = cls(d, n_bits, norm_dtype=norm_dtype)
    x = np.random.default_rng(d * 10 + n_bits).standard_normal((rows, d)).astype(np.float32)
    qt = q.quantize(x)
    back = QuantizedTensor.from_bytes(qt.to_bytes())
    np.testing.assert_array_equal(q.dequantize(back), q.dequantize(qt))
    assert back.nbytes == qt.nbytes


def test_dequantize_after_reading_on_another_backend(xp):
    blob, qt = _blob("mse", norm_dtype="float32")
    q = TurboQuantMSE(24, 3, seed=4, norm_dtype="float32")
    expected = q.dequantize(qt)
    out = q.dequantize(QuantizedTensor.from_bytes(blob, xp=xp))
    np.testing.assert_allclose(to_host(out), expected, atol=1e-5)


def test_truncated_blob_is_refused():
    blob, _ = _blob()
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(TqaiFormatError, match="truncated"):
            QuantizedTensor.from_bytes(blob[:cut])


def test_altered_blob_is_refused():
    blob, _ = _blob()
    for pos in (12, len(blob) // 2, len(blob) - 40):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(TqaiFormatError, match="checksum mismatch"):
            QuantizedTensor.from_bytes(bytes(bad))


def test_foreign_blob_and_version_are_refused():
    blob, _ = _blob()
    with pytest.raises(TqaiFormatError, match="not a tqai blob"):
        QuantizedTensor.from_bytes(b"PK\x03\x04" + blob[4:])
    newer = blob[:4] + struct.pack("<H", 99) + blob[6:]
    with pytest.raises(TqaiFormatError, match="unsupported format version 99"):
        QuantizedTensor.from_bytes(newer)


def test_inconsistent_header_is_refused():
    import hashlib
    import json

    blob, _ = _blob()
    (header_len,) = struct.unpack_from("<I", blob, 6)
    header = json.loads(blob[10 : 10 + header_len])
    header["spec"]["n_bits"] = 12
    raw = json.dumps(header).encode()
    body = blob[:6] + struct.pack("<I", len(raw)) + raw + blob[10 + header_len : -32]
    with pytest.raises(TqaiFormatError, match=r"n_bits must be in 1\.\.8"):
        QuantizedTensor.from_bytes(body + hashlib.sha256(body).digest())


def test_validate_catches_wrong_shapes():
    _, qt = _blob()
    bad = QuantizedTensor(
        spec=qt.spec, shape=qt.shape, dtype=qt.dtype, packed=qt.packed[..., :-1], norms=qt.norms
    )
    with pytest.raises(TqaiFormatError, match="packed must be uint8 of shape"):
        bad.validate()


def test_spec_bad_arguments():
    with pytest.raises(ValueError, match="kind must be 'mse' or 'prod'"):
        QuantizerSpec(kind="pq", d=8, n_bits=2)
    with pytest.raises(ValueError, match="qjl_dim applies to kind='prod' only"):
        QuantizerSpec(kind="mse", d=8, n_bits=2, qjl_dim=8)


def test_make_array_keeps_backend(xp):
    assert namespace_name(namespace(make_array(xp, np.ones(3)))) == namespace_name(xp)

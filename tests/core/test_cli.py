"""The ``tqai`` command line, driven through typer's ``CliRunner``."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import pytest
from typer.testing import CliRunner

import tqai
from tqai.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich wraps no cell


def _rows(output: str) -> list[list[str]]:
    """Split a rich table's body lines into stripped cells."""
    return [
        [cell.strip() for cell in line.strip("│┃ ").split("│")]
        for line in output.splitlines()
        if line.startswith("│")
    ]


def test_info_lists_backends_and_shipped_codebooks():
    from tqai.codebooks import SHIPPED_HEAD_DIMS

    result = runner.invoke(app, ["info"])

    assert result.exit_code == 0, result.output
    assert "tqai-core" in result.output
    first_cells = {row[0] for row in _rows(result.output)}
    assert {"torch", "mlx"} <= first_cells
    assert f"head dims {', '.join(map(str, SHIPPED_HEAD_DIMS))}" in result.output
    assert "bits 1..8" in result.output
    assert "error" not in result.output


def test_info_survives_a_broken_backend(monkeypatch: pytest.MonkeyPatch):
    from tqai.registry import Registry

    broken = Registry("tqai.backends")
    broken.register("ghost", "tqai_no_such_backend_xyz:BACKEND")
    monkeypatch.setattr("tqai.cli.registry", lambda group: broken)

    result = runner.invoke(app, ["info"])

    assert result.exit_code == 0, result.output
    assert "ghost" in result.output
    assert "ModuleNotFoundError" in result.output


def test_plugins_lists_builtin_rotations_from_tqai_core():
    result = runner.invoke(app, ["plugins"])

    assert result.exit_code == 0, result.output
    rows = {(row[0], row[1]): row for row in _rows(result.output)}
    for name in ("haar", "hadamard", "rotor"):
        _, _, package, version, status = rows["tqai.rotations", name]
        assert package == "tqai-core"
        assert version == importlib.metadata.version("tqai-core")
        assert status == "not loaded"
    assert ("tqai.backends", "torch") in rows


def test_plugins_load_reports_status():
    result = runner.invoke(app, ["plugins", "--load"])

    assert result.exit_code == 0, result.output
    rows = {(row[0], row[1]): row for row in _rows(result.output)}
    assert rows["tqai.backends", "torch"][4] == "ok"


@pytest.mark.parametrize(
    ("args", "option", "allowed"),
    [
        (["--bits-k", "9"], "--bits-k", "1..8"),
        (["--bits-v", "0"], "--bits-v", "1..8"),
        (["--head-dim", "1"], "--head-dim", ">= 2"),
        (["--rotation", "nope"], "--rotation", "haar, hadamard, rotor"),
    ],
)
def test_benchmark_rejects_bad_input(args, option, allowed):
    result = runner.invoke(app, ["benchmark", *args])

    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert allowed in result.output


def test_benchmark_labels_roles_and_reports_progress(monkeypatch: pytest.MonkeyPatch, tmp_path):
    calls = []

    def distortion_rows(d, bits, rotations, n_vectors, *, seed=0, quantizers=(), progress=None):
        calls.append((d, list(bits), list(rotations), n_vectors, seed, tuple(quantizers)))
        rows = []
        for b in bits:
            for rotation in rotations:
                for quantizer in quantizers:
                    rows.append(
                        {
                            "quantizer": quantizer,
                            "rotation": rotation,
                            "d": d,
                            "bits": b,
                            "measured": 0.1 / b,
                            "theory": 0.1 / b,
                            "paper": None,
                            "lower_bound": 0.05 / b,
                        }
                    )
                    progress()
        return rows

    fake = types.ModuleType("tqai.distortion")
    fake.distortion_rows = distortion_rows
    monkeypatch.setitem(sys.modules, "tqai.distortion", fake)
    monkeypatch.setattr(tqai, "distortion", fake, raising=False)
    out = tmp_path / "bench.json"

    result = runner.invoke(
        app,
        [
            *("benchmark", "--head-dim", "128", "--bits-k", "3", "--bits-v", "3"),
            *("--rotation", "haar", "--rotation", "rotor", "--seed", "5", "--json", str(out)),
        ],
    )

    assert result.exit_code == 0, result.output
    assert calls == [(128, [3], ["haar", "rotor"], 20000, 5, ("mse", "prod"))]
    data = json.loads(out.read_text())
    assert [row["role"] for row in data["rows"]] == ["K,V"] * 4
    assert data["average_bits"] == pytest.approx(3.125)
    assert data["compression_vs_bf16"] == pytest.approx(16 / 3.125)
    assert "3.125" in result.output
    assert "5.12x" in result.output


def test_benchmark_runs_distortion_rows(tmp_path):
    out = tmp_path / "bench.json"

    result = runner.invoke(
        app,
        [
            *("benchmark", "--n-vectors", "200", "--head-dim", "64"),
            *("--bits-k", "2", "--bits-v", "1", "--json", str(out)),
        ],
    )

    assert result.exit_code == 0, result.output
    table = [line.split() for line in result.output.splitlines()]
    roles = {tuple(row[:4]) for row in table if row and row[0] in {"K", "V", "K,V"}}
    assert "d=64" in result.output
    assert roles == {
        ("V", "mse", "haar", "1"),
        ("V", "prod", "haar", "1"),
        ("K", "mse", "haar", "2"),
        ("K", "prod", "haar", "2"),
    }
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4
    for row in data["rows"]:
        assert row["d"] == 64
        assert row["measured"] > 0
    assert data["average_bits"] == pytest.approx((2 + 16 / 64 + 1 + 16 / 64) / 2)

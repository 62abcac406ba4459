"""A third-party plugin package (tests/fixtures/tqai-plugin-example) works with no change to tqai.

The package is installed in the test environment (the Makefile's setup installs it editable); it
declares one scorer and one strategy through entry points. ``tqai plugins`` must list them with
their package, and a pipeline config must be able to name them.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from typer.testing import CliRunner

from tqai._xp import to_host
from tqai.cli import app
from tqai.pipeline import build_pipeline
from tqai.registry import registry
from tqai.testing import make_array

runner = CliRunner(env={"COLUMNS": "200"})

pytestmark = pytest.mark.skipif(
    not any(
        d.metadata["Name"] == "tqai-plugin-example" for d in importlib.metadata.distributions()
    ),
    reason="tests/fixtures/tqai-plugin-example is not installed (run make setup)",
)


def _rows(output: str) -> dict[tuple[str, str], list[str]]:
    rows = [
        [cell.strip() for cell in line.strip("│┃ ").split("│")]
        for line in output.splitlines()
        if line.startswith("│")
    ]
    return {(row[0], row[1]): row for row in rows}


def test_tqai_plugins_lists_the_third_party_plugins():
    # Without --load (which would import every backend): listing needs only the entry points.
    result = runner.invoke(app, ["plugins"])

    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    version = importlib.metadata.version("tqai-plugin-example")
    for group, name in [("tqai.scorers", "example_norm"), ("tqai.strategies", "example_keep_top")]:
        assert rows[group, name][2:4] == ["tqai-plugin-example", version]
    for group, name in [
        ("tqai.scorers", "palm"),
        ("tqai.strategies", "delta2"),
        ("tqai.monitors", "lyapunov"),
        ("tqai.adapters", "wan"),
    ]:
        assert rows[group, name][2] == "tqai-core"


def test_a_pipeline_runs_the_third_party_plugins(xp):
    norm = "float16" if hasattr(xp, "float16") else "float32"
    pipe = build_pipeline(
        {
            "scorer": "example_norm",
            "strategy": "example_keep_top",
            "strategy_kwargs": {"fraction": 0.1},
            "quantizer_kwargs": {"norm_dtype": norm},
            "bits_k": 2,
        }
    )
    host = np.random.default_rng(0).standard_normal((1, 2, 20, 64))
    host[0, 1, 7] *= 20.0  # the loudest token is kept exactly
    x = make_array(xp, host, "float32")

    res = pipe.compress(x, layer=0, stream="k")

    rec = to_host(res.reconstruction)
    np.testing.assert_array_equal(rec[0, 1, 7], host[0, 1, 7].astype(np.float32))
    assert res.info == {"kept_tokens": 4}
    assert type(pipe.scorer).__module__ == "tqai_plugin_example.scorers"
    info = {i.name: i for i in registry("tqai.strategies").entries()}["example_keep_top"]
    assert (info.package, info.status) == ("tqai-plugin-example", "ok")

"""benchmarks/report.py renders one self-contained page that a real headless browser shows.

The browser check (scripts/headless_check.py) needs Chromium; .ci/run installs Debian's, so in
CI (``CI`` set) a missing browser is a failure, elsewhere the browser tests are skipped.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


report = _load("tqai_report", ROOT / "benchmarks" / "report.py")
headless = _load("tqai_headless_check", ROOT / "scripts" / "headless_check.py")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "index.html"
    report.main(["--results", str(ROOT / "benchmarks" / "results"), "--output", str(path)])
    return path


@pytest.fixture(scope="module")
def browser() -> str:
    found = headless.find_chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("no Chromium on PATH")
    return found


def test_report_is_self_contained_with_every_section(page: Path):
    text = page.read_text(encoding="utf-8")
    for title in ("Quality vs bits", "Memory vs context", "Attention speed vs context, per card",
                  "Pipeline NMSE"):  # fmt: skip
        assert f"<h2>{title}</h2>" in text
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(sources) >= 6
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script" not in text
    results = sorted(p.stem for p in (ROOT / "benchmarks" / "results").glob("decode_*.json"))
    assert text.count("<h3>Decode step,") == len(results)  # one per card
    assert "Measured on:" in text


def test_report_handles_unknown_files_and_refuses_an_empty_folder(tmp_path: Path):
    with pytest.raises(ValueError, match="no results"):
        report.render(tmp_path)
    (tmp_path / "custom.json").write_text(json.dumps({"rows": [{"a": 1, "b": "x"}]}))
    text = report.render(tmp_path)
    assert "<h2>Other results</h2>" in text
    assert "<th>a</th><th>b</th>" in text


def test_report_renders_in_headless_chromium(page: Path, browser: str, tmp_path: Path):
    result = headless.check_page(page, browser=browser)
    assert result.problems == []
    assert result.errors == []
    n_images = len(re.findall(r"<img ", page.read_text(encoding="utf-8")))
    assert len(result.plots) == n_images
    assert all(p["naturalWidth"] > 0 for p in result.plots)
    from PIL import Image

    shot = Image.open(io.BytesIO(result.screenshot))
    bottom = max(p["y"] + p["height"] for p in result.plots)
    assert shot.size[1] >= bottom  # the full page, every plot inside the screenshot


def _png(color: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (200, 120), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_headless_check_catches_errors_and_blank_or_broken_plots(browser: str, tmp_path: Path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body>"
        f'<img class="plot" id="drawn" src="data:image/png;base64,{_png("navy")}">'
        f'<img class="plot" id="blank" src="data:image/png;base64,{_png("white")}">'
        '<img class="plot" id="broken" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom"); undefinedFunction();</script>'
        "</body></html>",
        encoding="utf-8",
    )
    result = headless.check_page(bad, browser=browser)
    text = "\n".join(result.problems)
    assert "console.error: boom" in text
    assert "undefinedFunction" in text
    assert "blank is blank in the screenshot" in text
    assert "broken did not decode" in text
    assert "drawn" not in text

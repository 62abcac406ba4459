"""tqai-core imports no backend library: checked at run time and in the source.

The run-time check imports the core in a fresh interpreter and inspects ``sys.modules``; the
source check parses every core file for import statements of a backend (the same rule as ruff's
``banned-api`` in packages/tqai-core/pyproject.toml, kept here in case that config drifts).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

BANNED = (
    "torch",
    "mlx",
    "triton",
    "transformers",
    "diffusers",
    "tqai_torch",
    "tqai_mlx",
    "tqai_diffusers",
)
CORE_SRC = Path(__file__).resolve().parents[2] / "packages" / "tqai-core" / "src"
# Test helpers that import the test backends (by design) or need pytest and hypothesis.
NOT_CORE = ("tqai.testing.fixtures", "tqai.testing.arrays")

_PROBE = """
import importlib, importlib.util, json, pkgutil, sys
BANNED, MODULES, WALK, SKIP = {banned!r}, {modules!r}, {walk!r}, {skip!r}
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in BANNED)
seen, report = set(), {{}}
def check(name):
    try:
        importlib.import_module(name)
    except Exception as exc:
        report[name] = {{"error": f"{{type(exc).__name__}}: {{exc}}"}}
        return
    new = [m for m in loaded() if m not in seen]
    seen.update(new)
    report[name] = {{"loaded": new}}
for name in MODULES:
    if name == "tqai" or importlib.util.find_spec(name) is not None:
        check(name)
if WALK:
    import tqai
    for info in pkgutil.walk_packages(tqai.__path__, "tqai."):
        if info.name not in report and not info.name.startswith(SKIP):
            check(info.name)
print(json.dumps(report))
"""


def _probe(modules: tuple[str, ...], *, walk: bool) -> dict[str, dict[str, object]]:
    code = _PROBE.format(banned=BANNED, modules=modules, walk=walk, skip=NOT_CORE)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_clean(report: dict[str, dict[str, object]]) -> None:
    errors = {name: r["error"] for name, r in report.items() if "error" in r}
    assert not errors, f"core modules failed to import: {errors}"
    dirty = {name: r["loaded"] for name, r in report.items() if r["loaded"]}
    assert not dirty, f"importing these core modules loaded backend libraries: {dirty}"


def test_import_tqai_loads_no_backend() -> None:
    report = _probe(("tqai", "tqai.cli", "tqai.registry"), walk=False)
    assert "tqai" in report
    _assert_clean(report)


def test_every_core_module_loads_no_backend() -> None:
    report = _probe(("tqai",), walk=True)
    assert len(report) > 1
    _assert_clean(report)


def _core_files() -> list[Path]:
    return sorted(CORE_SRC.rglob("*.py"))


def _banned_imports(path: Path, root: Path = CORE_SRC) -> list[str]:
    """``file:line: module`` for every import of a banned library, in line order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(
            (node.lineno, f"{path.relative_to(root)}:{node.lineno}: {name}")
            for name in names
            if name.split(".")[0] in BANNED
        )
    return [text for _, text in sorted(found)]


def test_core_sources_exist() -> None:
    assert any(p.name == "__init__.py" and p.parent.name == "tqai" for p in _core_files())


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(CORE_SRC)))
def test_core_source_has_no_backend_import(path: Path) -> None:
    assert _banned_imports(path) == []


def test_scanner_finds_banned_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import numpy\nimport torch.nn as nn\ndef f():\n    from mlx import core\n"
        "from tqai_torch.cache import X\nfrom . import torch\n",
        encoding="utf-8",
    )
    assert _banned_imports(sample, tmp_path) == [
        "sample.py:2: torch.nn",
        "sample.py:4: mlx",
        "sample.py:5: tqai_torch.cache",
    ]

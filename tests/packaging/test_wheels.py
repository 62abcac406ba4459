"""The four distributions as a user gets them: built wheels, installed into a fresh venv.

Checks the wheels' contents (``py.typed``, the ``tqai`` console script, entry points), that versions
move in lockstep and backends pin ``tqai-core==X.Y.*``, then installs all four from the wheels into
a new virtual environment outside the workspace and runs the smallest real use there.

torch goes in first with pip, as the Makefile does (pip takes a local CPU wheel where the machine
has one; uv would fetch PyPI's CUDA build). Everything else comes from the lock through uv, and the
tqai packages from the built wheels only: uv runs from ``tmp_path`` (no workspace in sight), and the
installed files' hashes are compared with the wheels' RECORDs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
# distribution -> (folder under packages/, import name)
PACKAGES = {
    "tqai-core": "tqai",
    "tqai-torch": "tqai_torch",
    "tqai-mlx": "tqai_mlx",
    "tqai-diffusers": "tqai_diffusers",
}
BACKENDS = {"tqai-torch": "torch", "tqai-mlx": "mlx", "tqai-diffusers": "diffusers"}


def _find_uv() -> str | None:
    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.exists() else shutil.which("uv")


def _torch_version() -> str:
    """The torch release the Makefile installs (TORCH_VERSION), else the one installed here."""
    match = re.search(r"^TORCH_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return match.group(1) if match else installed_version("torch").split("+")[0]


def _clean_env() -> dict[str, str]:
    """The environment minus anything pointing at the workspace's own venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT"}
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


class Wheel:
    """One built wheel, read with zipfile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        names = self.zip.namelist()
        self.dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
        self.names = set(names)
        self.metadata = Parser().parsestr(self.read("METADATA"))

    def read(self, name: str) -> str:
        return self.zip.read(f"{self.dist_info}/{name}").decode()

    @property
    def version(self) -> str:
        return str(self.metadata["Version"])

    def requires(self) -> list[Requirement]:
        return [Requirement(r) for r in self.metadata.get_all("Requires-Dist") or []]

    def entry_points(self) -> dict[str, dict[str, str]]:
        groups: dict[str, dict[str, str]] = {}
        if f"{self.dist_info}/entry_points.txt" not in self.names:
            return groups
        current = None
        for raw in self.read("entry_points.txt").splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                current = groups.setdefault(line[1:-1], {})
            elif "=" in line and current is not None:
                name, _, target = line.partition("=")
                current[name.strip()] = target.strip()
        return groups

    def hashes(self, package: str) -> dict[str, str]:
        """RECORD's ``path -> hash`` for the files of import package ``package``."""
        out = {}
        for line in self.read("RECORD").splitlines():
            path, digest, _ = line.rsplit(",", 2)
            if path.startswith(f"{package}/") and digest:
                out[path] = digest
        return out


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    for dist in PACKAGES:
        _run([*build, str(ROOT / "packages" / dist)], cwd=out, timeout=300)
    return out


@pytest.fixture(scope="module")
def wheels(dist_dir: Path) -> dict[str, Wheel]:
    found = {}
    for path in sorted(dist_dir.glob("*.whl")):
        wheel = Wheel(path)
        found[str(wheel.metadata["Name"])] = wheel
    assert sorted(found) == sorted(PACKAGES), f"built wheels: {sorted(found)}"
    return found


@pytest.mark.parametrize("dist", list(PACKAGES))
def test_wheel_ships_py_typed(wheels: dict[str, Wheel], dist: str) -> None:
    assert f"{PACKAGES[dist]}/py.typed" in wheels[dist].names
    assert f"{PACKAGES[dist]}/__init__.py" in wheels[dist].names


def test_core_wheel_has_console_script_and_testing(wheels: dict[str, Wheel]) -> None:
    core = wheels["tqai-core"]
    assert core.entry_points().get("console_scripts", {}).get("tqai") == "tqai.cli:main"
    assert "tqai/testing/__init__.py" in core.names
    assert {n.split("/")[0] for n in core.names} == {"tqai", core.dist_info}


@pytest.mark.parametrize("dist", list(BACKENDS))
def test_backend_wheel_registers_backend(wheels: dict[str, Wheel], dist: str) -> None:
    assert BACKENDS[dist] in wheels[dist].entry_points().get("tqai.backends", {})


def test_versions_move_in_lockstep(wheels: dict[str, Wheel]) -> None:
    versions = {dist: w.version for dist, w in wheels.items()}
    assert len(set(versions.values())) == 1, f"versions differ: {versions}"
    for dist, wheel in wheels.items():
        assert f"-{wheel.version}-" in wheel.path.name, (dist, wheel.path.name)


@pytest.mark.parametrize("dist", list(BACKENDS))
def test_backends_pin_core_minor(wheels: dict[str, Wheel], dist: str) -> None:
    major, minor = wheels["tqai-core"].version.split(".")[:2]
    pins = {str(r.name): str(r.specifier) for r in wheels[dist].requires()}
    assert pins.get("tqai-core") == f"=={major}.{minor}.*", pins
    for name, spec in pins.items():
        if name.startswith("tqai-"):
            assert spec == f"=={major}.{minor}.*", f"{dist} pins {name}{spec}"


_SMOKE = textwrap.dedent(
    """
    import importlib, importlib.metadata, importlib.util, json, sys
    from pathlib import Path

    workspace, prefix = Path(sys.argv[1]).resolve(), Path(sys.prefix).resolve()
    report = {"files": {}, "hashes": {}}
    for dist, name in json.loads(sys.argv[2]).items():
        module = importlib.import_module(name)
        report["files"][name] = str(Path(module.__file__).resolve())
        record = importlib.metadata.distribution(dist).read_text("RECORD") or ""
        report["hashes"][dist] = {
            p: h for p, h, _ in (line.rsplit(",", 2) for line in record.splitlines())
            if p.startswith(name + "/") and h
        }
    report["prefix"] = str(prefix)
    report["workspace"] = str(workspace)

    import tqai.testing  # ships with the core and needs only numpy to import
    from tqai.registry import registry  # (the name tqai.registry is also the function)
    report["backends"] = sorted(registry("tqai.backends").available())

    report["quantizers"] = importlib.util.find_spec("tqai.quantizers") is not None
    if report["quantizers"]:
        import mlx.core as mx
        import numpy as np
        import torch
        import tqai

        errors = {}
        q = tqai.TurboQuantMSE(d=64, n_bits=4)
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
        y = q.dequantize(q.quantize(x))
        assert isinstance(y, torch.Tensor), type(y)
        errors["torch"] = float(torch.linalg.norm(y.float() - x) / torch.linalg.norm(x))
        xm = mx.array(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
        ym = q.dequantize(q.quantize(xm))
        assert isinstance(ym, mx.array), type(ym)
        xh, yh = np.array(xm), np.array(ym.astype(mx.float32))
        errors["mlx"] = float(np.linalg.norm(yh - xh) / np.linalg.norm(xh))
        report["relative_errors"] = errors
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def fresh_venv(
    dist_dir: Path, wheels: dict[str, Wheel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    uv = _find_uv()
    if uv is None:
        pytest.skip("uv is not installed (make setup installs it into .venv)")
    work = tmp_path_factory.mktemp("fresh")
    venv = work / "venv"
    _run([uv, "venv", "--seed", "--python", sys.executable, str(venv)], cwd=work, timeout=300)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "-q", f"torch=={_torch_version()}"],
        cwd=work,
        timeout=600,
    )
    version = wheels["tqai-core"].version
    _run(
        [uv, "pip", "install", "--python", str(python), "--find-links", str(dist_dir)]
        + ["-c", str(LOCK)]
        + [f"{dist}=={version}" for dist in PACKAGES],
        cwd=work,
        timeout=600,
    )
    yield venv
    shutil.rmtree(work, ignore_errors=True)  # about 1 GB with torch; pytest keeps 3 runs' tmp


def test_installed_wheels_work_outside_the_workspace(
    fresh_venv: Path, wheels: dict[str, Wheel]
) -> None:
    script = fresh_venv.parent / "smoke.py"
    script.write_text(_SMOKE, encoding="utf-8")
    proc = _run(
        [str(fresh_venv / "bin" / "python"), str(script), str(ROOT), json.dumps(PACKAGES)],
        cwd=fresh_venv.parent,
        timeout=300,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    prefix = Path(report["prefix"])
    assert prefix == fresh_venv.resolve()
    for name, file in report["files"].items():
        path = Path(file)
        assert path.is_relative_to(prefix), f"{name} imported from {path}, not the fresh venv"
        assert not path.is_relative_to(ROOT), f"{name} imported from the workspace: {path}"
    for dist, hashes in report["hashes"].items():
        assert hashes == wheels[dist].hashes(PACKAGES[dist]), f"{dist} is not the built wheel"

    assert {"torch", "mlx", "diffusers"} <= set(report["backends"]), report["backends"]

    if report["quantizers"]:
        for backend, err in report["relative_errors"].items():
            assert err < 0.2, f"{backend}: relative error {err:.3f} at 4 bits"


def test_console_script_info(fresh_venv: Path) -> None:
    proc = _run([str(fresh_venv / "bin" / "tqai"), "info"], cwd=fresh_venv.parent, timeout=120)
    assert proc.stdout.strip()

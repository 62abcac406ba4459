"""scripts/update_readme.py: rewrites only the marked results sections of a README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "update_readme.py"
MACHINE = {"cpu": "Test CPU", "cores": 4, "os": "Linux", "python": "3.11.7", "date": "2026-01-01"}
DISTORTION = {
    "machine": MACHINE,
    "n_vectors": 1000,
    "rows": [
        {
            "quantizer": "mse",
            "rotation": "haar",
            "d": 128,
            "bits": 2,
            "measured": 0.11608783550882322,
            "theory": 0.116,
            "paper": 0.117,
            "lower_bound": 0.0625,
            "check": "ok",
        }
    ],
}
CODEC = {
    "machine": MACHINE,
    "rows": [
        {
            "provider": "reference",
            "namespace": "numpy",
            "version": "2.4.6",
            "rotation": "haar",
            "d": 128,
            "bits": 3,
            "n_vectors": 16384,
            "encode_vectors_per_s": 54403.79,
            "decode_vectors_per_s": 86966.52,
        }
    ],
}
PIPELINE = {"seed": 7, "rows": [{"scorer": "palm", "ratio": 0.25, "ok": True}]}

HEAD = "# tqai\r\n\r\nHand-written text | with a pipe.\n\n## Results\n"
TAIL = "\n## After\n\nMore hand-written text.\n"


def _section(name: str, body: str = "stale\n") -> str:
    return f"<!-- results:{name}:start -->\n{body}<!-- results:{name}:end -->"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    for name, doc in [
        ("distortion", DISTORTION),
        ("codec_cpu_test", CODEC),
        ("custom", PIPELINE),
    ]:
        (folder / f"{name}.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    middle = "\n\nBetween the tables.\n\n"
    text = HEAD + _section("distortion") + middle + _section("codec_cpu_test") + "\n"
    text += _section("custom", "") + TAIL
    path.write_bytes(text.encode())
    return path


def test_updates_only_the_marked_sections(readme: Path, results: Path) -> None:
    proc = _run("--readme", readme, "--results", results)
    assert proc.returncode == 0, proc.stderr
    for name in ("distortion", "codec_cpu_test", "custom"):
        assert f"updated: {name}" in proc.stdout
    text = readme.read_bytes().decode()
    assert text.startswith(HEAD)  # CRLF lines outside the markers are kept as they were
    assert text.endswith(TAIL)
    assert "\n\nBetween the tables.\n\n" in text
    assert "stale" not in text

    distortion = text.split("<!-- results:distortion:start -->")[1].split("<!-- results:")[0]
    assert "| quantizer | rotation | d | bits | measured | theory | paper | lower bound |" in (
        distortion
    )
    assert "| mse | haar | 128 | 2 | 0.1161 | 0.116 | 0.117 | 0.0625 |" in distortion
    assert "Test CPU (4 cores)" in distortion

    codec = text.split("<!-- results:codec_cpu_test:start -->")[1].split("<!-- results:")[0]
    assert "| namespace | rotation | bits | encode vectors/s | decode vectors/s |" in codec
    assert "| numpy | haar | 3 | 54,404 | 86,967 |" in codec
    assert "Test CPU (4 cores)" in codec

    pipeline = text.split("<!-- results:custom:start -->")[1].split("<!-- results:")[0]
    assert "| scorer | ratio | ok |" in pipeline  # generic: columns are the row keys
    assert "| palm | 0.25 | yes |" in pipeline
    assert "seed: 7." in pipeline


def test_second_run_changes_nothing_and_check_passes(readme: Path, results: Path) -> None:
    assert _run("--readme", readme, "--results", results).returncode == 0
    before = readme.read_bytes()
    proc = _run("--readme", readme, "--results", results)
    assert proc.returncode == 0
    assert "unchanged: distortion" in proc.stdout
    assert "updated:" not in proc.stdout
    assert readme.read_bytes() == before
    check = _run("--readme", readme, "--results", results, "--check")
    assert check.returncode == 0, check.stderr


def test_check_fails_when_stale_and_writes_nothing(readme: Path, results: Path) -> None:
    before = readme.read_bytes()
    proc = _run("--readme", readme, "--results", results, "--check")
    assert proc.returncode == 1
    assert "out of date" in proc.stderr
    assert "distortion" in proc.stderr
    assert readme.read_bytes() == before


def test_check_fails_after_results_change(readme: Path, results: Path) -> None:
    assert _run("--readme", readme, "--results", results).returncode == 0
    doc = json.loads((results / "distortion.json").read_text())
    doc["rows"][0]["measured"] = 0.2
    (results / "distortion.json").write_text(json.dumps(doc))
    proc = _run("--readme", readme, "--results", results, "--check")
    assert proc.returncode == 1
    assert "distortion" in proc.stderr
    assert "codec_cpu_test" not in proc.stderr


def test_marker_for_a_missing_file_fails(readme: Path, results: Path) -> None:
    (results / "custom.json").unlink()
    before = readme.read_bytes()
    proc = _run("--readme", readme, "--results", results)
    assert proc.returncode == 1
    assert "custom.json" in proc.stderr
    assert readme.read_bytes() == before


def test_start_marker_without_end_fails(tmp_path: Path, results: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# x\n<!-- results:distortion:start -->\nno end\n")
    proc = _run("--readme", path, "--results", results)
    assert proc.returncode == 1
    assert "without <!-- results:distortion:end -->" in proc.stderr


def test_results_without_marker_are_reported(tmp_path: Path, results: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# x\n" + _section("distortion") + "\n")
    proc = _run("--readme", path, "--results", results)
    assert proc.returncode == 0, proc.stderr
    assert "not in README (no marker): custom" in proc.stdout


def test_missing_readme_is_not_created(tmp_path: Path, results: Path) -> None:
    path = tmp_path / "README.md"
    proc = _run("--readme", path, "--results", results)
    assert proc.returncode == 1
    assert not path.exists()


def test_renders_the_committed_results(tmp_path: Path) -> None:
    committed = ROOT / "benchmarks" / "results"
    names = sorted(p.stem for p in committed.glob("*.json"))
    if not names:
        pytest.skip("no committed results")
    path = tmp_path / "README.md"
    path.write_text("\n".join(_section(n) for n in names) + "\n")
    proc = _run("--readme", path, "--results", committed)
    assert proc.returncode == 0, proc.stderr
    assert "stale" not in path.read_text()


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vae_memory_and_video_renderers() -> None:
    module = _script_module()
    row = {"frames": 5, "height": 480, "width": 832, "seconds": 1.0}
    vae = {
        "machine": MACHINE,
        "vae": "Wan 2.1 VAE",
        "peak": "VmHWM",
        "rows": [
            {**row, "config": "baseline", "peak_bytes": 8 * 2**30},
            {**row, "config": "optimize_vae_memory", "peak_bytes": 2 * 2**30},
        ],
    }
    text = module.render("vae_memory_cpu-test", vae)
    assert "| 5 | 480x832 | optimize_vae_memory | 2048 | 4x | 1 |" in text
    assert "vae: Wan 2.1 VAE." in text
    video = {
        "machine": {**MACHINE, "device": "Test GPU"},
        "note": "tiny",
        "rows": [
            {
                "model": "wan",
                "config": "delta K4/V4",
                "seconds": 2.0,
                "speedup": 0.5,
                "peak_bytes": 2**20,
                "rel_error": 0.001,
                "bits_per_coord": 4.5,
                "reuse": None,
            },
        ],
    }
    text = module.render("video_test-gpu", video)
    assert "| wan | delta K4/V4 | 2 | 0.5 | 1 | 0.001 | 4.5 |  |" in text
    assert "tiny. Device: Test GPU." in text


def test_attention_renderer_names_the_segments() -> None:
    module = _script_module()
    row = {"card": "Test GPU", "config": "K4/V2", "batch": 1, "context": 4096}
    doc = {
        "copy_gbps": 4000.0,
        "method": "CUDA graph",
        "segments": "4 sink and 33 window tokens",
        "rows": [{**row, "sdpa_us": 12.0, "tqai_us": 10.0, "tqai_gbps": 400.0}],
    }
    text = module.render("attention_test-gpu", doc)
    assert "| K4/V2 | 1 | 4096 | 12 | 10 | 1.20x | 400 | 10% |" in text
    assert "Timing: CUDA graph. Roofline: device-to-device copy, 4000 GB/s." in text
    assert "Segments: 4 sink and 33 window tokens." in text


def test_generate_renderer() -> None:
    module = _script_module()
    row = {"card": "Test GPU", "context": 8192, "batch": 1, "prefill_s": 1.0}
    doc = {
        "machine": {**MACHINE, "device": "Test GPU"},
        "model": "Llama-3-8B shape, random weights",
        "baseline": "DynamicCache, sdpa",
        "rows": [
            {**row, "config": "baseline", "ms_per_token": 80.0, "tokens_per_s": 12.5,
             "peak_gib": 16.5, "decode_peak_gib": 16.25, "cache_bytes": 2**30},
            {**row, "config": "K4/V2", "ms_per_token": 100.0, "tokens_per_s": 10.0,
             "peak_gib": 15.5, "decode_peak_gib": None, "cache_bytes": 2**28},
        ],
    }  # fmt: skip
    text = module.render("generate_test-gpu", doc)
    assert "| baseline | 8192 | 1 | 80 | 12.5 | 1.00x | 16.5 | 16.25 | 1024 |" in text
    assert "| K4/V2 | 8192 | 1 | 100 | 10 | 0.80x | 15.5 |  | 256 |" in text
    assert "Card: Test GPU. Model: Llama-3-8B shape, random weights. Baseline: DynamicCache" in text


def test_generate_renderer_shows_interleaved_blocks() -> None:
    module = _script_module()
    row = {"card": "Test GPU", "context": 8192, "batch": 1, "tokens_per_s": 1.0}
    doc = {
        "rows": [
            {**row, "config": "baseline", "ms_per_token": 80.0, "interleaved_median_ms": 70.0},
            {**row, "config": "K4/V2", "ms_per_token": 40.0, "interleaved_median_ms": 50.0,
             "interleaved_speed": 1.4},
        ],
    }  # fmt: skip
    text = module.render("generate_test-gpu", doc)
    assert (
        "| ms/token | tokens/s | speed vs baseline | interleaved ms/token | speed, interleaved |"
        in text
    )
    assert "| baseline | 8192 | 1 | 80 | 1 | 1.00x | 70 |  |" in text
    assert "| K4/V2 | 8192 | 1 | 40 | 1 | 2.00x | 50 | 1.40x |" in text


def test_pipeline_perplexity_renderer() -> None:
    module = _script_module()
    row = {"model": "M", "context": 1024, "residual_window": 0, "baseline_ppl": 10.0}
    doc = {
        "machine": MACHINE,
        "rows": [
            {**row, "config": "K4/V2", "bits_per_coord": 3.3, "ppl": 11.0},
            {
                **row,
                "config": "palm+tiered 25% K5|3 V4|2",
                "bits_per_coord": 3.32,
                "ppl": 10.5,
                "high_share_k": 0.25,
                "high_share_v": 0.2512,
            },
        ],
    }
    text = module.render("pipeline_perplexity", doc)
    assert "| 1024 | 0 | K4/V2 | 3.3 | 11 | 10 | +10.00% | - | - |" in text
    assert (
        "| 1024 | 0 | palm+tiered 25% K5\\|3 V4\\|2 | 3.32 | 10.5 | 10 | +5.00% | 0.250 | 0.251 |"
        in text
    )
    assert "Model: M." in text


def test_prefill_renderer() -> None:
    module = _script_module()
    doc = {
        "machine": {**MACHINE, "device": "Test GPU"},
        "rows": [
            {"provider": "torch", "context": 4096, "chunk": 4, "seconds": 1e-4},
            {"provider": "triton", "context": 4096, "chunk": 4, "seconds": 2e-4},
            {"provider": "torch", "context": 4096, "chunk": 16, "seconds": 4e-4},
            {"provider": "triton", "context": 4096, "chunk": 16, "seconds": 2e-4},
        ],
    }
    text = module.render("prefill_test-gpu", doc)
    assert "| triton | 4096 | 4 | 200 | 0.5x |" in text
    assert "| triton | 4096 | 16 | 200 | 2x |" in text
    assert "Card: Test GPU." in text


def test_fidelity_goal_status_is_derived_from_the_rows() -> None:
    module = _script_module()

    def row(config, bits, ppl, model="M", context=4096):
        return {
            "model": model,
            "context": context,
            "config": config,
            "bits_per_coord": bits,
            "ppl": ppl,
            "baseline_ppl": 100.0,
        }

    rows = [
        row("baseline", 16, 100.0),
        row("K4/V2", 3.4, 101.5),  # +1.5% at 3.4 bits: the 3.5-bit goal, ahead of the peer
        row("K4/V2 wide", 3.6, 100.1),  # over the 3.5-bit budget: not counted there
        row("kivi K3/V2", 3.5, 103.0),
        row("K4/V4", 4.4, 100.4),  # +0.4%, but the peer does better: not met
        row("kivi K4/V3", 4.5, 100.3),
        row("K8/V8", 4.4, 100.0, context=1024),  # another context: ignored
    ]
    status = {r["goal"].split(",")[0]: r for r in module._goal_rows(rows)}
    assert status["<= 3.5 bits"]["best tqai"] == "K4/V2: +1.50% at 3.40 bits"
    assert status["<= 3.5 bits"]["met"] == "yes"
    assert status["<= 4.5 bits"]["best tqai"] == "K4/V2 wide: +0.10% at 3.60 bits"
    assert status["<= 4.5 bits"]["met"] == "yes"
    rows.remove(rows[2])
    status = {r["goal"].split(",")[0]: r for r in module._goal_rows(rows)}
    assert status["<= 4.5 bits"]["KIVI-style peer"] == "kivi K4/V3: +0.30% at 4.50 bits"
    assert status["<= 4.5 bits"]["met"] == "no"
    assert "| no |" in module.render("fidelity", {"rows": rows})

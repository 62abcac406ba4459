"""Shared plumbing of the benchmark scripts: machine description, table printing, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the numbers came from: CPU model, cores, OS and Python (GPU scripts add the card)."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def peak_rss_env() -> dict[str, str]:
    """The environment for a subprocess whose peak resident memory is measured: glibc's mmap
    threshold fixed at 64 KiB. By default glibc raises the threshold after the first large
    free and then keeps freed temporaries in its heap, so the resident high-water mark of the
    same run varies (``bench_memory.py``, K4/V2 at 4096 tokens: 28 to 106 MiB in six runs; with
    the threshold fixed, 28 to 30): freed blocks of 64 KiB and more go back to the system and
    the peak is what was live at once."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def peak_rss_bytes() -> int:
    """This process's resident high-water mark in bytes (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> None:
    """Reset this process's resident high-water mark (:func:`peak_rss_bytes`) to what is
    resident now, so that a peak measured from here is this section's alone and not an earlier
    transient's (Linux >= 4.0, ``/proc/self/clear_refs``; elsewhere nothing is reset)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=140).print(table)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return path

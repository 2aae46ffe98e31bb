"""Headless Chromium for looking at the built book: rendered DOM and screenshots.

Uses Debian's ``chromium`` with the network closed to the outside
(``--disable-background-networking``): a page that needed a CDN would render
without it, which is what the checks want to catch.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["dump_dom", "find_chromium", "screenshot"]

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; install it with `apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="kronlab-chromium-") as profile:
        cmd = [exe, *_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(url_or_path: str | Path, *, budget_ms: int = 8000, timeout: float = 120) -> str:
    """The page's DOM after scripts ran for ``budget_ms`` of virtual time."""
    url = _as_url(url_or_path)
    proc = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def screenshot(url_or_path: str | Path, png: str | Path, *, width: int = 1280,
               height: int = 2400, budget_ms: int = 8000, timeout: float = 120) -> Path:
    """Save a PNG screenshot of the page (after ``budget_ms`` of virtual time)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    url = _as_url(url_or_path)
    proc = _run([f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}",
                 f"--screenshot={png}", url], timeout)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium screenshot of {url} failed: {proc.stderr[-2000:]}")
    return png


def _as_url(url_or_path) -> str:
    text = str(url_or_path)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()

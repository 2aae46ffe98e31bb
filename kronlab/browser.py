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

__all__ = ["dump_dom", "find_chromium", "print_pdf", "screenshot"]

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


# ----------------------------------------------------------------------------- printing

# Runs in the page before printing: eager images, MathJax's typesetting and the fonts done.
# Resolves to the number of math elements MathJax left untypeset and the raw TeX delimiters
# left in the visible text (outside code), which a good print has none of.
_SETTLE_JS = r"""
(async () => {
  document.querySelectorAll('img[loading="lazy"]').forEach(i => { i.loading = 'eager'; });
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    await mj.startup.promise;
    if (mj.typesetPromise) { await mj.typesetPromise(); }
  }
  await Promise.all([...document.images].map(i => i.complete ? null :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  await document.fonts.ready;
  const untypeset = [...document.querySelectorAll('.math')]
    .filter(e => !e.querySelector('mjx-container') && !e.closest('mjx-container')).length;
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, mjx-assistive-mml')
    .forEach(e => e.remove());
  const text = clone.textContent;
  const raw = (text.match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/g) || []).length;
  return {untypeset, raw};
})()
"""


class _DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4).

    No websocket library is needed: commands and replies are JSON texts ended by NUL.
    """

    def __init__(self, exe: str, profile: str):
        import os

        import fcntl

        cmd_r, self._cmd_w = os.pipe()   # we write commands, chromium reads fd 3
        self._out_r, out_w = os.pipe()   # chromium writes replies on fd 4
        # above 4, so that placing one on fd 3 or 4 in the child cannot overwrite the other
        hi_r, hi_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w))
        for fd in (cmd_r, out_w):
            os.close(fd)
        cmd_r, out_w = hi_r, hi_w

        def child_fds():
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        # the child closes every other descriptor after child_fds() ran: keep 3 and 4
        self.proc = subprocess.Popen(
            [exe, *_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=True, pass_fds=(3, 4))
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        import json
        import os
        import select
        import time

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 60) -> dict:
        import json
        import os
        import time

        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_w, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        import time

        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._read_message(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def close(self) -> None:
        import os

        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def print_pdf(url_or_path: str | Path, pdf: str | Path, *, css: str = "",
              page_numbers: bool = False, before_print: str = "", timeout: float = 300,
              strict_math: bool = True) -> dict:
    """Print a page to PDF with headless Chromium, after MathJax has typeset it.

    The page is loaded, ``css`` is added as a style sheet and the script ``before_print``
    (JavaScript, may be empty) runs; then the printer waits for MathJax
    (``MathJax.startup.promise``), images and fonts, and prints with the page size of the
    page's CSS ``@page`` rule (Letter when it has none), backgrounds, a document outline
    (PDF bookmarks from the headings) and, with ``page_numbers``, a centred page number at
    the foot of every page. The PDF is written atomically.

    Returns ``{"untypeset": n, "raw": k}``: math elements MathJax did not typeset and raw
    TeX delimiters (``$$``, ``\\(`` ...) left in the text outside code. With
    ``strict_math`` a non-zero count raises ``RuntimeError`` and no PDF is written.
    """
    import base64
    import json

    from .paths import write_atomic

    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; install it with `apt-get install chromium`")
    url = _as_url(url_or_path)
    with tempfile.TemporaryDirectory(prefix="kronlab-chromium-") as profile:
        dt = _DevTools(exe, profile)
        try:
            target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = dt.send("Target.attachToTarget",
                              {"targetId": target, "flatten": True})["sessionId"]
            dt.send("Page.enable", session=session)
            dt.send("Runtime.enable", session=session)
            dt.send("Page.navigate", {"url": url}, session=session)
            dt.wait_event("Page.loadEventFired", timeout=timeout)
            if css:
                js = ("(() => { const s = document.createElement('style'); s.textContent = "
                      f"{json.dumps(css)}; document.head.appendChild(s); }})()")
                dt.send("Runtime.evaluate", {"expression": js}, session=session)
            if before_print:
                dt.send("Runtime.evaluate", {"expression": before_print, "awaitPromise": True},
                        session=session, timeout=timeout)
            res = dt.send("Runtime.evaluate",
                          {"expression": _SETTLE_JS, "awaitPromise": True,
                           "returnByValue": True}, session=session, timeout=timeout)
            if "exceptionDetails" in res:
                raise RuntimeError(f"page script failed on {url}: {res['exceptionDetails']}")
            check = res["result"]["value"]
            if strict_math and (check["untypeset"] or check["raw"]):
                raise RuntimeError(
                    f"{url}: {check['untypeset']} math elements untypeset and {check['raw']} "
                    "raw TeX delimiters in the text; is MathJax bundled (sphinx-mathjax-offline)?")
            opts = {"printBackground": True, "preferCSSPageSize": True,
                    "generateDocumentOutline": True, "generateTaggedPDF": True,
                    "displayHeaderFooter": page_numbers, "transferMode": "ReturnAsBase64"}
            if page_numbers:
                opts.update(
                    headerTemplate="<span></span>",
                    footerTemplate=('<div style="width:100%;text-align:center;font-size:9pt;'
                                    'font-family:sans-serif;color:#444">'
                                    '<span class="pageNumber"></span></div>'))
            data = dt.send("Page.printToPDF", opts, session=session, timeout=timeout)["data"]
        finally:
            dt.close()
    write_atomic(pdf, base64.b64decode(data))
    return check

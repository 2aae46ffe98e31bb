"""Screenshots of the built book in headless Chromium, for a human look.

    python scripts/screenshots.py _build/html _build/screenshots [page ...]

Default pages: the introduction, the theory chapter and the poster. Each PNG
is 1280 px wide; the tool prints the files it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.browser import find_chromium, screenshot

DEFAULT_PAGES = ["book/intro", "book/theory", "book/poster"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__)
        return 2
    html, out, pages = Path(argv[0]), Path(argv[1]), argv[2:] or DEFAULT_PAGES
    if find_chromium() is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    for page in pages:
        src = html / f"{page}.html"
        if not src.exists():
            print(f"skip {page}: {src} not built", file=sys.stderr)
            continue
        png = screenshot(src, out / f"{Path(page).name}.png", width=1280, height=3000)
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

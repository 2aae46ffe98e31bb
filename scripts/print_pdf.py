"""Print the book or the poster to PDF with headless Chromium, offline.

    python scripts/print_pdf.py book     # _build/pdf/kronlab.pdf (needs `make book` first)
    python scripts/print_pdf.py poster [--profile P]   # _build/poster/poster.pdf

Prints the PDF's path, page count and page size, and copies it into the built site
(``_build/html``) when that exists, where the pages link it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.browser import find_chromium  # noqa: E402
from kronlab.book import stage_pdfs  # noqa: E402
from kronlab.printing import MM_PER_PT, build_book_pdf, build_poster_pdf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["book", "poster"])
    parser.add_argument("--profile", default="default",
                        help="parameter profile for the poster chapter if it has not run yet")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    info = build_book_pdf() if args.what == "book" else build_poster_pdf(profile=args.profile)
    w, h = info["page_size_pt"]
    print(f"{info['pdf']}: {info['pages']} page(s) of {w:.0f} x {h:.0f} pt "
          f"({w * MM_PER_PT:.0f} x {h * MM_PER_PT:.0f} mm)")
    for path in stage_pdfs():
        print(f"copied into the site: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

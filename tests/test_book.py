"""Build the book with the tiny `smoke` profile and inspect the result.

Every chapter runs (so a broken chapter fails CI), the site builds with
warnings as errors, every toc page and every figure exists, no page loads a
script, stylesheet or font from outside the site, and in headless Chromium
the equations are typeset.
"""

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kronlab.book import build_book, notebook_chapters, toc_documents
from kronlab.browser import dump_dom, find_chromium

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    import os

    old = os.environ.get("KRONLAB_FIGURES")
    os.environ["KRONLAB_FIGURES"] = str(out / "_build" / "figures")
    try:
        html = build_book("smoke", root=ROOT, out=out)
    finally:
        if old is None:
            os.environ.pop("KRONLAB_FIGURES", None)
        else:
            os.environ["KRONLAB_FIGURES"] = old
    return out, html


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.refs.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") in (
                "stylesheet", "preload", "modulepreload", "icon", "prefetch"):
            self.refs.append(attrs["href"])
        if tag in ("img", "iframe", "source") and attrs.get("src"):
            self.refs.append(attrs["src"])


def _external(ref: str) -> bool:
    return bool(re.match(r"^(https?:)?//", ref))


def test_every_toc_page_is_built(built_book):
    _, html = built_book
    for doc in toc_documents(ROOT):
        assert (html / f"{doc}.html").exists(), doc


def test_every_chapter_saved_its_figures(built_book):
    out, html = built_book
    figs = out / "_build" / "figures"
    for _stem, doc in notebook_chapters(ROOT).items():
        text = (ROOT / f"{doc}.md").read_text()
        for name in re.findall(r"save_figure\(\s*\w+\s*,\s*[\"']([\w-]+)[\"']", text):
            assert (figs / f"{name}.png").stat().st_size > 1000, name
            assert (figs / f"{name}.pdf").stat().st_size > 1000, name
    for page in html.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text()):
            if not _external(src):
                assert (page.parent / src).resolve().exists(), (page, src)


def test_no_page_loads_anything_from_outside(built_book):
    _, html = built_book
    pages = list(html.rglob("*.html"))
    assert pages
    for page in pages:
        parser = _Refs()
        parser.feed(page.read_text())
        bad = [r for r in parser.refs if _external(r)]
        assert not bad, f"{page.relative_to(html)} loads {bad}"
    for css in html.rglob("*.css"):
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", css.read_text(errors="ignore"))
        bad = [u for u in urls if _external(u)]
        assert not bad, f"{css.relative_to(html)} loads {bad}"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()


@pytest.mark.chromium
def test_math_is_typeset_in_chromium(built_book):
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    _, html = built_book
    dom = dump_dom(html / "book" / "intro.html")
    assert dom.count("<mjx-container") >= 5, "MathJax did not typeset the equations"
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.DOTALL)
    text = re.sub(r"<[^>]+>", " ", body)
    assert "$$" not in text and "\\(" not in text and "\\[" not in text
    assert not re.search(r"\$[^$\s][^$]*\$", text), "raw $...$ left on the page"

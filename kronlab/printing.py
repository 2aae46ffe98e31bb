"""The book as one PDF and the poster as one A0 page, printed offline by headless Chromium.

- :func:`build_book_pdf` (``make pdf``): the executed notebooks that ``kronlab book build``
  left in ``_build/site`` are rendered once more by ``jupyter-book --builder singlehtml``
  (numbered chapters, nothing executed again) into ``_build/pdf/work``; the page gets a
  print style sheet (:data:`BOOK_PRINT_CSS`: A4, a page break before every chapter, no
  sidebar, navbar or buttons), a title page and a table of contents, and is printed after
  MathJax has typeset it, to ``_build/pdf/kronlab.pdf``. A second pass writes the page
  numbers that the first one found into the table of contents (needs ``pypdf``).
- :func:`build_poster_pdf` (``make poster``): the poster chapter (``book/poster.md``)
  writes a standalone ``_build/poster/poster.html`` with an A0 landscape ``@page``
  (:func:`poster_html`); it is printed to ``_build/poster/poster.pdf``, one page of
  1189 x 841 mm (3370 x 2384 pt).

:func:`pdf_page_sizes` reads the page count and sizes back for the checks.
"""

from __future__ import annotations

import html as _html
import json
import math
import re
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import yaml

from .paths import repo_root, write_atomic

__all__ = [
    "A0_LANDSCAPE_MM",
    "BOOK_PRINT_CSS",
    "MM_PER_PT",
    "POSTER_LAYOUT_MM",
    "build_book_pdf",
    "build_poster_pdf",
    "pdf_page_sizes",
    "pdf_text",
    "poster_html",
    "svg_min_font_pt",
    "take_home",
]

#: millimetres per PostScript point (1 pt = 1/72 in)
MM_PER_PT = 25.4 / 72
#: ISO A0 in landscape, (width, height) in mm
A0_LANDSCAPE_MM = (1189.0, 841.0)
#: the poster's grid at print size (mm): outer margin, gap between blocks, width of the
#: text column, and the resulting width of each of the 2 x 2 figure panels
POSTER_LAYOUT_MM = {"margin": 18.0, "gap": 16.0, "text": 300.0}
POSTER_LAYOUT_MM["panel"] = (A0_LANDSCAPE_MM[0] - 2 * POSTER_LAYOUT_MM["margin"]
                             - POSTER_LAYOUT_MM["text"] - 2 * POSTER_LAYOUT_MM["gap"]) / 2

# ----------------------------------------------------------------------------- PDF checks


def pdf_page_sizes(path) -> list[tuple[float, float]]:
    """(width, height) in points of every page of a PDF, in order.

    Uses ``pypdf`` when installed; otherwise reads the ``/MediaBox`` of every ``/Type /Page``
    object directly, which works for the uncompressed object tables Chromium writes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no PDF at {path}")
    try:
        import pypdf
    except ImportError:
        pypdf = None
    if pypdf is not None:
        reader = pypdf.PdfReader(str(path))
        return [(float(p.mediabox.width), float(p.mediabox.height)) for p in reader.pages]
    raw = path.read_bytes().decode("latin-1")
    sizes = []
    for obj in re.finditer(r"<<(?:(?!>>\s*(?:endobj|stream)).)*?/Type\s*/Page\b(?!s)"
                           r"(?:(?!endobj).)*?endobj", raw, re.S):
        box = re.search(r"/MediaBox\s*\[\s*([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)",
                        obj.group(0))
        if box:
            x0, y0, x1, y1 = map(float, box.groups())
            sizes.append((x1 - x0, y1 - y0))
    if not sizes:
        raise ValueError(f"{path}: no page with a /MediaBox found; install pypdf to read it")
    return sizes


def pdf_text(path) -> str:
    """The text of a PDF (``pdftotext`` from poppler-utils, else ``pypdf``)."""
    exe = shutil.which("pdftotext")
    if exe:
        return subprocess.run([exe, "-q", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
    try:
        import pypdf
    except ImportError:
        raise RuntimeError("reading PDF text needs pdftotext (apt-get install poppler-utils) "
                           "or pypdf (pip install pypdf)") from None
    return "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(str(path)).pages)


_RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{|\\frac|\\mathbb")


def raw_tex_count(text: str) -> int:
    r"""How many raw TeX fragments (``$$``, ``\(``, ``\begin{``, ``\frac`` ...) a text holds.

    >>> raw_tex_count(r"typeset: W = A (x) B; raw: $$ \frac{a}{b} $$")
    3
    """
    return len(_RAW_TEX.findall(text))


# ----------------------------------------------------------------------------- the book

#: Print style for the single-page HTML build of the book (sphinx-book-theme / pydata).
BOOK_PRINT_CSS = r"""
@page { size: A4; margin: 18mm 17mm 20mm 17mm; }
html { font-size: 10pt !important; }
body { background: white !important; }
.bd-header, .bd-sidebar-primary, .bd-sidebar-secondary, .bd-header-article,
.prev-next-footer, .prev-next-area, .bd-footer, .bd-footer-article, .bd-footer-content,
#pst-back-to-top, .headerlink, .skip-link, dialog, #jb-print-docs-body, .search-button,
details.hide > summary, .toggle-details__summary, button.toggle-button, .copybtn,
.d-print-none { display: none !important; }
.bd-container, .bd-container__inner, .bd-page-width, .bd-main, .bd-content,
.bd-article-container, .bd-article, article {
  display: block !important; max-width: none !important; width: auto !important;
  margin: 0 !important; padding: 0 !important; overflow: visible !important; }
section.kl-chapter { break-before: page; }
article.bd-article > section > h1 { display: block !important; }  /* the theme hides it in print */
h1, h2, h3, h4, .caption, figcaption { break-after: avoid; break-inside: avoid; }
figure, img, table, mjx-container[display="true"], .cell_output img { break-inside: avoid; }
pre { white-space: pre-wrap !important; word-break: break-word; font-size: 8pt; }
.cell_output, .output, div.highlight, .table-wrapper, .pst-scrollable-table-container {
  overflow: visible !important; max-height: none !important; }
a { color: inherit !important; text-decoration: none !important; }
.kl-front { break-after: page; }
.kl-title { break-after: page; padding-top: 70mm; text-align: center; }
.kl-title .kl-t { font-size: 24pt; font-weight: 700; line-height: 1.25; }
.kl-title .kl-a { font-size: 14pt; margin-top: 14mm; }
.kl-title .kl-d { font-size: 11pt; margin-top: 4mm; color: #555; }
.kl-toc h2 { font-size: 18pt; margin-bottom: 6mm; }
.kl-toc ol { list-style: none; padding: 0; margin: 0; }
.kl-toc li { display: flex; gap: 2mm; margin: 1.2mm 0; }
.kl-toc li.kl-ch { font-weight: 700; margin-top: 3mm; }
.kl-toc li.kl-sec { padding-left: 8mm; }
.kl-toc .kl-fill { flex: 1; border-bottom: 1px dotted #999; margin-bottom: 1.2mm; }
"""

# Marks the chapters (sections whose heading is numbered) and puts a title page and a
# table of contents in front; PAGES maps heading ids to page numbers (empty: none shown).
_FRONT_JS = r"""
(() => {
  const INFO = __INFO__;
  const article = document.querySelector('article.bd-article') || document.body;
  const text = h => { const c = h.cloneNode(true);
    c.querySelectorAll('.headerlink').forEach(e => e.remove());
    return c.textContent.replace(/\s+/g, ' ').trim(); };
  const entries = [];
  const first = article.querySelector('section > h1');
  if (first) entries.push({cls: 'kl-ch', id: first.parentElement.id, title: text(first)});
  for (const s of article.querySelectorAll('section')) {
    const h = s.querySelector(':scope > h2');
    if (!h || !h.querySelector('.section-number')) continue;
    s.classList.add('kl-chapter');
    entries.push({cls: 'kl-ch', id: s.id, title: text(h)});
    for (const sub of s.querySelectorAll(':scope > section')) {
      const h3 = sub.querySelector(':scope > h3');
      if (h3) entries.push({cls: 'kl-sec', id: sub.id, title: text(h3)});
    }
  }
  const esc = t => t.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  const rows = entries.map(e => `<li class="${e.cls}"><a href="#${e.id}">${esc(e.title)}</a>` +
    `<span class="kl-fill"></span><span>${INFO.pages[e.title] || ''}</span></li>`).join('');
  const front = document.createElement('div');
  front.className = 'kl-front';
  front.innerHTML = `<div class="kl-title"><div class="kl-t">${esc(INFO.title)}</div>` +
    `<div class="kl-a">${esc(INFO.author)}</div><div class="kl-d">${esc(INFO.date)}</div></div>` +
    `<div class="kl-toc"><h2 class="kl-toc-h">Contents</h2><ol>${rows}</ol></div>`;
  article.prepend(front);
  return entries.length;
})()
"""


def _stage_pdf_site(out: Path) -> Path:
    """Copy the executed site of ``kronlab book build`` to ``_build/pdf/site`` with
    numbered chapters (``_toc.yml`` option ``numbered``) for the single-page build."""
    src = out / "_build" / "site"
    if not (src / "_toc.yml").exists():
        raise FileNotFoundError(f"no executed book in {src}: run `make book` (or "
                                "`python -m kronlab book build --profile smoke`) first")
    dest = out / "_build" / "pdf" / "site"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.failed.ipynb", ".*"))
    toc = yaml.safe_load((dest / "_toc.yml").read_text())
    toc.setdefault("options", {})["numbered"] = True
    write_atomic(dest / "_toc.yml", yaml.safe_dump(toc, sort_keys=False))
    return dest


def _singlehtml(site: Path, work: Path) -> Path:
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(site), "--builder",
           "singlehtml", "--path-output", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    root_doc = yaml.safe_load((site / "_toc.yml").read_text())["root"]
    page = work / "_build" / "singlehtml" / f"{root_doc}.html"
    if not page.exists():
        raise FileNotFoundError(f"the single-page build wrote no {page}")
    # the builder writes links relative to its output folder (``_static/...``) even for a
    # root document in a subfolder: print a copy that sits there
    flat = page.parents[len(Path(root_doc).parts) - 1] / "kronlab-print.html"
    shutil.copyfile(page, flat)
    return flat


def _outline_pages(pdf: Path) -> dict[str, int]:
    """Heading title -> 1-based page number, from the PDF outline (needs pypdf)."""
    try:
        import pypdf
    except ImportError:
        return {}
    reader = pypdf.PdfReader(str(pdf))
    pages: dict[str, int] = {}

    def walk(items):
        for item in items:
            if isinstance(item, list):
                walk(item)
            else:
                title = re.sub(r"\s+", " ", item.title).strip()
                pages.setdefault(title, reader.get_destination_page_number(item) + 1)

    walk(reader.outline)
    return pages


def build_book_pdf(root=None, out=None, *, pdf=None) -> dict:
    """Print the whole executed book to one PDF (default ``<out>/_build/pdf/kronlab.pdf``).

    Nothing is executed: the notebooks come from ``<out>/_build/site``. Returns
    ``{"pdf", "pages", "page_size_pt", "toc_entries", "raw_tex"}``; raises if MathJax left
    math untypeset or raw TeX reached the PDF's text.
    """
    from .browser import print_pdf

    root = Path(root).resolve() if root is not None else repo_root()
    out = Path(out).resolve() if out is not None else root
    pdf = Path(pdf) if pdf is not None else out / "_build" / "pdf" / "kronlab.pdf"
    site = _stage_pdf_site(out)
    page = _singlehtml(site, out / "_build" / "pdf" / "work")
    config = yaml.safe_load((root / "_config.yml").read_text())
    info = {"title": config.get("title", "kronlab"), "author": config.get("author", ""),
            "date": date.today().strftime("%B %Y"), "pages": {}}
    first = pdf.with_name(pdf.stem + ".pass1.pdf")
    print_pdf(page, first, css=BOOK_PRINT_CSS, page_numbers=True,
              before_print=_FRONT_JS.replace("__INFO__", json.dumps(info)))
    info["pages"] = {t: p for t, p in _outline_pages(first).items() if t != "Contents"}
    if info["pages"]:
        print_pdf(page, pdf, css=BOOK_PRINT_CSS, page_numbers=True,
                  before_print=_FRONT_JS.replace("__INFO__", json.dumps(info)))
        first.unlink()
    else:
        first.replace(pdf)
    sizes = pdf_page_sizes(pdf)
    raw = raw_tex_count(pdf_text(pdf)) if shutil.which("pdftotext") else None
    if raw:
        raise RuntimeError(f"{pdf}: {raw} raw TeX fragments in the text; MathJax did not typeset")
    return {"pdf": pdf, "pages": len(sizes), "page_size_pt": sizes[0],
            "toc_entries": len(info["pages"]), "raw_tex": raw}


# ----------------------------------------------------------------------------- the poster

_LABELS = {
    "kron": "plain Kronecker (kron)",
    "kron-aa": "activation-aware Kronecker (kron-aa)",
    "kron-fisher": "Fisher-weighted Kronecker (kron-fisher)",
    "svd": "truncated SVD (svd)",
    "svd-aa": "whitened low rank, SVD-LLM (svd-aa)",
    "svd-fisher": "Fisher-weighted low rank (svd-fisher)",
}


def take_home(frame, dense_ppl: float, corpus: str, ratio: float, *,
              method: str = "kron-fisher", baseline: str = "svd-aa",
              model: str = "SmolLM2-135M") -> str:
    """The poster's take-home sentence, built from recorded perplexities.

    ``frame`` is a sweep frame (:func:`kronlab.results.sweep_frame`: columns ``method``,
    ``ratio``, ``macs_ratio``, ``ppl_<corpus>``); runs at a parameter budget only
    (``macs_ratio`` null) at the recorded ratio nearest ``ratio`` are compared.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"method": ["kron-fisher", "svd-aa"], "ratio": [0.8, 0.8],
    ...                   "macs_ratio": [None, None], "ppl_wiki": [80.0, 100.0]})
    >>> take_home(f, 20.0, "wiki", 0.8)  # doctest: +NORMALIZE_WHITESPACE
    'Keeping 80% of the linear-layer parameters of SmolLM2-135M, Fisher-weighted Kronecker
    (kron-fisher) reaches perplexity 80.0 on wiki, 20% lower than whitened low rank, SVD-LLM
    (svd-aa) at 100.0 (dense model: 20.0).'
    """
    col = f"ppl_{corpus}"
    if col not in frame:
        have = [c[4:] for c in frame.columns if c.startswith("ppl_")]
        raise ValueError(f"no perplexities on {corpus!r}; corpora in the frame: {have}")
    runs = frame[frame["macs_ratio"].isna()] if "macs_ratio" in frame else frame
    runs = runs.dropna(subset=[col])
    missing = [m for m in (method, baseline) if m not in set(runs["method"])]
    if missing:
        raise ValueError(f"no parameter-budget runs of {missing}; methods recorded: "
                         f"{sorted(set(runs['method']))}")
    both = runs[runs["method"].isin([method, baseline])]
    ratios = sorted(set(both[both.method == method].ratio) & set(both[both.method == baseline].ratio))
    if not ratios:
        raise ValueError(f"{method} and {baseline} share no ratio")
    at = min(ratios, key=lambda r: abs(r - ratio))
    ppl = both[both.ratio == at].groupby("method")[col].min()
    p, q = float(ppl[method]), float(ppl[baseline])
    change = abs(p / q - 1)
    word = "lower" if p < q else "higher"
    return (f"Keeping {at:.0%} of the linear-layer parameters of {model}, "
            f"{_LABELS.get(method, method)} reaches perplexity {p:.1f} on {corpus}, "
            f"{change:.0%} {word} than {_LABELS.get(baseline, baseline)} at {q:.1f} "
            f"(dense model: {dense_ppl:.1f}).")


def svg_min_font_pt(svg: str, print_width_mm: float) -> float:
    """Smallest font size (pt) of a matplotlib SVG (``svg.fonttype: none``) printed
    ``print_width_mm`` wide: each ``font-size``/``font: Npx`` times print width / SVG width."""
    m = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', svg)
    if not m:
        raise ValueError("not a matplotlib SVG: no width in pt on the <svg> element")
    scale = print_width_mm / MM_PER_PT / float(m.group(1))
    sizes = [float(s) for s in re.findall(r"font(?:-size)?:\s*(?:[a-z]+\s+)*([\d.]+)px", svg)]
    if not sizes:
        raise ValueError("no text sizes in the SVG: save it with rcParams['svg.fonttype'] = 'none'")
    return min(sizes) * scale


def _cqw(mm: float) -> str:
    """A length at A0 print size as a fraction of the poster width (CSS container units)."""
    return f"{100 * mm / A0_LANDSCAPE_MM[0]:.4f}cqw"


def _poster_css(standalone: bool) -> str:
    # sizes in mm at print size (A0), written in container units so that the poster
    # embedded in a web page is the same poster, scaled
    L = POSTER_LAYOUT_MM
    pt = lambda p: _cqw(p * MM_PER_PT)  # noqa: E731
    page = ("@page { size: 1189mm 841mm; margin: 0; }\n"
            "html, body { margin: 0; padding: 0; background: white; }\n"
            ".kl-poster-frame { width: 1189mm; }\n") if standalone else ""
    return page + f"""
.kl-poster-frame {{ container-type: inline-size; }}
.kl-poster {{ box-sizing: border-box; width: 100cqw; height: {_cqw(A0_LANDSCAPE_MM[1])};
  overflow: hidden; padding: {_cqw(L['margin'])}; background: #fff; color: #1a1a1a;
  font-family: "DejaVu Sans", "Helvetica", "Arial", sans-serif; font-size: {pt(34)};
  line-height: 1.3; display: grid; grid-template-rows: auto 1fr auto; gap: {_cqw(L['gap'])};
  border: 1px solid #ccc; }}
.kl-poster * {{ box-sizing: border-box; }}
.kl-poster header {{ background: #08306b; color: #fff; padding: {_cqw(10)} {_cqw(16)};
  border-radius: {_cqw(6)}; }}
.kl-poster .kl-title {{ font-size: {pt(84)}; font-weight: 700; line-height: 1.1; margin: 0; }}
.kl-poster .kl-byline {{ font-size: {pt(40)}; margin-top: {_cqw(4)}; opacity: 0.9; }}
.kl-poster main {{ display: grid; grid-template-columns: {_cqw(L['text'])} 1fr;
  gap: {_cqw(L['gap'])}; min-height: 0; }}
.kl-poster .kl-text {{ display: flex; flex-direction: column; gap: {_cqw(10)}; }}
.kl-poster h2 {{ font-size: {pt(46)}; color: #08306b; margin: 0 0 {_cqw(3)} 0;
  border-bottom: {_cqw(1.2)} solid #08306b; padding-bottom: {_cqw(1.5)}; }}
.kl-poster p, .kl-poster li {{ margin: 0 0 {_cqw(3)} 0; }}
.kl-poster ul {{ margin: 0; padding-left: {_cqw(12)}; }}
.kl-poster .kl-take {{ background: #fff3e0; border-left: {_cqw(5)} solid #d94801;
  padding: {_cqw(6)} {_cqw(8)}; font-size: {pt(40)}; font-weight: 600; }}
.kl-poster .kl-panels {{ display: grid; grid-template-columns: 1fr 1fr;
  grid-template-rows: 1fr 1fr; gap: {_cqw(L['gap'])}; min-height: 0; }}
.kl-poster figure {{ margin: 0; display: flex; flex-direction: column; min-height: 0; }}
.kl-poster figure svg, .kl-poster figure img {{ width: 100%; height: auto; display: block; }}
.kl-poster figcaption {{ font-size: {pt(28)}; line-height: 1.25; margin-top: {_cqw(2)}; }}
.kl-poster figcaption b {{ color: #08306b; }}
.kl-poster footer {{ font-size: {pt(30)}; color: #333; border-top: {_cqw(0.8)} solid #999;
  padding-top: {_cqw(3)}; display: flex; justify-content: space-between; }}
"""


def poster_html(*, title: str, byline: str, blocks: list[tuple[str, str]], take_home: str,
                panels: list[tuple[str, str]], link: str, standalone: bool = True) -> str:
    """An A0 landscape poster as HTML: a title band, a text column, 2 x 2 figure panels.

    ``blocks``: (heading, HTML body) of the text column; ``take_home``: the sentence in
    the highlighted box (plain text); ``panels``: up to four (figure markup, e.g. inline
    SVG, caption HTML); ``link``: the footer's link line (plain text). With
    ``standalone`` the result is a whole document with ``@page { size: 1189mm 841mm }``
    (one page when printed); else a fragment for a web page, the same poster scaled to
    the width of its container. Text is sized at print size: body 34 pt, captions 28 pt.
    """
    if not 3 <= len(panels) <= 4:
        raise ValueError(f"a poster has 3 or 4 panels; got {len(panels)}")
    esc = _html.escape
    text = "".join(f"<section><h2>{esc(h)}</h2>{body}</section>" for h, body in blocks)
    figs = "".join(f"<figure>{fig}<figcaption>{cap}</figcaption></figure>"
                   for fig, cap in panels)
    body = (f'<div class="kl-poster-frame"><div class="kl-poster">'
            f'<header><div class="kl-title">{esc(title)}</div>'
            f'<div class="kl-byline">{esc(byline)}</div></header>'
            f'<main><div class="kl-text">{text}<div class="kl-take">{esc(take_home)}</div>'
            f'</div><div class="kl-panels">{figs}</div></main>'
            f'<footer><span>{esc(link)}</span></footer></div></div>')
    css = f"<style>{_poster_css(standalone)}</style>"
    if not standalone:
        return css + body
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title>{css}</head><body>{body}</body></html>\n")


def build_poster_pdf(root=None, out=None, *, profile: str = "default") -> dict:
    """Print ``<out>/_build/poster/poster.html`` to ``poster.pdf`` next to it: one A0 page.

    Runs the poster chapter first (with ``profile``) when the HTML is missing. Returns
    ``{"pdf", "pages", "page_size_pt"}``; raises unless the PDF is one page of about
    3370 x 2384 pt.
    """
    from .browser import print_pdf

    root = Path(root).resolve() if root is not None else repo_root()
    out = Path(out).resolve() if out is not None else root
    src = out / "_build" / "poster" / "poster.html"
    if not src.exists():
        from .book import run_chapter_timed

        run_chapter_timed("poster", profile=profile, root=root, out=out)
    if not src.exists():
        raise FileNotFoundError(f"the poster chapter did not write {src}")
    pdf = src.with_suffix(".pdf")
    print_pdf(src, pdf)
    sizes = pdf_page_sizes(pdf)
    want = tuple(v / MM_PER_PT for v in A0_LANDSCAPE_MM)
    if len(sizes) != 1 or any(not math.isclose(a, b, rel_tol=0.01) for a, b in zip(sizes[0], want, strict=True)):
        raise RuntimeError(f"{pdf}: {len(sizes)} page(s) of {sizes[0]} pt; the poster must be "
                           f"one page of {want[0]:.0f} x {want[1]:.0f} pt (A0 landscape)")
    return {"pdf": pdf, "pages": 1, "page_size_pt": sizes[0]}

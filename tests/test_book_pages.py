"""The book as its readers see it: clean pages and one figure style.

Cheap checks (always run): the style module of :mod:`kronlab.notebook` gives every
method one distinct style (variants keep their method's colour), writes PNG at 300 dpi
and vector PDF at the printed width with mode 0644, keeps legends off the data, and
formats table numbers for reading; every chapter draws its figures through it and tags
every code cell.

Slow check: in the smoke build that ``test_book.py`` makes (built once per session, see
:func:`test_book.smoke_book`), no HTML page holds a progress bar (``it/s]``), a
``Warning`` or a ``Traceback``.
"""

import re
import stat
from pathlib import Path

import pytest

from kronlab.book import notebook_chapters

ROOT = Path(__file__).resolve().parent.parent

#: What must never reach a built page: a tqdm bar, a warning, a traceback.
NOISE = ("it/s]", "Warning", "Traceback")
#: Chapters that draw their figures at another print size than the book's columns: the
#: poster's panels are drawn at A0 size (its chapter checks every text >= 24 pt there).
PRINT_SIZE_FIGURES = {"poster"}
#: Tags a code cell may carry: the one parameters cell, hidden setup, a figure or table
#: whose code is removed, and computation or checks behind a "show code" toggle.
CELL_TAGS = {"parameters", "remove-cell", "remove-input", "hide-input"}


@pytest.fixture(autouse=True)
def _agg():
    import matplotlib

    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


# ----------------------------------------------------------------------------- style module

def test_every_method_has_one_distinct_style():
    from kronlab.notebook import ALL_METHODS, METHOD_STYLE, METHODS, style

    for method in (*ALL_METHODS, *METHODS, "dense", "kron-aa-perm", "lowrank", "KronLinear"):
        kw = style(method)
        assert kw["label"] == method and kw["color"].startswith("#")
    colours = [v["color"].lower() for v in METHOD_STYLE.values()]
    assert len(set(colours)) == len(colours), "two methods share a colour"
    # the families: Kronecker sums blue (b largest), low rank orange/brown (r largest)
    for method in ALL_METHODS:
        r, g, b = (int(style(method)["color"][i:i + 2], 16) for i in (1, 3, 5))
        assert (b > r) if method.startswith("kron") else (r > b), method
    # dense: a line without markers, drawn above the methods
    assert style("dense")["marker"] == "" and style("dense")["zorder"] > 2


@pytest.mark.parametrize("variant", ["kron-fisher (MACs<=1)", "kron-aa, MACs capped",
                                     "svd-aa (MACs capped)"])
def test_a_variant_keeps_its_methods_colour_and_marker(variant):
    from kronlab.notebook import style

    base = re.split(r"[ ,(]", variant)[0]
    kw = style(variant)
    assert kw["color"] == style(base)["color"] and kw["marker"] == style(base)["marker"]
    assert kw["mfc"] == "white" and kw["ls"] == ":" and kw["label"] == variant
    assert style(variant, ls="none")["ls"] == "none"


def test_unknown_methods_and_widths_are_refused():
    from kronlab.notebook import figure, palette, style

    for bad in ("nope", "kron-aaa", "svdx (y)"):
        with pytest.raises(ValueError, match="no style"):
            style(bad)
    with pytest.raises(ValueError, match="width"):
        figure("triple")
    with pytest.raises(ValueError, match="series colours"):
        palette(50)


def test_series_colours_are_not_method_colours():
    from kronlab.notebook import METHOD_STYLE, SERIES_COLORS, palette

    assert not {c.lower() for c in SERIES_COLORS} & {v["color"].lower() for v in METHOD_STYLE.values()}
    assert palette(["q", "k", "v"]) == dict(zip("qkv", SERIES_COLORS[:3], strict=True))
    assert list(palette(2)) == [0, 1]


def _png_size_and_dpi(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.info.get("dpi")


def _pdf_media_box(path: Path):
    box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", path.read_bytes())
    assert box, f"{path} has no MediaBox"
    return float(box.group(1)), float(box.group(2))


@pytest.mark.parametrize("width,inches", [("single", 3.3), ("double", 6.8), (5.0, 5.0)])
def test_save_figure_writes_png_and_pdf_at_the_printed_size(tmp_path, width, inches):
    from kronlab.notebook import DPI, figure, save_figure, style

    fig, ax = figure(width, 2.0)
    ax.plot([0, 1], [1, 0], **style("kron-aa"))
    ax.set_xlabel("a long label that would otherwise change the saved size")
    paths = save_figure(fig, "size-check", tmp_path)
    assert DPI == 300
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    (w, h), dpi = _png_size_and_dpi(paths["png"])
    assert (w, h) == (round(inches * 300), 600)
    assert dpi is not None and round(dpi[0]) == 300
    assert _pdf_media_box(paths["pdf"]) == pytest.approx((inches * 72, 2.0 * 72), abs=0.5)
    pdf = paths["pdf"].read_bytes()
    assert b"/Subtype /Image" not in pdf, "the PDF should hold vector lines, not a raster"
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_text_is_8_to_9_points():
    import matplotlib as mpl

    from kronlab.notebook import RC_PARAMS, figure

    figure("single")
    for key in ("font.size", "axes.labelsize", "axes.titlesize", "xtick.labelsize",
                "ytick.labelsize", "legend.fontsize"):
        assert 8 <= RC_PARAMS[key] <= 9 and mpl.rcParams[key] == RC_PARAMS[key], key


def test_panel_letters_in_reading_order():
    from kronlab.notebook import figure, panel_letters

    fig, axes = figure("double", 3.0, 2, 3)
    axes[1, 2].axis("off")
    texts = panel_letters(axes)
    assert [t.get_text() for t in texts] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert texts[3].axes is axes[1, 0]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legend_below_covers_no_axes_and_stays_on_the_figure(tmp_path):
    import numpy as np

    from kronlab.notebook import ALL_METHODS, figure, legend_below, save_figure, style

    fig, axes = figure("double", 2.4, 1, 2)
    x = np.linspace(0, 1, 20)
    for ax in axes:
        for i, meth in enumerate(ALL_METHODS):
            ax.plot(x, x * (i + 1), **style(meth))
        ax.axhline(1.0, **style("dense"))
    leg = legend_below(fig)
    assert [t.get_text() for t in leg.get_texts()] == [*ALL_METHODS, "dense"]  # once each
    save_figure(fig, "legend-check", tmp_path)   # draws with the layout engine
    renderer = fig.canvas.get_renderer()
    box = leg.get_window_extent(renderer)
    figbox = fig.bbox
    assert box.x0 >= figbox.x0 - 1 and box.x1 <= figbox.x1 + 1 and box.y0 >= figbox.y0 - 1
    for ax in axes:
        assert not _overlap(box, ax.get_window_extent(renderer)), "the legend covers a panel"


def test_numbers_are_formatted_for_reading():
    import numpy as np
    import pandas as pd

    from kronlab.notebook import format_number, readable

    assert format_number(1.284010e+05) == "128,401"
    assert format_number(96.082) == "96.08" and format_number(np.float64(0.84)) == "0.840"
    assert format_number(14.0) == "14" and format_number(np.int64(3)) == "3"
    assert format_number(None) == format_number(float("nan")) == "–"
    assert format_number(2.2e-16) == "2.2e-16" and format_number("kron") == "kron"
    frame = pd.DataFrame({"ppl": [1.284010e+05, 96.082], "n": [14.0, 14.0],
                          "text": ["a\n\nb", "c"]},
                         index=pd.MultiIndex.from_tuples([(0.8, "kron"), (0.6, "svd")],
                                                         names=["ratio", "method"]))
    text = readable(frame).to_html()
    assert "e+" not in text and "14.0" not in text and "\\n" not in text and "\n\n" not in text
    assert readable(frame).index.tolist() == [("0.8", "kron"), ("0.6", "svd")]
    assert readable(frame).loc[("0.8", "kron"), "text"] == "a ¶ b"


# ----------------------------------------------------------------------------- chapters

def _code_cells(doc: str):
    import jupytext

    nb = jupytext.read(ROOT / f"{doc}.md")
    return [c for c in nb.cells if c.cell_type == "code"]


CHAPTERS = sorted(notebook_chapters(ROOT).items())


@pytest.mark.parametrize("stem,doc", CHAPTERS, ids=[s for s, _ in CHAPTERS])
def test_every_code_cell_is_tagged(stem, doc):
    """Parameters shown; setup removed; figures and tables without code; computations and
    checks behind a toggle. No cell's code sits open in the page by accident."""
    for cell in _code_cells(doc):
        tags = set(cell.metadata.get("tags", []))
        assert tags & CELL_TAGS, (f"{doc}.md: a code cell has no tag among {sorted(CELL_TAGS)}: "
                                  f"{cell.source[:80]!r}")


@pytest.mark.parametrize("stem,doc", CHAPTERS, ids=[s for s, _ in CHAPTERS])
def test_figures_use_the_book_style(stem, doc):
    if stem in PRINT_SIZE_FIGURES:
        pytest.skip(f"{stem} draws its figures at its own print size (A0), checked in the chapter")
    source = "\n".join(c.source for c in _code_cells(doc))
    for bad in ("figsize=", "plt.subplots(", "tight_layout(", 'color=f"C', "fontsize="):
        assert bad not in source, f"{doc}.md uses {bad!r}: draw with kronlab.notebook.figure"


# ----------------------------------------------------------------------------- built pages

def noise_counts(html: Path) -> dict[str, dict[str, int]]:
    """For every built page with noise: how often each string of :data:`NOISE` occurs."""
    counts = {}
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(errors="replace")
        found = {s: text.count(s) for s in NOISE if s in text}
        if found:
            counts[str(page.relative_to(html))] = found
    return counts


def test_noise_counts_finds_each_string(tmp_path):
    (tmp_path / "a.html").write_text("<pre>10/10 [00:01<00:00, 9.5it/s]</pre> TqdmWarning")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text("Traceback (most recent call last)")
    (tmp_path / "c.html").write_text("clean")
    assert noise_counts(tmp_path) == {"a.html": {"it/s]": 1, "Warning": 1},
                                      "sub/b.html": {"Traceback": 1}}


@pytest.fixture(scope="session")
def smoke_site(tmp_path_factory):
    from test_book import smoke_book   # the session's one smoke build

    return smoke_book(tmp_path_factory)


@pytest.mark.slow
def test_no_page_shows_a_progress_bar_warning_or_traceback(smoke_site):
    _, html = smoke_site
    assert list(html.rglob("*.html"))
    counts = noise_counts(html)
    assert not counts, "built pages with progress bars, warnings or tracebacks:\n" + "\n".join(
        f"  {page}: " + ", ".join(f"{s!r} x{n}" for s, n in found.items())
        for page, found in counts.items())

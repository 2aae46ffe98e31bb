"""The offline printing of the book and the poster (kronlab.printing, kronlab.browser)."""

from __future__ import annotations

import math
import re

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from kronlab import printing  # noqa: E402
from kronlab.browser import find_chromium, print_pdf  # noqa: E402

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")


def _frame():
    return pd.DataFrame({
        "method": ["kron-fisher", "svd-aa", "kron-fisher", "svd-aa", "kron-fisher"],
        "ratio": [0.8, 0.8, 0.6, 0.6, 0.8],
        "macs_ratio": [None, None, None, None, 1.0],
        "ppl_sotu": [120.0, 100.0, 300.0, 250.0, 50.0]})


def test_take_home_compares_parameter_budget_runs_at_nearest_ratio():
    s = printing.take_home(_frame(), 30.0, "sotu", 0.78)
    # the MACs-capped run (50.0) is not a parameter-budget run and must be ignored
    assert "80%" in s and "120.0" in s and "100.0" in s and "50.0" not in s
    assert "20% higher" in s and "dense model: 30.0" in s
    assert "60%" in printing.take_home(_frame(), 30.0, "sotu", 0.55)


def test_take_home_rejects_unknown_corpus_and_method():
    with pytest.raises(ValueError, match="corpora in the frame: \\['sotu'\\]"):
        printing.take_home(_frame(), 30.0, "wiki", 0.8)
    with pytest.raises(ValueError, match="methods recorded"):
        printing.take_home(_frame(), 30.0, "sotu", 0.8, baseline="svd")


def test_poster_layout_fills_a0_width():
    L = printing.POSTER_LAYOUT_MM
    total = 2 * L["margin"] + L["text"] + 2 * L["gap"] + 2 * L["panel"]
    assert math.isclose(total, printing.A0_LANDSCAPE_MM[0])


def _poster(standalone=True, n=3):
    panels = [("<svg></svg>", f"caption {i}") for i in range(n)]
    return printing.poster_html(title="T <x>", byline="b", blocks=[("Q", "<p>q</p>")],
                                take_home="take", panels=panels, link="L",
                                standalone=standalone)


def test_poster_html_page_size_and_fonts():
    html = _poster()
    assert "@page { size: 1189mm 841mm; margin: 0; }" in html
    assert "T &lt;x&gt;" in html  # the title is escaped
    # every font size is given in container units; at A0 width 1 cqw = 11.89 mm
    sizes_pt = [float(v) * printing.A0_LANDSCAPE_MM[0] / 100 / printing.MM_PER_PT
                for v in re.findall(r"font-size: ([\d.]+)cqw", html)]
    assert sizes_pt and min(sizes_pt) >= 24
    frag = _poster(standalone=False)
    assert "@page" not in frag and "<html" not in frag and "container-type" in frag
    with pytest.raises(ValueError, match="3 or 4 panels"):
        _poster(n=2)


def test_svg_min_font_pt_scales_with_print_width():
    import matplotlib.pyplot as plt
    import io

    with plt.rc_context({"svg.fonttype": "none", "font.size": 10}):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.set_xlabel("x")
        ax.tick_params(labelsize=8)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
    svg = buf.getvalue()
    assert math.isclose(printing.svg_min_font_pt(svg, 4 * 25.4), 8, rel_tol=1e-3)
    assert math.isclose(printing.svg_min_font_pt(svg, 12 * 25.4), 24, rel_tol=1e-3)


def test_raw_tex_count():
    assert printing.raw_tex_count("W = A ⊗ B, e_Y = 0.1") == 0
    assert printing.raw_tex_count(r"\(W\) and $$x$$") == 4


@needs_chromium
def test_print_pdf_page_size_from_css(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><style>@page { size: 210mm 99mm; margin: 0 }</style></head>"
                    "<body><p>one</p><p>two</p></body></html>")
    check = print_pdf(page, tmp_path / "p.pdf")
    assert check == {"untypeset": 0, "raw": 0}
    (w, h), = printing.pdf_page_sizes(tmp_path / "p.pdf")
    assert abs(w - 210 / printing.MM_PER_PT) < 2 and abs(h - 99 / printing.MM_PER_PT) < 2


@needs_chromium
def test_print_pdf_a0_poster_is_one_page(tmp_path):
    page = tmp_path / "poster.html"
    page.write_text(_poster(n=4))
    print_pdf(page, tmp_path / "poster.pdf")
    sizes = printing.pdf_page_sizes(tmp_path / "poster.pdf")
    assert len(sizes) == 1
    assert abs(sizes[0][0] - 3370) < 5 and abs(sizes[0][1] - 2384) < 5


@needs_chromium
def test_print_pdf_refuses_raw_tex(tmp_path):
    page = tmp_path / "tex.html"
    page.write_text(r"<html><body><p>\(W = A \otimes B\)</p></body></html>")
    with pytest.raises(RuntimeError, match="raw TeX"):
        print_pdf(page, tmp_path / "tex.pdf")
    assert not (tmp_path / "tex.pdf").exists()

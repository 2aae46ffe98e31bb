"""The book: its chapters, their parameters and glue, the built site.

Cheap checks (always run): every profile sets only parameters that a chapter's
``parameters`` cell declares; no chapter imports a private name of kronlab; the chapter
helpers of :mod:`kronlab.notebook` behave.

Slow checks: the book is built with the tiny ``smoke`` profile (every chapter runs, so a
broken chapter fails CI; the site builds with warnings as errors; every toc page and every
figure exists; no page loads a script, stylesheet or font from outside the site; in
headless Chromium the equations are typeset), and every chapter is run again with the
``alt`` profile, whose values all differ, and a sweep file of one corpus: every glue key
that the prose names must be defined by the executed notebook for both profiles, and the
``alt`` site must build with ``-W`` too, so a page never depends on its default values.
"""

import ast
import json
import os
import re
import stat
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from kronlab.book import build_book, build_html, notebook_chapters, run_chapter, toc_documents
from kronlab.browser import dump_dom, find_chromium

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted(p.stem for p in (ROOT / "book" / "params").glob("*.yaml"))

# {glue}`key`, {glue:text}`key:.2f`, {glue:md}`key`, ... and ```{glue:figure} key
_GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)(?::[^`]*)?`")
_GLUE_DIRECTIVE = re.compile(r"^[`:]{3,}\{glue(?::\w+)?\}\s+(\S+)", re.MULTILINE)


def glue_references(md_text: str) -> set[str]:
    """Glue keys that the prose of a MyST chapter names (roles and directives)."""
    return set(_GLUE_ROLE.findall(md_text)) | set(_GLUE_DIRECTIVE.findall(md_text))


def glued_names(ipynb: Path) -> set[str]:
    """Glue keys that an executed notebook defines (myst_nb stores them as "scrapbook")."""
    nb = json.loads(ipynb.read_text())
    return {out["metadata"]["scrapbook"]["name"]
            for cell in nb["cells"] for out in cell.get("outputs", [])
            if "scrapbook" in out.get("metadata", {})}


def parameter_names(md_path: Path) -> set[str]:
    """Names assigned in a chapter's cell tagged ``parameters``."""
    import jupytext

    nb = jupytext.read(md_path)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{md_path.name} has {len(cells)} cells tagged parameters, not 1"
    tree = ast.parse(cells[0].source)
    return {t.id for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def check_glue(site: Path, label: str) -> None:
    """Every glue key that a chapter's prose names is defined by its executed notebook."""
    missing = {}
    for stem, doc in notebook_chapters(ROOT).items():
        refs = glue_references((ROOT / f"{doc}.md").read_text())
        lost = refs - glued_names(site / f"{doc}.ipynb")
        if lost:
            missing[stem] = sorted(lost)
    assert not missing, f"profile {label}: glue keys named in the prose but never glued: {missing}"


@contextmanager
def figures_in(folder: Path):
    old = os.environ.get("KRONLAB_FIGURES")
    os.environ["KRONLAB_FIGURES"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KRONLAB_FIGURES", None)
        else:
            os.environ["KRONLAB_FIGURES"] = old


# ----------------------------------------------------------------------------- cheap checks

@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_set_only_declared_parameters(profile):
    data = yaml.safe_load((ROOT / "book" / "params" / f"{profile}.yaml").read_text())
    chapters = notebook_chapters(ROOT)
    for stem, params in data.items():
        declared = parameter_names(ROOT / f"{chapters[stem]}.md")
        unknown = set(params or {}) - declared
        assert not unknown, (f"book/params/{profile}.yaml sets {sorted(unknown)} for {stem}, "
                             f"whose parameters are {sorted(declared)}")


def test_alt_profile_differs_from_smoke():
    """Every value that alt sets for a chapter differs from smoke's (paths aside)."""
    smoke = yaml.safe_load((ROOT / "book" / "params" / "smoke.yaml").read_text())
    alt = yaml.safe_load((ROOT / "book" / "params" / "alt.yaml").read_text())
    assert set(alt) == set(smoke) == set(notebook_chapters(ROOT))
    for stem, params in alt.items():
        same = [k for k, v in params.items()
                if smoke[stem].get(k) == v and not k.endswith(("_path", "_file")) and k not in (
                    "device", "corpus")]
        assert not same, f"alt.yaml repeats smoke's values for {stem}: {same}"


def test_no_chapter_imports_a_private_name():
    private = re.compile(r"(from\s+kronlab(\.\w+)*\s+import\s+[^\n]*\b_\w+"
                         r"|from\s+kronlab\._|import\s+kronlab\._|kronlab(\.\w+)*\._\w+\()")
    for doc in notebook_chapters(ROOT).values():
        import jupytext

        nb = jupytext.read(ROOT / f"{doc}.md")
        for cell in nb.cells:
            if cell.cell_type == "code":
                hit = private.search(cell.source)
                assert not hit, f"{doc}.md uses a private name of kronlab: {hit.group(0)!r}"


def test_glue_references_are_parsed():
    text = ("a {glue:text}`x_1:.2f` b {glue}`y` {glue:md}`z` {numref}`fig-a`\n"
            "```{glue:figure} fig_key\n:name: f\n```\n")
    assert glue_references(text) == {"x_1", "y", "z", "fig_key"}


def test_notebook_glue_gives_plain_numbers(monkeypatch):
    """numpy and torch scalars reach myst_nb.glue as Python numbers; other values unchanged."""
    import myst_nb
    import numpy as np
    import torch

    from kronlab.notebook import glue

    seen = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: seen.update(
        {name: (value, display)}))
    arr = np.arange(3)
    for name, value in [("f", np.float64(0.5)), ("i", np.int64(3)), ("a0", np.array(2.0)),
                        ("t", torch.tensor(1.5)), ("arr", arr), ("s", "text")]:
        glue(name, value)
    assert seen["f"] == (0.5, False) and type(seen["f"][0]) is float
    assert type(seen["i"][0]) is int and type(seen["a0"][0]) is float
    assert type(seen["t"][0]) is float and seen["t"][0] == 1.5
    assert seen["arr"][0] is arr and seen["s"][0] == "text"
    glue("shown", 1, display=True)
    assert seen["shown"] == (1, True)


def test_notebook_glue_rejects_bad_names():
    from kronlab.notebook import glue

    with pytest.raises(ValueError, match="glue name"):
        glue("speed ratio", 1.0)


def test_notebook_save_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kronlab.notebook import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with figures_in(tmp_path / "figs"):
        paths = save_figure(fig, "test-fig")
    assert set(paths) == {"png", "pdf"}
    for fmt, path in paths.items():
        assert path == tmp_path / "figs" / f"test-fig.{fmt}"
        assert path.stat().st_size > 1000
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["pdf"].read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["test-fig.pdf", "test-fig.png"]
    with pytest.raises(ValueError, match="figure name"):
        save_figure(fig, "Bad Name", tmp_path)
    plt.close(fig)


def test_notebook_result_paths(monkeypatch, tmp_path):
    from kronlab.notebook import result_path

    monkeypatch.setenv("KRONLAB_ROOT", str(tmp_path))
    assert result_path("", "llm_sweep.json") == tmp_path / "data" / "results" / "llm_sweep.json"
    assert result_path(None, "x.json") == tmp_path / "data" / "results" / "x.json"
    assert result_path("runs/s.json", "x") == tmp_path / "runs" / "s.json"
    assert result_path("/abs/s.json", "x") == Path("/abs/s.json")


def test_notebook_styles_and_lists():
    from kronlab.compress import METHODS as COMPRESS_METHODS
    from kronlab.notebook import ALL_METHODS, FISHER_METHODS, METHOD_STYLE, METHODS, join_and, style

    assert set(METHODS) | set(FISHER_METHODS) == set(ALL_METHODS) <= set(METHOD_STYLE)
    assert set(ALL_METHODS) <= set(COMPRESS_METHODS)
    # the Fisher variants have their own marker, shared by both families
    assert style("kron-fisher")["marker"] == style("svd-fisher")["marker"] != style("kron-aa")["marker"]
    colours = [METHOD_STYLE[m]["color"] for m in METHOD_STYLE]
    assert len(set(colours)) == len(colours), "two methods share a colour"
    assert style("lowrank")["color"] == style("svd")["color"]
    assert style("kron", ls=":")["ls"] == ":"
    with pytest.raises(ValueError, match="no style"):
        style("nope")
    assert join_and([]) == "" and join_and(["a"]) == "a"
    assert join_and(["a", "b", "c"]) == "a, b and c"


# ----------------------------------------------------------------------------- built books

_SMOKE_BUILD: dict = {}


def smoke_book(tmp_path_factory) -> tuple[Path, Path]:
    """The book built with the smoke profile, once per test session: ``(out, html)``.

    Other test modules (``test_book_pages.py``) check the same build through this
    function instead of building again.
    """
    if "site" not in _SMOKE_BUILD:
        out = tmp_path_factory.mktemp("book")
        with figures_in(out / "_build" / "figures"):
            _SMOKE_BUILD["site"] = out, build_book("smoke", root=ROOT, out=out)
    return _SMOKE_BUILD["site"]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    return smoke_book(tmp_path_factory)


def alt_sweep(path: Path) -> Path:
    """The recorded sweep cut to its last evaluation corpus and its parameter-budget runs.

    Chapters must not assume the default sweep's corpora or its MACs-capped runs.
    """
    from kronlab.results import load_sweep

    sweep = load_sweep()
    keep = sweep["config"]["eval"][-1]
    drop = [c for c in sweep["config"]["eval"] if c != keep]
    sweep["config"] = {**sweep["config"], "eval": [keep], "macs_matched": False}
    for c in drop:
        sweep["dense"].pop(c, None)
    runs = []
    for run in sweep["runs"]:
        if run.get("macs_ratio") is None:
            run["ppl"] = {c: v for c, v in run["ppl"].items() if c == keep}
            runs.append(run)
    sweep["runs"] = runs
    path.write_text(json.dumps(sweep))
    return path


@pytest.fixture(scope="session")
def alt_book(tmp_path_factory):
    """Every chapter executed with the alt profile and a one-corpus sweep; the site built."""
    out = tmp_path_factory.mktemp("book_alt")
    sweep = alt_sweep(out / "sweep_alt.json")
    with figures_in(out / "_build" / "figures"):
        for stem in notebook_chapters(ROOT):
            params = {"sweep_path": str(sweep)} if stem in (
                "intro", "poster", "llm_compression") else {}
            run_chapter(stem, params, profile="alt", root=ROOT, out=out)
        html = build_html(ROOT, out, strict=True)
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


@pytest.mark.slow
def test_every_toc_page_is_built(built_book):
    _, html = built_book
    for doc in toc_documents(ROOT):
        assert (html / f"{doc}.html").exists(), doc


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_smoke_glue_keys_are_defined(built_book):
    out, _ = built_book
    check_glue(out / "_build" / "site", "smoke")


@pytest.mark.slow
def test_alt_profile_builds_and_defines_every_glue_key(alt_book):
    out, html = alt_book
    check_glue(out / "_build" / "site", "alt")
    for doc in toc_documents(ROOT):
        assert (html / f"{doc}.html").exists(), doc

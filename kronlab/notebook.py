"""What the book's chapters share: glue, figures, recorded results, one style per method.

A chapter (a MyST notebook in ``book/``) holds narrative, one ``parameters`` cell, calls
into kronlab and plots; the glue between them lives here, written once and tested:

- :func:`glue` puts a value into the prose (``{glue:text}`name:.2f```) with numpy
  scalars turned into Python numbers, whose text form a format spec can read;
- :func:`save_figure` writes a figure under its stable name as PNG and PDF
  (``_build/figures`` or ``$KRONLAB_FIGURES``), atomically, mode 0644;
- :func:`result_path`, :func:`load_sweep` and :func:`load_benchmark` find and read the
  recorded results in ``data/results`` (through :mod:`kronlab.results`) with one
  convention for a chapter's path parameter;
- :data:`METHODS` and :data:`METHOD_STYLE` give every method the same colour, marker
  and line in every figure; :func:`figure` makes a figure at a printed width
  (:data:`SINGLE` 3.3 in or :data:`DOUBLE` 6.8 in, 8 pt text, :data:`RC_PARAMS`),
  :func:`panel_letters` labels its panels, :func:`legend_below` puts one legend where
  it hides no data, :func:`heatmap` draws a table with seaborn;
- :func:`format_number` and :func:`readable` format numbers for a reader's table.

Importing this module loads neither torch, matplotlib nor seaborn.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .paths import figures_dir, repo_root, results_dir, write_atomic

__all__ = [
    "ALL_METHODS",
    "DOUBLE",
    "DPI",
    "FISHER_METHODS",
    "METHODS",
    "METHOD_STYLE",
    "RC_PARAMS",
    "SERIES_COLORS",
    "SINGLE",
    "figure",
    "format_number",
    "glue",
    "heatmap",
    "legend_below",
    "palette",
    "panel_letters",
    "readable",
    "use_style",
    "join_and",
    "load_benchmark",
    "load_sweep",
    "parameter_budget_runs",
    "result_path",
    "save_figure",
    "style",
]

#: The four methods every chapter compares, in the order of its tables and legends: the
#: ones that need at most the activation covariance ``C`` (:func:`kronlab.fit_methods`
#: fits each of them on one matrix).
METHODS = ("kron", "kron-aa", "svd", "svd-aa")
#: The loss-aware (K-FAC Fisher) methods, which also need the output-gradient covariance
#: ``G`` (:func:`kronlab.calibration.collect_statistics`).
FISHER_METHODS = ("kron-fisher", "svd-fisher")
#: Every method with a style, in legend order: Kronecker sums, then low rank.
ALL_METHODS = ("kron", "kron-aa", "kron-fisher", "svd", "svd-aa", "svd-fisher")

#: Figure widths in inches: one column and two columns of a two-column paper page.
SINGLE = 3.3
DOUBLE = 6.8
#: Resolution of the PNG files (the PDFs are vector).
DPI = 300

#: One matplotlib style per method (and per layer class, ``KronLinear`` drawn as ``kron``,
#: ``LowRankLinear`` as ``svd``), and for the dense model's reference line. The hue family
#: tells the family: blues for Kronecker sums (``kron-*``), oranges and browns for low rank
#: (``svd-*``); each method has its own colour. The marker tells the objective (circle or
#: square: weight or activation aware, diamond: loss aware, Fisher), a solid line a
#: data-aware fit and a dashed one a plain fit. The dense model is a black dash-dot line
#: without markers, drawn above the others. A variant of a method, written
#: ``"<method> (<what differs>)"`` or ``"<method>, <what differs>"`` (``"kron-fisher
#: (MACs<=1)"``), keeps the method's colour and marker, hollow, on a dotted line.
METHOD_STYLE = {
    "kron": {"color": "#6baed6", "marker": "o", "ls": "--"},
    "kron-aa": {"color": "#2171b5", "marker": "o", "ls": "-"},
    "kron-fisher": {"color": "#08306b", "marker": "D", "ls": "-"},
    "svd": {"color": "#fdae6b", "marker": "s", "ls": "--"},
    "svd-aa": {"color": "#e6550d", "marker": "s", "ls": "-"},
    "svd-fisher": {"color": "#7f2704", "marker": "D", "ls": "-"},
    "kron-aa-perm": {"color": "#6a51a3", "marker": "^", "ls": "-"},
    "dense": {"color": "#000000", "marker": "", "ls": "-.", "lw": 1.3, "zorder": 5},
}
_LAYER_METHOD = {"KronLinear": "kron", "kron": "kron", "LowRankLinear": "svd", "lowrank": "svd"}
_VARIANT = {"mfc": "white", "ls": ":"}

#: Colours for series that are not methods (layer types, inputs, solvers, ranks): greens,
#: purples, pinks, browns and greys, so that no series is mistaken for a method's blue or
#: orange. :func:`palette` hands them out in this order.
SERIES_COLORS = ("#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#666666",
                 "#17becf", "#bcbd22")

#: matplotlib settings of every figure: 8 pt text (9 pt titles) at the printed size, thin
#: lines, no top and right spines, a light grid, legends without frames.
RC_PARAMS = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "pdf.fonttype": 42,
    "figure.constrained_layout.use": True,
}

_FIGURE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_GLUE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _method_key(method: str) -> tuple[str, bool]:
    """The :data:`METHOD_STYLE` key of ``method`` and whether it names a variant."""
    key = _LAYER_METHOD.get(method, method)
    if key in METHOD_STYLE:
        return key, False
    for base in sorted(METHOD_STYLE, key=len, reverse=True):
        if key.startswith(base) and key[len(base)] in " ,(":
            return base, True
    raise ValueError(f"no style for {method!r}; methods with a style: {sorted(METHOD_STYLE)}, "
                     "or a variant '<method> (<what differs>)'")


def style(method: str, **overrides) -> dict:
    """``plot`` keyword arguments for ``method`` (a name of :data:`METHOD_STYLE`, a layer
    class: ``"lowrank"``/``"LowRankLinear"`` draw as ``svd``, or a variant such as
    ``"kron-fisher (MACs<=1)"``), with ``label=method``.

    >>> style("kron-aa", lw=2)
    {'color': '#2171b5', 'marker': 'o', 'ls': '-', 'label': 'kron-aa', 'lw': 2}
    >>> style("kron-aa (MACs<=1)")["mfc"], style("kron-aa (MACs<=1)")["color"]
    ('white', '#2171b5')
    """
    key, variant = _method_key(method)
    return {**METHOD_STYLE[key], **(_VARIANT if variant else {}), "label": method, **overrides}


def palette(names) -> dict:
    """A colour from :data:`SERIES_COLORS` for each of ``names`` (series that are not
    methods), in order; an int ``n`` stands for ``range(n)``.

    >>> palette(["q", "k"])
    {'q': '#1b9e77', 'k': '#7570b3'}
    """
    names = list(range(names)) if isinstance(names, int) else list(names)
    if len(names) > len(SERIES_COLORS):
        raise ValueError(f"{len(names)} series, but only {len(SERIES_COLORS)} series colours")
    return dict(zip(names, SERIES_COLORS[:len(names)], strict=True))


def use_style() -> None:
    """Set :data:`RC_PARAMS` for every later figure (called by :func:`figure`)."""
    import matplotlib as mpl

    mpl.rcParams.update(RC_PARAMS)


def figure(width: str | float = "single", height: float | None = None, nrows: int = 1,
           ncols: int = 1, **kwargs):
    """``plt.subplots`` at a printed width: ``"single"`` (:data:`SINGLE`, 3.3 in),
    ``"double"`` (:data:`DOUBLE`, 6.8 in) or a number of inches, in the book's style.

    ``height`` defaults to 0.75 of the width for one panel per row (2.5 in at single
    width), less per row for wider grids. The figure uses constrained layout, so do not
    call ``tight_layout``. Returns ``(fig, axes)`` as ``plt.subplots`` does.
    """
    import matplotlib.pyplot as plt

    widths = {"single": SINGLE, "double": DOUBLE}
    if isinstance(width, str):
        if width not in widths:
            raise ValueError(f"width {width!r} is not valid: use 'single', 'double' or inches")
        width = widths[width]
    if height is None:
        height = nrows * min(0.75 * width / ncols, 2.5)
    use_style()
    return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kwargs)


def panel_letters(axes, start: str = "a", x: float = -0.02, y: float = 1.02) -> list:
    """Write ``(a)``, ``(b)``, ... above the top-left corner of each of ``axes`` (row
    order; hidden axes are skipped). Returns the text artists."""
    import numpy as np

    axes = [ax for ax in np.ravel(axes) if ax.get_visible() and ax.axison]
    return [ax.text(x, y, f"({chr(ord(start) + i)})", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=9, fontweight="bold")
            for i, ax in enumerate(axes)]


def legend_below(fig, axes=None, ncol: int | None = None, **kwargs):
    """One legend for the whole figure, below the panels, where it covers no data.

    Entries are collected from ``axes`` (default: all of the figure's axes), once per
    label, in the order first seen.
    """
    import numpy as np

    axes = fig.axes if axes is None else list(np.ravel(axes))
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    ncol = ncol if ncol is not None else min(len(seen), 4) or 1
    return fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol,
                      **kwargs)


def heatmap(frame, ax, *, fmt: str = ".2f", cmap: str = "rocket_r", label: str = "",
            annot: bool = True, **kwargs):
    """A seaborn heatmap of a table (rows by columns, e.g. layer type by method), annotated
    with its values in ``fmt``; ``label`` names the colour bar."""
    import seaborn as sns

    ax.grid(False)
    return sns.heatmap(frame, ax=ax, annot=annot, fmt=fmt, cmap=cmap,
                       linewidths=0.5 if annot else 0, annot_kws={"fontsize": 8},
                       cbar_kws={"label": label}, **kwargs)


def format_number(value, digits: int = 3) -> str:
    """A number as a reader wants it in a table: no exponent above 1e-3, thousands
    separated, ``digits`` significant digits (at least three decimals below 1), integers
    as integers, and a dash for a missing value.

    >>> [format_number(v) for v in (128401.0, 142.824, 0.84, 14.0, 2.2e-16, float("nan"))]
    ['128,401', '142.8', '0.840', '14', '2.2e-16', '–']
    """
    import math
    import numbers

    value = _plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral) or (float(value).is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    a = abs(value)
    if a >= 10 ** (digits + 1):
        return f"{value:,.0f}"
    if a >= 1:
        return f"{value:,.{max(digits - int(math.floor(math.log10(a))), 0)}f}"
    if a >= 1e-3:
        return f"{value:.3f}"
    return f"{value:.1e}"


def readable(frame, digits: int = 3):
    """A copy of a data frame with every number as text by :func:`format_number`, index
    line breaks in text shown as ``¶``, and float index labels in their shortest form
    (``0.8``): the form of a book table.

    A column whose values are all whole numbers is shown as integers.
    """
    import pandas as pd

    def key(v):  # index labels: ratios as 0.8, not 0.800
        v = _plain(v)
        return f"{v:g}" if isinstance(v, float) else cell(v)

    def cell(v):
        if isinstance(v, str):
            return re.sub(r"\s*\n+\s*", " ¶ ", v.strip())
        return format_number(v, digits)

    out = frame.copy()
    for col in out.columns:
        out[col] = out[col].map(cell).astype(object)
    if isinstance(out.index, pd.MultiIndex):
        out.index = pd.MultiIndex.from_tuples([tuple(key(v) for v in t) for t in out.index],
                                              names=out.index.names)
    else:
        out.index = pd.Index([key(v) for v in out.index], name=out.index.name)
    return out


def _plain(value):
    """numpy scalars and 0-d numpy arrays or torch tensors as Python numbers; else unchanged."""
    package = type(value).__module__.split(".")[0]
    if package in ("numpy", "torch") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def glue(name: str, value, display: bool = False) -> None:
    """:func:`myst_nb.glue` that the prose can format: ``{glue:text}`name:.3f```.

    numpy scalars (``np.float64(0.5)``, whose text form a format spec cannot read) become
    Python numbers; other values pass unchanged. ``display=False`` (the default here, not
    myst_nb's) keeps the value out of the cell's visible output. ``name`` must be an
    identifier-like key so that it can be written literally in the prose.
    """
    if not _GLUE_NAME.match(name):
        raise ValueError(f"glue name {name!r} is not valid: use letters, digits and '_', "
                         "starting with a letter or '_'")
    from myst_nb import glue as _glue

    _glue(name, _plain(value), display=display)


def join_and(items: Iterable) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``: a list for a sentence.

    >>> join_and(["1.0 on sotu", "2.0 on austen"]), join_and(["x"]), join_and([])
    ('1.0 on sotu and 2.0 on austen', 'x', '')
    """
    items = [str(v) for v in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def save_figure(fig, name: str, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Save ``fig`` as ``<folder>/<name>.png`` (:data:`DPI`, 300 dpi) and vector ``.pdf``,
    both at the figure's own size (its width is what a printed page shows: :func:`figure`
    makes it :data:`SINGLE` or :data:`DOUBLE`); return both paths.

    ``name`` is the figure's stable name (lower-case letters, digits, ``-`` and ``_``),
    the one reports cite; ``folder`` defaults to :func:`kronlab.paths.figures_dir`. A
    figure without a layout engine gets constrained layout, so that nothing is cut off.
    Each file is rendered in memory and written with :func:`kronlab.paths.write_atomic` (a
    temporary file renamed over the old one, mode 0644), so an interrupted save leaves
    the previous figure intact.
    """
    if not _FIGURE_NAME.match(name):
        raise ValueError(
            f"figure name {name!r} is not valid: use lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    out = Path(folder) if folder is not None else figures_dir()
    paths = {"png": out / f"{name}.png", "pdf": out / f"{name}.pdf"}
    for fmt, path in paths.items():
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI)
        write_atomic(path, buf.getvalue())
    return paths


def result_path(path: str | os.PathLike | None, default_name: str) -> Path:
    """Where a chapter's result-file parameter points.

    Empty or None: ``data/results/<default_name>`` (:func:`kronlab.paths.results_dir`); a
    relative path: relative to the checkout root (not to the folder the notebook runs
    in); an absolute path: itself.

    >>> result_path("", "llm_sweep.json") == result_path("data/results/llm_sweep.json", "x")
    True
    """
    if path is None or str(path) == "":
        return results_dir() / default_name
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path


def load_sweep(path: str | os.PathLike | None = ""):
    """The recorded LLM sweep named by a chapter's ``sweep_path`` parameter.

    Returns ``(path, sweep, frame)``: the file (:func:`result_path`, default
    ``data/results/llm_sweep.json``), its contents (:func:`kronlab.results.load_sweep`,
    which names the command that writes a missing file) and one row per compressed run
    (:func:`kronlab.results.sweep_frame`).
    """
    from . import results

    path = result_path(path, "llm_sweep.json")
    sweep = results.load_sweep(path)
    return path, sweep, results.sweep_frame(sweep)


def load_benchmark(name: str, path: str | os.PathLike | None = "") -> dict:
    """The recorded benchmark ``name`` (``"bench_layers"``, ``"bench_compress"``, ...) from
    the file a chapter's parameter names (:func:`result_path`, default
    ``data/results/<name>.json``), read by :func:`kronlab.results.load_benchmark`."""
    from . import results

    return results.load_benchmark(name, result_path(path, f"{name}.json"))


def parameter_budget_runs(frame, path=None):
    """The runs of a sweep frame made at a parameter budget only (``macs_ratio`` null).

    Raises if there are none: the sweep has not finished (``path`` names the file).
    """
    runs = frame[frame.macs_ratio.isna()] if len(frame) else frame
    if runs.empty:
        where = f"{path} holds" if path is not None else "the sweep holds"
        raise RuntimeError(f"{where} no compressed runs at a parameter budget yet: let "
                           "`python scripts/run_llm_experiments.py` finish (it resumes with "
                           "--resume)")
    return runs

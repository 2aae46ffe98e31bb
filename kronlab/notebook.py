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
  and line in every figure.

Importing this module loads neither torch nor matplotlib.
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
    "FISHER_METHODS",
    "METHODS",
    "METHOD_STYLE",
    "glue",
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

#: One matplotlib style per method (and per layer class, ``KronLinear`` drawn as ``kron``,
#: ``LowRankLinear`` as ``svd``). The hue family tells the family: blues and purples for
#: Kronecker sums (``kron-*``), reds and oranges for low rank (``svd-*``); each method has
#: its own colour. The marker tells the objective (circle/square: weight or activation
#: aware, diamond: loss aware, Fisher), a solid line a data-aware fit and a dashed one a
#: plain fit. The first five keep their markers and lines of earlier versions.
METHOD_STYLE = {
    "kron": {"color": "#6baed6", "marker": "o", "ls": "--"},
    "kron-aa": {"color": "#2171b5", "marker": "o", "ls": "-"},
    "kron-fisher": {"color": "#08306b", "marker": "D", "ls": "-"},
    "svd": {"color": "#fd8d3c", "marker": "s", "ls": "--"},
    "svd-aa": {"color": "#d94801", "marker": "s", "ls": "-"},
    "svd-fisher": {"color": "#7f2704", "marker": "D", "ls": "-"},
    "kron-aa-perm": {"color": "#6a51a3", "marker": "^", "ls": "-"},
}
_LAYER_METHOD = {"KronLinear": "kron", "kron": "kron", "LowRankLinear": "svd", "lowrank": "svd"}

_FIGURE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_GLUE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def style(method: str, **overrides) -> dict:
    """``plot`` keyword arguments for ``method`` (a name of :data:`METHOD_STYLE`, or a layer
    class: ``"lowrank"``/``"LowRankLinear"`` draw as ``svd``), with ``label=method``.

    >>> style("kron-aa", lw=2)
    {'color': '#2171b5', 'marker': 'o', 'ls': '-', 'label': 'kron-aa', 'lw': 2}
    """
    key = _LAYER_METHOD.get(method, method)
    if key not in METHOD_STYLE:
        raise ValueError(f"no style for {method!r}; methods with a style: {sorted(METHOD_STYLE)}")
    return {**METHOD_STYLE[key], "label": method, **overrides}


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
    """Save ``fig`` as ``<folder>/<name>.png`` (150 dpi) and ``.pdf``; return both paths.

    ``name`` is the figure's stable name (lower-case letters, digits, ``-`` and ``_``),
    the one reports cite; ``folder`` defaults to :func:`kronlab.paths.figures_dir`. Each
    file is rendered in memory and written with :func:`kronlab.paths.write_atomic` (a
    temporary file renamed over the old one, mode 0644), so an interrupted save leaves
    the previous figure intact.
    """
    if not _FIGURE_NAME.match(name):
        raise ValueError(
            f"figure name {name!r} is not valid: use lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    out = Path(folder) if folder is not None else figures_dir()
    paths = {"png": out / f"{name}.png", "pdf": out / f"{name}.pdf"}
    for fmt, path in paths.items():
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", **({"dpi": 150} if fmt == "png" else {}))
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

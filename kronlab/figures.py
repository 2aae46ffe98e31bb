"""Saving figures under stable names, as PNG and PDF, for the book and for citing."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .paths import figures_dir

__all__ = ["save_figure"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _atomic_savefig(fig, path: Path, **kwargs) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, name: str, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Save ``fig`` as ``<folder>/<name>.png`` and ``.pdf`` and return both paths.

    ``name`` is the figure's stable name (lower case, digits, ``-`` and ``_``);
    the folder defaults to :func:`kronlab.paths.figures_dir`. Each file is
    written under a temporary name and renamed, so an interrupted save leaves
    the previous figure intact.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"figure name {name!r} is not valid: use lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    out = Path(folder) if folder is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / f"{name}.png", "pdf": out / f"{name}.pdf"}
    _atomic_savefig(fig, paths["png"], dpi=150, bbox_inches="tight")
    _atomic_savefig(fig, paths["pdf"], bbox_inches="tight")
    return paths

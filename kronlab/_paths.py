"""Where the project's folders are, for code run from a checkout or a notebook."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "figures_dir", "repo_root", "results_dir"]


def repo_root() -> Path:
    """The checkout root: ``$KRONLAB_ROOT`` if set, else the parent of the package."""
    env = os.environ.get("KRONLAB_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return repo_root() / "data"


def results_dir() -> Path:
    """``data/results``: recorded outputs of the expensive runs that the book reads."""
    return data_dir() / "results"


def figures_dir() -> Path:
    """Where figures are saved as PNG and PDF: ``$KRONLAB_FIGURES`` or ``_build/figures``."""
    env = os.environ.get("KRONLAB_FIGURES")
    path = Path(env) if env else repo_root() / "_build" / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path

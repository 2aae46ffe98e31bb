"""Where the project's folders are, for code run from a checkout or a notebook."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["data_dir", "figures_dir", "repo_root", "results_dir", "write_atomic"]


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


def write_atomic(path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` all at once or not at all.

    The data goes to a temporary file beside ``path`` (mode 0644), which is renamed over
    it; on any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

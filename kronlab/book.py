"""Execute the book's MyST notebooks with papermill and build the static site.

Pipeline (``kronlab book build``):

1. Every chapter listed in ``_toc.yml`` that is a MyST notebook (a ``.md``
   file with a jupytext header) is converted to ``.ipynb`` with jupytext and
   executed by papermill with the parameters of a profile
   (``book/params/<profile>.yaml``, one mapping per chapter stem), in the
   staging folder ``_build/site/book`` so relative paths are the same as in
   the build. Pages that are not notebooks are copied as they are.
2. ``jupyter-book build`` renders the staged, executed notebooks (no
   execution at build time) to ``_build/html`` with warnings as errors.

``kronlab book run CHAPTER -p NAME VALUE`` reruns one chapter with overrides,
as a papermill user expects; add ``--html`` to rebuild the site afterwards.
Figures land in ``_build/figures`` (PNG and PDF), or ``$KRONLAB_FIGURES``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .paths import repo_root

__all__ = ["build_book", "load_profile", "notebook_chapters", "run_chapter", "toc_documents"]

TOP_FILES = ("_config.yml", "_toc.yml")


def _root(root=None) -> Path:
    return Path(root).resolve() if root is not None else repo_root()


def toc_documents(root=None) -> list[str]:
    """Document paths (without suffix, relative to the root) listed in ``_toc.yml``."""
    toc = yaml.safe_load((_root(root) / "_toc.yml").read_text())
    docs = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                docs.append(entry["file"])
            for key in ("sections", "chapters"):
                walk(entry.get(key))
            for part in entry.get("parts", []) or []:
                walk(part.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []) or []:
        walk(part.get("chapters"))
    return docs


def _is_notebook(path: Path) -> bool:
    head = path.read_text().split("\n---", 2)[0] if path.suffix == ".md" else ""
    return path.suffix == ".md" and "kernelspec" in head


def _source(doc: str, root: Path) -> Path:
    for suffix in (".md", ".ipynb", ".rst"):
        path = root / f"{doc}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"_toc.yml lists {doc!r} but no {doc}.md/.ipynb/.rst exists")


def notebook_chapters(root=None) -> dict[str, str]:
    """Map chapter stem (e.g. ``theory``) to document path for every notebook in the toc."""
    root = _root(root)
    out = {}
    for doc in toc_documents(root):
        if _is_notebook(_source(doc, root)):
            out[Path(doc).name] = doc
    return out


def load_profile(profile: str, root=None) -> dict[str, dict]:
    """Parameters per chapter stem from ``book/params/<profile>.yaml``."""
    root = _root(root)
    path = root / "book" / "params" / f"{profile}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (root / "book" / "params").glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(valid)}")
    data = yaml.safe_load(path.read_text()) or {}
    chapters = notebook_chapters(root)
    unknown = set(data) - set(chapters)
    if unknown:
        raise ValueError(
            f"profile {profile!r} names unknown chapters {sorted(unknown)}; "
            f"chapters are {sorted(chapters)}"
        )
    return {stem: dict(data.get(stem) or {}) for stem in chapters}


def _site_dir(out: Path) -> Path:
    return out / "_build" / "site"


def stage_static(root=None, out=None) -> Path:
    """Copy the non-notebook inputs of the book into the staging folder."""
    root = _root(root)
    out = Path(out).resolve() if out is not None else root
    site = _site_dir(out)
    site.mkdir(parents=True, exist_ok=True)
    for name in TOP_FILES:
        shutil.copy2(root / name, site / name)
    book_src = root / "book"
    for path in book_src.rglob("*"):
        rel = path.relative_to(root)
        if path.is_dir() or any(part.startswith((".", "_")) for part in rel.parts[1:]):
            continue
        if path.suffix == ".md" and _is_notebook(path):
            continue
        dest = site / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return site


def run_chapter(chapter: str, params: dict | None = None, *, profile: str = "default",
                root=None, out=None, log_output: bool = False) -> Path:
    """Execute one chapter with papermill; return the executed notebook's path.

    Parameters are the profile's for that chapter, updated by ``params``. The
    executed notebook is written to ``<out>/_build/site/<doc>.ipynb`` via a
    temporary file, so a failed run leaves no half-written notebook behind
    (papermill's partial output is kept next to it as ``*.failed.ipynb``).
    """
    import jupytext
    import papermill as pm

    root = _root(root)
    out = Path(out).resolve() if out is not None else root
    chapters = notebook_chapters(root)
    if chapter not in chapters:
        raise ValueError(f"unknown chapter {chapter!r}; chapters are {sorted(chapters)}")
    merged = load_profile(profile, root)[chapter]
    merged.update(params or {})
    doc = chapters[chapter]
    site = stage_static(root, out)
    dest = site / f"{doc}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(root / f"{doc}.md")
    src_ipynb = out / "_build" / "notebooks" / f"{doc}.ipynb"
    src_ipynb.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(nb, src_ipynb)
    tmp = dest.with_name(f".{dest.stem}.running.ipynb")
    failed = dest.with_name(f"{dest.stem}.failed.ipynb")
    env_backup = {k: os.environ.get(k)
                  for k in ("KRONLAB_ROOT", "KRONLAB_FIGURES", "OMP_WAIT_POLICY")}
    os.environ["KRONLAB_ROOT"] = str(root)
    # On a shared CPU, spinning OpenMP threads slow small matmuls by 10-100x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KRONLAB_FIGURES", str(out / "_build" / "figures"))
    try:
        pm.execute_notebook(str(src_ipynb), str(tmp), parameters=merged, kernel_name="python3",
                            cwd=str(dest.parent), log_output=log_output, progress_bar=False)
        _collapse_injected_parameters(tmp)
        os.replace(tmp, dest)
        failed.unlink(missing_ok=True)
    except BaseException:
        if tmp.exists():
            os.replace(tmp, failed)
        raise
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return dest


def _collapse_injected_parameters(path: Path) -> None:
    """Fold papermill's injected-parameters cell behind a "show" toggle in the site.

    The chapter's own ``parameters`` cell (defaults, with comments) stays in view;
    the values actually used are one click away.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")
            changed = True
    if changed:
        nbformat.write(nb, path)


def build_html(root=None, out=None, *, strict: bool = True) -> Path:
    """Render the staged site with jupyter-book; return ``<out>/_build/html``."""
    root = _root(root)
    out = Path(out).resolve() if out is not None else root
    site = stage_static(root, out)
    missing = [doc for doc in notebook_chapters(root).values()
               if not (site / f"{doc}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"chapters not executed yet: {missing}; run `kronlab book build`")
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(site),
           "--path-output", str(out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}): {' '.join(cmd)}")
    return out / "_build" / "html"


def build_book(profile: str = "default", root=None, out=None, *, chapters=None,
               strict: bool = True) -> Path:
    """Execute every chapter (or those named) with a profile, then build the site."""
    root = _root(root)
    names = list(chapters) if chapters else list(notebook_chapters(root))
    load_profile(profile, root)  # validate before spending time
    for name in names:
        t0 = time.perf_counter()
        print(f"[kronlab book] executing {name} (profile {profile}) ...", flush=True)
        run_chapter(name, profile=profile, root=root, out=out)
        print(f"[kronlab book] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return build_html(root, out, strict=strict)

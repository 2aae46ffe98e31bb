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

The build prints one line per chapter (name, seconds, ok or failed). Kernels run
with ``TQDM_DISABLE=1``, so no progress bar reaches a page, and the kernels'
transport chatter on stderr (ZMQ/TCP warnings, a ``KeyboardInterrupt`` at shutdown)
is filtered out; a failing cell's error is reported in full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .paths import repo_root, write_atomic

__all__ = [
    "BookBuildError",
    "build_book",
    "build_html",
    "load_profile",
    "notebook_chapters",
    "run_chapter",
    "run_chapter_timed",
    "stage_pdfs",
    "toc_documents",
]

TOP_FILES = ("_config.yml", "_toc.yml")


class BookBuildError(RuntimeError):
    """A chapter failed to execute, or jupyter-book failed to build the site."""


# Lines a Jupyter kernel writes to the stderr it inherits that say nothing about the book.
_NOISE = re.compile(
    r"^\[IPKernelApp\] (WARNING|ERROR) \| .*(TCP without encryption|CurveZMQ|zmq|ZMQ"
    r"|[Tt]ransport|Parent appears to have exited)"
    r"|^KeyboardInterrupt\s*$")
# Loggers whose warnings about the kernel's sockets and shutdown are not cell errors.
_QUIET_LOGGERS = ("traitlets", "jupyter_client", "nbclient", "asyncio")


def is_kernel_noise(block: str) -> bool:
    """Whether a stderr line, or a whole traceback, is kernel chatter to drop.

    A traceback is dropped only when it ends in a bare ``KeyboardInterrupt`` (a kernel
    interrupted while shutting down); every other traceback is kept.

    >>> is_kernel_noise("[IPKernelApp] WARNING | Kernel is running over TCP without encryption.")
    True
    >>> is_kernel_noise("Traceback (most recent call last):\\n  File 'x'\\nValueError: bad")
    False
    """
    lines = [ln for ln in block.splitlines() if ln.strip()]
    if not lines:
        return False
    if lines[0].startswith("Traceback (most recent call last)"):
        return lines[-1].strip() == "KeyboardInterrupt"
    return all(_NOISE.search(ln) for ln in lines)


def _blocks(lines):
    """Group stderr lines into single lines and whole tracebacks (header to exception line)."""
    block: list[str] = []
    for line in lines:
        if block:
            block.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):
                yield "".join(block)
                block = []
        elif line.startswith("Traceback (most recent call last)"):
            block = [line]
        else:
            yield line
    if block:
        yield "".join(block)


@contextlib.contextmanager
def _quiet_kernels():
    """Filter kernel noise from file descriptor 2 (which kernels inherit) while running.

    Everything else written to stderr, by this process or a kernel, passes through at once.
    """
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        saved = None
    if saved is not None:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)

        def pump():
            with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as src:
                for block in _blocks(iter(src.readline, "")):
                    if not is_kernel_noise(block):
                        try:
                            os.write(saved, block.encode("utf-8"))
                        except OSError:
                            pass

        thread = threading.Thread(target=pump, name="kronlab-stderr-filter", daemon=True)
        thread.start()
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 2)  # closes the pipe's last write end this process holds
            thread.join(timeout=10)
            os.close(saved)


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
                  for k in ("KRONLAB_ROOT", "KRONLAB_FIGURES", "OMP_WAIT_POLICY", "TQDM_DISABLE",
                            "PYTHONWARNINGS")}
    os.environ["KRONLAB_ROOT"] = str(root)
    # On a shared CPU, spinning OpenMP threads slow small matmuls by 10-100x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KRONLAB_FIGURES", str(out / "_build" / "figures"))
    # No progress bar in a page; tqdm.auto would also warn that ipywidgets is missing.
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found") if w)
    # log_output: stream the cells' stdout and stderr here as they run
    stream = {"stdout_file": sys.stdout, "stderr_file": sys.stderr} if log_output else {}
    try:
        with _quiet_kernels():
            pm.execute_notebook(str(src_ipynb), str(tmp), parameters=merged,
                                kernel_name="python3", cwd=str(dest.parent),
                                progress_bar=False, **stream)
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
        raise BookBuildError(f"jupyter-book build failed (exit {proc.returncode}): "
                             f"{' '.join(cmd)}")
    stage_pdfs(root, out)
    return out / "_build" / "html"


#: PDFs printed by ``make pdf`` and ``make poster`` -> their name in the built site
SITE_PDFS = {("pdf", "kronlab.pdf"): "kronlab.pdf", ("poster", "poster.pdf"): "poster.pdf"}
_PRINT_BUTTON = re.compile(r'<button onclick="window\.print\(\)"(.*?)</button>', re.S)
_SOURCE_ITEM = re.compile(r'(<li><a href="(\.\./)*_sources/(?P<doc>[^"]+)\.ipynb".*?</li>)', re.S)


def stage_pdfs(root=None, out=None) -> list[Path]:
    """Put the printed PDFs and the chapters' MyST sources into the built site.

    ``_build/pdf/kronlab.pdf`` and ``_build/poster/poster.pdf`` (when printed) are copied
    to ``_build/html/``; each notebook chapter's ``.md`` goes to ``_build/html/_sources``
    and its page's download menu gets a ``.md`` entry next to ``.ipynb``; once the book PDF
    exists, the menu's ``.pdf`` entry (the browser's print dialog) links it instead.
    Returns the files copied. Does nothing before the site is built.
    """
    root = _root(root)
    out = Path(out).resolve() if out is not None else root
    html = out / "_build" / "html"
    if not (html / "index.html").exists():
        return []
    copied = []
    for (folder, name), dest in SITE_PDFS.items():
        src = out / "_build" / folder / name
        if src.exists():
            shutil.copyfile(src, html / dest)
            copied.append(html / dest)
    book_pdf = (html / "kronlab.pdf").exists()
    for doc in notebook_chapters(root).values():
        page, md = html / f"{doc}.html", root / f"{doc}.md"
        if not page.exists():
            continue
        shutil.copyfile(md, html / "_sources" / f"{doc}.md")
        text = page.read_text(encoding="utf-8")
        up = "../" * (len(Path(doc).parts) - 1)
        if "btn-download-md-button" not in text:
            text = _SOURCE_ITEM.sub(
                lambda m, up=up: m.group(1) + f'\n<li><a href="{up}_sources/{m.group("doc")}.md" '
                'target="_blank" class="btn btn-sm btn-download-md-button dropdown-item" '
                'title="Download the MyST source (.md)"><span class="btn__icon-container">'
                '<i class="fas fa-file"></i></span><span class="btn__text-container">.md'
                '</span></a></li>', text, count=1)
        if book_pdf:
            text = _PRINT_BUTTON.sub(
                lambda m, up=up: f'<a href="{up}kronlab.pdf" target="_blank"{m.group(1)}</a>', text)
        write_atomic(page, text)
    return copied


def run_chapter_timed(chapter: str, params: dict | None = None, *, profile: str = "default",
                      root=None, out=None, log_output: bool = False, width: int = 20) -> Path:
    """:func:`run_chapter`, then one line: the chapter, its seconds, ``ok`` or ``failed``.

    A failure raises :class:`BookBuildError` with the cell's error and the path of the
    partial notebook (``*.failed.ipynb``).
    """
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    try:
        path = run_chapter(chapter, params, profile=profile, root=root, out=out,
                           log_output=log_output)
    except PapermillExecutionError as exc:
        print(f"{chapter:<{width}s} {time.perf_counter() - t0:7.1f} s  failed", flush=True)
        raise BookBuildError(_failure(chapter, exc, root, out)) from None
    print(f"{chapter:<{width}s} {time.perf_counter() - t0:7.1f} s  ok", flush=True)
    return path


def _failure(chapter: str, exc: Exception, root, out) -> str:
    root = _root(root)
    out = Path(out).resolve() if out is not None else root
    doc = notebook_chapters(root)[chapter]
    partial = _site_dir(out) / f"{doc}.failed.ipynb"
    return f"chapter {chapter} failed (partial notebook: {partial}):\n{exc}"


def build_book(profile: str = "default", root=None, out=None, *, chapters=None,
               strict: bool = True) -> Path:
    """Execute every chapter (or those named) with a profile, then build the site.

    Prints one line per chapter (name, seconds, ok or failed). Every chapter runs even
    if an earlier one failed; then a :class:`BookBuildError` names each failure with its
    cell error, and no site is built. Returns ``<out>/_build/html``.
    """
    root = _root(root)
    names = list(chapters) if chapters else list(notebook_chapters(root))
    load_profile(profile, root)  # validate before spending time
    known = notebook_chapters(root)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown chapters {unknown}; chapters are {sorted(known)}")
    width = max(len(n) for n in names)
    print(f"executing {len(names)} chapter(s) with profile {profile}:", flush=True)
    failures = []
    t0 = time.perf_counter()
    for name in names:
        try:
            run_chapter_timed(name, profile=profile, root=root, out=out, width=width)
        except BookBuildError as exc:
            failures.append(str(exc))
    print(f"{'all':<{width}s} {time.perf_counter() - t0:7.1f} s  "
          f"{len(names) - len(failures)} ok, {len(failures)} failed", flush=True)
    if failures:
        raise BookBuildError("\n\n".join(failures))
    return build_html(root, out, strict=strict)

"""The kronlab command line.

    kronlab compress --method kron-aa --ratio 0.6 --out runs/m   compress a causal LM, save it
    kronlab evaluate --model runs/m                              perplexity of a model or a save
    kronlab heal --model runs/m --out runs/h                     distil a save from its teacher
    kronlab book build [--profile default]        execute every chapter, build _build/html
    kronlab book run CHAPTER [-p NAME VALUE]...   rerun one chapter with overrides
    kronlab book html                             rebuild the site from executed chapters

Every argument is checked before a model is loaded; every default is shown by
``kronlab COMMAND --help`` and comes from :mod:`kronlab.defaults`. The base install
(numpy and torch) runs ``--help``; the LLM commands need ``pip install 'kronlab[llm]'``
and the book ``pip install 'kronlab[book]'``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

__all__ = ["UsageError", "build_parser", "main"]

DESCRIPTION = ("kronlab: compress the linear layers of language models with sums of "
               "Kronecker products, evaluate them, and build the book.")


class UsageError(ValueError):
    """A command-line argument is invalid; ``main`` prints it with the command's name."""

    def __init__(self, message: str, prog: str = "kronlab"):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors return from :func:`main` (exit status 2) instead of
    exiting the interpreter, so every error reaches the user the same way."""

    def error(self, message):
        raise UsageError(message, self.prog)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: ...)`` after every option's help, except flags and options whose help
    already says what happens without them."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default:" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def missing_extra(modules, extra: str) -> str | None:
    """The install hint if any of ``modules`` cannot be imported, else None (nothing imported)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"this command needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: pip install 'kronlab[{extra}]'")


def parse_value(text: str):
    """A ``-p`` value as papermill reads it: YAML (``8`` -> int, ``[1, 2]`` -> list,
    ``null`` -> None, ``true`` -> True).

    Without PyYAML the same scalars are recognised, then JSON and Python literals are
    tried; anything else is a string.
    """
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    lowered = text.strip().lower()
    if lowered in ("null", "~", ""):
        return None
    if lowered in ("true", "yes", "on", "false", "no", "off"):
        return lowered in ("true", "yes", "on")
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


# ----------------------------------------------------------------------------- book

def _book_extra() -> None:
    hint = missing_extra(("yaml", "papermill", "jupytext", "nbformat"), "book")
    if hint:
        raise UsageError(hint, "kronlab book")


def _cmd_book_build(args) -> int:
    _book_extra()
    from .book import build_book

    html = build_book(args.profile, out=args.out, chapters=args.chapters or None)
    print(f"site: {html / 'index.html'}")
    return 0


def _cmd_book_run(args) -> int:
    _book_extra()
    from .book import build_html, run_chapter_timed

    params = {name: parse_value(value) for name, value in args.param or []}
    path = run_chapter_timed(args.chapter, params, profile=args.profile, out=args.out,
                             log_output=True)
    print(f"executed notebook: {path}")
    if args.html:
        print(f"site: {build_html(out=args.out) / 'index.html'}")
    return 0


def _cmd_book_html(args) -> int:
    _book_extra()
    from .book import build_html

    print(f"site: {build_html(out=args.out) / 'index.html'}")
    return 0


def _add_book(sub) -> None:
    book = sub.add_parser("book", help="execute the book's notebooks and build the site",
                          description="Execute the book's MyST notebooks with papermill and "
                                      "build the static site with jupyter-book.",
                          formatter_class=HelpFormatter)
    bsub = book.add_subparsers(dest="book_command", required=True, metavar="{build,run,html}")

    b = bsub.add_parser("build", help="execute every chapter with a profile, then build",
                        formatter_class=HelpFormatter)
    b.add_argument("--profile", default="default",
                   help="parameter profile: book/params/PROFILE.yaml")
    b.add_argument("--chapter", dest="chapters", action="append",
                   help="execute only this chapter (repeatable); the others must have been "
                        "executed before (default: every chapter)")
    b.add_argument("--out", default=None,
                   help="output root; the site goes to OUT/_build/html (default: the checkout)")
    b.set_defaults(func=_cmd_book_build)

    r = bsub.add_parser("run", help="rerun one chapter with parameter overrides",
                        formatter_class=HelpFormatter)
    r.add_argument("chapter", help="chapter stem, e.g. intro")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter of the chapter's parameters cell (repeatable; "
                        "the value is read as YAML: 8, 0.1, [1, 2], null, true)")
    r.add_argument("--profile", default="default",
                   help="parameter profile: book/params/PROFILE.yaml")
    r.add_argument("--out", default=None, help="output root (default: the checkout)")
    r.add_argument("--html", action="store_true", help="rebuild the site afterwards")
    r.set_defaults(func=_cmd_book_run)

    h = bsub.add_parser("html", help="build the site from the executed chapters",
                        formatter_class=HelpFormatter)
    h.add_argument("--out", default=None, help="output root (default: the checkout)")
    h.set_defaults(func=_cmd_book_html)


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports torch, for the method list; nothing heavier)."""
    from . import cli_heal, cli_llm

    parser = Parser(prog="kronlab", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{compress,evaluate,heal,book}")
    cli_llm.add_commands(sub)
    cli_heal.add_command(sub)
    _add_book(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; return the exit status (2 for bad arguments, 1 for a failed book)."""
    from .runtime import configure_threads

    configure_threads()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch is imported
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        print(f"(see `{exc.prog} --help` for the valid values and the defaults)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        print(f"kronlab: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        book = sys.modules.get("kronlab.book")
        if book is not None and isinstance(exc, book.BookBuildError):
            print(f"kronlab book: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

"""The ``kronlab`` command line.

    kronlab book build [--profile default]       execute every chapter, build _build/html
    kronlab book run CHAPTER [-p NAME VALUE]...  rerun one chapter with overrides
    kronlab book html                            rebuild the site from executed chapters
"""

from __future__ import annotations

import argparse
import sys

import yaml

__all__ = ["build_parser", "main"]


def _parse_value(text: str):
    """Parse a ``-p`` value as YAML, as papermill does (``8`` -> int, ``[1, 2]`` -> list)."""
    return yaml.safe_load(text)


def _cmd_book_build(args) -> int:
    from .book import build_book

    html = build_book(args.profile, out=args.out, chapters=args.chapters or None)
    print(f"built {html / 'index.html'}")
    return 0


def _cmd_book_run(args) -> int:
    from .book import build_html, run_chapter

    params = {name: _parse_value(value) for name, value in args.param or []}
    path = run_chapter(args.chapter, params, profile=args.profile, out=args.out, log_output=True)
    print(f"executed {path}")
    if args.html:
        print(f"built {build_html(out=args.out) / 'index.html'}")
    return 0


def _cmd_book_html(args) -> int:
    from .book import build_html

    print(f"built {build_html(out=args.out) / 'index.html'}")
    return 0


def _add_book(sub) -> None:
    book = sub.add_parser("book", help="execute the book's notebooks and build the site")
    bsub = book.add_subparsers(dest="book_command", required=True)

    b = bsub.add_parser("build", help="execute every chapter with a profile, then build")
    b.add_argument("--profile", default="default", help="book/params/<profile>.yaml")
    b.add_argument("--chapter", dest="chapters", action="append",
                   help="execute only this chapter (repeatable); the others must exist")
    b.add_argument("--out", default=None, help="output root (default: the checkout)")
    b.set_defaults(func=_cmd_book_build)

    r = bsub.add_parser("run", help="rerun one chapter with parameter overrides")
    r.add_argument("chapter", help="chapter stem, e.g. intro")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter (value parsed as YAML)")
    r.add_argument("--profile", default="default")
    r.add_argument("--out", default=None)
    r.add_argument("--html", action="store_true", help="rebuild the site afterwards")
    r.set_defaults(func=_cmd_book_run)

    h = bsub.add_parser("html", help="build the site from the executed chapters")
    h.add_argument("--out", default=None)
    h.set_defaults(func=_cmd_book_html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kronlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_book(sub)
    try:  # the LLM commands need the `llm` extra
        from . import cli_llm
    except ImportError:
        cli_llm = None
    if cli_llm is not None:
        cli_llm.add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kronlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

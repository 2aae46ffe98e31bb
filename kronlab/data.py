"""Text for calibration and evaluation: the frozen corpora in ``data/corpora``.

Three public English corpora are stored in the repository as xz-compressed UTF-8 text
(regenerated, byte for byte, by ``scripts/make_corpora.py``):

* ``sotu``   the 233 State of the Union addresses, 1790-2021, in chronological order;
* ``austen`` Jane Austen's six novels, in order of publication;
* ``brown``  the Brown corpus (500 samples, 1961), genres A..R in file-name order.

Every corpus has the same layout: documents separated by one blank line (``"\\n\\n"``),
paragraphs inside a document by a single newline. :func:`split_corpus` splits on those
document boundaries, so calibration and evaluation text never share a document.

Examples
--------
>>> text = load_corpus("sotu")                        # str, ~10.8 MB, sha256 checked
>>> calib, held_out = split_corpus("sotu", eval_fraction=0.1)  # held_out: latest addresses
>>> len(calib) > 8 * len(held_out) > 0
True
>>> from kronlab.models import load_model
>>> _, tok = load_model()                            # the offline SmolLM2 tokenizer
>>> X = calibration_token_batches(tok, calib, n_tokens=4096, seq_len=512, seed=0)
>>> X.shape
torch.Size([8, 512])
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import math
import random
from pathlib import Path
from typing import Any

import torch

from .paths import data_dir

__all__ = [
    "DOCUMENT_SEPARATOR",
    "calibration_token_batches",
    "corpus_info",
    "encode",
    "list_corpora",
    "load_corpus",
    "load_text",
    "load_wikitext2",
    "split_corpus",
    "split_documents",
]

DOCUMENT_SEPARATOR = "\n\n"


def _corpora_dir() -> Path:
    return data_dir() / "corpora"


def _manifest() -> dict[str, Any]:
    path = _corpora_dir() / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no corpus manifest at {path}; regenerate the corpora with "
            "`.venv/bin/python scripts/make_corpora.py`")
    return json.loads(path.read_text(encoding="utf-8"))["corpora"]


def list_corpora() -> list[str]:
    """Names of the stored corpora, sorted (``['austen', 'brown', 'sotu']``)."""
    return sorted(_manifest())


def corpus_info(name: str) -> dict[str, Any]:
    """The manifest entry of corpus ``name``: source, licence, sizes, sha256, documents."""
    manifest = _manifest()
    if name not in manifest:
        raise KeyError(f"unknown corpus {name!r}; valid names: {', '.join(sorted(manifest))}")
    return dict(manifest[name])


@functools.lru_cache(maxsize=8)
def _load_verified(path: str, sha_compressed: str, sha_text: str, verify: bool) -> str:
    blob = Path(path).read_bytes()
    if verify and hashlib.sha256(blob).hexdigest() != sha_compressed:
        raise ValueError(
            f"{path}: sha256 of the compressed file differs from data/corpora/manifest.json "
            f"(expected {sha_compressed}); the file was changed or is corrupt. Regenerate "
            "it with `.venv/bin/python scripts/make_corpora.py` or restore it from git.")
    raw = lzma.decompress(blob)
    if verify and hashlib.sha256(raw).hexdigest() != sha_text:
        raise ValueError(f"{path}: sha256 of the decompressed text differs from the manifest "
                         f"(expected {sha_text})")
    return raw.decode("utf-8")


def load_corpus(name: str, *, verify: bool = True) -> str:
    """The full text of corpus ``name`` (see :func:`list_corpora`).

    The compressed file and the decompressed text are both checked against the sha256
    recorded in ``data/corpora/manifest.json`` (set ``verify=False`` to skip). Results
    are cached per process. Cost: ~0.1-0.3 s to decompress a corpus of a few MB.
    """
    info = corpus_info(name)
    path = _corpora_dir() / info["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with "
                                f"`.venv/bin/python scripts/make_corpora.py --only {name}`")
    return _load_verified(str(path), info["sha256_compressed"], info["sha256_text"], verify)


def split_documents(text: str) -> list[str]:
    """The documents of a corpus text: the pieces between blank lines (``"\\n\\n"``)."""
    docs = text.strip("\n").split(DOCUMENT_SEPARATOR)
    return [d for d in docs if d.strip()]


def split_corpus(text_or_name: str, *, eval_fraction: float = 0.1,
                 max_eval_chars: int | None = None) -> tuple[str, str]:
    """Split a corpus into (calibration_text, evaluation_text) on document boundaries.

    The evaluation part is the shortest run of *last* documents holding at least
    ``eval_fraction`` of the characters; the calibration part is everything before it.
    Both are non-empty, disjoint, deterministic, and together cover the text:
    ``calib + "\\n\\n" + evaluation == text.strip("\\n")`` when no document is empty.

    For the stored corpora this means: ``sotu`` evaluates on the most recent addresses
    (``eval_fraction=0.1``: the 30 addresses 1992-2021), ``austen``
    on the last novel(s) published (*Persuasion*, 1817, is ~11% of the text) and
    ``brown`` on the last samples in file-name order (``eval_fraction=0.1``: cn14..cr09,
    i.e. fiction: adventure, romance, humor).

    Parameters
    ----------
    text_or_name : a corpus name from :func:`list_corpora`, or the text itself
        (documents separated by blank lines; at least two documents).
    eval_fraction : in (0, 1), the share of characters to hold out (at least that much,
        rounded up to whole documents).
    max_eval_chars : if given, the evaluation text is cut to its first
        ``max_eval_chars`` characters (at a document or paragraph boundary when one
        exists in the last quarter, else at a space); the calibration part is unchanged.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    text = load_corpus(text_or_name) if text_or_name in _names_or_empty() else text_or_name
    docs = split_documents(text)
    if len(docs) < 2:
        raise ValueError(
            f"need at least two documents (separated by a blank line) to split on document "
            f"boundaries, got {len(docs)}; if you passed a corpus name, valid names are "
            f"{', '.join(_names_or_empty()) or '(none stored)'}")
    total = sum(len(d) for d in docs) + len(DOCUMENT_SEPARATOR) * (len(docs) - 1)
    target = eval_fraction * total
    k, held = len(docs), 0
    while k > 1 and held < target:
        k -= 1
        held += len(docs[k]) + (len(DOCUMENT_SEPARATOR) if k < len(docs) - 1 else 0)
    calib = DOCUMENT_SEPARATOR.join(docs[:k])
    evaluation = DOCUMENT_SEPARATOR.join(docs[k:])
    if max_eval_chars is not None and len(evaluation) > max_eval_chars:
        evaluation = _cut(evaluation, max_eval_chars)
    return calib, evaluation


def _cut(text: str, n: int) -> str:
    head = text[:n]
    for sep in (DOCUMENT_SEPARATOR, "\n", " "):
        i = head.rfind(sep)
        if i >= (3 * n) // 4 or (sep == " " and i > 0):
            return head[:i]
    return head


def _names_or_empty() -> list[str]:
    try:
        return list_corpora()
    except FileNotFoundError:
        return []


def load_wikitext2(split: str = "test", *, name: str = "wikitext-2-raw-v1") -> str:
    """WikiText-2 (raw) ``split`` joined by ``"\\n\\n"``, the usual perplexity protocol.

    Needs the optional ``datasets`` package and the internet (or a filled HF cache):
    WikiText is not packaged in any registry reachable offline, so the stored corpora
    (:func:`load_corpus`) are the offline default.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("load_wikitext2 needs the `datasets` package: "
                          "`.venv/bin/python -m pip install datasets` (and network access); "
                          "offline, use kronlab.data.load_corpus('sotu' | 'austen' | "
                          "'brown')") from exc
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", name, split=split)
    except Exception as exc:  # offline: ConnectionError, OfflineModeIsEnabled, ...
        raise RuntimeError(
            f"could not load WikiText-2 ({name}, {split}) through `datasets`: {exc}. It needs "
            "the internet or a cached copy; offline, use kronlab.data.load_corpus().") from exc
    return "\n\n".join(ds["text"])


def load_text(name: str, part: str) -> str:
    """The ``part`` (``"calibration"`` or ``"evaluation"``) of a named text, as the CLI reads it.

    ``name`` is a stored corpus (:func:`list_corpora`: its :func:`split_corpus` halves),
    ``"wikitext2"`` (online: the ``train`` split for calibration, ``test`` for evaluation,
    :func:`load_wikitext2`), or the path of a UTF-8 text file (used whole for either part).
    """
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    if name in _names_or_empty():
        calib, evaluation = split_corpus(name)
        return calib if part == "calibration" else evaluation
    if name == "wikitext2":
        return load_wikitext2("train" if part == "calibration" else "test")
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"{name!r} is neither a stored corpus ({', '.join(list_corpora())}), "
                     "'wikitext2' (needs `datasets` and the internet) nor a text file")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS added).

    Works with a transformers tokenizer or any object with
    ``encode(text, add_special_tokens=False)`` (``tests/tiny_model.py``'s byte tokenizer).
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


def calibration_token_batches(tokenizer: Any, text: str, *, n_tokens: int, seq_len: int,
                              seed: int = 0) -> torch.Tensor:
    """Random token sequences from ``text`` for calibration, shape ``(n_seq, seq_len)``.

    ``n_seq = ceil(n_tokens / seq_len)``. Each sequence starts at a uniformly random
    word boundary of ``text`` (``random.Random(seed)``), and is the first ``seq_len``
    tokens of the text from there (no special tokens), so sequences may overlap but the
    draw is deterministic for a given (text, tokenizer, seed). Only the drawn spans are
    tokenized, so the cost does not grow with the size of ``text``.

    Returns a ``torch.long`` tensor; the calibration covariances of the layers are then
    taken over ``n_seq * seq_len`` token positions.
    """
    if n_tokens <= 0 or seq_len <= 0:
        raise ValueError(f"n_tokens and seq_len must be positive, got {n_tokens}, {seq_len}")
    if len(text) <= 16 * seq_len and len(encode(tokenizer, text)) < seq_len:
        raise ValueError(f"text has fewer than seq_len={seq_len} tokens")
    n_seq = math.ceil(n_tokens / seq_len)
    rng = random.Random(seed)
    # starts leave >= 8*seq_len characters after them, so a sequence is (almost) always full
    n_starts = max(1, len(text) - 8 * seq_len)
    rows: list[list[int]] = []
    while len(rows) < n_seq:
        start = rng.randrange(n_starts)
        if start:
            start = text.find(" ", start) + 1  # 0 when no space follows: whole text
        span = 8 * seq_len  # characters; English BPE averages ~4-5 characters a token
        while True:
            ids = encode(tokenizer, text[start:start + span])
            if len(ids) > seq_len or start + span >= len(text):
                break
            span *= 2
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)

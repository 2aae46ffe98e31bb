"""The stored corpora, their sha256 check, the document split and calibration sampling."""

import hashlib
import json
import lzma
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import ByteTokenizer

from kronlab import data
from kronlab.paths import data_dir


def test_list_corpora():
    assert data.list_corpora() == ["austen", "brown", "sotu"]


@pytest.mark.parametrize("name", ["sotu", "austen", "brown"])
def test_corpus_matches_manifest_and_layout(name):
    info = data.corpus_info(name)
    path = data_dir() / "corpora" / info["file"]
    blob = path.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == info["sha256_compressed"]
    text = data.load_corpus(name)
    assert hashlib.sha256(text.encode()).hexdigest() == info["sha256_text"]
    assert lzma.decompress(blob).decode() == text
    assert text.endswith("\n") and "\n\n\n" not in text
    docs = data.split_documents(text)
    assert len(docs) == info["n_documents"] == len(info["document_names"])
    readme = (path.parent / "README.md").read_text()
    assert info["sha256_compressed"] in readme and info["sha256_text"] in readme
    assert "scripts/make_corpora.py" in readme


def test_unknown_corpus_lists_valid_names():
    with pytest.raises(KeyError, match="austen, brown, sotu"):
        data.load_corpus("wikitext")


def test_corrupt_corpus_is_detected(tmp_path, monkeypatch):
    src = data_dir() / "corpora"
    dst = tmp_path / "data" / "corpora"
    shutil.copytree(src / "austen", dst / "austen")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["corpora"] = {"austen": manifest["corpora"]["austen"]}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    blob = bytearray((dst / "austen" / "text.txt.xz").read_bytes())
    blob[-100] ^= 1
    (dst / "austen" / "text.txt.xz").write_bytes(bytes(blob))
    monkeypatch.setenv("KRONLAB_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        data.load_corpus("austen")


@pytest.mark.parametrize("name", ["sotu", "austen", "brown"])
def test_split_corpus_disjoint_covering_deterministic(name):
    text = data.load_corpus(name)
    calib, ev = data.split_corpus(name, eval_fraction=0.1)
    assert (calib, ev) == data.split_corpus(text, eval_fraction=0.1)
    assert calib + data.DOCUMENT_SEPARATOR + ev == text.strip("\n")
    c_docs, e_docs = data.split_documents(calib), data.split_documents(ev)
    assert set(c_docs).isdisjoint(e_docs)
    assert len(c_docs) + len(e_docs) == len(data.split_documents(text))
    assert 0.1 <= len(ev) / len(text) < 0.3


def test_sotu_evaluation_is_the_latest_addresses():
    _, ev = data.split_corpus("sotu", eval_fraction=0.1)
    names = data.corpus_info("sotu")["document_names"]
    docs = data.split_documents(data.load_corpus("sotu"))
    k = len(docs) - len(data.split_documents(ev))
    assert names[-1].startswith("2021") and names[k].startswith("1992")
    assert ev.startswith(docs[k])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", min_size=1, max_size=30).map(
    lambda s: s.replace("\n\n", "\n").strip("\n") or "x"), min_size=2, max_size=12),
    st.floats(0.01, 0.99))
def test_split_property(docs, frac):
    docs = [d for d in docs if d.strip("\n")]
    text = "\n\n".join(docs)
    docs = data.split_documents(text)
    if len(docs) < 2:
        return
    calib, ev = data.split_corpus("\n\n".join(docs), eval_fraction=frac)
    assert calib and ev
    assert calib + "\n\n" + ev == "\n\n".join(docs)
    # the evaluation part is the shortest suffix reaching the fraction
    total = len("\n\n".join(docs))
    assert len(ev) >= frac * total or data.split_documents(calib) == docs[:1]
    shorter = "\n\n".join(data.split_documents(ev)[1:])
    assert not shorter or len(shorter) < frac * total


def test_split_errors():
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_corpus("a\n\nb", eval_fraction=1.0)
    with pytest.raises(ValueError, match="two documents"):
        data.split_corpus("just one document", eval_fraction=0.5)


def test_max_eval_chars():
    _, ev = data.split_corpus("austen", max_eval_chars=10_000)
    assert 7_500 <= len(ev) <= 10_000


def test_calibration_token_batches_deterministic_and_from_text():
    tok = ByteTokenizer()
    calib, _ = data.split_corpus("austen")
    a = data.calibration_token_batches(tok, calib, n_tokens=1000, seq_len=64, seed=3)
    b = data.calibration_token_batches(tok, calib, n_tokens=1000, seq_len=64, seed=3)
    c = data.calibration_token_batches(tok, calib, n_tokens=1000, seq_len=64, seed=4)
    assert a.dtype == torch.long and a.shape == (16, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert bytes(row.tolist()).decode("utf-8", errors="ignore")[8:-8] in calib


def test_calibration_token_batches_short_text():
    tok = ByteTokenizer()
    x = data.calibration_token_batches(tok, "0123456789", n_tokens=20, seq_len=10, seed=0)
    assert x.shape == (2, 10) and bytes(x[0].tolist()) == b"0123456789"
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_token_batches(tok, "short", n_tokens=20, seq_len=10)


def test_load_wikitext2_clear_error_without_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            data.load_wikitext2("test")
    else:
        pytest.skip("datasets is installed; the offline error path is not exercised")


def test_load_wikitext2_through_a_stand_in_datasets(monkeypatch):
    """The online path: the call `datasets` gets and the protocol's "\\n\\n" join."""
    import sys
    import types

    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        if split == "validation":
            raise ConnectionError("offline")
        return {"text": [" = Title = \n", " first line \n", ""]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = data.load_wikitext2("test")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert text == " = Title = \n\n\n first line \n\n\n"
    with pytest.raises(RuntimeError, match="load_corpus"):
        data.load_wikitext2("validation")
    with pytest.raises(ValueError, match="'train', 'validation' or 'test'"):
        data.load_wikitext2("dev")


def test_load_text_parts(tmp_path, monkeypatch):
    calib, evaluation = data.split_corpus("austen")
    assert data.load_text("austen", "calibration") == calib
    assert data.load_text("austen", "evaluation") == evaluation
    f = tmp_path / "mine.txt"
    f.write_text("my own text\n", encoding="utf-8")
    assert data.load_text(str(f), "evaluation") == "my own text\n"
    with pytest.raises(ValueError, match="stored corpus .*austen.*'wikitext2'.*text file"):
        data.load_text("no-such-thing", "evaluation")
    with pytest.raises(ValueError, match="'calibration' or 'evaluation'"):
        data.load_text("austen", "test")
    monkeypatch.setattr(data, "load_wikitext2", lambda split: f"wiki:{split}")
    assert data.load_text("wikitext2", "calibration") == "wiki:train"
    assert data.load_text("wikitext2", "evaluation") == "wiki:test"

"""Start token (BOS) of the perplexity protocol: context only, same scored tokens."""

import math

import pytest
import torch
from tiny_model import ByteTokenizer, tiny_llama

from kronlab.evaluate import perplexity, start_token

TEXT = "It is a truth universally acknowledged, that a single man in possession " * 3


class BosByteTokenizer(ByteTokenizer):
    """Bytes 0..254 as text; 255 is a BOS, added by ``encode`` when ``add_bos_token``."""

    bos_token_id = 255

    def __init__(self, add_bos_token=None):
        if add_bos_token is not None:
            self.add_bos_token = add_bos_token
        self._probe_adds = add_bos_token is None

    def encode(self, text, add_special_tokens=False):
        ids = super().encode(text)
        return ([255] if add_special_tokens and self._probe_adds else []) + ids


def _hand_nll(model, ids, window, start):
    """Sum of -log p(t_i | [start,] t_1..t_{i-1}) over i >= 2 of every window, and the count."""
    total, count = 0.0, 0
    prefix = [] if start is None else [start]
    with torch.no_grad():
        for s in range(0, len(ids), window):
            w = ids[s:s + window]
            if len(w) < 2:
                continue
            x = prefix + w
            logp = torch.log_softmax(model(torch.tensor([x])).logits[0].double(), -1)
            for i in range(len(prefix) + 1, len(x)):
                total -= logp[i - 1, x[i]].item()
                count += 1
    return total, count


def test_bos_false_is_the_protocol_without_start_token():
    model, tok = tiny_llama(seed=3)
    ids = tok.encode(TEXT)
    res = perplexity(model, tok, TEXT, window=50, bos=False, progress=False)
    auto = perplexity(model, tok, TEXT, window=50, progress=False)  # no BOS defined
    total, count = _hand_nll(model, ids, 50, None)
    assert res["bos"] is None and auto["bos"] is None
    assert res["nll_sum"] == auto["nll_sum"]
    assert res["n_predicted"] == count
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)


@pytest.mark.parametrize("window,batch_size", [(64, 1), (50, 3)])
def test_start_token_is_context_only(window, batch_size):
    model, tok = tiny_llama(seed=4)
    ids = tok.encode(TEXT)
    without = perplexity(model, tok, TEXT, window=window, bos=False, progress=False)
    res = perplexity(model, tok, TEXT, window=window, bos=7, batch_size=batch_size,
                     progress=False)
    total, count = _hand_nll(model, ids, window, 7)
    assert res["bos"] == 7
    # same scored tokens, same count, but each is now conditioned on the start token
    assert (res["n_predicted"], res["n_tokens"], res["n_windows"]) == (
        without["n_predicted"], without["n_tokens"], without["n_windows"])
    assert res["n_predicted"] == count
    assert res["nll_sum"] == pytest.approx(total, rel=1e-9)
    assert abs(res["nll_sum"] - without["nll_sum"]) > 1e-6


def test_first_scored_token_conditioned_on_start_token():
    model, tok = tiny_llama(seed=5)
    text = "ab"  # one window, one scored token: -log p(b | s, a)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[9, 97]])).logits[0, -1].double(), -1)
    res = perplexity(model, tok, text, window=8, bos=9, progress=False)
    assert res["n_predicted"] == 1
    assert res["nll"] == pytest.approx(-logp[98].item(), rel=1e-9)


@pytest.mark.parametrize("tok,expected", [
    (BosByteTokenizer(add_bos_token=True), 255),
    (BosByteTokenizer(add_bos_token=False), None),  # e.g. SmolLM2: a BOS it never adds
    (BosByteTokenizer(), 255),  # no flag: found by encoding with special tokens
    (ByteTokenizer(), None),
])
def test_auto_start_token(tok, expected):
    assert start_token(tok, "auto") == expected
    model, _ = tiny_llama(seed=6)
    assert perplexity(model, tok, TEXT, window=64, progress=False)["bos"] == expected


def test_forced_and_invalid_start_tokens():
    model, tok = tiny_llama()
    assert start_token(BosByteTokenizer(add_bos_token=False), True) == 255
    assert start_token(tok, False) is None
    with pytest.raises(ValueError, match="defines no bos_token_id"):
        perplexity(model, tok, TEXT, bos=True, progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        perplexity(model, tok, TEXT, bos=256, progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        perplexity(model, tok, TEXT, bos=-1, progress=False)
    with pytest.raises(ValueError, match="'auto', True, False or a token id"):
        perplexity(model, tok, TEXT, bos="yes", progress=False)
    with pytest.raises(ValueError, match="'auto', True, False or a token id"):
        perplexity(model, tok, TEXT, bos=None, progress=False)


def test_record_dense_records_both_protocols():
    """scripts/record_dense.py: ``perplexity`` is the protocol's (no start token for a
    tokenizer that adds none), ``perplexity_start_token`` the same windows with one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "record_dense.py"
    spec = importlib.util.spec_from_file_location("record_dense_bos", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, tok = tiny_llama(seed=1)
    texts = {"a": TEXT}
    res = mod.measure(model, tok, texts=texts, eval_tokens=150, window=64, model_spec="tiny",
                      start_tokens={"<s>": 3})
    assert res["config"]["bos"] == "auto" and res["config"]["bos_token_id"] is None
    plain = perplexity(model, tok, TEXT, window=64, max_tokens=150, bos=False, progress=False)
    started = perplexity(model, tok, TEXT, window=64, max_tokens=150, bos=3, progress=False)
    assert res["perplexity"]["a"] == plain
    assert res["perplexity_start_token"]["<s>"]["a"] == started
    assert started["n_predicted"] == plain["n_predicted"] == 150 - 3
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        mod.resolve_start_tokens(tok, ["<|nope|>"])
    assert mod.resolve_start_tokens(BosByteTokenizer(False), ["bos"]) == {"id 255": 255}

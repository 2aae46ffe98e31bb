"""Perplexity against a hand computation; parameter/memory counts; latency; greedy sample."""

import math

import pytest
import torch
from tiny_model import ByteTokenizer, tiny_gpt2, tiny_llama

from kronlab.evaluate import (
    count_parameters,
    forward_latency,
    generate_sample,
    perplexity,
    weight_memory_bytes,
)

TEXT = "It is a truth universally acknowledged, that a single man in possession " * 3


def _hand_ppl(model, ids, window):
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), window):
            w = ids[s:s + window]
            if len(w) < 2:
                continue
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
            for i in range(1, len(w)):
                total -= logp[i - 1, w[i]].item()
                count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("window,batch_size", [(64, 1), (50, 3), (len(TEXT) - 1, 2)])
def test_perplexity_equals_hand_computation(make, window, batch_size):
    model, tok = make(seed=2)
    ids = tok.encode(TEXT)
    res = perplexity(model, tok, TEXT, window=window, batch_size=batch_size, progress=False)
    ppl, count = _hand_ppl(model, ids, window)
    n_windows = math.ceil(len(ids) / window) - (len(ids) % window == 1)
    assert res["n_windows"] == n_windows
    assert res["n_predicted"] == count == len(ids) - n_windows - (len(ids) % window == 1)
    assert res["text_tokens"] == len(ids)
    assert res["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert res["nll"] == pytest.approx(res["nll_sum"] / res["n_predicted"])


def test_perplexity_max_tokens_and_errors():
    model, tok = tiny_llama()
    res = perplexity(model, tok, TEXT, window=32, max_tokens=100, progress=False)
    assert res["n_tokens"] == 100 and res["n_windows"] == 4 and res["n_predicted"] == 96
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tok, "a", progress=False)
    with pytest.raises(ValueError, match="window"):
        perplexity(model, tok, TEXT, window=1, progress=False)


def test_random_model_perplexity_near_vocab_size():
    model, tok = tiny_llama()
    res = perplexity(model, tok, TEXT, window=64, progress=False)
    assert 150 < res["perplexity"] < 400  # near-uniform over 256 bytes


def test_count_parameters_and_memory_tied():
    model, _ = tiny_llama()
    n = count_parameters(model)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    assert n == sum(p.numel() for p in model.parameters())  # parameters() dedupes ties
    by_hand = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                  if name != "lm_head.weight")
    assert n == by_hand
    assert weight_memory_bytes(model, include_buffers=False) == 4 * n
    assert weight_memory_bytes(model) >= 4 * n
    assert count_parameters(model, include_buffers=True) >= n


def test_forward_latency_positive():
    model, _ = tiny_gpt2()
    t = forward_latency(model, n_tokens=16, repeats=3)
    assert 0 < t < 5


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_sample_is_greedy(make):
    model, tok = make(seed=0)
    out = generate_sample(model, tok, "Hello", max_new_tokens=6)
    ids = tok.encode("Hello")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ByteTokenizer().decode(ids[5:])

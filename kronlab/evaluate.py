"""Evaluate a (compressed) causal LM: perplexity, size, speed, a greedy sample."""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import encode

__all__ = [
    "count_parameters",
    "forward_latency",
    "generate_sample",
    "perplexity",
    "weight_memory_bytes",
]


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    return next(model.parameters()).device


def perplexity(model: nn.Module, tokenizer: Any, text: str, *, window: int = 1024,
               max_tokens: int | None = None, batch_size: int = 1, device=None,
               progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``text`` in non-overlapping windows (the usual WikiText protocol).

    The text is tokenized as a whole without special tokens, cut to its first
    ``max_tokens`` tokens if given, and split into consecutive windows of ``window``
    tokens (the last one may be shorter; a last window of a single token is dropped, as
    it predicts nothing). Window ``w`` with tokens ``t_1..t_L`` contributes the
    negative log-likelihood of ``t_2..t_L``, each given the tokens before it *in the
    window*, so it predicts ``L - 1`` tokens:

        ppl = exp( sum_w sum_{i=2}^{L_w} -log p(t_i | t_1..t_{i-1}) / sum_w (L_w - 1) ).

    Losses are summed in float64 from the model's logits.

    Returns a dict: ``perplexity``; ``nll`` (mean per predicted token, nats);
    ``nll_sum``; ``n_tokens`` (tokens evaluated, after ``max_tokens``);
    ``n_predicted`` (= n_tokens - n_windows, the denominator); ``n_windows``; ``window``;
    ``text_tokens`` (tokens of the whole text).
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    dev = _device_of(model, device)
    ids = encode(tokenizer, text)
    text_tokens = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"text has {len(ids)} tokens; at least 2 are needed")
    # batch windows of equal length together (all but possibly the last)
    groups: list[list[list[int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    nll_sum = 0.0
    n_pred = 0
    from tqdm.auto import tqdm

    with torch.no_grad():
        for group in tqdm(groups, desc="perplexity", unit="batch", disable=not progress):
            x = torch.tensor(group, dtype=torch.long, device=dev)
            logits = model(input_ids=x, use_cache=False).logits
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64)
            target = x[:, 1:].reshape(-1)
            nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
            n_pred += target.numel()
    nll = nll_sum / n_pred
    n_tokens = sum(len(w) for w in windows)
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "nll_sum": nll_sum,
        "n_tokens": n_tokens,
        "n_predicted": n_pred,
        "n_windows": len(windows),
        "window": window,
        "text_tokens": text_tokens,
    }


def _unique_tensors(tensors) -> list[torch.Tensor]:
    seen: dict[tuple, torch.Tensor] = {}
    for t in tensors:
        if t is None:
            continue
        seen.setdefault((t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t),), t)
    return list(seen.values())


def count_parameters(model: nn.Module, *, include_buffers: bool = False) -> int:
    """Number of parameter entries, each shared tensor counted once (tied lm_head).

    With ``include_buffers``, buffers are counted too (useful if a compressed layer
    keeps its factors as buffers; rotary tables and masks are counted as well).
    """
    tensors = list(model.parameters())
    if include_buffers:
        tensors += list(model.buffers())
    return sum(t.numel() for t in _unique_tensors(tensors))


def weight_memory_bytes(model: nn.Module, *, include_buffers: bool = True) -> int:
    """Bytes of the model's parameters (and buffers), each shared storage counted once."""
    tensors = list(model.parameters())
    if include_buffers:
        tensors += list(model.buffers())
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))


def forward_latency(model: nn.Module, *, n_tokens: int = 256, repeats: int = 5,
                    batch_size: int = 1, warmup: int = 1, device=None,
                    seed: int = 0) -> float:
    """Median wall time (seconds) of one forward pass on ``batch_size x n_tokens`` tokens.

    Random token ids (``torch.Generator`` seeded by ``seed``), ``use_cache=False``,
    under ``torch.no_grad``; ``warmup`` untimed passes first; CUDA is synchronised
    around each timed pass.
    """
    dev = _device_of(model, device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, n_tokens), generator=gen).to(dev)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 40,
                    *, device=None) -> str:
    """Greedy continuation of ``prompt`` (argmax at every step), decoded; prompt not included.

    Stops early at the tokenizer's ``eos_token_id`` if it has one. Uses the KV cache.
    """
    dev = _device_of(model, device)
    ids = torch.tensor([encode(tokenizer, prompt)], dtype=torch.long, device=dev)
    if ids.shape[1] == 0:
        raise ValueError("prompt must encode to at least one token")
    eos = getattr(tokenizer, "eos_token_id", None)
    new: list[int] = []
    # transformers >= 5.2x names the KV cache `cache`, older versions `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    x = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=x, use_cache=True, **({key: past} if past is not None else {}))
            past = out.get(key)
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if eos is not None and nxt == eos:
                break
            step = torch.tensor([[nxt]], dtype=torch.long, device=dev)
            # without a returned cache, feed the whole sequence again
            x = step if past is not None else torch.cat([x, step], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)

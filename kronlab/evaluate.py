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
    "start_token",
    "weight_memory_bytes",
]


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    return next(model.parameters()).device


def start_token(tokenizer: Any, bos: bool | int | str = "auto", *,
                vocab_size: int | None = None) -> int | None:
    """The token id :func:`perplexity` puts before every window, or ``None`` for none.

    ``bos`` is one of:

    * ``"auto"``: the tokenizer's ``bos_token_id`` if it defines one *and* adds it to
      every encoding by default (its ``add_bos_token`` flag; a tokenizer without the flag
      is probed: ``encode("a", add_special_tokens=True)`` starts with the BOS id), the
      sign that the model was trained with it (Llama, Mistral, Gemma). Otherwise
      ``None``. SmolLM2-Instruct defines ``<|im_start|>`` as its BOS but never adds it
      (GGUF ``tokenizer.ggml.add_bos_token = false``): it opens chat turns, and the
      pre-training documents carried no BOS, so ``"auto"`` gives ``None`` there;
    * ``False``: ``None``; ``True``: the tokenizer's ``bos_token_id`` (an error if it
      has none);
    * an ``int``: that token id (in ``[0, vocab_size)`` when ``vocab_size`` is given),
      e.g. a document separator such as ``<|endoftext|>``.
    """
    if isinstance(bos, bool):
        if not bos:
            return None
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos=True but the tokenizer defines no bos_token_id; pass a "
                             "token id (int), False, or 'auto'")
        return int(bos_id)
    if isinstance(bos, int):
        if bos < 0 or (vocab_size is not None and bos >= vocab_size):
            raise ValueError(f"bos token id {bos} is outside the vocabulary "
                             f"[0, {vocab_size if vocab_size is not None else 'vocab_size'})")
        return bos
    if bos != "auto":
        raise ValueError(f"bos must be 'auto', True, False or a token id (int), got {bos!r}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    adds = getattr(tokenizer, "add_bos_token", None)
    if adds is None:
        probe = list(tokenizer.encode("a", add_special_tokens=True))
        adds = bool(probe) and probe[0] == bos_id
    return int(bos_id) if adds else None


def perplexity(model: nn.Module, tokenizer: Any, text: str, *, window: int = 1024,
               max_tokens: int | None = None, batch_size: int = 1, device=None,
               bos: bool | int | str = "auto", progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``text`` in non-overlapping windows (the usual WikiText protocol).

    The text is tokenized as a whole without special tokens, cut to its first
    ``max_tokens`` tokens if given, and split into consecutive windows of ``window``
    tokens (the last one may be shorter; a last window of a single token is dropped, as
    it predicts nothing). Window ``w`` with tokens ``t_1..t_L`` contributes the
    negative log-likelihood of ``t_2..t_L``, each given the tokens before it *in the
    window* (and the start token ``s``, if any), so it predicts ``L - 1`` tokens:

        ppl = exp( sum_w sum_{i=2}^{L_w} -log p(t_i | [s,] t_1..t_{i-1}) / sum_w (L_w - 1) ).

    Start token: ``bos`` (see :func:`start_token`; ``"auto"`` is the tokenizer's BOS
    when the tokenizer adds it by default, else none) picks a token ``s`` that is put
    before *every* window, so the model reads ``L + 1`` positions. ``s`` is context
    only: it is never scored, and the scored tokens ``t_2..t_L`` and their count are
    the same with and without it, so the two numbers compare the same predictions. Every
    window gets it because each window is a fresh sequence starting at position 0: a
    model trained with a BOS saw one at position 0 of every training sequence (where many
    heads park their attention), so a window without it is off the training
    distribution at every position, not only the first, and giving it to the first
    window only would mix two protocols in one number. ``t_1`` stays unscored as before
    (with ``s`` it could be scored, but then the counts would differ).

    Losses are summed in float64 from the model's logits.

    Returns a dict: ``perplexity``; ``nll`` (mean per predicted token, nats);
    ``nll_sum``; ``n_tokens`` (tokens evaluated, after ``max_tokens``, start tokens not
    counted); ``n_predicted`` (= n_tokens - n_windows, the denominator); ``n_windows``;
    ``window``; ``text_tokens`` (tokens of the whole text); ``bos`` (the start token id,
    or ``None``).
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    start = start_token(tokenizer, bos, vocab_size=vocab)
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
    prefix = [] if start is None else [start]
    skip = len(prefix)  # logits at the start token predict t_1, which is not scored
    nll_sum = 0.0
    n_pred = 0
    from tqdm.auto import tqdm

    with torch.no_grad():
        for group in tqdm(groups, desc="perplexity", unit="batch", disable=not progress):
            x = torch.tensor([prefix + w for w in group], dtype=torch.long, device=dev)
            logits = model(input_ids=x, use_cache=False).logits
            pred = logits[:, skip:-1].reshape(-1, logits.shape[-1]).to(torch.float64)
            target = x[:, skip + 1:].reshape(-1)
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
        "bos": start,
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

"""Record the dense SmolLM2-135M baseline with the book's protocol.

    .venv/bin/python scripts/record_dense.py             # writes data/results/dense_smollm2.json
    .venv/bin/python scripts/record_dense.py --out /tmp/dense.json

Perplexity of the uncompressed model on the held-out part of each evaluation corpus
(``kronlab.data.load_text(name, "evaluation")``, i.e. ``split_corpus``'s last documents),
its first ``EVAL_TOKENS`` tokens in windows of ``WINDOW`` tokens: the protocol of the
LLM sweep (``scripts/run_llm_experiments.py``), whose ``"dense"`` entry this reproduces.
The protocol's start token is ``EVAL_BOS`` (``"auto"``: none for SmolLM2, whose tokenizer
never adds its BOS). The same windows are measured again with each token of
``--start-tokens`` put before every window as context only (same scored tokens), under
``"perplexity_start_token"``: by default the tokenizer's BOS (``<|im_start|>`` for
SmolLM2-Instruct) and ``<|endoftext|>`` (the separator of SmolLM2's pre-training
documents).
The file holds the configuration, the model's description (``kronlab.models.model_info``),
the parameter count and weight memory, per-corpus perplexities and seconds, and the
machine (``kronlab.runtime.machine_info``: the command, the load). It is read with
:func:`kronlab.results.dense_reference`. Takes 1-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.defaults import EVAL_BOS, EVAL_TEXTS, EVAL_TOKENS, THREADS, WINDOW  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

__all__ = ["main", "measure", "resolve_start_tokens"]

#: ``--start-tokens`` default: "bos" is the tokenizer's BOS, anything else a token's text.
START_TOKENS = ("bos", "<|endoftext|>")


def resolve_start_tokens(tokenizer, names) -> dict[str, int]:
    """Token ids of the start tokens named in ``names`` (label -> id), checked up front.

    ``"bos"`` is the tokenizer's BOS (labelled by its text); any other name must be one
    token of the tokenizer's vocabulary. A tokenizer without a BOS skips ``"bos"``.
    """
    out: dict[str, int] = {}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in names:
        if name == "bos":
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is not None:
                out[getattr(tokenizer, "bos_token", None) or f"id {bos}"] = int(bos)
            continue
        if name not in vocab:
            raise ValueError(f"start token {name!r} is not a token of the tokenizer; valid: "
                             f"'bos' or a token's text (e.g. one of "
                             f"{sorted(getattr(tokenizer, 'all_special_tokens', []))})")
        out[name] = int(vocab[name])
    return out


def measure(model, tokenizer, *, eval_texts=EVAL_TEXTS, eval_tokens: int = EVAL_TOKENS,
            window: int = WINDOW, texts: dict | None = None, model_spec: str = "smollm2",
            load_seconds: float | None = None, bos=EVAL_BOS,
            start_tokens: dict[str, int] | None = None) -> dict:
    """Dense perplexities of ``model`` on each evaluation corpus; the result file's dict.

    ``texts`` may map corpus names to evaluation texts (default:
    ``load_text(name, "evaluation")`` of each name in ``eval_texts``). Keys: ``config``,
    ``model``, ``parameters``, ``weight_memory_bytes``, ``perplexity`` (corpus -> the dict
    of :func:`kronlab.evaluate.perplexity` with ``bos``: the protocol),
    ``perplexity_start_token`` (label -> corpus -> the same with that start token id, for
    each item of ``start_tokens``), ``seconds`` (per corpus and per start token, and
    ``load`` when given) and ``machine``.
    """
    import torch

    from kronlab.data import load_text
    from kronlab.evaluate import count_parameters, perplexity, weight_memory_bytes
    from kronlab.models import model_info
    from kronlab.runtime import machine_info

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if texts is None:
        texts = {name: load_text(name, "evaluation") for name in eval_texts}
    ppl, seconds = {}, {}
    if load_seconds is not None:
        seconds["load"] = load_seconds
    start_tokens = dict(start_tokens or {})
    with_start: dict[str, dict] = {label: {} for label in start_tokens}
    for name, text in texts.items():
        t0 = time.perf_counter()
        ppl[name] = perplexity(model, tokenizer, text, window=window, max_tokens=eval_tokens,
                               bos=bos, progress=False)
        seconds[name] = time.perf_counter() - t0
        for label, token_id in start_tokens.items():
            t0 = time.perf_counter()
            with_start[label][name] = perplexity(model, tokenizer, text, window=window,
                                                 max_tokens=eval_tokens, bos=token_id,
                                                 progress=False)
            seconds[f"{name} start {label}"] = time.perf_counter() - t0
    resolved = next(iter(ppl.values()))["bos"] if ppl else None
    config = {"model": model_spec, "eval": list(texts), "eval_tokens": eval_tokens,
              "window": window, "eval_part": "evaluation (kronlab.data.split_corpus defaults)",
              "bos": bos, "bos_token_id": resolved,
              "protocol": (f"non-overlapping {window}-token windows of the first {eval_tokens} "
                           f"tokens; start token {'none' if resolved is None else resolved} "
                           f"(bos={bos!r}); the first token of each window is not scored"),
              "start_tokens": start_tokens,
              "start_token_protocol": "the same windows and scored tokens, each window "
                                      "preceded by the start token (context only)",
              "threads": torch.get_num_threads()}
    return {"config": config, "model": model_info(model), "parameters": count_parameters(model),
            "weight_memory_bytes": weight_memory_bytes(model), "perplexity": ppl,
            "perplexity_start_token": with_start,
            "seconds": seconds, "machine": machine_info("cpu", load_start=load_start)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: the offline SmolLM2-135M)")
    p.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS))
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--start-tokens", nargs="*", default=list(START_TOKENS),
                   help="start tokens also measured (context only): 'bos' (the tokenizer's) "
                        "or a token's text (default: %(default)s; none: no extra runs)")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--out", type=Path, default=results_dir() / "dense_smollm2.json")
    args = p.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    from kronlab.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    start_tokens = resolve_start_tokens(tok, args.start_tokens)
    result = measure(model, tok, eval_texts=args.eval, eval_tokens=args.eval_tokens,
                     window=args.window, model_spec=args.model or "smollm2",
                     load_seconds=load_seconds, start_tokens=start_tokens)
    for name, r in result["perplexity"].items():
        print(f"dense {name}: perplexity {r['perplexity']:.4f} ({r['n_tokens']} tokens, "
              f"{r['n_windows']} windows of {r['window']}, start token {r['bos']}; "
              f"{result['seconds'][name]:.0f} s)")
        for label, runs in result["perplexity_start_token"].items():
            print(f"  with start token {label} (id {start_tokens[label]}): "
                  f"{runs[name]['perplexity']:.4f}")
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

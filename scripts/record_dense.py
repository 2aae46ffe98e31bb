"""Record the dense SmolLM2-135M baseline with the book's protocol.

    .venv/bin/python scripts/record_dense.py             # writes data/results/dense_smollm2.json
    .venv/bin/python scripts/record_dense.py --out /tmp/dense.json

Perplexity of the uncompressed model on the held-out part of each evaluation corpus
(``kronlab.data.load_text(name, "evaluation")``, i.e. ``split_corpus``'s last documents),
its first ``EVAL_TOKENS`` tokens in windows of ``WINDOW`` tokens: the protocol of the
LLM sweep (``scripts/run_llm_experiments.py``), whose ``"dense"`` entry this reproduces.
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

from kronlab.defaults import EVAL_TEXTS, EVAL_TOKENS, THREADS, WINDOW  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

__all__ = ["main", "measure"]


def measure(model, tokenizer, *, eval_texts=EVAL_TEXTS, eval_tokens: int = EVAL_TOKENS,
            window: int = WINDOW, texts: dict | None = None, model_spec: str = "smollm2",
            load_seconds: float | None = None) -> dict:
    """Dense perplexities of ``model`` on each evaluation corpus; the result file's dict.

    ``texts`` may map corpus names to evaluation texts (default:
    ``load_text(name, "evaluation")`` of each name in ``eval_texts``). Keys: ``config``,
    ``model``, ``parameters``, ``weight_memory_bytes``, ``perplexity`` (corpus -> the dict
    of :func:`kronlab.evaluate.perplexity`), ``seconds`` (per corpus, and ``load`` when
    given) and ``machine``.
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
    for name, text in texts.items():
        t0 = time.perf_counter()
        ppl[name] = perplexity(model, tokenizer, text, window=window, max_tokens=eval_tokens,
                               progress=False)
        seconds[name] = time.perf_counter() - t0
    config = {"model": model_spec, "eval": list(texts), "eval_tokens": eval_tokens,
              "window": window, "eval_part": "evaluation (kronlab.data.split_corpus defaults)",
              "threads": torch.get_num_threads()}
    return {"config": config, "model": model_info(model), "parameters": count_parameters(model),
            "weight_memory_bytes": weight_memory_bytes(model), "perplexity": ppl,
            "seconds": seconds, "machine": machine_info("cpu", load_start=load_start)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: the offline SmolLM2-135M)")
    p.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS))
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--out", type=Path, default=results_dir() / "dense_smollm2.json")
    args = p.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    from kronlab.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    result = measure(model, tok, eval_texts=args.eval, eval_tokens=args.eval_tokens,
                     window=args.window, model_spec=args.model or "smollm2",
                     load_seconds=load_seconds)
    for name, r in result["perplexity"].items():
        print(f"dense {name}: perplexity {r['perplexity']:.3f} ({r['n_tokens']} tokens, "
              f"{r['n_windows']} windows of {r['window']}; {result['seconds'][name]:.0f} s)")
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

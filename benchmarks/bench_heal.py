"""Training-step throughput of healing: the dense model, a Kronecker and a low-rank student.

One step of :func:`kronlab.heal.heal` is a teacher forward (no gradient), a student
forward and backward, the KL loss and an AdamW update of the trained parameters. This
benchmark times that step, in interleaved rounds (:func:`kronlab.runtime.time_rounds`),
for three students of SmolLM2-135M in one run on one machine:

* ``dense``: the model itself, its decoder-block linear weights trained (the cost a
  dense fine-tune of the same layers would have);
* the Kronecker student: compressed with ``--kron-method`` (default ``kron-fisher`` with
  ``--macs-cap 1.0``, the configuration that ``scripts/heal_sweep.py`` heals) at
  ``--ratio`` (default 0.8), factors trained;
* ``svd-aa``: compressed with ``svd-aa`` at the same ratio (the same parameter budget).

Each student's decoder blocks are recomputed in the backward pass when its Kronecker
intermediates exceed :data:`kronlab.defaults.HEAL_ACTIVATION_LIMIT`, as :func:`heal`
does; the row records it. Regenerate ``data/results/bench_heal.json`` with::

    .venv/bin/python benchmarks/bench_heal.py                 # whole model: kron-fisher
                                                               # compression takes 10-25 min
    .venv/bin/python benchmarks/bench_heal.py --quick         # 2 blocks, short steps: printed
    .venv/bin/python benchmarks/bench_heal.py --device cuda   # on a GPU (bfloat16 autocast)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kronlab.defaults import (  # noqa: E402
    CALIBRATION,
    HEAL_ACTIVATION_LIMIT,
    HEAL_BATCH_SIZE,
    HEAL_LR,
    HEAL_SEQ_LEN,
    SEED,
    THREADS,
)
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "bench_heal"
TITLE = "healing: training-step tokens/s of dense, Kronecker and low-rank students"
QUICK = {"blocks": 2, "batch_size": 1, "seq_len": 128, "calib_tokens": 1024, "repeats": 2}

__all__ = ["main", "measure", "report"]


def _step_fn(student, teacher, params, x, device, checkpointing: bool):
    """One training step of ``student`` on tokens ``x`` (what heal does per step)."""
    import torch

    from kronlab.heal import logits_of, checkpointed_blocks, kl_divergence

    opt = torch.optim.AdamW(params, lr=HEAL_LR)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = logits_of(teacher, x, device)[:, :-1]
        with checkpointed_blocks(student, checkpointing):
            s = logits_of(student, x, device)[:, :-1]
            kl_divergence(s, t).backward()
        opt.step()

    return step


def measure(model, tokenizer, *, ratio: float = 0.8, blocks: int | None = None,
            batch_size: int = HEAL_BATCH_SIZE, seq_len: int = HEAL_SEQ_LEN,
            calibration: str = CALIBRATION, calib_text: str | None = None,
            calib_tokens: int = 4096, repeats: int = 3, device="cpu", seed: int = SEED,
            model_name: str = "smollm2", kron_method: str = "kron-fisher",
            macs_cap: float | None = 1.0) -> dict:
    """Time one training step of the dense model and its Kronecker and svd-aa students.

    The Kronecker student is compressed with ``kron_method`` (``macs_ratio=macs_cap``);
    the ``-fisher`` methods collect the output-gradient covariances from the same
    calibration tokens.

    ``blocks`` restricts compression (and, for the dense row, training) to the first
    ``blocks`` decoder blocks. Returns the result dict: ``rows`` (one per student:
    ``student``, ``trained_parameters``, ``layer_params_kept``, ``macs_kept``,
    ``seconds_per_step``, ``tokens_per_second``, ``grad_checkpointing``,
    ``kron_activation_bytes``), ``compress_seconds``, ``config``, ``machine``.
    """
    import copy

    import torch

    from kronlab.compress import compress
    from kronlab.data import calibration_token_batches, split_corpus
    from kronlab.heal import kron_activation_bytes, trainable_parameters
    from kronlab.models import find_linear_layers
    from kronlab.runtime import machine_info, time_rounds

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    model.to(device).eval()
    layers = None if blocks is None else [f"model.layers.{b}.*" for b in range(blocks)]
    if calib_text is None:
        calib_text = split_corpus(calibration)[0]
    calib = calibration_token_batches(tokenizer, calib_text, n_tokens=calib_tokens,
                                      seq_len=min(seq_len, calib_tokens), seed=seed)
    students, summaries, compress_seconds = {}, {}, {}
    if not kron_method.startswith("kron"):
        raise ValueError(f"kron_method must be a Kronecker method (kron, kron-aa, kron-fisher), "
                         f"got {kron_method!r}")
    for method in (kron_method, "svd-aa"):
        t0 = time.perf_counter()
        students[method], rep = compress(
            model, method=method, ratio=ratio, calibration=calib, layers=layers, device=device,
            progress=False, macs_ratio=macs_cap if method.startswith("kron") else None)
        compress_seconds[method] = time.perf_counter() - t0
        summaries[method] = rep.summary()
    # the teacher: a frozen copy, so that the dense row may train the model's own weights
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    dense = [m.weight for m in find_linear_layers(model, include=layers).values()]
    x = calibration_token_batches(tokenizer, calib_text, n_tokens=batch_size * seq_len,
                                  seq_len=seq_len, seed=seed + 1).to(device)
    elt = 2 if str(device).startswith("cuda") else 4
    steps, rows = [], []
    for name, student in (("dense", model), *students.items()):
        if name == "dense":
            params = dense
        else:
            params = list(trainable_parameters(student).values())
        chosen = {id(p) for p in params}
        for p in student.parameters():
            p.requires_grad_(id(p) in chosen)
        act = kron_activation_bytes(student, batch_size * seq_len, elt)
        steps.append(_step_fn(student, teacher, params, x, device, act > HEAL_ACTIVATION_LIMIT))
        s = summaries.get(name, {})
        rows.append({"student": name, "trained_parameters": sum(p.numel() for p in params),
                     "layer_params_kept": s.get("layer_params_kept", 1.0),
                     "macs_kept": s.get("macs_kept", 1.0),
                     "grad_checkpointing": act > HEAL_ACTIVATION_LIMIT,
                     "kron_activation_bytes": act})
    try:
        times = time_rounds(steps, repeats=repeats, warmup=1, device=device)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    tokens = batch_size * seq_len
    for r, t in zip(rows, times, strict=True):
        r.update(seconds_per_step=t, tokens_per_second=tokens / t)
    config = {"model": model_name, "ratio": ratio, "blocks": blocks, "batch_size": batch_size,
              "seq_len": seq_len, "tokens_per_step": tokens, "calibration": calibration,
              "calib_tokens": calib_tokens, "repeats": repeats, "device": str(device),
              "dtype": "float32" + (" (bfloat16 autocast)" if elt == 2 else ""),
              "threads": torch.get_num_threads(), "seed": seed, "kron_method": kron_method,
              "macs_cap": macs_cap,
              "activation_limit": HEAL_ACTIVATION_LIMIT}
    return {"benchmark": NAME, "title": TITLE, "config": config, "rows": rows,
            "compress_seconds": compress_seconds, "compress": summaries,
            "wall_seconds": time.perf_counter() - t_start,
            "machine": machine_info(device, load_start=load_start)}


def report(result: dict) -> str:
    """The readable summary of a result dict (what the script prints)."""
    c = result["config"]
    scope = "whole model" if c["blocks"] is None else f"first {c['blocks']} blocks compressed"
    lines = [f"kronlab benchmark: {result['title']}",
             f"{c['model']}, {scope}, ratio {c['ratio']}; steps of {c['batch_size']} x "
             f"{c['seq_len']} tokens on {c['device']} ({c['dtype']}, {c['threads']} threads), "
             f"median of {c['repeats']} interleaved rounds", ""]
    dense = next(r for r in result["rows"] if r["student"] == "dense")
    for r in result["rows"]:
        lines.append(f"{r['student']:11s} {r['tokens_per_second']:9.1f} tokens/s  "
                     f"({r['seconds_per_step']:.2f} s a step, "
                     f"{dense['seconds_per_step'] / r['seconds_per_step']:.2f}x dense; "
                     f"{r['trained_parameters']:,} trained parameters, MACs kept "
                     f"{r['macs_kept']:.2f}"
                     + (", blocks recomputed" if r["grad_checkpointing"] else "") + ")")
    lines.append(f"command: {result['machine']['command']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--kron-method", default="kron-fisher", choices=["kron", "kron-aa", "kron-fisher"],
                    help="the Kronecker student's method (default kron-fisher, as healed)")
    ap.add_argument("--macs-cap", type=float, default=1.0,
                    help="the Kronecker student's forward MACs budget as a fraction of dense "
                         "(default 1.0; 0 for none)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['blocks']} blocks compressed, steps of {QUICK['batch_size']} "
                         f"x {QUICK['seq_len']} tokens, {QUICK['repeats']} rounds (a few "
                         "minutes on 2 cores); printed, written only with --out")
    ap.add_argument("--blocks", type=int, default=None, help="compress only the first N blocks")
    ap.add_argument("--batch-size", type=int, default=HEAL_BATCH_SIZE)
    ap.add_argument("--seq-len", type=int, default=HEAL_SEQ_LEN)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result file (default data/results/{NAME}.json for a whole-model run)")
    args = ap.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    from kronlab.models import load_model

    kw = {"blocks": args.blocks, "batch_size": args.batch_size, "seq_len": args.seq_len,
          "repeats": args.repeats}
    if args.quick:
        kw = {k: QUICK[k] for k in ("blocks", "batch_size", "seq_len", "repeats")}
        kw["calib_tokens"] = QUICK["calib_tokens"]
    model, tok = load_model(device=args.device)
    if not 0 < args.ratio <= 1:
        ap.error(f"--ratio must lie in (0, 1], got {args.ratio}")
    if args.macs_cap < 0:
        ap.error(f"--macs-cap must be positive (or 0 for no MACs budget), got {args.macs_cap}")
    result = measure(model, tok, ratio=args.ratio, device=args.device,
                     kron_method=args.kron_method, macs_cap=args.macs_cap or None, **kw)
    print(report(result))
    whole = kw["blocks"] is None
    out = args.out if args.out is not None or not whole else results_dir() / f"{NAME}.json"
    if out is not None:
        write_atomic(out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

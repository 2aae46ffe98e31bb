"""Whole-model compression time of SmolLM2-135M, per layer type, for each method.

With the settings of the recorded sweep (``kronlab.defaults``: calibration tokens of the
SOTU corpus, ALS sweeps, ``permute`` for kron-aa, shapes chosen once per layer type),
time ``compress`` of every decoder-block linear layer (210 layers) for ``kron-aa`` and,
in the same run, the other methods, and print the seconds per layer type, the total and
its ratio to ``svd-aa``'s. Target of issue 3: ``kron-aa`` on the whole model in under 10
minutes on this CPU.

Regenerate ``data/results/bench_compress.json`` (rows per method and layer type, totals,
configuration and machine; read with ``kronlab.results.load_benchmark("bench_compress")``)
with::

    .venv/bin/python benchmarks/bench_compress.py            # all blocks (minutes)
    .venv/bin/python benchmarks/bench_compress.py --blocks 2  # first 2 blocks, printed only

Covariance collection is timed separately (it is shared by all methods).
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
    ALS_SWEEPS,
    CALIB_TOKENS,
    CALIBRATION,
    PERMUTE,
    SEED,
    SEQ_LEN,
    SHAPE_POLICY,
    THREADS,
)
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "bench_compress"
TITLE = "whole-model compression time, SmolLM2-135M"
TARGET_MINUTES = 10

__all__ = ["main", "measure", "report"]


def measure(model, tokenizer, *, methods, ratio: float = 0.6, blocks: int | None = None,
            calibration: str = CALIBRATION, calib_text: str | None = None,
            calib_tokens: int = CALIB_TOKENS, seq_len: int = SEQ_LEN, als_sweeps: int = ALS_SWEEPS,
            permute=PERMUTE, shape_policy: str = SHAPE_POLICY, seed: int = SEED,
            model_name: str = "smollm2", on_method=None) -> dict:
    """Time :func:`kronlab.compress.compress` of ``model`` for each method; the result dict.

    ``permute`` applies to kron-aa only. ``calib_text`` defaults to the calibration part
    of the corpus ``calibration``. Keys: ``benchmark``, ``title``, ``config``,
    ``n_layers``, ``covariance_seconds``, ``totals`` (method -> seconds), ``rows`` (one per
    method and layer type: ``method``, ``layer_type``, ``seconds``, ``n_layers``,
    ``mean_seconds``), ``summary`` (kron-aa's total, its target and its ratio to the other
    methods), ``wall_seconds`` and ``machine``. ``on_method(method, rows, total)`` is
    called after each method.
    """
    import torch

    from kronlab.calibration import collect_covariances
    from kronlab.compress import compress
    from kronlab.data import calibration_token_batches, split_corpus
    from kronlab.models import find_linear_layers, layer_type
    from kronlab.runtime import machine_info

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    layers = None if blocks is None else [f"model.layers.{b}.*" for b in range(blocks)]
    names = list(find_linear_layers(model, include=layers))
    if calib_text is None:
        calib_text = split_corpus(calibration)[0]
    calib = calibration_token_batches(tokenizer, calib_text, n_tokens=calib_tokens,
                                      seq_len=seq_len, seed=seed)
    t0 = time.perf_counter()
    covs = collect_covariances(model, calib, names, progress=False)
    t_cov = time.perf_counter() - t0
    totals, rows = {}, []
    for method in methods:
        t0 = time.perf_counter()
        _, rep = compress(model, method=method, ratio=ratio, covariances=covs, layers=layers,
                          als_sweeps=als_sweeps, permute=permute if method == "kron-aa" else None,
                          shape_policy=shape_policy, progress=False)
        totals[method] = time.perf_counter() - t0
        per_type: dict[str, list[float]] = {}
        for lr in rep.layers:
            per_type.setdefault(layer_type(lr.name), []).append(lr.seconds)
        new = [{"method": method, "layer_type": k, "seconds": sum(v), "n_layers": len(v),
                "mean_seconds": sum(v) / len(v)} for k, v in per_type.items()]
        rows += new
        if on_method is not None:
            on_method(method, new, totals[method])
    summary = {}
    if "kron-aa" in totals:
        t = totals["kron-aa"]
        summary = {"kron_aa_seconds": t, "kron_aa_minutes": t / 60,
                   "time_ratios": {f"kron-aa / {o}": t / totals[o]
                                   for o in ("svd-aa", "kron") if o in totals}}
        if blocks is None:
            summary |= {"target_minutes": TARGET_MINUTES, "target_met": t < 60 * TARGET_MINUTES}
    config = {"model": model_name, "methods": list(methods), "ratio": ratio, "blocks": blocks,
              "calibration": calibration, "calib_tokens": calib_tokens, "seq_len": seq_len,
              "als_sweeps": als_sweeps, "permute": permute, "shape_policy": shape_policy,
              "seed": seed, "threads": torch.get_num_threads()}
    return {"benchmark": NAME, "title": TITLE, "config": config, "n_layers": len(names),
            "covariance_seconds": t_cov, "totals": totals, "rows": rows, "summary": summary,
            "wall_seconds": time.perf_counter() - t_start,
            "machine": machine_info("cpu", load_start=load_start)}


def method_line(method: str, rows: list[dict], total: float) -> str:
    detail = ", ".join(f"{r['layer_type']} {r['seconds']:.1f} s ({r['n_layers']}, mean "
                       f"{r['mean_seconds']:.2f})" for r in rows)
    return f"{method:8s} total {total:7.1f} s  ({detail})"


def report(result: dict) -> str:
    """The readable summary of a result dict (what the script prints at the end)."""
    c, s = result["config"], result["summary"]
    lines = [f"kronlab benchmark: {result['title']}",
             (f"{result['n_layers']} layers; calibration {c['calib_tokens']} {c['calibration']} "
              f"tokens, covariances in {result['covariance_seconds']:.1f} s; ratio {c['ratio']}, "
              f"{c['als_sweeps']} ALS sweeps, permute={c['permute']} (kron-aa), shape policy "
              f"{c['shape_policy']}"), ""]
    for method, total in result["totals"].items():
        lines.append(method_line(method, [r for r in result["rows"] if r["method"] == method],
                                 total))
    if s:
        scope = "whole model" if c["blocks"] is None else f"first {c['blocks']} blocks"
        t = s["kron_aa_seconds"]
        lines += ["", f"kron-aa, {scope}: {t:.0f} s = {t / 60:.1f} min"
                  + (f" (target < {s['target_minutes']} min: {'met' if s['target_met'] else 'NOT met'})"
                     if "target_met" in s else "")]
        lines += [f"{k} time: {v:.1f}x" for k, v in s["time_ratios"].items()]
    lines.append(f"command: {result['machine']['command']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--methods", nargs="+", default=["kron-aa", "kron", "svd-aa", "svd"])
    ap.add_argument("--blocks", type=int, default=None,
                    help="only the first N decoder blocks (prints; writes only with --out)")
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    ap.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS)
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result file (default data/results/{NAME}.json for a whole-model run)")
    args = ap.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    from kronlab.compress import METHODS
    from kronlab.models import load_model

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    model, tok = load_model()
    result = measure(model, tok, methods=args.methods, ratio=args.ratio, blocks=args.blocks,
                     calib_tokens=args.calib_tokens, als_sweeps=args.als_sweeps,
                     on_method=lambda m, rows, t: print(method_line(m, rows, t), flush=True))
    print(report(result))
    out = args.out if args.out is not None or args.blocks is not None else \
        results_dir() / f"{NAME}.json"
    if out is not None:
        write_atomic(out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compress SmolLM2 with every method at several ratios; record perplexities.

    python scripts/run_llm_experiments.py                 # the book's default sweep
    python scripts/run_llm_experiments.py --ratios 0.6 --methods kron kron-aa --eval-tokens 4096

Writes ``data/results/llm_sweep.json`` (atomically, after every configuration,
so an interrupted sweep resumes where it stopped with ``--resume``): the full
configuration, the environment and the machine (``kronlab.runtime.machine_info``: the
command, the load), dense and compressed perplexities on the held-out part of each
evaluation corpus, per-layer compression reports, and a greedy generation sample of
``kronlab.results.SWEEP_PROMPT`` per model (the prompt is recorded as ``"prompt"``).
Each run records its own date and machine (runs may be added later with ``--resume``).
The book's LLM chapter reads this file with :func:`kronlab.results.load_sweep`.

The defaults are the book's protocol, :mod:`kronlab.defaults`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.defaults import (  # noqa: E402
    ALS_SWEEPS,
    CALIB_TOKENS,
    CALIBRATION,
    EVAL_TEXTS,
    EVAL_TOKENS,
    PERMUTE,
    SEED,
    SEQ_LEN,
    SHAPE_POLICY,
    THREADS,
    WINDOW,
)
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.results import SWEEP_PROMPT, settings_differences, sweep_config  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

PROMPT = SWEEP_PROMPT
# Options that plan the sweep (which runs); the others define the results, and a file
# can be resumed only under the same values of those.
PLAN_KEYS = ("methods", "ratios", "macs_matched", "macs_cap", "threads", "device")


def write_json_atomic(obj, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str))


def environment() -> dict:
    import numpy
    import torch
    import transformers

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "transformers": transformers.__version__}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--methods", nargs="+", default=["kron", "kron-aa", "svd", "svd-aa"],
                   help="methods of kronlab.compress.METHODS")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.4, 0.8],
                   help="run in this order (the most informative first)")
    p.add_argument("--macs-matched", action="store_true",
                   help="also run kron-aa with forward MACs capped at the ratio (= svd-aa's)")
    p.add_argument("--macs-cap", type=float, default=None,
                   help="also run every Kronecker method with forward MACs capped at this "
                        "fraction of the dense layers' (e.g. 1.0: never slower than dense)")
    p.add_argument("--calibration", default=CALIBRATION)
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS))
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS)
    p.add_argument("--permute", default=PERMUTE or "none", choices=["none", "variance"],
                   help="input-channel permutation for kron-aa")
    p.add_argument("--shape-policy", default=SHAPE_POLICY, choices=["per-type", "per-layer"])
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--layers", nargs="+", default=None,
                   help="name patterns (fnmatch) of the layers to compress; default: every "
                        "linear layer of the decoder blocks")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the model and the fits run")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default=str(results_dir() / "llm_sweep.json"))
    p.add_argument("--resume", action="store_true")
    return p


def _machine(load_start) -> dict:
    from kronlab.runtime import machine_info

    return machine_info(_DEVICE[0], load_start=load_start)


_DEVICE = ["cpu"]


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    _DEVICE[0] = args.device
    from kronlab.compress import METHODS

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; valid (kronlab.compress.METHODS): {', '.join(METHODS)}")

    from kronlab.calibration import collect_statistics
    from kronlab.compress import compress
    from kronlab.data import calibration_token_batches, split_corpus
    from kronlab.evaluate import generate_sample, perplexity
    from kronlab.models import find_linear_layers, load_model

    out = Path(args.out)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    results = {"config": config, "environment": environment(), "machine": _machine(load_start),
               "prompt": PROMPT, "dense": {}, "runs": []}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        # Runs can be added to a file whose results-defining settings match; the plan
        # (methods, ratios, macs-matched) recorded in it becomes the union of both.
        old_config = sweep_config(old)  # older files: als_iters -> als_sweeps
        diff = settings_differences(old_config, config, PLAN_KEYS)
        if diff or old.get("prompt", PROMPT) != PROMPT:
            raise SystemExit(f"--resume: {out} was made with different settings "
                             f"{diff or ['prompt']}; use another --out")
        results = old
        results["config"] = oc = old_config
        # every version of this script sampled PROMPT; files from before it was recorded lack it
        results.setdefault("prompt", PROMPT)
        oc["methods"] = list(dict.fromkeys(oc["methods"] + config["methods"]))
        oc["ratios"] = list(dict.fromkeys(oc["ratios"] + config["ratios"]))
        oc["macs_matched"] = bool(oc.get("macs_matched") or config["macs_matched"])
        oc["macs_cap"] = oc.get("macs_cap") if config["macs_cap"] is None else config["macs_cap"]
        print(f"resuming: {len(results['runs'])} runs already in {out}")

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    results["model_load_seconds"] = time.perf_counter() - t0
    eval_texts = {name: split_corpus(name)[1] for name in args.eval}
    calib_text = split_corpus(args.calibration)[0]
    batches = calibration_token_batches(tok, calib_text, n_tokens=args.calib_tokens,
                                        seq_len=args.seq_len, seed=args.seed)
    names = list(find_linear_layers(model, include=args.layers))
    t0 = time.perf_counter()
    # the -fisher methods also need the output-gradient covariances G (a backward pass)
    fisher = any(m.endswith("-fisher") for m in args.methods)
    stats = collect_statistics(model, batches, names, gradients=fisher, device=args.device)
    covs, gcovs = stats.cov, (stats.gcov if fisher else None)
    results["calibration_seconds"] = time.perf_counter() - t0

    if not results["dense"]:
        for name, text in eval_texts.items():
            results["dense"][name] = perplexity(model, tok, text, window=args.window,
                                                max_tokens=args.eval_tokens)
            print(f"dense {name}: {results['dense'][name]['perplexity']:.3f}", flush=True)
        results["dense"]["sample"] = generate_sample(model, tok, PROMPT)
        results["dense"]["parameters"] = sum(p.numel() for p in model.parameters())
        write_json_atomic(results, out)

    plan = []
    for r in args.ratios:  # each ratio's runs together, the macs-matched one first
        if args.macs_matched:
            plan.append(("kron-aa", r, r))
        plan += [(m, r, None) for m in args.methods]
        if args.macs_cap is not None:
            plan += [(m, r, args.macs_cap) for m in args.methods if m.startswith("kron")]
    done = {(r["method"], r["ratio"], r["macs_ratio"]) for r in results["runs"]}
    for method, ratio, macs_ratio in plan:
        if (method, ratio, macs_ratio) in done:
            continue
        run_load = os.getloadavg() if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        cmodel, report = compress(model, method=method, ratio=ratio, covariances=covs,
                                  gcovariances=gcovs, device=args.device, layers=args.layers,
                                  macs_ratio=macs_ratio, als_sweeps=args.als_sweeps,
                                  permute=None if args.permute == "none" else args.permute,
                                  shape_policy=args.shape_policy, progress=False)
        run = {"method": method, "ratio": ratio, "macs_ratio": macs_ratio,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "compress_seconds": time.perf_counter() - t0, "report": report.to_dict(),
               "ppl": {}}
        for name, text in eval_texts.items():
            run["ppl"][name] = perplexity(cmodel, tok, text, window=args.window,
                                          max_tokens=args.eval_tokens)
        run["sample"] = generate_sample(cmodel, tok, PROMPT)
        run["machine"] = _machine(run_load)
        results["runs"].append(run)
        write_json_atomic(results, out)
        ppl = ", ".join(f"{k} {v['perplexity']:.2f}" for k, v in run["ppl"].items())
        print(f"{method:8s} ratio {ratio:.2f} macs {macs_ratio}: {ppl} "
              f"({run['compress_seconds']:.0f} s compress)", flush=True)
        del cmodel
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

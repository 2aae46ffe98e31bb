"""Compress SmolLM2 with every method at several ratios; record perplexities.

    python scripts/run_llm_experiments.py                 # the book's default sweep
    python scripts/run_llm_experiments.py --ratios 0.6 --methods kron kron-aa --eval-tokens 4096

Writes ``data/results/llm_sweep.json`` (atomically, after every configuration,
so an interrupted sweep resumes where it stopped with ``--resume``): the full
configuration, the environment, dense and compressed perplexities on the
held-out part of each evaluation corpus, per-layer compression reports, and a
greedy generation sample per model. The book's LLM chapter reads this file.
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: no spinning OpenMP threads

import torch

from kronlab.paths import write_atomic
from kronlab.calibration import collect_covariances
from kronlab.compress import compress
from kronlab.data import calibration_token_batches, split_corpus
from kronlab.evaluate import generate_sample, perplexity
from kronlab.models import find_linear_layers, load_model

PROMPT = "The most important duty of a government is"


def write_json_atomic(obj, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str))


def environment() -> dict:
    import numpy
    import transformers

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "transformers": transformers.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--methods", nargs="+", default=["kron", "kron-aa", "svd", "svd-aa"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.4, 0.8],
                   help="run in this order (the most informative first)")
    p.add_argument("--macs-matched", action="store_true",
                   help="also run kron-aa with forward MACs capped at the ratio (= svd-aa's)")
    p.add_argument("--calibration", default="sotu")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", nargs="+", default=["sotu", "austen"])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--als-iters", type=int, default=2)
    p.add_argument("--permute", default="variance", choices=["none", "variance"],
                   help="input-channel permutation for kron-aa")
    p.add_argument("--shape-policy", default="per-type", choices=["per-type", "per-layer"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "data" / "results" / "llm_sweep.json"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    results = {"config": config, "environment": environment(), "dense": {}, "runs": []}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        # Runs can be added to a file whose results-defining settings match; the plan
        # (methods, ratios, macs-matched) recorded in it becomes the union of both.
        plan_keys = ("methods", "ratios", "macs_matched", "threads")
        same = {k: v for k, v in config.items() if k not in plan_keys}
        old_same = {k: v for k, v in old.get("config", {}).items() if k not in plan_keys}
        if same != old_same:
            diff = sorted(k for k in set(same) | set(old_same) if same.get(k) != old_same.get(k))
            raise SystemExit(f"--resume: {out} was made with different settings {diff}; "
                             "use another --out")
        results = old
        oc = results["config"]
        oc["methods"] = list(dict.fromkeys(oc["methods"] + config["methods"]))
        oc["ratios"] = list(dict.fromkeys(oc["ratios"] + config["ratios"]))
        oc["macs_matched"] = bool(oc.get("macs_matched") or config["macs_matched"])
        print(f"resuming: {len(results['runs'])} runs already in {out}")

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    results["model_load_seconds"] = time.perf_counter() - t0
    eval_texts = {name: split_corpus(name)[1] for name in args.eval}
    calib_text = split_corpus(args.calibration)[0]
    batches = calibration_token_batches(tok, calib_text, n_tokens=args.calib_tokens,
                                        seq_len=args.seq_len, seed=args.seed)
    names = list(find_linear_layers(model))
    t0 = time.perf_counter()
    covs = collect_covariances(model, batches, names)
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
    done = {(r["method"], r["ratio"], r["macs_ratio"]) for r in results["runs"]}
    for method, ratio, macs_ratio in plan:
        if (method, ratio, macs_ratio) in done:
            continue
        t0 = time.perf_counter()
        cmodel, report = compress(model, method=method, ratio=ratio, covariances=covs,
                                  macs_ratio=macs_ratio, als_iters=args.als_iters,
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

"""Whole-model compression time of SmolLM2-135M, per layer type, for each method.

With the settings of the recorded sweep (``scripts/run_llm_experiments.py``: 8192
calibration tokens of the SOTU corpus, 2 ALS sweeps, ``permute="variance"``, shapes
chosen once per layer type), time ``compress`` of every decoder-block linear layer
(210 layers) for ``kron-aa`` and, in the same run, the other methods, and print the
seconds per layer type, the total and its ratio to ``svd-aa``'s. Target of issue 3:
``kron-aa`` on the whole model in under 10 minutes on this CPU.

Regenerate ``data/results/bench_compress.txt`` with::

    .venv/bin/python benchmarks/bench_compress.py            # all blocks (minutes)
    .venv/bin/python benchmarks/bench_compress.py --blocks 2  # first 2 blocks, printed only

Covariance collection is timed separately (it is shared by all methods).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kronlab.paths import write_atomic  # noqa: E402
from kronlab.analysis import layer_kind  # noqa: E402
from kronlab.calibration import collect_covariances  # noqa: E402
from kronlab.compress import compress  # noqa: E402
from kronlab.data import calibration_token_batches, split_corpus  # noqa: E402
from kronlab.models import find_linear_layers, load_model  # noqa: E402

OUT = ROOT / "data" / "results" / "bench_compress.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--methods", nargs="+", default=["kron-aa", "kron", "svd-aa", "svd"])
    ap.add_argument("--blocks", type=int, default=None,
                    help="only the first N decoder blocks (prints, does not write the file)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--als-iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(msg: str = "") -> None:
        print(msg, flush=True)
        lines.append(msg)

    say("kronlab benchmark: whole-model compression time, SmolLM2-135M")
    say(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  platform {platform.platform()}  "
        f"cpus {os.cpu_count()}  torch threads {torch.get_num_threads()}  "
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}")
    say(f"torch {torch.__version__}  command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}  "
        f"load average at start {os.getloadavg()[0]:.1f}")
    model, tok = load_model()
    layers = None
    if args.blocks is not None:
        layers = [f"model.layers.{b}.*" for b in range(args.blocks)]
    names = list(find_linear_layers(model, include=layers))
    calib_text, _ = split_corpus("sotu")
    calib = calibration_token_batches(tok, calib_text, n_tokens=args.calib_tokens, seq_len=512, seed=0)
    t0 = time.perf_counter()
    covs = collect_covariances(model, calib, names, progress=False)
    t_cov = time.perf_counter() - t0
    say(f"{len(names)} layers; calibration {args.calib_tokens} SOTU tokens, covariances in {t_cov:.1f} s; "
        f"ratio {args.ratio}, {args.als_iters} ALS sweeps, permute=variance (kron-aa), shapes per layer type")
    say("")
    totals = {}
    for method in args.methods:
        t0 = time.perf_counter()
        _, rep = compress(model, method=method, ratio=args.ratio, covariances=covs, layers=layers,
                          als_iters=args.als_iters, permute="variance" if method == "kron-aa" else None,
                          shape_policy="per-type", progress=False)
        totals[method] = time.perf_counter() - t0
        per_type: dict = defaultdict(list)
        for lr in rep.layers:
            per_type[layer_kind(lr.name)].append(lr.seconds)
        detail = ", ".join(f"{k} {sum(v):.1f} s ({len(v)}, mean {sum(v) / len(v):.2f})"
                           for k, v in per_type.items())
        say(f"{method:8s} total {totals[method]:7.1f} s  ({detail})")
    say("")
    if "kron-aa" in totals:
        t = totals["kron-aa"]
        scope = "whole model" if args.blocks is None else f"first {args.blocks} blocks"
        say(f"kron-aa, {scope}: {t:.0f} s = {t / 60:.1f} min"
            + (f" (target < 10 min: {'met' if t < 600 else 'NOT met'})" if args.blocks is None else ""))
        for other in ("svd-aa", "kron"):
            if other in totals:
                say(f"kron-aa / {other} time: {t / totals[other]:.1f}x")
    say(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.blocks is None:
        write_atomic(OUT, "\n".join(lines) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

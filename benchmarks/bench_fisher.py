"""Benchmark of the loss-aware (K-FAC Fisher) fit against the activation-aware one (a script).

At a SmolLM2 MLP shape, W 1536 x 576, for a balanced a_shape (32, 24) and a thin one
(64, 1), at 80% and 60% of the m n parameters, it times in interleaved rounds (one run, so
the ratios share the machine's state):

* ``one-sided``: ``nearest_kronecker(W, a, r, cov=C)``, objective ``tr(E C E^T)``;
* ``two-sided``: ``nearest_kronecker(W, a, r, cov=C, gcov=G)``, objective ``tr(G E C E^T)``
  (dense G and C: the two-sided ALS, with its default activation-aware warm-up sweep);
* ``two-sided, no warm-up``: the same with ``warmup_sweeps=0`` (every sweep two-sided);

(at the thin shape, n1 = 1 makes C trivially Kronecker and the loss-aware fit is the exact
one-sided reduction with G as the covariance, ``route`` in the rows, so the last two agree);

all with the default starts and ``ALS_SWEEPS`` sweeps, and records each fit's loss-aware
error ``relative_error(W, F, cov=C, gcov=G)``, its output error, and the loss-aware error of
the closed-form low-rank fit (``low_rank(cov=C, gcov=G)``) with the same parameter count.
``W`` is :func:`kronlab.synthetic.power_law_matrix` (a stand-in for a trained weight), ``G``
and ``C`` are :func:`kronlab.synthetic.realistic_cov` (heavy-tailed channel scales, outlier
channels, correlated channels: far from Kronecker).

Regenerate ``data/results/bench_fisher.json`` (``rows``: one per shape, ratio and method;
``summary``: the time ratios; ``config``; ``machine``) with::

    nice .venv/bin/python benchmarks/bench_fisher.py          # full size (minutes)
    .venv/bin/python benchmarks/bench_fisher.py --quick       # 384 x 144, prints only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kronlab.defaults import ALS_SWEEPS, SEED, THREADS  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "bench_fisher"
TITLE = "loss-aware (two-sided) vs activation-aware (one-sided) Kronecker fits"
METHODS = ("one-sided", "two-sided", "two-sided, no warm-up")

__all__ = ["main", "measure"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _fit_into(fits: dict, name: str, W, C, G, a_shape, rank: int, sweeps: int) -> None:
    """Fit by method ``name`` (one of METHODS) and keep the factors in ``fits[name]``."""
    from kronlab import nearest_kronecker

    extra = {} if name == "one-sided" else {"gcov": G}
    if name == "two-sided, no warm-up":
        extra["warmup_sweeps"] = 0
    fits[name] = nearest_kronecker(W, a_shape, rank, cov=C, als_sweeps=sweeps, **extra)


def measure(*, m: int = 1536, n: int = 576, shapes=((32, 24), (64, 1)), ratios=(0.8, 0.6),
            sweeps: int = ALS_SWEEPS, repeats: int = 2, seed: int = SEED, quick: bool = False) -> dict:
    """Time and score the three fits per (a_shape, ratio); returns the result file's dict."""
    import numpy as np
    import torch

    from kronlab import low_rank, low_rank_rank_for_budget, relative_error
    from kronlab.runtime import machine_info, time_rounds
    from kronlab.synthetic import power_law_matrix, realistic_cov

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    W = torch.from_numpy(power_law_matrix(m, n, exponent=0.5, seed=seed))
    G = torch.from_numpy(realistic_cov(m, seed=seed + 1)[0])
    C = torch.from_numpy(realistic_cov(n, seed=seed + 2)[0])
    say(f"kronlab benchmark: {TITLE}")
    say(f"W {m}x{n} (power law), G ({m}x{m}) and C ({n}x{n}) realistic; {sweeps} ALS sweeps, "
        f"{repeats} interleaved rounds, {torch.get_num_threads()} threads")
    rows, summary = [], []
    for a_shape in shapes:
        m1, n1 = (int(v) for v in a_shape)
        m2, n2 = m // m1, n // n1
        for ratio in ratios:
            r = min(int(ratio * m * n / (m1 * n1 + m2 * n2)), m1 * n1, m2 * n2)
            fits: dict = {}
            fns = [functools.partial(_fit_into, fits, name, W, C, G, (m1, n1), r, sweeps)
                   for name in METHODS]
            seconds = dict(zip(METHODS, time_rounds(fns, repeats=repeats, warmup=0), strict=True))
            params = fits["two-sided"].num_params
            r_lr = low_rank_rank_for_budget(m, n, params)
            e_lr = relative_error(W, low_rank(W, r_lr, cov=C, gcov=G), cov=C, gcov=G)
            say(f"== a_shape ({m1}, {n1}), b_shape ({m2}, {n2}), rank {r} "
                f"({params / (m * n):.0%} of {m * n} parameters) ==")
            for name in METHODS:
                F = fits[name]
                info = F.info
                row = {"a_shape": [m1, n1], "b_shape": [m2, n2], "ratio": ratio, "rank": r,
                       "params": params, "method": name, "seconds": seconds[name],
                       "time_vs_one_sided": seconds[name] / seconds["one-sided"],
                       "fisher_error": relative_error(W, F, cov=C, gcov=G),
                       "output_error": relative_error(W, F, cov=C),
                       "lowrank_rank": r_lr, "lowrank_fisher_error": e_lr,
                       "route": info.get("als", info.get("method")),
                       "start": info.get("start"), "solver": info.get("solver"),
                       "preconditioner": info.get("preconditioner"), "sweeps": info.get("sweeps"),
                       "iterations": info.get("iterations"),
                       "cg_iterations": info.get("cg_iterations")}
                rows.append(row)
                say(f"  {name:22s} {row['seconds']:7.2f} s = {row['time_vs_one_sided']:5.2f}x "
                    f"one-sided; loss-aware error {row['fisher_error']:.4f}, output error "
                    f"{row['output_error']:.4f} ({row['route']}; start {row['start']}, "
                    f"{row['iterations']} sweeps {row['sweeps'] or ''}, solver {row['solver']}, "
                    f"preconditioner {row['preconditioner']})")
            say(f"  {'low rank (closed form)':22s} rank {r_lr}: loss-aware error {e_lr:.4f}")
            summary.append({"a_shape": [m1, n1], "ratio": ratio, "rank": r,
                            "two_sided_vs_one_sided": seconds["two-sided"] / seconds["one-sided"],
                            "no_warmup_vs_one_sided":
                                seconds["two-sided, no warm-up"] / seconds["one-sided"]})
    config = {"quick": quick, "m": m, "n": n, "shapes": [list(map(int, s)) for s in shapes],
              "ratios": list(ratios), "als_sweeps": sweeps, "repeats": repeats, "seed": seed,
              "weight": "power_law_matrix(exponent=0.5)", "covariances": "realistic_cov",
              "threads": torch.get_num_threads(), "numpy": np.__version__}
    return {"benchmark": NAME, "title": TITLE, "config": config, "rows": rows,
            "summary": summary, "wall_seconds": time.perf_counter() - t_start,
            "machine": machine_info("cpu", load_start=load_start)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="384 x 144, a_shape (8, 6) and (16, 1); prints only")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds (default 2)")
    ap.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS,
                    help=f"ALS sweeps (default {ALS_SWEEPS})")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result file (default data/results/{NAME}.json; --quick writes only with --out)")
    args = ap.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    if args.quick:
        result = measure(m=384, n=144, shapes=((8, 6), (16, 1)), sweeps=args.als_sweeps,
                         repeats=args.repeats, quick=True)
    else:
        result = measure(sweeps=args.als_sweeps, repeats=args.repeats)
    say(f"command: {result['machine']['command']}; wall time {result['wall_seconds']:.0f} s")
    out = args.out if args.out is not None or args.quick else results_dir() / f"{NAME}.json"
    if out is not None:
        write_atomic(out, json.dumps(result, indent=1) + "\n")
        say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

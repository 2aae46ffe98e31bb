"""Benchmark of the nearest-Kronecker solvers (a script, not a timed test).

(a) randomized vs exact SVD of R(W) for a 4096 x 4096 matrix, a_shape (64, 64), ranks 1-16;
(b) cost of the activation-aware ALS relative to the plain solver at that size;
(c) per-layer ALS time at SmolLM2-135M shapes at ~60% parameters kept, extrapolated to
    the model's 210 layers, and the effect of ``permute="variance"`` on the output error.

Regenerate ``data/results/bench_nkp.json`` (rows of the three parts with ``part`` "svd",
"als", "layers", the parts' targets, configuration and machine; read with
``kronlab.results.load_benchmark("bench_nkp")``) with::

    .venv/bin/python benchmarks/bench_nkp.py          # full size (minutes)
    .venv/bin/python benchmarks/bench_nkp.py --quick  # small sizes, does not write the file

The covariances are synthetic but realistic in the ways that matter: heavy-tailed channel
scales (exp of a Student-t), correlated channels with a decaying spectrum, far from
Kronecker. Timings are wall-clock on a shared machine: ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kronlab.defaults import ALS_SWEEPS, SEED, THREADS  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "bench_nkp"
TITLE = "nearest Kronecker solvers"
#: Targets: randomized SVD >= 20x faster than the exact one with |error difference| <= 1e-3;
#: ALS <= 5x the plain randomized solver; the whole model's ALS under 10 minutes.
TARGET_SPEEDUP, TARGET_ERROR_DIFF, TARGET_ALS_VS_RANDOMIZED, TARGET_MINUTES = 20, 1e-3, 5, 10
ALS_NOTE = ("(the one-time W C product and the covariance factorisation cost O(m n^2) and "
            "O(n^3)-ish, which no plain solver pays)")
MODEL_LAYERS = 210

SMOL = [  # name, (m, n), a_shape, layers per block
    ("q_proj/o_proj", (576, 576), (24, 24), 2),
    ("k_proj/v_proj", (192, 576), (12, 24), 2),
    ("gate/up_proj", (1536, 576), (32, 24), 2),
    ("down_proj", (576, 1536), (24, 48), 1),
]
BLOCKS = 30

__all__ = ["main", "measure"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def realistic_cov(n: int, rng) -> np.ndarray:
    """Heavy-tailed channel scales times a correlated, decaying-spectrum correlation."""
    d = np.exp(rng.standard_t(3, size=n).clip(-6, 6))
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 1.0 / np.arange(1, n + 1)
    S = (Q * lam) @ Q.T + 0.05 * lam.mean() * np.eye(n)
    return d[:, None] * S * d[None, :]


def decaying_kron_matrix(m: int, n: int, a_shape, rng, terms: int = 32) -> np.ndarray:
    """A weight-like matrix: a decaying sum of Kronecker products plus dense noise."""
    m1, n1 = a_shape
    m2, n2 = m // m1, n // n1
    A = rng.standard_normal((terms, m1 * n1)) * (0.85 ** np.arange(terms))[:, None]
    B = rng.standard_normal((terms, m2 * n2))
    R = A.T @ B / np.sqrt(m1 * n1 * m2 * n2)
    W = R.reshape(m1, n1, m2, n2).transpose(0, 2, 1, 3).reshape(m, n)
    return W + 0.02 * rng.standard_normal((m, n)) / np.sqrt(n)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def part_svd_als(size: int, a_shape, ranks, rng, sweeps: int):
    """Parts (a) and (b): returns ``(parts, rows)``."""
    import torch

    from kronlab import nearest_kronecker, relative_error

    a_shape = [int(v) for v in a_shape]
    say(f"== (a) randomized vs exact SVD of R(W): W {size}x{size}, a_shape {tuple(a_shape)} ==")
    W = torch.from_numpy(decaying_kron_matrix(size, size, a_shape, rng))
    exact, t_exact = timed(lambda: nearest_kronecker(W, a_shape, max(ranks), method="exact"))
    say(f"exact full SVD of R(W) ({size}x{size}): {t_exact:.2f} s (rank-independent; "
        "errors for smaller ranks from the same SVD)")
    rows, t_plain = [], {}
    for r in ranks:
        fast, t_fast = timed(lambda r=r: nearest_kronecker(W, a_shape, r, method="randomized"))
        t_plain[r] = t_fast
        e_fast = relative_error(W, fast)
        e_ex = relative_error(W, exact.truncate(r))
        ok = t_exact / t_fast >= TARGET_SPEEDUP and abs(e_fast - e_ex) <= TARGET_ERROR_DIFF
        rows.append({"part": "svd", "m": size, "n": size, "a_shape": a_shape, "rank": r,
                     "randomized_seconds": t_fast, "speedup": t_exact / t_fast,
                     "error_randomized": e_fast, "error_exact": e_ex, "error_diff": e_fast - e_ex,
                     "target_met": bool(ok)})
        say(f"  rank {r:2d}: randomized {t_fast:6.3f} s  speedup {t_exact / t_fast:7.1f}x  "
            f"rel.err {e_fast:.6f} vs exact {e_ex:.6f} (diff {e_fast - e_ex:+.1e})  "
            f"{'target met' if ok else 'TARGET MISSED'}")
    ok_all = all(row["target_met"] for row in rows)
    say(f"(a) target >= {TARGET_SPEEDUP}x and |err diff| <= {TARGET_ERROR_DIFF:g}: "
        f"{'met' if ok_all else 'NOT met'}")
    parts = {"svd": {"m": size, "n": size, "a_shape": a_shape, "exact_seconds": t_exact,
                     "target_speedup": TARGET_SPEEDUP, "target_error_diff": TARGET_ERROR_DIFF,
                     "target_met": ok_all}}

    say("")
    say(f"== (b) activation-aware ALS vs plain at {size}x{size}, a_shape {tuple(a_shape)} ==")
    C = torch.from_numpy(realistic_cov(size, rng))
    for r in ranks:
        F, t_als = timed(lambda r=r: nearest_kronecker(W, a_shape, r, cov=C, als_sweeps=sweeps,
                                                       tol=0))
        Fp = nearest_kronecker(W, a_shape, r, method="randomized")
        e_plain, e_als = relative_error(W, Fp, cov=C), relative_error(W, F, cov=C)
        ratio = t_als / t_plain[r]
        ok = ratio <= TARGET_ALS_VS_RANDOMIZED
        rows.append({"part": "als", "m": size, "n": size, "a_shape": a_shape, "rank": r,
                     "solver": F.info["solver"], "sweeps": F.info["iterations"],
                     "start": F.info["start"], "seconds": t_als, "time_vs_randomized": ratio,
                     "time_vs_exact": t_als / t_exact, "error_plain": e_plain, "error_als": e_als,
                     "target_met": bool(ok)})
        say(f"  rank {r:2d}: ALS ({F.info['solver']}, {F.info['iterations']} sweeps, start "
            f"{F.info['start']}) {t_als:6.2f} s = {ratio:5.1f}x plain randomized, "
            f"{t_als / t_exact:4.2f}x plain exact; output err plain {e_plain:.4f} -> ALS {e_als:.4f}  "
            + ("target met" if ok else f"TARGET (<={TARGET_ALS_VS_RANDOMIZED}x plain randomized) MISSED"))
    say("  " + ALS_NOTE)
    parts["als"] = {"m": size, "n": size, "a_shape": a_shape,
                    "target_time_vs_randomized": TARGET_ALS_VS_RANDOMIZED, "note": ALS_NOTE}
    return parts, rows


def part_layers(rng, keep: float, scale: int, sweeps: int):
    """Part (c): returns ``(parts, rows)``."""
    import torch

    from kronlab import low_rank, low_rank_rank_for_budget, nearest_kronecker, relative_error

    say("")
    say(f"== (c) per-layer ALS at SmolLM2-135M shapes, ~{keep:.0%} parameters kept, "
        f"{sweeps} sweeps ==")
    total, rows = 0.0, []
    for name, (m, n), (m1, n1), count in SMOL:
        m, n, m1, n1 = m // scale, n // scale, max(m1 // scale, 1), max(n1 // scale, 1)
        m2, n2 = m // m1, n // n1
        r = int(keep * m * n / (m1 * n1 + m2 * n2))
        W = torch.from_numpy(rng.standard_normal((m, n)) / np.sqrt(n))
        C = torch.from_numpy(realistic_cov(n, rng))
        a = (m1, n1)
        F, t = timed(lambda W=W, C=C, r=r, a=a: nearest_kronecker(W, a, r, cov=C,
                                                                   als_sweeps=sweeps, tol=0))
        Fv, tv = timed(lambda W=W, C=C, r=r, a=a: nearest_kronecker(
            W, a, r, cov=C, als_sweeps=sweeps, tol=0, permute="variance"))
        e_plain = relative_error(W, nearest_kronecker(W, a, r), cov=C)
        e_als, e_var = relative_error(W, F, cov=C), relative_error(W, Fv, cov=C)
        rl = low_rank_rank_for_budget(m, n, F.num_params)
        e_lr = relative_error(W, low_rank(W, rl, cov=C), cov=C)
        n_layers = count * BLOCKS
        total += n_layers * t
        rows.append({"part": "layers", "name": name, "m": m, "n": n, "a_shape": [m1, n1],
                     "rank": r, "params_fraction": F.num_params / (m * n),
                     "solver": F.info["solver"], "seconds": t, "n_layers": n_layers,
                     "error_plain": e_plain, "error_als": e_als, "error_als_variance": e_var,
                     "seconds_variance": tv, "lowrank_rank": rl, "error_lowrank": e_lr})
        say(f"  {name:14s} {m}x{n} a_shape ({m1},{n1}) rank {r:3d} "
            f"({F.num_params / (m * n):.0%} params, solver {F.info['solver']}): ALS {t:6.2f} s "
            f"(x{n_layers} layers)")
        say(f"      output err: plain {e_plain:.4f}, ALS {e_als:.4f}, ALS+permute=variance {e_var:.4f} "
            f"({tv:.2f} s), SVD-LLM low rank r={rl} {e_lr:.4f}")
    ok = total < 60 * TARGET_MINUTES
    say(f"(c) estimated whole model ({MODEL_LAYERS} layers): {total:.0f} s = {total / 60:.1f} min "
        f"(target < {TARGET_MINUTES} min: {'met' if ok else 'NOT met'})")
    parts = {"layers": {"keep": keep, "scale": scale, "sweeps": sweeps,
                        "model_layers": MODEL_LAYERS, "estimated_model_seconds": total,
                        "estimated_model_minutes": total / 60, "target_minutes": TARGET_MINUTES,
                        "target_met": ok}}
    return parts, rows


def measure(*, size: int = 4096, a_shape=(64, 64), ranks=(1, 4, 8, 16), keep: float = 0.6,
            scale: int = 1, sweeps: int = ALS_SWEEPS, seed: int = SEED, quick: bool = False) -> dict:
    """Run parts (a)-(c) and return the result file's dict.

    Keys: ``benchmark``, ``title``, ``config``, ``parts`` (per part: shapes, the one-off
    numbers such as the exact SVD's time, targets and whether they were met), ``rows``
    (one dict per measurement, ``part`` "svd", "als" or "layers"), ``wall_seconds`` and
    ``machine``. ``scale`` divides the SmolLM2 shapes of part (c).
    """
    import torch

    from kronlab.runtime import machine_info

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    say(f"kronlab benchmark: {TITLE}")
    parts, rows = part_svd_als(size, a_shape, list(ranks), rng, sweeps)
    more_parts, more_rows = part_layers(rng, keep, scale, sweeps)
    config = {"quick": quick, "size": size, "a_shape": [int(v) for v in a_shape],
              "ranks": [int(r) for r in ranks], "keep": keep, "scale": scale,
              "als_sweeps": sweeps, "tol": 0, "seed": seed, "threads": torch.get_num_threads()}
    return {"benchmark": NAME, "title": TITLE, "config": config, "parts": parts | more_parts,
            "rows": rows + more_rows, "wall_seconds": time.perf_counter() - t0,
            "machine": machine_info("cpu", load_start=load_start) | {"numpy": np.__version__}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (1024, a_shape (32, 32), SmolLM2 shapes / 4); prints only")
    ap.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS,
                    help=f"ALS sweeps of parts (b) and (c) (default {ALS_SWEEPS})")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result file (default data/results/{NAME}.json; --quick writes only "
                         "with --out)")
    args = ap.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    if args.quick:
        result = measure(size=1024, a_shape=(32, 32), scale=4, sweeps=args.als_sweeps, quick=True)
    else:
        result = measure(sweeps=args.als_sweeps)
    say(f"command: {result['machine']['command']}; wall time {result['wall_seconds']:.0f} s")
    out = args.out if args.out is not None or args.quick else results_dir() / f"{NAME}.json"
    if out is not None:
        write_atomic(out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

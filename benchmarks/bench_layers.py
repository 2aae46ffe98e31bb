"""Forward time of KronLinear and LowRankLinear against the dense nn.Linear.

For each layer shape (out x in) of SmolLM2-135M, and 4096 x 4096, and a few
(a_shape, rank) choices whose multiply-add count ranges from ~5% of the dense
layer's to more than it, time one forward of a (1, tokens, n) batch, and the
LowRankLinear with the same number of parameters. Reported per row:

- FLOP ratio ``layer_macs / dense_macs`` (multiply-adds per token),
- measured speed-up ``dense_time / layer_time``,
- realised fraction ``speed-up / (dense_macs / layer_macs)``: 1 means the layer
  runs as fast as its FLOP count promises relative to the dense GEMM.

Dense, Kronecker and low-rank layers are timed in interleaved rounds (so a
burst of load from other processes hits all three alike) and the median of the
rounds is reported. The timing code is :mod:`kronlab.benchmark` (the book's speed
chapter uses it too).

Regenerate ``data/results/bench_layers.json`` (rows, summary, configuration and
machine; read with ``kronlab.results.load_benchmark("bench_layers")``) with::

    .venv/bin/python benchmarks/bench_layers.py

OpenMP's wait policy is PASSIVE unless ``OMP_WAIT_POLICY`` is set (see
:func:`kronlab.runtime.configure_threads`); on a dedicated machine use
``OMP_WAIT_POLICY=active``.
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

from kronlab.defaults import SEED, THREADS  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "bench_layers"
TITLE = "KronLinear / LowRankLinear forward vs dense nn.Linear (F.linear), float32"
WARMUP = 3

__all__ = ["main", "measure", "report"]


def _notes(tokens: int, repeats: int, big_repeats: int) -> list[str]:
    return [
        (f"batch (1, {tokens}, n); median of {repeats} interleaved rounds "
         f"({big_repeats} for 4096x4096) after {WARMUP} warm-up rounds; input permutation and "
         "bias included."),
        ("params = layer params / dense weight params (bias excluded); FLOPs = layer "
         "multiply-adds / dense (m*n) per token;"),
        "speed-up = dense ms / layer ms; realised = speed-up / (dense MACs / layer MACs).",
        ("note: the CPU may be shared with other processes; timings are medians of "
         "interleaved rounds, so bursts hit dense and factored layers alike."),
    ]


def measure(cases=None, *, tokens: int = 2048, repeats: int = 15, device: str = "cpu",
            seed: int = SEED, on_row=None) -> dict:
    """Run :func:`kronlab.benchmark.run_benchmark` and return the result file's dict.

    Keys: ``benchmark``, ``title``, ``config``, ``notes``, ``rows`` (one dict per layer,
    see :func:`kronlab.benchmark.bench_case`), ``summary`` (:func:`kronlab.benchmark.summarize`),
    ``wall_seconds`` and ``machine`` (:func:`kronlab.runtime.machine_info`).
    """
    import torch

    from kronlab.benchmark import CASES, run_benchmark, summarize
    from kronlab.runtime import machine_info

    cases = CASES if cases is None else cases
    cases = [[int(m), int(n), [int(a) for a in a_shape], [int(r) for r in ranks]]
             for m, n, a_shape, ranks in cases]
    big_repeats = max(5, repeats // 3)  # run_benchmark's rounds for layers over 4M weights
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rows = run_benchmark([(m, n, tuple(a), r) for m, n, a, r in cases], tokens=tokens,
                         repeats=repeats, big_repeats=big_repeats, device=device, seed=seed,
                         on_row=on_row)
    wall = time.perf_counter() - t0
    config = {"device": str(device), "dtype": "float32", "tokens": tokens, "repeats": repeats,
              "big_repeats": big_repeats, "warmup": WARMUP, "seed": seed,
              "threads": torch.get_num_threads(), "cases": cases}
    return {"benchmark": NAME, "title": TITLE, "config": config,
            "notes": _notes(tokens, repeats, big_repeats), "rows": rows,
            "summary": summarize(rows), "wall_seconds": wall,
            "machine": machine_info(device, load_start=load_start)}


def report(result: dict) -> str:
    """The readable table and summary of a result dict (what the script prints)."""
    from kronlab.benchmark import HEADER, format_row

    s = result["summary"]
    return "\n".join([
        result["title"], *result["notes"][:3], "", HEADER,
        *(format_row(r) for r in result["rows"]), "",
        (f"Kronecker layers with FLOP ratio < 1 realising at least half of it as speed-up: "
         f"{s['meets_half']} of {s['n']}."),
        f"median realised fraction, Kronecker layers with FLOP ratio < 1: {s['median_realised']:.2f}",
        f"benchmark wall time: {result['wall_seconds']:.0f} s",
        f"command: {result['machine']['command']}",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--out", type=Path, default=results_dir() / f"{NAME}.json",
                   help=f"result file (default data/results/{NAME}.json)")
    args = p.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    import torch

    from kronlab.benchmark import HEADER, format_row

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    print(HEADER, flush=True)
    result = measure(tokens=args.tokens, repeats=args.repeats, device=args.device,
                     on_row=lambda r: print(format_row(r), flush=True))
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(report(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

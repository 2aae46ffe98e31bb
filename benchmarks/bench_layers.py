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
rounds is reported.

Regenerate ``data/results/bench_layers.txt`` with::

    .venv/bin/python benchmarks/bench_layers.py
"""

from __future__ import annotations

import os

# The timing code lives in kronlab.benchmark (the book's speed chapter uses it too).
# On a shared CPU, OpenMP threads that spin while waiting at barriers steal the
# core from a descheduled team mate: with the machine oversubscribed, many
# small parallel products (the Kronecker layer) then run 10-100x slower. A
# passive wait policy avoids that; it must be set before torch loads OpenMP.
# Override with OMP_WAIT_POLICY=active on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import time
from pathlib import Path

import torch

from kronlab._paths import write_atomic
from kronlab.benchmark import CASES, HEADER, format_row, machine_info, run_benchmark, summarize

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "data" / "results" / "bench_layers.txt"

__all__ = ["CASES", "main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"result file (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    rows = run_benchmark(CASES, tokens=args.tokens, repeats=args.repeats, device=device,
                         on_row=lambda r: print(format_row(r), flush=True))
    elapsed = time.perf_counter() - t0

    summary = summarize(rows)
    lines = [
        "KronLinear / LowRankLinear forward vs dense nn.Linear (F.linear), float32",
        (f"batch (1, {args.tokens}, n); median of {args.repeats} interleaved rounds "
         f"(5 for 4096x4096) after 3 warm-up rounds; input permutation and bias included."),
        ("params = layer params / dense weight params (bias excluded); FLOPs = layer "
         "multiply-adds / dense (m*n) per token;"),
        "speed-up = dense ms / layer ms; realised = speed-up / (dense MACs / layer MACs).",
        "",
        HEADER,
        *(format_row(r) for r in rows),
        "",
        (f"Kronecker layers with FLOP ratio < 1 realising at least half of it as speed-up: "
         f"{summary['meets_half']} of {summary['n']} (target from the issue: all)."),
        (f"median realised fraction, Kronecker layers with FLOP ratio < 1: "
         f"{summary['median_realised']:.2f}"),
        "",
        *machine_info(device, torch.get_num_threads(), load_start),
        f"benchmark wall time: {elapsed:.0f} s",
        "command: .venv/bin/python benchmarks/bench_layers.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    ]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines[-13:]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

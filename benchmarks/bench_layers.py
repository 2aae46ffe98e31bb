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

# On a shared CPU, OpenMP threads that spin while waiting at barriers steal the
# core from a descheduled team mate: with the machine oversubscribed, many
# small parallel products (the Kronecker layer) then run 10-100x slower. A
# passive wait policy avoids that; it must be set before torch loads OpenMP.
# Override with OMP_WAIT_POLICY=active on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kronlab._factors import KronFactors
from kronlab.layers import KronLinear, LowRankLinear

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "data" / "results" / "bench_layers.txt"

# (out, in, a_shape, ranks): ranks chosen so the FLOP ratio spans ~0.05 .. > 1.
CASES = [
    (576, 576, (24, 24), [1, 4, 8, 16]),
    (192, 576, (12, 24), [1, 4, 12]),
    (1536, 576, (32, 24), [1, 4, 8, 20]),
    (576, 1536, (24, 32), [1, 4, 8, 20]),
    (4096, 4096, (64, 64), [2, 8, 16, 40]),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_rounds(fns, device, repeats, warmup=3):
    """Median seconds of each function, timed in interleaved rounds."""
    for _ in range(warmup):
        for f in fns:
            f()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def run(device: torch.device, tokens: int, repeats: int, seed: int = 0) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    for m, n, (m1, n1), ranks in CASES:
        m2, n2 = m // m1, n // n1
        W = torch.randn(m, n, generator=g).div_(n ** 0.5).to(device)
        bias = torch.randn(m, generator=g).to(device)
        x = torch.randn(1, tokens, n, generator=g).to(device)
        dense_macs = m * n
        reps = max(5, repeats // 3) if m * n > 4_000_000 else repeats
        for r in ranks:
            f = KronFactors(torch.randn(r, m1, n1, generator=g), torch.randn(r, m2, n2, generator=g),
                            torch.randperm(n, generator=g))
            kron = KronLinear.from_factors(f, bias.cpu(), dtype=torch.float32).to(device)
            lr_rank = max(1, round(kron.num_params / (m + n)))
            low = LowRankLinear(lr_rank, n, m, dtype=torch.float32).to(device)
            with torch.no_grad():
                # sanity: the Kronecker layer computes F.linear with its dense weight
                ref = F.linear(x[:, :64], kron.to_dense(), kron.bias)
                err = ((kron(x[:, :64]) - ref).norm() / ref.norm()).item()
                assert err < 1e-4, f"KronLinear disagrees with its dense weight: {err:.2e}"
                td, tk, tl = _time_rounds(
                    [lambda x=x, W=W, b=bias: F.linear(x, W, b), lambda x=x, k=kron: k(x),
                     lambda x=x, lo=low: lo(x)], device, reps)
            for name, desc, t, mod in [("kron", f"a={m1}x{n1} r={r} {kron.order}", tk, kron),
                                       ("lowrank", f"r={lr_rank}", tl, low)]:
                ratio = mod.forward_macs / dense_macs
                speedup = td / t
                rows.append({"shape": f"{m}x{n}", "layer": name, "config": desc,
                             "params_ratio": (mod.num_params - m) / (m * n),
                             "flop_ratio": ratio, "dense_ms": td * 1e3, "layer_ms": t * 1e3,
                             "speedup": speedup, "realised": speedup * ratio})
            print(_format_row(rows[-2]), flush=True)
            print(_format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'shape':>10} {'layer':>8} {'config':>26} {'params':>7} {'FLOPs':>7} "
          f"{'dense ms':>9} {'layer ms':>9} {'speed-up':>9} {'realised':>9}")


def _format_row(r: dict) -> str:
    return (f"{r['shape']:>10} {r['layer']:>8} {r['config']:>26} {r['params_ratio']:7.3f} "
            f"{r['flop_ratio']:7.3f} {r['dense_ms']:9.2f} {r['layer_ms']:9.2f} "
            f"{r['speedup']:9.2f} {r['realised']:9.2f}")


def _machine_info(device: torch.device, threads: int, load_start=None) -> list[str]:
    lines = [
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"platform: {platform.platform()}; python {platform.python_version()}",
        f"processor: {_cpu_name()}; logical cores: {os.cpu_count()}; torch threads: {threads}",
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"torch: {torch.__version__}; device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    if load_start is not None:
        lines.append("load average at start (1, 5, 15 min): "
                     + ", ".join(f"{v:.2f}" for v in load_start))
    if hasattr(os, "getloadavg"):
        lines.append("load average at end (1, 5, 15 min): "
                     + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    lines.append("note: the CPU may be shared with other processes; timings are medians of "
                 "interleaved rounds, so bursts hit dense and factored layers alike.")
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    rows = run(device, args.tokens, args.repeats)
    elapsed = time.perf_counter() - t0

    kron = [r for r in rows if r["layer"] == "kron" and r["flop_ratio"] < 1]
    meets = sum(r["realised"] >= 0.5 for r in kron)
    lines = [
        "KronLinear / LowRankLinear forward vs dense nn.Linear (F.linear), float32",
        (f"batch (1, {args.tokens}, n); median of {args.repeats} interleaved rounds "
         f"(5 for 4096x4096) after 3 warm-up rounds; input permutation and bias included."),
        ("params = layer params / dense weight params (bias excluded); FLOPs = layer "
         "multiply-adds / dense (m*n) per token;"),
        "speed-up = dense ms / layer ms; realised = speed-up / (dense MACs / layer MACs).",
        "",
        HEADER,
        *(_format_row(r) for r in rows),
        "",
        (f"Kronecker layers with FLOP ratio < 1 realising at least half of it as speed-up: "
         f"{meets} of {len(kron)} (target from the issue: all)."),
        (f"median realised fraction, Kronecker layers with FLOP ratio < 1: "
         f"{statistics.median(r['realised'] for r in kron):.2f}"),
        "",
        *_machine_info(device, torch.get_num_threads(), load_start),
        f"benchmark wall time: {elapsed:.0f} s",
        "command: .venv/bin/python benchmarks/bench_layers.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    ]
    _write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines[-13:]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

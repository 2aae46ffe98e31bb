"""Forward time and weight memory of factored layers against the dense ``nn.Linear``.

The timing core shared by ``benchmarks/bench_layers.py`` (which records
``data/results/bench_layers.json``, read with :func:`kronlab.results.load_benchmark`) and
the book's speed chapter. For a layer
shape ``m x n`` (out x in), a Kronecker factor shape ``a_shape = (m1, n1)`` and a
rank ``r``, :func:`bench_case` times one forward of a ``(1, tokens, n)`` batch
through the dense layer (``F.linear``), a :class:`~kronlab.layers.KronLinear`
with random factors and an input permutation, and the
:class:`~kronlab.layers.LowRankLinear` with the same number of parameters, and
reports per factored layer

- FLOP ratio ``layer_macs / dense_macs`` (multiply-adds per token, ``dense = m n``),
- measured speed-up ``dense_time / layer_time``,
- realised fraction ``speed-up * FLOP ratio``: 1 means the layer runs as fast as
  its multiply-add count promises relative to the dense GEMM.

The three layers are timed in interleaved rounds (:func:`kronlab.runtime.time_rounds`),
so a burst of load from other processes hits all of them alike, and medians are reported.

On a shared CPU, call :func:`kronlab.runtime.configure_threads` before torch is imported:
OpenMP threads spinning at barriers steal the core from a descheduled team mate and make
many small parallel products (the Kronecker layer) 10-100x slower.

>>> rows = bench_case(64, 96, (8, 8), 2, tokens=32, repeats=1, warmup=1)
>>> [r["layer"] for r in rows], rows[0]["flop_ratio"] == rows[0]["layer_macs"] / (64 * 96)
(['kron', 'lowrank'], True)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ._factors import KronFactors
from ._rearrange import check_a_shape
from .layers import KronLinear, LowRankLinear
from .runtime import time_rounds

__all__ = [
    "CASES",
    "HEADER",
    "bench_case",
    "format_row",
    "run_benchmark",
    "summarize",
    "weight_bytes",
]

# (out, in, a_shape, ranks) of SmolLM2-135M's layer shapes and a 4096 x 4096 layer;
# ranks chosen so the Kronecker FLOP ratio spans ~0.05 .. > 1.
CASES = [
    (576, 576, (24, 24), [1, 4, 8, 16]),
    (192, 576, (12, 24), [1, 4, 12]),
    (1536, 576, (32, 24), [1, 4, 8, 20]),
    (576, 1536, (24, 32), [1, 4, 8, 20]),
    (4096, 4096, (64, 64), [2, 8, 16, 40]),
]

HEADER = (f"{'shape':>10} {'layer':>8} {'config':>26} {'params':>7} {'FLOPs':>7} "
          f"{'dense ms':>9} {'layer ms':>9} {'speed-up':>9} {'realised':>9}")


def weight_bytes(module: torch.nn.Module) -> dict:
    """Bytes a layer stores: floating parameters, bias, and integer buffers (the permutation).

    Returns ``{"params": n, "weight_bytes": b, "bias_bytes": b, "index_bytes": b,
    "total_bytes": b}``; ``params`` counts the weight parameters (bias excluded).
    For ``nn.Linear`` this is ``m n`` numbers, for ``KronLinear`` ``r (m1 n1 + m2 n2)``
    plus ``n`` int64 indices of the permutation, for ``LowRankLinear`` ``r (m + n)``.
    """
    out = {"params": 0, "weight_bytes": 0, "bias_bytes": 0, "index_bytes": 0}
    for name, p in module.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "bias":
            out["bias_bytes"] += nbytes
        else:
            out["params"] += p.numel()
            out["weight_bytes"] += nbytes
    for _, b in module.named_buffers():
        if b is not None:
            out["index_bytes"] += b.numel() * b.element_size()
    out["total_bytes"] = out["weight_bytes"] + out["bias_bytes"] + out["index_bytes"]
    return out


def bench_case(m: int, n: int, a_shape, rank: int, *, tokens: int = 2048, repeats: int = 15,
               warmup: int = 3, device="cpu", generator: torch.Generator | None = None,
               dense: tuple | None = None, check: bool = True) -> list[dict]:
    """Time dense, Kronecker (``rank`` terms of ``a_shape``) and equal-parameter low-rank layers.

    Shapes: dense weight (m, n), ``A_i`` (m1, n1), ``B_i`` (m/m1, n/n1), input
    (1, tokens, n). The low-rank layer has rank ``max(1, round(kron params / (m + n)))``.
    ``dense`` may pass ``(W, bias, x)`` to reuse one weight and batch across ranks.
    With ``check``, the Kronecker layer is first compared with ``F.linear`` of its
    dense weight (relative error below 1e-4, else ``AssertionError``).

    Returns two rows (dicts), ``layer`` "kron" and "lowrank", with ``shape`` ("m x n"
    as text), ``m``, ``n``, ``a_shape`` ([m1, n1]; None for low rank), ``rank``, ``order``
    (the Kronecker layer's product order, None for low rank), ``config`` (a short text of
    a_shape, rank and order), ``params_ratio`` (layer weight params / (m n)), ``layer_macs``,
    ``flop_ratio``, ``dense_ms``, ``layer_ms``, ``speedup``, ``realised``, ``params``,
    ``weight_bytes`` and ``total_bytes``.
    """
    device = torch.device(device)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    m1, n1, m2, n2 = check_a_shape((m, n), a_shape)
    if dense is None:
        W = torch.randn(m, n, generator=g).div_(n ** 0.5).to(device)
        bias = torch.randn(m, generator=g).to(device)
        x = torch.randn(1, tokens, n, generator=g).to(device)
    else:
        W, bias, x = dense
    f = KronFactors(torch.randn(rank, m1, n1, generator=g), torch.randn(rank, m2, n2, generator=g),
                    torch.randperm(n, generator=g))
    kron = KronLinear.from_factors(f, bias.cpu(), dtype=torch.float32).to(device)
    lr_rank = max(1, round(kron.num_params / (m + n)))
    low = LowRankLinear(lr_rank, n, m, dtype=torch.float32).to(device)
    with torch.no_grad():
        if check:
            ref = F.linear(x[:, :64], kron.to_dense(), kron.bias)
            err = ((kron(x[:, :64]) - ref).norm() / ref.norm()).item()
            assert err < 1e-4, f"KronLinear disagrees with its dense weight: {err:.2e}"
        td, tk, tl = time_rounds(
            [lambda: F.linear(x, W, bias), lambda: kron(x), lambda: low(x)],
            repeats=repeats, warmup=warmup, device=device)
    rows = []
    for name, desc, t, mod, a, r, order in [
            ("kron", f"a={m1}x{n1} r={rank} {kron.order}", tk, kron, [m1, n1], rank, kron.order),
            ("lowrank", f"r={lr_rank}", tl, low, None, lr_rank, None)]:
        ratio = mod.forward_macs / (m * n)
        mem = weight_bytes(mod)
        rows.append({"shape": f"{m}x{n}", "m": m, "n": n, "layer": name, "a_shape": a,
                     "rank": r, "order": order, "config": desc,
                     "params_ratio": (mod.num_params - m) / (m * n),
                     "layer_macs": mod.forward_macs, "flop_ratio": ratio,
                     "dense_ms": td * 1e3, "layer_ms": t * 1e3,
                     "speedup": td / t, "realised": td / t * ratio,
                     "params": mem["params"], "weight_bytes": mem["weight_bytes"],
                     "total_bytes": mem["total_bytes"]})
    return rows


def run_benchmark(cases: Iterable = CASES, *, tokens: int = 2048, repeats: int = 15,
                  big_repeats: int | None = None, big_size: int = 4_000_000, device="cpu",
                  seed: int = 0, on_row: Callable[[dict], None] | None = None,
                  progress: bool = False) -> list[dict]:
    """:func:`bench_case` for every ``(m, n, a_shape, ranks)`` of ``cases``.

    Layers with more than ``big_size`` weights are timed ``big_repeats`` rounds
    (default ``max(5, repeats // 3)``). ``on_row`` is called with each row as it
    is measured (the script prints them). Returns all rows, kron and low-rank
    alternating.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    cases = [(int(m), int(n), tuple(a), [int(r) for r in ranks]) for m, n, a, ranks in cases]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(c[3]) for c in cases), desc="layers", leave=False)
    rows: list[dict] = []
    for m, n, a_shape, ranks in cases:
        W = torch.randn(m, n, generator=g).div_(n ** 0.5).to(device)
        bias = torch.randn(m, generator=g).to(device)
        x = torch.randn(1, tokens, n, generator=g).to(device)
        reps = repeats
        if m * n > big_size:
            reps = big_repeats if big_repeats is not None else max(5, repeats // 3)
        for r in ranks:
            new = bench_case(m, n, a_shape, r, tokens=tokens, repeats=reps, device=device,
                             generator=g, dense=(W, bias, x))
            rows.extend(new)
            if on_row is not None:
                for row in new:
                    on_row(row)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows


def format_row(r: dict) -> str:
    """One fixed-width line of the result table (columns of :data:`HEADER`)."""
    return (f"{r['shape']:>10} {r['layer']:>8} {r['config']:>26} {r['params_ratio']:7.3f} "
            f"{r['flop_ratio']:7.3f} {r['dense_ms']:9.2f} {r['layer_ms']:9.2f} "
            f"{r['speedup']:9.2f} {r['realised']:9.2f}")


def summarize(rows: Iterable[dict]) -> dict:
    """Realised fractions of the Kronecker rows with FLOP ratio < 1.

    Returns ``{"n": rows, "meets_half": rows realising >= 0.5, "median_realised",
    "min_realised", "max_realised"}`` (NaN statistics when there are none).
    """
    k = [r["realised"] for r in rows if r["layer"] == "kron" and r["flop_ratio"] < 1]
    nan = float("nan")
    return {"n": len(k), "meets_half": sum(v >= 0.5 for v in k),
            "median_realised": statistics.median(k) if k else nan,
            "min_realised": min(k) if k else nan, "max_realised": max(k) if k else nan}

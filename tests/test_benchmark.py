"""The timing core shared by benchmarks/bench_layers.py and the speed chapter."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kronlab import benchmark
from kronlab.layers import KronLinear, LowRankLinear

ROOT = Path(__file__).resolve().parents[1]


def test_time_rounds_interleaves_and_returns_medians():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    t = benchmark.time_rounds(fns, repeats=4, warmup=2)
    assert len(t) == 3 and all(v >= 0 for v in t)
    # warm-up and timed rounds call the functions in turn, never one after itself
    assert calls == [0, 1, 2] * 6


def test_time_rounds_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        benchmark.time_rounds([lambda: None], repeats=0)


@pytest.mark.parametrize("m,n,a_shape,rank", [(24, 36, (4, 6), 1), (48, 32, (6, 4), 3)])
def test_weight_bytes_counts_exact_parameters(m, n, a_shape, rank):
    (m1, n1) = a_shape
    m2, n2 = m // m1, n // n1
    kron = KronLinear(rank, a_shape, (m2, n2), permuted=True)
    mem = benchmark.weight_bytes(kron)
    assert mem["params"] == rank * (m1 * n1 + m2 * n2)
    assert mem["weight_bytes"] == 4 * mem["params"]
    assert mem["bias_bytes"] == 4 * m and mem["index_bytes"] == 8 * n
    assert mem["total_bytes"] == mem["weight_bytes"] + mem["bias_bytes"] + mem["index_bytes"]
    low = benchmark.weight_bytes(LowRankLinear(rank, n, m, bias=False))
    assert low["params"] == rank * (m + n) and low["bias_bytes"] == 0
    dense = benchmark.weight_bytes(nn.Linear(n, m, dtype=torch.float64))
    assert dense["weight_bytes"] == 8 * m * n


@pytest.mark.parametrize("seed", [0, 1])
def test_bench_case_rows_are_consistent(seed):
    g = torch.Generator().manual_seed(seed)
    rows = benchmark.bench_case(32, 48, (4, 6), 2, tokens=40, repeats=2, warmup=1, generator=g)
    kron, low = rows
    assert kron["layer"] == "kron" and low["layer"] == "lowrank"
    assert kron["params"] == 2 * (4 * 6 + 8 * 8)
    # equal-parameter low-rank layer: rank = round(kron params (with bias) / (m + n))
    assert low["config"] == f"r={max(1, round((kron['params'] + 32) / 80))}"
    for r in rows:
        assert math.isclose(r["flop_ratio"], r["layer_macs"] / (32 * 48))
        assert math.isclose(r["speedup"], r["dense_ms"] / r["layer_ms"])
        assert math.isclose(r["realised"], r["speedup"] * r["flop_ratio"])
    assert "\n" not in benchmark.format_row(kron)
    assert len(benchmark.format_row(kron)) == len(benchmark.HEADER)


def test_bench_case_rejects_non_dividing_shape():
    with pytest.raises(ValueError, match="divide"):
        benchmark.bench_case(30, 48, (4, 6), 1, tokens=8, repeats=1)


def test_run_benchmark_and_summary():
    seen = []
    rows = benchmark.run_benchmark([(16, 24, (4, 4), [1, 2])], tokens=20, repeats=1,
                                   on_row=seen.append)
    assert rows == seen and [r["layer"] for r in rows] == ["kron", "lowrank"] * 2
    s = benchmark.summarize(rows)
    kron = [r for r in rows if r["layer"] == "kron" and r["flop_ratio"] < 1]
    assert s["n"] == len(kron)
    assert s["meets_half"] == sum(r["realised"] >= 0.5 for r in kron)


def test_parse_recorded_file_round_trips(tmp_path):
    rows = benchmark.run_benchmark([(16, 24, (4, 4), [1])], tokens=20, repeats=1)
    text = "\n".join(["title line", "", benchmark.HEADER,
                      *(benchmark.format_row(r) for r in rows), "",
                      "median realised fraction, Kronecker layers with FLOP ratio < 1: 0.50", "",
                      *benchmark.machine_info(), "command: python x.py"])
    path = tmp_path / "b.txt"
    path.write_text(text + "\n")
    parsed, meta = benchmark.parse_bench_file(path)
    assert [r["layer"] for r in parsed] == ["kron", "lowrank"]
    assert parsed[0]["config"] == rows[0]["config"]
    assert math.isclose(parsed[1]["flop_ratio"], rows[1]["flop_ratio"], abs_tol=1e-3)
    assert meta["header"] == ["title line"] and meta["command"] == "python x.py"
    assert "torch" in meta["machine"] and "OMP_WAIT_POLICY" in meta["machine"]


def test_parse_the_recorded_benchmark():
    path = ROOT / "data" / "results" / "bench_layers.txt"
    if not path.exists():
        pytest.skip("no recorded benchmark")
    rows, meta = benchmark.parse_bench_file(path)
    assert {r["layer"] for r in rows} == {"kron", "lowrank"}
    assert "processor" in meta["machine"]


def test_parse_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench_layers.py"):
        benchmark.parse_bench_file(tmp_path / "nope.txt")


def test_parse_compress_bench(tmp_path):
    f = tmp_path / "bench_compress.txt"
    f.write_text("kronlab benchmark: whole-model compression time, SmolLM2-135M\n"
                 "210 layers; calibration 8192 SOTU tokens\n\n"
                 "kron-aa  total   612.5 s  (q_proj 40.1 s (30, mean 1.34), down_proj 300.0 s (30, mean 10.00))\n"
                 "svd-aa   total    20.0 s  (q_proj 2.0 s (30, mean 0.07))\n"
                 "kron-aa / svd-aa time: 30.6x\n")
    runs, other = benchmark.parse_compress_bench(f)
    assert list(runs) == ["kron-aa", "svd-aa"]
    assert runs["kron-aa"]["total"] == 612.5
    assert runs["kron-aa"]["types"] == {"q_proj": (40.1, 30), "down_proj": (300.0, 30)}
    assert other[-1] == "kron-aa / svd-aa time: 30.6x"
    with pytest.raises(FileNotFoundError, match="bench_compress.py"):
        benchmark.parse_compress_bench(tmp_path / "nope.txt")
    f.write_text("nothing here\n")
    with pytest.raises(ValueError, match="bench_compress.py"):
        benchmark.parse_compress_bench(f)

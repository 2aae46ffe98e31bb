"""The benchmarks: kronlab.benchmark's timing core, and the structured JSON each
benchmark script writes (run here on tiny sizes), read back with kronlab.results."""

import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kronlab import benchmark, results
from kronlab.layers import KronLinear, LowRankLinear
from kronlab.runtime import time_rounds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

MACHINE_KEYS = {"command", "date_utc", "processor", "torch_threads", "omp_wait_policy", "torch",
                "load_start", "load_end"}


def _script(path: str):
    """Import a benchmark or script file as a module (they are not a package)."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _round_trip(result, tmp_path, name):
    """Write a result as the script does and read it back through kronlab.results."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    back = results.load_benchmark(name, path)
    assert back["rows"] == json.loads(json.dumps(result["rows"]))
    return back


def test_time_rounds_interleaves_the_functions():
    """The benchmarks time with kronlab.runtime.time_rounds: warm-up and timed rounds call
    the functions in turn, never one after itself, and one median comes back per function."""
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    t = time_rounds(fns, repeats=4, warmup=2)
    assert len(t) == 3
    assert calls == [0, 1, 2] * 6


def test_time_rounds_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_rounds([lambda: None], repeats=0)


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
    assert (kron["m"], kron["n"], kron["a_shape"], kron["rank"]) == (32, 48, [4, 6], 2)
    assert kron["order"] in ("a_first", "b_first") and low["order"] is None
    assert kron["config"] == f"a=4x6 r=2 {kron['order']}"
    assert kron["params"] == 2 * (4 * 6 + 8 * 8)
    # equal-parameter low-rank layer: rank = round(kron params (with bias) / (m + n))
    assert low["rank"] == max(1, round((kron["params"] + 32) / 80))
    assert low["config"] == f"r={low['rank']}" and low["params"] == low["rank"] * 80
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


# ----------------------------------------------------------------------------- the scripts' JSON

def test_bench_layers_writes_structured_rows(tmp_path):
    mod = _script("benchmarks/bench_layers.py")
    cases = [(16, 24, (4, 4), [1, 2]), (24, 16, (4, 2), [1])]
    res = mod.measure(cases, tokens=20, repeats=1)
    back = _round_trip(res, tmp_path, "bench_layers")
    assert back["config"]["cases"] == [[16, 24, [4, 4], [1, 2]], [24, 16, [4, 2], [1]]]
    assert back["config"]["tokens"] == 20 and back["config"]["threads"] == torch.get_num_threads()
    rows = back["rows"]
    assert [(r["m"], r["n"], r["layer"]) for r in rows] == (
        [(16, 24, "kron"), (16, 24, "lowrank")] * 2 + [(24, 16, "kron"), (24, 16, "lowrank")])
    assert [r["rank"] for r in rows if r["layer"] == "kron"] == [1, 2, 1]
    assert rows[4]["a_shape"] == [4, 2] and rows[5]["a_shape"] is None
    assert back["summary"] == json.loads(json.dumps(benchmark.summarize(res["rows"])))
    assert MACHINE_KEYS <= set(back["machine"])
    assert shlex.quote(sys.argv[0]) in back["machine"]["command"]  # the command that ran
    text = mod.report(res)
    assert benchmark.HEADER in text and all(benchmark.format_row(r) in text for r in rows)


def test_bench_nkp_writes_structured_rows(tmp_path):
    mod = _script("benchmarks/bench_nkp.py")
    res = mod.measure(size=48, a_shape=(6, 8), ranks=(1, 3), scale=12, sweeps=2)
    back = _round_trip(res, tmp_path, "bench_nkp")
    rows = {p: [r for r in back["rows"] if r["part"] == p] for p in ("svd", "als", "layers")}
    assert [r["rank"] for r in rows["svd"]] == [1, 3] == [r["rank"] for r in rows["als"]]
    assert len(rows["layers"]) == len(mod.SMOL)
    svd = back["parts"]["svd"]
    for r in rows["svd"]:
        assert (r["m"], r["n"], r["a_shape"]) == (48, 48, [6, 8])
        assert r["speedup"] == pytest.approx(svd["exact_seconds"] / r["randomized_seconds"])
        # the exact SVD is the optimum (Eckart-Young): the randomized one is never better
        assert r["error_randomized"] >= r["error_exact"] - 1e-12
        assert r["error_diff"] == pytest.approx(r["error_randomized"] - r["error_exact"])
        assert r["target_met"] == (r["speedup"] >= 20 and abs(r["error_diff"]) <= 1e-3)
    assert svd["target_met"] == all(r["target_met"] for r in rows["svd"])
    for r in rows["als"]:
        assert r["sweeps"] == 2 and r["start"] in ("plain", "kronecker")
        # ALS starts from the better of the plain and Kronecker-covariance fits and descends
        assert r["error_als"] <= r["error_plain"] * (1 + 1e-6)
        assert r["target_met"] == (r["time_vs_randomized"] <= 5)
    layers = back["parts"]["layers"]
    assert layers["estimated_model_seconds"] == pytest.approx(
        sum(r["n_layers"] * r["seconds"] for r in rows["layers"]))
    assert sum(r["n_layers"] for r in rows["layers"]) == layers["model_layers"] == 210
    for r in rows["layers"]:
        m1, n1 = r["a_shape"]
        per = m1 * n1 + (r["m"] // m1) * (r["n"] // n1)
        assert r["params_fraction"] == pytest.approx(r["rank"] * per / (r["m"] * r["n"]))
    assert back["config"]["als_sweeps"] == 2 and MACHINE_KEYS <= set(back["machine"])


def test_bench_compress_writes_structured_rows(tmp_path):
    from tiny_model import tiny_llama

    mod = _script("benchmarks/bench_compress.py")
    model, tok = tiny_llama(seed=0)
    seen = []
    res = mod.measure(model, tok, methods=["kron-aa", "svd"], calib_text="some plain words " * 80,
                      calib_tokens=64, seq_len=32, model_name="tiny-llama",
                      on_method=lambda m, rows, t: seen.append(m))
    back = _round_trip(res, tmp_path, "bench_compress")
    assert seen == ["kron-aa", "svd"] == list(back["totals"])
    assert back["n_layers"] == 14 and back["config"]["model"] == "tiny-llama"
    for method, total in back["totals"].items():
        rows = [r for r in back["rows"] if r["method"] == method]
        assert {r["layer_type"] for r in rows} == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        assert sum(r["n_layers"] for r in rows) == 14
        assert sum(r["seconds"] for r in rows) <= total
        for r in rows:
            assert r["mean_seconds"] == pytest.approx(r["seconds"] / r["n_layers"])
    s = back["summary"]
    assert s["kron_aa_seconds"] == back["totals"]["kron-aa"]
    assert s["time_ratios"] == {}  # neither svd-aa nor kron ran
    assert s["target_met"] == (s["kron_aa_seconds"] < 600)
    assert MACHINE_KEYS <= set(back["machine"])
    assert "kron-aa" in mod.report(res) and "svd" in mod.report(res)


def test_bench_compress_rejects_unknown_method():
    mod = _script("benchmarks/bench_compress.py")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--methods", "kron", "nope", "--threads", str(torch.get_num_threads())])
    assert exc.value.code == 2

"""kronlab.results: the one reader of data/results; the sweep tables; the lossless
conversion of the benchmark text files of commit c61dfc0 into JSON."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kronlab import defaults, results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "data" / "results"
sys.path.insert(0, str(Path(__file__).parent))


def _script(path: str):
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- sweeps

def _fake_sweep():
    def run(method, ratio, ew, ey, ppl, macs=None):
        return {"method": method, "ratio": ratio, "macs_ratio": macs, "compress_seconds": 1.0,
                "report": {"summary": {"model_params_kept": ratio, "layer_params_kept": ratio,
                                       "macs_kept": ratio, "mean_weight_error": ew,
                                       "mean_output_error": ey, "seconds": 1.0},
                           "config": {}, "layers": []},
                "ppl": {"sotu": {"perplexity": ppl}}, "sample": "x"}
    return {"config": {}, "environment": {},
            "dense": {"sotu": {"perplexity": 10.0}, "sample": "y", "parameters": 100},
            "runs": [run("kron", 0.8, 0.3, 0.2, 12.0), run("kron-aa", 0.8, 0.4, 0.1, 11.0),
                     run("kron", 0.6, 0.5, 0.4, 20.0), run("kron-aa", 0.6, 0.6, 0.3, 15.0),
                     run("kron-aa", 0.6, 0.7, 0.35, 16.0, macs=0.6)]}


def test_sweep_frame_and_correlation(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_fake_sweep()))
    df = results.sweep_frame(results.load_sweep(path))
    assert len(df) == 5 and set(df.method) == {"kron", "kron-aa"}
    assert df.loc[df.ppl_sotu == 20.0, "dlogppl_sotu"].item() == pytest.approx(math.log(2.0))
    assert df.macs_ratio.isna().sum() == 4
    c = results.error_ppl_correlation(df, "sotu")
    assert c["n"] == 5
    # e_Y orders the runs exactly as the perplexity does; e_W does not
    assert c["output"] == pytest.approx(1.0)
    assert c["weight"] < c["output"]
    with pytest.raises(KeyError, match="sotu"):
        results.error_ppl_correlation(df, "austen")


def test_load_sweep_missing_names_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_llm_experiments.py"):
        results.load_sweep(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match=r"missing keys \['dense', 'runs'\]"):
        results.load_sweep(bad)


def test_sweep_command_round_trips_config():
    sweep = {"config": {"methods": ["kron", "svd"], "ratios": [0.6], "macs_matched": False,
                        "model": None, "calib_tokens": 1024, "resume_x": True}}
    cmd = results.sweep_command(sweep, "/tmp/x.json")
    assert cmd == ("python scripts/run_llm_experiments.py --methods kron svd --ratios 0.6 "
                   "--calib-tokens 1024 --resume-x --out /tmp/x.json")


def test_sweep_command_uses_current_option_names():
    """Sweeps recorded with --als-iters are reproduced with its new name --als-sweeps."""
    sweep = {"config": {"als_iters": 3, "model": "a dir/with space"}}
    assert results.sweep_config(sweep) == {"als_sweeps": 3, "model": "a dir/with space"}
    assert results.sweep_command(sweep) == (
        "python scripts/run_llm_experiments.py --als-sweeps 3 --model 'a dir/with space'")


def test_recorded_sweep_command_parses_with_the_script():
    """The command the book prints for the recorded sweep is accepted by today's script and
    sets every recorded option; the script's defaults are the book's (kronlab.defaults)."""
    sweep = results.load_sweep()
    mod = _script("scripts/run_llm_experiments.py")
    argv = results.sweep_command(sweep).split()[2:]
    args = vars(mod.build_parser().parse_args(argv))
    cfg = results.sweep_config(sweep)
    assert {k: args[k] for k in cfg} == cfg
    d = vars(mod.build_parser().parse_args([]))
    assert (d["calib_tokens"], d["eval_tokens"], d["als_sweeps"], d["permute"], d["shape_policy"],
            d["calibration"], d["seq_len"], d["window"], tuple(d["eval"]), d["threads"]) == (
        defaults.CALIB_TOKENS, defaults.EVAL_TOKENS, defaults.ALS_SWEEPS, defaults.PERMUTE,
        defaults.SHAPE_POLICY, defaults.CALIBRATION, defaults.SEQ_LEN, defaults.WINDOW,
        defaults.EVAL_TEXTS, defaults.THREADS)


def test_sweep_script_rejects_methods_outside_compress_methods(capsys):
    mod = _script("scripts/run_llm_experiments.py")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--methods", "kron", "svd-magic", "--threads", str(torch.get_num_threads()),
                  "--out", "/nonexistent/never_written.json"])
    assert exc.value.code == 2
    assert "svd-magic" in capsys.readouterr().err


def test_sweep_prompt():
    mod = _script("scripts/run_llm_experiments.py")
    assert mod.PROMPT == results.SWEEP_PROMPT
    assert results.sweep_prompt({"prompt": "Once upon a time"}) == "Once upon a time"
    # files written before the prompt was recorded: the one prompt every version used
    assert results.sweep_prompt({"config": {}}) == results.SWEEP_PROMPT
    assert results.sweep_prompt(results.load_sweep()) == results.SWEEP_PROMPT


# ----------------------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("name", list(results.BENCHMARKS))
def test_recorded_benchmarks_load(name):
    b = results.load_benchmark(name)
    assert b["benchmark"] == name and b["rows"]
    assert "command" in b["machine"] and "config" in b


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names: bench_nkp, bench_layers, bench_compress, bench_heal"):
        results.load_benchmark("bench_gpu")
    with pytest.raises(FileNotFoundError, match=re.escape("benchmarks/bench_layers.py")):
        results.load_benchmark("bench_layers", tmp_path / "bench_layers.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"benchmark": "bench_nkp", "rows": []}))
    with pytest.raises(ValueError, match="not a bench_layers result.*bench_layers.py"):
        results.load_benchmark("bench_layers", wrong)
    wrong.write_text("shape layer config\n576x576 kron ...\n")  # an old text file
    with pytest.raises(ValueError, match="not valid JSON.*bench_compress.py"):
        results.load_benchmark("bench_compress", wrong)


# ----------------------------------------------------------------------------- dense reference

def test_dense_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/record_dense.py"):
        results.dense_reference(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {}, "corpora": {}}))
    with pytest.raises(ValueError, match="missing keys.*record_dense.py"):
        results.dense_reference(bad)


def test_record_dense_measures_the_protocol(tmp_path):
    """record_dense's perplexities are kronlab.evaluate.perplexity's with the given tokens and
    window, and the written file reads back through results.dense_reference."""
    from tiny_model import tiny_llama

    from kronlab.evaluate import perplexity

    mod = _script("scripts/record_dense.py")
    model, tok = tiny_llama(seed=1)
    texts = {"a": "the quick brown fox jumps over the lazy dog. " * 12,
             "b": "It is a truth universally acknowledged. " * 12}
    res = mod.measure(model, tok, texts=texts, eval_tokens=300, window=128, model_spec="tiny")
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(res, indent=1))
    back = results.dense_reference(path)
    assert back["config"]["eval"] == ["a", "b"] and back["config"]["eval_tokens"] == 300
    for name, text in texts.items():
        ref = perplexity(model, tok, text, window=128, max_tokens=300, progress=False)
        assert back["perplexity"][name]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-12)
        assert back["perplexity"][name]["n_tokens"] == 300
        assert back["perplexity"][name]["n_windows"] == 3
    assert back["parameters"] == sum(p.numel() for p in model.parameters())
    assert {"command", "load_start", "load_end"} <= set(back["machine"])


def test_recorded_dense_reference_matches_the_sweep():
    """The dense baseline file and the sweep's dense entry are the same protocol and numbers."""
    dense, sweep = results.dense_reference(), results.load_sweep()
    cfg = results.sweep_config(sweep)
    assert dense["config"]["eval_tokens"] == cfg["eval_tokens"]
    assert dense["config"]["window"] == cfg["window"]
    for corpus in cfg["eval"]:
        assert dense["perplexity"][corpus]["perplexity"] == pytest.approx(
            sweep["dense"][corpus]["perplexity"], rel=1e-6)


# ----------------------------------------------------------------------------- the conversion

_NUM = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)")
# labels in the text that are not data (column headings, a model's name)
_LABELS = ("(1, 5, 15 min)", "SmolLM2-135M")


def _nums(text: str) -> list[float]:
    """The numbers of a text, unsigned; ``60%`` reads as 0.6."""
    for label in _LABELS:
        text = text.replace(label, " ")
    return [float(v) / 100 if pct else float(v) for v, pct in _NUM.findall(text)]


def _json_nums(obj) -> set[float]:
    if isinstance(obj, bool) or obj is None:
        return set()
    if isinstance(obj, (int, float)):
        return {abs(float(obj))}
    if isinstance(obj, str):
        return set(_nums(obj))
    items = obj.values() if isinstance(obj, dict) else obj
    return set().union(*(_json_nums(v) for v in items)) if items else set()


def _old_text(name: str) -> str:
    if "provenance" not in results.load_benchmark(name):
        pytest.skip(f"{name}.json was re-measured since its conversion from text (the "
                    f"converted file is in the git history)")
    conv = _script("scripts/convert_bench_txt.py")
    try:
        return conv.old_text(name)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"git history with commit {conv.COMMIT} unavailable: {exc}")


@pytest.mark.parametrize("name", list(results.BENCHMARKS))
def test_conversion_is_lossless(name):
    """Every number of the old text file is in the recorded JSON, and the JSON is exactly
    what the converter makes of that text."""
    text = _old_text(name)
    data = results.load_benchmark(name)
    conv = _script("scripts/convert_bench_txt.py")
    assert data == conv.convert(name, text)
    assert data["provenance"].startswith(f"converted from data/results/{name}.txt of commit "
                                         f"{conv.COMMIT} by scripts/convert_bench_txt.py")
    missing = set(_nums(text)) - _json_nums(data)
    assert not missing, f"numbers of {name}.txt not in {name}.json: {sorted(missing)}"


def test_converted_layer_rows_equal_the_table():
    text = _old_text("bench_layers")
    table = [line.split() for line in text.splitlines()
             if re.match(r"\s*\d+x\d+\s+(kron|lowrank)\s", line)]
    rows = results.load_benchmark("bench_layers")["rows"]
    assert len(rows) == len(table) == 38
    keys = ["params_ratio", "flop_ratio", "dense_ms", "layer_ms", "speedup", "realised"]
    for row, tok in zip(rows, table, strict=True):
        assert [row["shape"], row["layer"], row["config"]] == [tok[0], tok[1], " ".join(tok[2:-6])]
        assert [row[k] for k in keys] == [float(v) for v in tok[-6:]]


def test_converted_compress_rows_equal_the_text():
    text = _old_text("bench_compress")
    b = results.load_benchmark("bench_compress")
    lines = [line for line in text.splitlines() if " total " in line]
    assert list(b["totals"]) == [line.split()[0] for line in lines] == ["kron-aa", "kron", "svd-aa", "svd"]
    for line in lines:
        method = line.split()[0]
        assert b["totals"][method] == float(line.split()[2])
        per_type = re.findall(r"(\w+) ([\d.]+) s \((\d+), mean ([\d.]+)\)", line)
        rows = [r for r in b["rows"] if r["method"] == method]
        assert [(r["layer_type"], r["seconds"], r["n_layers"], r["mean_seconds"]) for r in rows] == [
            (t, float(s), int(k), float(mn)) for t, s, k, mn in per_type]


def test_converted_nkp_rows_equal_the_text():
    text = _old_text("bench_nkp")
    b = results.load_benchmark("bench_nkp")
    rank_lines = [line for line in text.splitlines() if line.startswith("  rank")]
    svd = [r for r in b["rows"] if r["part"] == "svd"]
    als = [r for r in b["rows"] if r["part"] == "als"]
    assert len(rank_lines) == len(svd) + len(als) == 8
    for r, line in zip(svd, rank_lines[:4], strict=True):
        assert _nums(line) == [r["rank"], r["randomized_seconds"], r["speedup"],
                               r["error_randomized"], r["error_exact"], abs(r["error_diff"])]
    for r, line in zip(als, rank_lines[4:], strict=True):
        target = [] if r["target_met"] else [b["parts"]["als"]["target_time_vs_randomized"]]
        assert _nums(line) == [r["rank"], r["sweeps"], r["seconds"], r["time_vs_randomized"],
                               r["time_vs_exact"], r["error_plain"], r["error_als"], *target]
    layer_lines = [line for line in text.splitlines() if re.match(r"  \S+\s+\d+x\d+ a_shape", line)]
    err_lines = [line for line in text.splitlines() if "output err:" in line]
    layers = [r for r in b["rows"] if r["part"] == "layers"]
    assert len(layers) == len(layer_lines) == len(err_lines) == 4
    for r, line, err in zip(layers, layer_lines, err_lines, strict=True):
        assert _nums(line) == [r["m"], r["n"], *r["a_shape"], r["rank"], r["params_fraction"],
                               r["seconds"], r["n_layers"]]
        assert _nums(err) == [r["error_plain"], r["error_als"], r["error_als_variance"],
                              r["seconds_variance"], r["lowrank_rank"], r["error_lowrank"]]


# ----------------------------------------------------------------------------- layer damage

def _damage_row(layer="model.layers.0.mlp.up_proj", ratio=0.8, method="kron-aa", inc=0.01):
    return {"layer": layer, "block": 0, "type": layer.split(".", 3)[3], "shape": [1536, 576],
            "ratio": ratio, "method": method, "rank": 3, "a_shape": [32, 24],
            "b_shape": [48, 24], "params": 100, "dense_params": 884736,
            "weight_error": 0.3, "output_error": 0.2, "fisher_error": 0.1,
            "kfac_increase": inc / 2, "calib_increase": inc, "eval_increase": inc,
            "eval_ppl": 28.0}


def test_damage_frame_one_row_per_layer_ratio_method(tmp_path):
    rows = [_damage_row(), _damage_row(method="svd"), _damage_row(ratio=0.6),
            _damage_row(inc=0.5)]  # the last repeats the first (a resumed run): it wins
    path = tmp_path / "ld.json"
    path.write_text(json.dumps({"config": {"blocks": [0]}, "rows": rows}))
    df = results.damage_frame(results.load_layer_damage(path))
    assert len(df) == 3
    assert not df.duplicated(["layer", "ratio", "method"]).any()
    assert list(df.columns) == list(results.DAMAGE_COLUMNS)
    kept = df[(df.method == "kron-aa") & (df.ratio == 0.8)]
    assert kept.calib_increase.item() == 0.5 and kept.a_shape.item() == (32, 24)
    assert list(df.ratio) == sorted(df.ratio, reverse=True)
    assert results.damage_frame({"config": {}, "rows": []}).empty


def test_load_layer_damage_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/layer_damage.py"):
        results.load_layer_damage(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="scripts/layer_damage.py"):
        results.load_layer_damage(bad)


def test_recorded_layer_damage_loads():
    df = results.damage_frame(results.load_layer_damage())
    assert len(df) > 0
    from kronlab.compress import METHODS

    assert set(df.method) <= set(METHODS)
    assert (df.weight_error >= 0).all() and (df.output_error >= 0).all()


# ----------------------------------------------------------------------------- healing

def _fake_heal():
    def run(method, ratio, before, after):
        curve = [{"step": 0, "tokens": 0, "perplexity": {"sotu": before, "austen": 2 * before}},
                 {"step": 4, "tokens": 4096, "perplexity": {"sotu": after, "austen": 2 * after}}]
        return {"method": method, "ratio": ratio, "compress_seconds": 3.0,
                "compress": {"layer_params_kept": ratio, "macs_kept": 0.9},
                "ppl_before": curve[0]["perplexity"], "ppl_after": curve[-1]["perplexity"],
                "tokens_per_second": 50.0,
                "heal": {"tokens": 4096, "curve": curve, "seconds": {"train": 81.92}}}
    return {"config": {"macs_cap": 1.0}, "machine": {},
            "dense": {"sotu": {"perplexity": 20.0}, "austen": {"perplexity": 40.0}},
            "runs": [run("svd-aa", 0.8, 90.0, 30.0), run("kron-fisher", 0.8, 80.0, 28.0),
                     run("svd-aa", 0.6, 200.0, 50.0)]}


def test_heal_frame_and_curves(tmp_path):
    path = tmp_path / "heal.json"
    path.write_text(json.dumps(_fake_heal()))
    data = results.load_heal(path)
    df = results.heal_frame(data)
    assert list(df["ratio"]) == [0.8, 0.8, 0.6]
    row = df[(df.method == "kron-fisher")].iloc[0]
    assert row["label"] == "kron-fisher (MACs<=1)"
    assert (row["before_sotu"], row["after_sotu"], row["after_austen"]) == (80.0, 28.0, 56.0)
    assert row["after_over_dense_sotu"] == pytest.approx(1.4)
    assert row["after_over_dense_austen"] == pytest.approx(1.4)
    assert df[df.method == "svd-aa"]["label"].tolist() == ["svd-aa", "svd-aa"]
    curves = results.heal_curves(data)
    assert len(curves) == 3 * 2 * 2
    end = curves[(curves.method == "svd-aa") & (curves.ratio == 0.6) & (curves.tokens == 4096)]
    assert sorted(end["perplexity"]) == [50.0, 100.0]
    assert sorted(end["over_dense"]) == [2.5, 2.5]


def test_load_heal_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/heal_sweep.py"):
        results.load_heal(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}, "runs": {}}))
    with pytest.raises(ValueError, match="not a healing sweep"):
        results.load_heal(bad)


def test_rotation_scope_frame(tmp_path):
    def run(ratio, setting, start, end, skip):
        return {"ratio": ratio, "setting": setting, "layer_ratio": ratio - skip / 100,
                "budget_kept": ratio, "skip_parameters": skip, "start": start, "end": end,
                "relative_objective": [start, end], "seconds": 1.0}

    data = {"layer_parameters": 100, "runs": [
        run(0.6, "global", 0.2, 0.15, 0), run(0.8, "global", 0.1, 0.08, 0),
        run(0.8, "block, paid", 0.14, 0.09, 9)]}
    path = tmp_path / "scope.json"
    path.write_text(json.dumps(data))
    df = results.rotation_scope_frame(results.load_rotation_scope(path))
    assert list(zip(df.ratio, df.setting, strict=True)) == [(0.8, "global"), (0.8, "block, paid"),
                                               (0.6, "global")]
    assert df.reduction.tolist() == pytest.approx([0.2, 1 - 0.09 / 0.14, 0.25])
    assert df.layer_ratio.tolist() == pytest.approx([0.8, 0.71, 0.6])
    with pytest.raises(FileNotFoundError, match="scripts/rotation_scope.py"):
        results.load_rotation_scope(tmp_path / "missing.json")
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="not a rotation-scope comparison"):
        results.load_rotation_scope(path)


# ----------------------------------------------------------------------------- ablation

def _fake_ablation():
    def run(seed, method, variant, ppl):
        return {"seed": seed, "ratio": 0.8, "method": method, "variant": variant,
                "layer_params_kept": 0.8, "model_params_kept": 0.84, "macs_kept": 0.8,
                "phases": {"statistics": 1.0, "rotation": 0.0, "allocation": 0.0, "fit": 2.0},
                "compress_seconds": 3.0, "peak_rss_bytes": 2**31,
                "ppl": {"sotu": {"perplexity": ppl}}}
    return {"config": {}, "machine": {}, "dense": {"ppl": {"sotu": {"perplexity": 25.0}}},
            "runs": [run(0, "svd-aa", "all", 50.0) | {"allocation_key": "fisher"},
                     run(0, "svd-aa", "none", 100.0), run(1, "svd-aa", "none", 90.0),
                     run(0, "kron-fisher", "rotation", 75.0),
                     # recorded before allocation settings were keyed: read from its allocation
                     run(0, "svd-aa", "allocation", 500.0) | {"allocation": {"metric": "output"}}]}


def test_ablation_frame(tmp_path):
    path = tmp_path / "abl.json"
    path.write_text(json.dumps(_fake_ablation()))
    df = results.ablation_frame(results.load_ablation(path))
    assert list(zip(df.method, df.variant, df.seed, strict=True)) == [
        ("kron-fisher", "rotation", 0), ("svd-aa", "none", 0), ("svd-aa", "none", 1),
        ("svd-aa", "allocation [output]", 0), ("svd-aa", "all [fisher]", 0)]
    assert df["allocation"].tolist() == ["", "", "", "output", "fisher"]
    assert list(df["over_dense_sotu"]) == [3.0, 4.0, 3.6, 20.0, 2.0]
    assert df["peak_rss_gib"].tolist() == [2.0] * 5
    assert df["seconds_fit"].tolist() == [2.0] * 5
    with pytest.raises(FileNotFoundError, match="scripts/ablation_sweep.py"):
        results.load_ablation(tmp_path / "none.json")

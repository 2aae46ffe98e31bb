"""scripts/layer_damage.py on a tiny Llama: rows, correlations, resume, model restored."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_llama

import kronlab.models

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "layer_damage.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("layer_damage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(monkeypatch):
    model, tok = tiny_llama(seed=0)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    monkeypatch.setattr(kronlab.models, "load_model", lambda spec=None, **kw: (model, tok))
    return model, snapshot, modules


TINY = ["--calib-tokens", "64", "--seq-len", "16", "--eval-tokens", "96", "--window", "32",
        "--threads", "0", "--no-progress", "--ratios", "0.6"]


def test_rows_correlations_and_model_restored(script, tiny, tmp_path):
    model, snapshot, modules = tiny
    out = tmp_path / "ld.json"
    assert script.main([*TINY, "--blocks", "0", "1", "--methods", "svd", "svd-aa",
                        "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert len(rows) == 2 * 7 * 2  # blocks x layer types x methods
    assert {r["type"] for r in rows} == {"self_attn.q_proj", "self_attn.k_proj",
                                         "self_attn.v_proj", "self_attn.o_proj",
                                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    dense = res["dense"]
    for r in rows:
        assert 0 < r["weight_error"] and 0 < r["output_error"] and 0 < r["fisher_error"]
        assert r["kfac_increase"] > 0 and r["params"] <= 0.6 * r["dense_params"]
        assert math.isclose(r["calib_increase"], r["calib_nll"] - dense["calib"]["nll"])
        assert math.isclose(r["eval_ppl"], math.exp(r["eval_nll"]))
    assert dense["eval"]["n_tokens"] == 96 and res["statistics"]["n_tokens"] == 64
    assert res["statistics"]["accumulator_bytes"] > 0
    # C and G come from the calibration tokens whose loss is measured
    assert res["statistics"]["loss"] == pytest.approx(dense["calib"]["nll"], rel=1e-5)
    corr = res["correlations"]
    for damage in ("calib_increase", "eval_increase"):
        assert corr[damage]["all"]["n"] == 28
        assert -1 <= corr[damage]["all"]["output_error"] <= 1
        assert corr[damage]["mlp.up_proj"]["n"] == 4
    assert "date_utc" in res["sessions"][0]["machine"]
    # the model is the one loaded, unchanged: same modules, same weights, no hooks, no grads
    assert dict(model.named_modules()) == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_resume_adds_only_missing_rows(script, tiny, tmp_path):
    out = tmp_path / "ld.json"
    # kron fits are slow-ish even at tiny shapes (the factor-shape search): two rows only
    args = [*TINY, "--blocks", "1", "--types", "mlp.down_proj", "self_attn.v_proj", "--out", str(out)]
    script.main([*args, "--methods", "svd"])
    first = json.loads(out.read_text())["rows"]
    script.main([*args, "--methods", "svd", "kron", "--resume"])
    res = json.loads(out.read_text())
    assert res["rows"][:2] == first  # kept, not recomputed
    assert [(r["type"], r["method"]) for r in res["rows"][2:]] == [
        ("self_attn.v_proj", "kron"), ("mlp.down_proj", "kron")]
    assert res["config"]["methods"] == ["svd", "kron"] and len(res["sessions"]) == 2
    with pytest.raises(SystemExit, match="different settings.*calib_tokens"):
        script.main([*args, "--methods", "svd", "--resume", "--calib-tokens", "32"])


@pytest.mark.parametrize("argv,message", [
    (["--methods", "nope"], "unknown method"),
    (["--blocks", "7"], r"blocks \[7\] not in the model"),
    (["--blocks", "0", "--types", "mlp.nope"], "the model's types"),
    (["--ratios", "1.5"], "ratios must lie in"),
])
def test_bad_arguments(script, tiny, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.main([*TINY, "--out", str(tmp_path / "x.json"), *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_spearman_and_correlations(script):
    assert script.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert script.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(script.spearman([1, 2], [1, 2]))
    assert math.isnan(script.spearman([1, 1, 1], [1, 2, 3]))
    rows = [{"type": "a", "weight_error": w, "output_error": None, "fisher_error": w,
             "kfac_increase": w, "calib_increase": w * 2, "eval_increase": -w}
            for w in (0.1, 0.2, 0.3)]
    c = script.correlations(rows)
    assert c["calib_increase"]["all"]["weight_error"] == pytest.approx(1)
    assert c["eval_increase"]["a"]["fisher_error"] == pytest.approx(-1)
    assert math.isnan(c["calib_increase"]["all"]["output_error"])


def test_reused_prefix_gives_the_full_forward_numbers(script, tiny, tmp_path):
    """A row evaluated from its block on (blocks before it looked up) equals the full forward."""
    model, snapshot, modules = tiny
    args = [*TINY, "--blocks", "1", "--types", "mlp.down_proj", "--methods", "svd", "svd-aa"]
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    script.main([*args, "--out", str(fast)])
    script.main([*args, "--no-reuse-prefix", "--out", str(slow)])
    f, s = json.loads(fast.read_text()), json.loads(slow.read_text())
    assert [r["prefix_reused"] for r in f["rows"]] == [True, True]
    assert [r["prefix_reused"] for r in s["rows"]] == [False, False]
    assert f["sessions"][0]["prefix_check"]["1"]["max_relative_deviation"] <= 1e-6
    for a, b in zip(f["rows"], s["rows"], strict=True):
        for key in ("calib_nll", "eval_nll", "output_error"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["calib_increase"] != 0  # the compressed layer is seen
    assert dict(model.named_modules()) == modules  # the blocks are put back
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k

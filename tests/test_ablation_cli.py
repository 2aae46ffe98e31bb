"""kronlab compress --rotate/--allocate/--closed-loop (checked before a model loads; a tiny
round trip), and scripts/ablation_sweep.py on a tiny Llama (every variant, resume)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_llama

import kronlab.io
import kronlab.models
import kronlab.results
from kronlab.calibration import collect_statistics
from kronlab.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ablation_sweep.py"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n\n") * 150


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(kronlab.models, "load_model", boom)
    monkeypatch.setattr(kronlab.io, "load_compressed", boom)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, _ = tiny_llama(seed=0)
    with torch.no_grad():  # norm weights other than 1, so that folding does something
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape))
    model.save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def _writes(name: str) -> bool:
    """Whether a Llama layer writes into the residual stream (else it reads it)."""
    return name.endswith(("o_proj", "down_proj"))


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    return " ".join(err.split())


@pytest.mark.parametrize("extra, message", [
    (["--method", "svd-aa", "--rotate", "procrustes"], r"rotation invariant"),
    (["--method", "svd", "--rotate", "hadamard"], r"use a kron method, or --rotate none"),
    (["--rotate", "procrustes", "--shape-policy", "per-layer"], r"--shape-policy per-type"),
    (["--rotate", "random", "--shape-policy", "per-layer"], r"--rotate random fixes one"),
    (["--rotate", "givens"], r"argument --rotate: invalid choice: 'givens'"),
    (["--rotate-scope", "block"], r"add --rotate procrustes or random"),
    (["--rotate", "hadamard", "--rotate-scope", "block"], r"use --rotate-scope global"),
    (["--rotate", "procrustes", "--rotate-scope", "layer"], r"invalid choice: 'layer'"),
    (["--allocate", "--ratio", "1"], r"no budget to spread"),
    (["--method", "kron", "--no-output-error", "--closed-loop"], r"--closed-loop collects"),
    (["--alloc-min-ratio", "0.2"], r"add --allocate or drop it"),
    (["--allocate", "--alloc-min-ratio", "0.7"], r"must lie in \(0, --ratio 0.5\]"),
    (["--method", "kron", "--no-output-error", "--allocate"], r"use --alloc-metric own"),
    (["--allocate", "--alloc-metric", "kl"], r"invalid choice: 'kl'"),
    (["--closed-loop-target", "dense"], r"add --closed-loop or drop it"),
    (["--method", "kron", "--closed-loop", "--closed-loop-target", "dense"], r"use an -aa or"),
    (["--closed-loop", "--closed-loop-target", "both"], r"invalid choice: 'both'"),
])
def test_pipeline_argument_errors(extra, message, capsys, tmp_path, tiny_dir, no_model_load):
    out = tmp_path / "X"
    err = _error(["compress", "--method", "kron-aa", "--ratio", "0.5", "--model", str(tiny_dir),
                  "--out", str(out)] + extra, capsys)
    assert re.search(message, err), err
    assert not out.exists()


def test_help_documents_the_pipeline_options(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--rotate {none,procrustes,hadamard,random}", "--allocate", "--closed-loop",
                   "--seed", "--alloc-metric {fisher,own}", "--alloc-min-ratio",
                   "--closed-loop-target {compressed,dense}"):
        assert option in text
    args = build_parser().parse_args(["compress", "--method", "kron", "--ratio", "0.5",
                                      "--out", "x"])
    assert args.rotate == "none" and not args.allocate and not args.closed_loop


@pytest.mark.parametrize("extra", [
    ["--method", "kron-aa", "--rotate", "procrustes", "--allocate", "--closed-loop"],
    ["--method", "kron-fisher", "--rotate", "hadamard", "--closed-loop", "--macs-ratio", "1"],
    ["--method", "kron-aa", "--rotate", "procrustes", "--rotate-scope", "block", "--allocate"],
    ["--method", "kron", "--rotate", "random", "--rotate-scope", "block", "--closed-loop"],
    ["--method", "svd-aa", "--allocate"],
    ["--method", "svd-aa", "--allocate", "--alloc-metric", "own", "--alloc-min-ratio", "0.3"],
    ["--method", "svd-aa", "--closed-loop", "--closed-loop-target", "dense"],
])
def test_pipeline_round_trip(extra, tiny_dir, tmp_path, capsys):
    text = tmp_path / "pride.txt"
    text.write_text(TEXT)
    out = tmp_path / "save"
    rc = main(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--calibration", str(text),
               "--calib-tokens", "128", "--seq-len", "32", "--dtype", "float32",
               "--out", str(out), *extra])
    assert rc == 0
    stdout = capsys.readouterr().out
    extra_cfg = json.loads((out / "kronlab.json").read_text())["config_extra"]
    assert extra_cfg["report"]["summary"]["layers"] == 14
    if "--rotate" in extra:
        assert "rotation" in extra_cfg["timings"] and extra_cfg["rotation"]["extra_parameters"] > 0
        # the fixed shapes a rotation can change: 1 < n1 < n (readers), 1 < m1 < m (writers)
        for r in extra_cfg["report"]["layers"]:
            i = 0 if _writes(r["name"]) else 1
            assert 1 < r["a_shape"][i] < r["shape"][i], r
        assert "rotate=" + extra[extra.index("--rotate") + 1] in stdout
    if "block" in extra:
        # one skip map (2 blocks, 32 x 32), paid from the budget of 0.5 x 18432 parameters
        assert extra_cfg["per_block"] == {"skip_parameters": 1024,
                                          "layer_ratio": pytest.approx(0.5 - 1024 / 18432)}
        summary = extra_cfg["report"]["summary"]
        assert summary["layer_params_after"] + 1024 <= 0.5 * summary["layer_params_before"] + 1
        assert extra_cfg["rotation"]["scope"] == "block"
    if "--allocate" in extra:
        assert "allocation" in extra_cfg["timings"]
        assert len(extra_cfg["allocation"]["ratios"]) == 14
        own = "own" in extra  # svd-aa's own metric is the output error; by default Fisher
        assert extra_cfg["allocation"]["metric"] == ("output" if own else "fisher")
        if "--alloc-min-ratio" in extra:
            assert min(extra_cfg["allocation"]["ratios"].values()) >= 0.3
        kept = extra_cfg["report"]["summary"]["layer_params_kept"]
        assert kept <= 0.5 + 1e-9
    if "--closed-loop" in extra:
        assert extra_cfg["report"]["config"]["closed_loop"] is True
        target = "dense" if "dense" in extra else "compressed"
        assert extra_cfg["report"]["config"]["target"] == target
        assert f"closed_loop=yes (target {target})" in stdout
    # the save loads, and evaluates to the same loss as what was saved (a rotation is exact)
    from kronlab.io import load_compressed

    model = load_compressed(out)[0]
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    if "block" in extra:
        from kronlab.rotate import residual_map_parameters

        assert residual_map_parameters(model) == 1024


def test_rotation_alone_keeps_the_function(tiny_dir, tmp_path):
    """The saved tiny model, folded (head untied, as --rotate does) and rotated, computes
    the same logits: what --rotate changes is only the basis the fits see."""
    from kronlab.rotate import fold_norms, hadamard, rotate_residual

    model = kronlab.models.load_model(str(tiny_dir))[0].float().eval()
    rotated = rotate_residual(fold_norms(model, tied_head="untie"), hadamard(32))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rotated(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the sweep script

@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ablation_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rotation_a_shapes():
    from kronlab.rotate import rotation_a_shapes, sqrt_divisor

    assert sqrt_divisor(576) == 24 and sqrt_divisor(64) == 8
    assert sqrt_divisor(32) == 8 and sqrt_divisor(16) == 4
    with pytest.raises(ValueError, match="no divisor"):
        sqrt_divisor(7)
    model, _ = tiny_llama(seed=0)
    shapes = rotation_a_shapes(model, kronlab.models.find_linear_layers(model))
    assert shapes == {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (4, 8),
                      "self_attn.v_proj": (4, 8), "self_attn.o_proj": (8, 8),
                      "mlp.gate_proj": (8, 8), "mlp.up_proj": (8, 8), "mlp.down_proj": (8, 8)}
    # within budgets: rotatable (readers 1 < n1 < n, writers 1 < m1 < m) and affordable
    stats = collect_statistics(model, torch.randint(0, 256, (2, 16)), progress=False)
    chosen = rotation_a_shapes(model, kronlab.models.find_linear_layers(model),
                               method="kron-fisher", ratio=0.5, macs_ratio=1.0, stats=stats)
    for t, (m1, n1) in chosen.items():
        m, n = {"self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
                "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32),
                "mlp.down_proj": (32, 64)}.get(t, (32, 32))
        assert (1 < m1 < m) if _writes(t) else (1 < n1 < n), t


def test_sweep_runs_every_variant_and_resumes(script, tmp_path, monkeypatch):
    model, tok = tiny_llama(seed=0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(kronlab.models, "load_model", lambda spec=None, **kw: (model, tok))
    out = tmp_path / "abl.json"
    tiny = ["--ratios", "0.5", "--calib-tokens", "128", "--seq-len", "32", "--eval-tokens", "96",
            "--window", "32", "--threads", "1", "--procrustes-iters", "2", "--out", str(out)]
    assert script.main([*tiny, "--methods", "svd-aa", "kron-fisher"]) == 0
    res = json.loads(out.read_text())
    runs = {(r["method"], r["variant"]): r for r in res["runs"]}
    assert set(runs) == {("svd-aa", v) for v in ("none", "allocation", "closed-loop", "all")} | {
        ("kron-fisher", v) for v in ("none", "allocation", "closed-loop", "rotation", "all")}
    for (method, variant), r in runs.items():
        assert set(r["ppl"]) == {"sotu", "austen"} and r["ppl"]["sotu"]["n_tokens"] <= 96
        assert set(r["phases"]) == {"statistics", "rotation", "allocation", "fit"}
        assert r["peak_rss_bytes"] > 0 and r["layer_params_kept"] <= 0.5 + 1e-9
        if method == "kron-fisher":
            assert r["macs_ratio"] == 1.0 and r["macs_kept"] <= 1.0 + 1e-9
        if "rotation" in r["components"]:
            assert r["phases"]["rotation"] > 0
            # the tied head keeps its final norm as a d x d map: counted in the model
            assert r["rotation"]["extra_parameters"] == 32 * 32
            assert r["model_params"] == (res["dense"]["parameters"] - r["layer_params_before"]
                                         + r["layer_params_after"] + 32 * 32)
            for t, s in r["structures"].items():
                assert 1 < s["a_shape"][0 if _writes(t) else 1], (t, s)
        else:
            assert r["model_params"] == (res["dense"]["parameters"] - r["layer_params_before"]
                                         + r["layer_params_after"])
        assert r["report"]["config"].get("closed_loop", False) == ("closed-loop" in r["components"])
        assert ("allocation" in r) == ("allocation" in r["components"])
        if "allocation" in r:  # every method's allocation scored by the Fisher loss
            assert r["allocation"]["metric"] == "fisher" and r["allocation_key"] == "fisher"
    assert runs[("svd-aa", "all")]["components"] == ["allocation", "closed-loop"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    # resume: a new seed adds its runs, the old ones stay
    assert script.main([*tiny, "--methods", "svd-aa", "--variants", "none", "--seeds", "1",
                        "--resume"]) == 0
    res2 = json.loads(out.read_text())
    assert len(res2["runs"]) == len(res["runs"]) + 1 and res2["config"]["seeds"] == [0, 1]
    # other allocation settings are other runs: added, the recorded ones kept
    assert script.main([*tiny, "--methods", "svd-aa", "--variants", "allocation", "none",
                        "--alloc-metric", "own", "--alloc-min-ratio", "0.25", "--resume"]) == 0
    res3 = json.loads(out.read_text())
    new = res3["runs"][len(res2["runs"]):]
    assert [(r["variant"], r["allocation_key"]) for r in new] == [("allocation", "output, floor 0.25")]
    assert all(v >= 0.25 for v in new[0]["allocation"]["ratios"].values())
    frame = kronlab.results.ablation_frame(res3)
    assert {"allocation [fisher]", "allocation [output, floor 0.25]"} <= set(frame.variant)
    assert script.main([*tiny, "--methods", "svd-aa", "--variants", "allocation",
                        "--alloc-metric", "own", "--alloc-min-ratio", "0.25", "--resume"]) == 0
    assert len(json.loads(out.read_text())["runs"]) == len(res3["runs"])  # nothing to do
    with pytest.raises(SystemExit):
        script.main([*tiny, "--alloc-min-ratio", "0.7", "--resume"])  # above the ratio
    with pytest.raises(SystemExit, match="different settings"):
        script.main([*tiny[:-2], "--out", str(out), "--methods", "svd-aa", "--resume",
                     "--window", "64"])
    # the asymmetric closed loop is another run too, labelled with its damping
    assert script.main([*tiny, "--methods", "svd-aa", "--variants", "closed-loop",
                        "--closed-loop-target", "dense", "--closed-loop-damping", "0.1",
                        "--resume"]) == 0
    res4 = json.loads(out.read_text())
    new = res4["runs"][len(res3["runs"]):]
    assert [(r["variant"], r["closed_loop_target"], r["report"]["config"]["target"])
            for r in new] == [("closed-loop", "dense", "dense")]
    assert new[0]["report"]["config"]["damping"] == 0.1
    frame = kronlab.results.ablation_frame(res4)
    assert {"closed-loop", "closed-loop [asymmetric 0.1]"} <= set(frame.variant)
    # per-block rotations: another run; the skip map (2 blocks: one 32 x 32) is paid from
    # the budget, so the layers keep less and layers + map stay within the ratio
    assert script.main([*tiny, "--methods", "kron-fisher", "--variants", "rotation",
                        "--rotation-scope", "block", "--resume"]) == 0
    res5 = json.loads(out.read_text())
    new = res5["runs"][len(res4["runs"]):]
    assert [(r["variant"], r["rotation_scope"]) for r in new] == [("rotation", "block")]
    r = new[0]
    assert r["rotation"]["skip_parameters"] == 1024 and r["rotation"]["scope"] == "block"
    assert r["rotation"]["procrustes"]["config"]["per_block"] is True
    assert r["layer_params_after"] + 1024 <= 0.5 * r["layer_params_before"] + 1
    assert r["rotation"]["extra_parameters"] == 32 * 32 + 1024   # mixed head + skip map
    assert r["model_params"] == (res["dense"]["parameters"] - r["layer_params_before"]
                                 + r["layer_params_after"] + 32 * 32 + 1024)
    frame = kronlab.results.ablation_frame(res5)
    assert {"rotation", "rotation [per-block Q]"} <= set(frame.variant)
    # the baselines: a Hadamard Q (global) and random Qs per block, no Procrustes step
    assert script.main([*tiny, "--methods", "kron-fisher", "--variants", "rotation",
                        "--rotation-q", "hadamard", "--resume"]) == 0
    assert script.main([*tiny, "--methods", "kron-fisher", "--variants", "rotation",
                        "--rotation-q", "random", "--rotation-scope", "block", "--resume"]) == 0
    res6 = json.loads(out.read_text())
    new = res6["runs"][len(res5["runs"]):]
    assert [(r["rotation_q"], r["rotation"]["scope"]) for r in new] == [("hadamard", "global"),
                                                                        ("random", "block")]
    assert new[0]["rotation"]["procrustes"]["history"] == []
    assert new[0]["rotation"]["extra_parameters"] == 32 * 32
    assert new[1]["rotation"]["extra_parameters"] == 32 * 32 + 1024   # random Q differ by block
    frame = kronlab.results.ablation_frame(res6)
    assert {"rotation [hadamard Q]", "rotation [random Q, per-block Q]"} <= set(frame.variant)
    with pytest.raises(SystemExit):
        script.main([*tiny, "--rotation-q", "hadamard", "--rotation-scope", "block"])


def test_sweep_rejects_bad_closed_loop_settings(script, capsys):
    for argv, message in ((["--closed-loop-damping", "-1"], "must be >= 0"),
                          (["--methods", "svd", "--closed-loop-target", "dense"],
                           "needs activation-aware methods")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert message in capsys.readouterr().err


def test_rotation_scope_script(tmp_path, monkeypatch):
    """scripts/rotation_scope.py on a tiny Llama: one round from Q = I, so one Q per block
    ends no higher than one global Q (the same fits, a larger set of Qs); the paid setting
    keeps fewer layer parameters; the baselines report their fixed Q; --resume adds."""
    spec = importlib.util.spec_from_file_location("rotation_scope",
                                                  ROOT / "scripts" / "rotation_scope.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, tok = tiny_llama(seed=0, n_layers=3)
    monkeypatch.setattr(kronlab.models, "load_model", lambda spec=None, **kw: (model, tok))
    out = tmp_path / "scope.json"
    argv = ["--ratios", "0.5", "--iters", "1", "--macs-ratio", "0", "--threads", "1",
            "--out", str(out)]
    assert mod.main([*argv, "--settings", "global", "block, same ratio", "block, paid"]) == 0
    runs = {r["setting"]: r for r in json.loads(out.read_text())["runs"]}
    g, same, paid = runs["global"], runs["block, same ratio"], runs["block, paid"]
    assert same["start"] == pytest.approx(g["start"], rel=1e-12)
    assert same["end"] <= g["end"] * (1 + 1e-12) and g["end"] < g["start"]
    assert paid["skip_parameters"] == 2 * 32 * 32 and same["skip_parameters"] == 2 * 32 * 32
    assert paid["layer_ratio"] == pytest.approx(0.5 - 2048 / (3 * 9216))
    assert paid["budget_kept"] == pytest.approx(0.5) and g["skip_parameters"] == 0
    assert mod.main([*argv, "--settings", "hadamard", "random", "--resume"]) == 0
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["runs"]] == ["global", "block, same ratio", "block, paid",
                                                    "hadamard", "random"]
    assert data["config"]["settings"] == [r["setting"] for r in data["runs"]]
    for r in data["runs"][3:]:
        assert r["start"] == pytest.approx(g["start"], rel=1e-12) and r["end"] != r["start"]
    frame = kronlab.results.rotation_scope_frame(data)
    assert len(frame) == 5

"""Round trips of compressed models through save_compressed / load_compressed."""

import copy
import json
import os

import pytest
import torch

from kronlab import io as kio
from kronlab import KronFactors, LowRankFactors
from kronlab.io import load_compressed, read_manifest, save_compressed, update_config_extra
from kronlab.layers import KronLinear, LowRankLinear
from kronlab.models import set_submodule

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _tiny_llama(seed=0):
    try:
        from tiny_model import tiny_llama  # tests/tiny_model.py, when present
        return tiny_llama(seed=seed)[0]
    except ImportError:
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=100, tie_word_embeddings=True)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _kron_like(linear, rank, a_shape, g, *, perm=False, bias=False, order="auto"):
    m, n = linear.weight.shape
    (m1, n1) = a_shape
    f = KronFactors(torch.randn(rank, m1, n1, generator=g),
                    torch.randn(rank, m // m1, n // n1, generator=g),
                    torch.randperm(n, generator=g) if perm else None)
    b = torch.randn(m, generator=g) if bias else None
    return KronLinear.from_factors(f, b, dtype=linear.weight.dtype, order=order)


def _compressed(seed=0):
    """A tiny Llama with a Kron q_proj (perm), a Kron up_proj (bias), a low-rank down_proj."""
    model = _tiny_llama(seed)
    g = torch.Generator().manual_seed(seed + 1)
    layer0 = model.model.layers[0]
    kron_q = _kron_like(layer0.self_attn.q_proj, 2, (4, 8), g, perm=True, order="b_first")
    kron_up = _kron_like(layer0.mlp.up_proj, 3, (8, 4), g, bias=True)
    m, n = model.model.layers[1].mlp.down_proj.weight.shape
    lr = LowRankLinear.from_factors(
        LowRankFactors(torch.randn(m, 5, generator=g), torch.randn(5, n, generator=g)))
    set_submodule(model, "model.layers.0.self_attn.q_proj", kron_q)
    set_submodule(model, "model.layers.0.mlp.up_proj", kron_up)
    set_submodule(model, "model.layers.1.mlp.down_proj", lr)
    return model.eval()


def _logits(model):
    ids = torch.arange(12).reshape(2, 6) % 100
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_bit_identical(tmp_path):
    model = _compressed()
    before = copy.deepcopy(model.state_dict())
    ref = _logits(model)
    tok = _tokenizer()
    out = save_compressed(model, tmp_path / "save", tokenizer=tok,
                          config_extra={"method": "test", "ratio": 0.5})
    assert out == tmp_path / "save"
    # the input model is unchanged
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.model.layers[0].self_attn.q_proj, KronLinear)

    manifest = json.loads((out / "kronlab.json").read_text())
    assert manifest["config_extra"] == {"method": "test", "ratio": 0.5}
    recs = {r["name"]: r for r in manifest["modules"]}
    assert set(recs) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                         "model.layers.1.mlp.down_proj"}
    q = recs["model.layers.0.self_attn.q_proj"]
    hidden = model.config.hidden_size
    assert (q["class"], q["rank"], q["a_shape"], q["perm"], q["bias"], q["dtype"]) \
        == ("KronLinear", 2, [4, 8], True, False, "float32")
    assert q["a_shape"][0] * q["b_shape"][0] == q["out_features"]
    assert q["in_features"] == hidden
    assert recs["model.layers.1.mlp.down_proj"]["class"] == "LowRankLinear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]  # no temp dirs left

    loaded, tok2 = load_compressed(out)
    assert not loaded.training
    assert torch.equal(_logits(loaded), ref)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, KronLinear)
    assert loaded.model.layers[0].self_attn.q_proj.order == "b_first"
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    assert loaded.model.layers[0].mlp.up_proj.bias is not None
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tok2 is not None and tok2("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"]


def test_round_trip_float64_and_no_tokenizer(tmp_path):
    model = _compressed(seed=3).double()
    ref = _logits(model)
    save_compressed(model, tmp_path / "m")
    loaded, tok = load_compressed(tmp_path / "m")
    assert tok is None
    assert loaded.model.layers[0].self_attn.q_proj.A.dtype == torch.float64
    assert torch.equal(_logits(loaded), ref)


def test_overwrite_existing_save(tmp_path):
    save_compressed(_compressed(seed=0), tmp_path / "m")
    model = _compressed(seed=1)
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(_logits(loaded), _logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_target_untouched(tmp_path, monkeypatch, existing):
    target = tmp_path / "m"
    if existing:
        save_compressed(_compressed(seed=0), target)
        old = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.torch

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(_compressed(seed=1), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == old


def test_interrupted_rename_restores_old_save(tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_compressed(_compressed(seed=0), target)
    old = {p.name: p.read_bytes() for p in target.iterdir()}
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new save into place
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(kio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="interrupted"):
        save_compressed(_compressed(seed=1), target)
    monkeypatch.setattr(kio.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old


def test_clear_errors(tmp_path):
    model = _compressed()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        save_compressed(model, f)
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_compressed(f)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a kronlab save"):
        save_compressed(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="kronlab.json"):
        load_compressed(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(TypeError, match="JSON"):
        save_compressed(model, tmp_path / "x", config_extra={"bad": object()})
    assert not (tmp_path / "x").exists()
    with pytest.raises(KeyError, match="no submodule"):
        set_submodule(model, "model.nope.q_proj", torch.nn.Identity())


def test_round_trip_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D layers (weight stored as (in, out)) are replaced and reloaded too."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(5)
    # c_fc maps 32 -> 128; its Conv1D weight is (32, 128)
    f = KronFactors(torch.randn(2, 8, 4, generator=g), torch.randn(2, 16, 8, generator=g),
                    torch.randperm(32, generator=g))
    set_submodule(model, "transformer.h.1.mlp.c_fc",
                   KronLinear.from_factors(f, torch.randn(128, generator=g), dtype=torch.float32))
    ref = _logits(model)
    save_compressed(model, tmp_path / "g")
    loaded, _ = load_compressed(tmp_path / "g")
    assert isinstance(loaded.transformer.h[1].mlp.c_fc, KronLinear)
    assert torch.equal(_logits(loaded), ref)


def test_bfloat16_save_round_trip_leaves_the_model_alone(tmp_path):
    model = _compressed(seed=4)
    before = copy.deepcopy(model.state_dict())
    save_compressed(model, tmp_path / "f32")
    save_compressed(model, tmp_path / "bf16", dtype="bfloat16", config_extra={"k": 1})
    # the user's model is untouched: same tensors, same dtypes, same config
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
               for k in before)
    assert model.config.dtype in (None, torch.float32, "float32")
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert 0.45 < size16 / size32 < 0.55  # every float halves; the header and perm are small

    manifest = read_manifest(tmp_path / "bf16")
    assert manifest["model_dtype"] == "bfloat16" and manifest["memory_dtype"] == "float32"
    assert {r["dtype"] for r in manifest["modules"]} == {"bfloat16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    loaded, _ = load_compressed(tmp_path / "bf16")  # the saved dtype
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.A.dtype == torch.bfloat16 and q.perm.dtype == torch.long
    assert loaded.kronlab_info["saved_dtype"] == "bfloat16"
    state = loaded.state_dict()
    for k, v in before.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert state[k].dtype == want.dtype and torch.equal(state[k], want), k
    logits16 = _logits(loaded)
    assert logits16.dtype == torch.bfloat16 and torch.isfinite(logits16).all()

    up, _ = load_compressed(tmp_path / "bf16", dtype=torch.float32)  # upcast on load
    assert up.model.layers[0].self_attn.q_proj.A.dtype == torch.float32
    state = up.state_dict()
    for k, v in before.items():
        want = v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
        assert torch.equal(state[k], want), k
    ref = _logits(model)
    err = (_logits(up) - ref).norm() / ref.norm()
    assert 0 < err < 0.05  # bfloat16 keeps ~3 significant digits of each weight


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644),
                                                        (0o077, 0o700, 0o600)])
def test_saves_have_ordinary_file_modes(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = save_compressed(_compressed(), tmp_path / "m", tokenizer=_tokenizer())
        update_config_extra(out, {"timings": {"save": 0.1}})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == dir_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"model.safetensors", "kronlab.json", "config.json"} <= {p.name for p in files}
    for p in files:
        assert (p.stat().st_mode & 0o777) == file_mode, p.name


def test_update_config_extra(tmp_path):
    out = save_compressed(_compressed(), tmp_path / "m", config_extra={"method": "kron"})
    extra = update_config_extra(out, {"timings": {"save": 1.5}})
    assert extra == {"method": "kron", "timings": {"save": 1.5}}
    assert read_manifest(out)["config_extra"] == extra
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    with pytest.raises(TypeError, match="JSON"):
        update_config_extra(out, {"bad": object()})
    assert read_manifest(out)["config_extra"] == extra

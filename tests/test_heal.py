"""Healing (knowledge distillation): the losses' mathematics, what is trained, exact resume,
the teacher cache, the disjointness of training and evaluation text, the `kronlab heal`
command and the sweep script, on tiny models (CPU, seconds)."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kronlab.heal  # noqa: E402
import kronlab.io  # noqa: E402
import kronlab.models  # noqa: E402
from kronlab import defaults  # noqa: E402
from kronlab.cli import main  # noqa: E402
from kronlab.compress import compress  # noqa: E402
from kronlab.heal import (  # noqa: E402
    CHECKPOINT,
    TRAIN_MODES,
    check_same_vocabulary,
    default_training_text,
    heal,
    kl_divergence,
    teacher_topk,
    text_overlap,
    token_overlap,
    topk_kl_divergence,
    trainable_parameters,
)
from kronlab.io import load_compressed  # noqa: E402
from tiny_model import ByteTokenizer, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# training text and a disjoint held-out text (different sentences, so no shared 64-grams)
TRAIN = " ".join(f"Sentence {i} tells of the {w} river and the {v} hill." for i, (w, v) in
                 enumerate(zip(["green", "cold", "wide", "slow"] * 60, ["high", "dry"] * 120,
                                   strict=True)))
HELD_OUT = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. ") * 8
SMALL = dict(seq_len=32, batch_size=2, window=64, eval_tokens=256, progress=False)


def _teacher(seed=0):
    """A tiny Llama whose predictions are far from uniform (final norm scaled up)."""
    model, tok = tiny_llama(seed=seed)
    with torch.no_grad():
        model.model.norm.weight.fill_(20.0)
    return model, tok


def _student(teacher, method="svd", ratio=0.5, noise=0.0, seed=0):
    student, _ = compress(teacher, method=method, ratio=ratio, progress=False)
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in trainable_parameters(student).values():
                p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    return student


def _mean_kl(student, teacher, ids):
    with torch.no_grad():
        return float(kl_divergence(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_matches_torch_and_topk_is_a_lower_bound(seed, T):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    kl = kl_divergence(s, t, temperature=T)
    ref = F.kl_div(F.log_softmax(s / T, -1).reshape(-1, 50), F.log_softmax(t / T, -1).reshape(-1, 50),
                   log_target=True, reduction="batchmean") * T * T
    assert torch.allclose(kl, ref, rtol=1e-5)
    assert float(kl_divergence(t, t, temperature=T)) == pytest.approx(0.0, abs=1e-6)
    # the coarsened KL: exact at k = V, a lower bound below, and it grows with k
    full = topk_kl_divergence(s, *teacher_topk(t, 50, temperature=T), temperature=T)
    assert torch.allclose(full, kl, rtol=1e-5)
    values = [float(topk_kl_divergence(s, *teacher_topk(t, k, temperature=T), temperature=T))
              for k in (1, 5, 20, 49)]
    assert all(0 <= v <= float(kl) + 1e-6 for v in values)
    assert values == sorted(values)


def test_teacher_topk_keeps_all_the_mass():
    t = torch.randn(4, 100) * 4
    index, logp, rest = teacher_topk(t, 10, temperature=2.0)
    assert index.shape == logp.shape == (4, 10) and rest.shape == (4,)
    assert torch.allclose(logp.exp().sum(-1) + rest.exp(), torch.ones(4), atol=1e-6)
    assert torch.equal(index, (t / 2).topk(10).indices)
    _, _, rest = teacher_topk(t, 100)
    assert torch.isneginf(rest).all()


# ----------------------------------------------------------------------------- training

def test_distillation_lowers_the_kl_of_a_perturbed_student():
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.5)
    probe = torch.tensor([tok.encode(HELD_OUT[:64])])
    before = _mean_kl(student, teacher, probe)
    healed, report = heal(student, teacher, TRAIN, tokenizer=tok, tokens=64 * 40, lr=3e-3,
                          warmup=0.1, eval_text=HELD_OUT, eval_every=64 * 10, **SMALL)
    after = _mean_kl(healed, teacher, probe)
    assert after < 0.5 * before, (before, after)
    first, last = report.losses[0]["loss"], report.losses[-1]["loss"]
    assert last < 0.5 * first
    assert report.steps == report.total_steps == 40 and report.finished
    assert [p["tokens"] for p in report.curve] == [0, 640, 1280, 1920, 2560]
    with torch.no_grad():  # the held-out perplexity moved towards the teacher's
        from kronlab.evaluate import perplexity

        ppl_t = perplexity(teacher, tok, HELD_OUT, window=64, max_tokens=256, progress=False)
    target = ppl_t["perplexity"]
    assert abs(math.log(report.ppl_after["eval"] / target)) < \
        abs(math.log(report.ppl_before["eval"] / target))
    assert report.tokens_per_second > 0 and report.config["tokens"] == 2560
    json.dumps(report.to_dict())  # stored in kronlab.json as it is


def _gpt2_teacher():
    from tiny_model import tiny_gpt2

    model, tok = tiny_gpt2(seed=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(20.0)
    return model, tok


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("train", TRAIN_MODES)
def test_only_the_chosen_parameters_change_and_the_input_is_left_alone(train, arch):
    teacher, tok = _teacher() if arch == "llama" else _gpt2_teacher()
    student = _student(teacher, method="kron", ratio=0.6, noise=0.3)
    next(iter(student.parameters())).requires_grad_(False)  # flags are the user's business
    original, flags = _state(student), {n: p.requires_grad for n, p in student.named_parameters()}
    teacher_state = _state(teacher)
    healed, report = heal(student, teacher, TRAIN, tokenizer=tok, tokens=64 * 3, lr=1e-2,
                          train=train, **SMALL)
    assert healed is not student
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in original.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in healed.named_parameters()} == flags
    assert not healed.training
    changed = {k for k, v in healed.state_dict().items() if not torch.equal(v, original[k])}
    chosen = set(trainable_parameters(student, train))
    assert changed == chosen
    factors = {k for k in chosen if k.rsplit(".", 1)[-1] in ("A", "B", "U", "V")}
    norms = {k for k in chosen if re.search(r"norm|ln_", k)}
    biases = {k for k in chosen if k.endswith(".bias")}
    assert factors and not any(re.search(r"embed|wte|wpe|lm_head", k) for k in chosen)
    if train == "factors":
        assert chosen == factors
    else:
        assert norms and chosen == factors | norms | biases
        assert bool(biases) == (arch == "gpt2")  # GPT-2 has biases, the tiny Llama none
    assert report.trainable["parameters"] == sum(p.numel() for p in
                                                 trainable_parameters(student, train).values())


def test_in_place_trains_the_given_model():
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.3)
    before = _state(student)
    healed, _ = heal(student, teacher, TRAIN, tokenizer=tok, tokens=64, lr=1e-2, in_place=True,
                     **SMALL)
    assert healed is student
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="heal trains float32 weights"):
        heal(student.to(torch.bfloat16), teacher, TRAIN, tokenizer=tok, tokens=64,
             in_place=True, **SMALL)


def _run(student, teacher, tok, ckpt=None, **kw):
    args = dict(tokens=128 * 8, grad_accum=2, lr=5e-3, warmup=0.25, eval_text=HELD_OUT,
                eval_every=128, checkpoint_dir=ckpt, **SMALL)
    args.update(kw)
    return heal(student, teacher, TRAIN, tokenizer=tok, **args)


@pytest.mark.parametrize("cache", [False, True])
def test_an_interrupted_run_resumed_ends_where_an_uninterrupted_run_ends(tmp_path, cache):
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.4)
    kw = {"cache_teacher": tmp_path / "cache"} if cache else {}
    full, rep_full = _run(student, teacher, tok, tmp_path / "a", **kw)
    part, rep_part = _run(student, teacher, tok, tmp_path / "b", stop_after=3, **kw)
    assert rep_part.steps == 3 and not rep_part.finished
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    assert not list((tmp_path / "b").glob(".*.tmp"))  # written atomically
    with pytest.raises(FileExistsError, match="pass resume=True"):
        _run(student, teacher, tok, tmp_path / "b", **kw)
    resumed, rep = _run(student, teacher, tok, tmp_path / "b", resume=True, **kw)
    assert rep.resumed_from_step == 3 and rep.finished and rep.steps == 8
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], rtol=0, atol=1e-6), k
    assert [r["loss"] for r in rep.losses] == pytest.approx([r["loss"] for r in rep_full.losses],
                                                            rel=1e-6)
    assert [p["tokens"] for p in rep.curve] == [p["tokens"] for p in rep_full.curve]
    assert [p["perplexity"]["eval"] for p in rep.curve] == \
        pytest.approx([p["perplexity"]["eval"] for p in rep_full.curve], rel=1e-6)
    # a finished run resumed again does nothing more
    again, rep2 = _run(student, teacher, tok, tmp_path / "b", resume=True, **kw)
    assert rep2.steps == 8 and len(rep2.losses) == 8
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_resume_refuses_other_settings_or_another_student(tmp_path):
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.4)
    _run(student, teacher, tok, tmp_path, stop_after=2)
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        _run(student, teacher, tok, tmp_path, resume=True, lr=1e-3)
    other = _student(teacher, noise=0.4, seed=1)
    with pytest.raises(ValueError, match="another student"):
        _run(other, teacher, tok, tmp_path, resume=True)
    # resume without a checkpoint starts from the beginning
    _, rep = _run(student, teacher, tok, tmp_path / "new", resume=True, stop_after=1)
    assert rep.resumed_from_step is None and rep.steps == 1


def test_full_vocabulary_cache_gives_the_on_the_fly_result(tmp_path):
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.4)
    a, rep_a = _run(student, teacher, tok)
    b, rep_b = _run(student, teacher, tok, cache_teacher=tmp_path / "c", cache_top_k=256)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k
    assert rep_b.teacher["mode"] == "top-k cache"
    assert rep_b.teacher["bytes"] == 32 * 31 * (8 * 256 + 4)  # 32 sequences of 32 tokens
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["top_k"] == 256 and meta["n_seq"] == 32
    # a top-k cache: another objective (a lower bound), still a descent
    c, rep_c = _run(student, teacher, tok, cache_teacher=tmp_path / "k8", cache_top_k=8)
    assert rep_c.losses[-1]["loss"] < rep_c.losses[0]["loss"]
    # the cache is reused for the same teacher, refused for another one
    _run(student, teacher, tok, cache_teacher=tmp_path / "k8", cache_top_k=8, stop_after=1)
    other, _ = _teacher(seed=1)
    with pytest.raises(ValueError, match="another teacher"):
        _run(student, other, tok, cache_teacher=tmp_path / "k8", cache_top_k=8)
    with pytest.raises(ValueError, match=r"other settings \(top_k differ\)"):
        _run(student, teacher, tok, cache_teacher=tmp_path / "k8", cache_top_k=4)


def test_gradient_checkpointing_changes_memory_not_results():
    from kronlab.heal import decoder_blocks, kron_activation_bytes

    teacher, tok = _teacher()
    student = _student(teacher, method="kron", ratio=0.6, noise=0.4)
    a, rep_a = _run(student, teacher, tok, grad_checkpointing=False)
    b, rep_b = _run(student, teacher, tok, grad_checkpointing=True)
    assert not rep_a.config["grad_checkpointing"] and rep_b.config["grad_checkpointing"]
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    assert all("forward" not in blk.__dict__ for blk in decoder_blocks(b))  # undone
    assert len(decoder_blocks(b)) == 2
    # "auto" decides by the bytes of the KronLinear intermediates of a micro-batch
    per_token = kron_activation_bytes(student, 1)
    assert per_token > 0 and kron_activation_bytes(student, 64) == 64 * per_token
    assert rep_a.config["kron_activation_bytes"] == 64 * per_token
    _, rep = _run(student, teacher, tok, stop_after=1)
    assert rep.config["grad_checkpointing"] is False  # 64 tokens: far below the limit


@pytest.mark.cuda
def test_heal_on_cuda_matches_the_cpu_run_roughly():
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.4)
    cpu, rep_cpu = _run(student, teacher, tok)
    gpu, rep_gpu = _run(student, teacher.to("cuda"), tok, device="cuda")
    assert rep_gpu.config["autocast"] == "bfloat16"
    assert next(gpu.parameters()).device.type == "cuda"
    assert next(student.parameters()).device.type == "cpu"  # the input stays where it was
    assert rep_gpu.losses[-1]["loss"] < rep_gpu.losses[0]["loss"]
    assert rep_gpu.ppl_after["eval"] == pytest.approx(rep_cpu.ppl_after["eval"], rel=0.2)


def test_token_batches_are_used_in_order():
    teacher, tok = _teacher()
    student = _student(teacher, noise=0.3)
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    _, rep = heal(student, teacher, ids, tokens=96, seq_len=None, batch_size=2, progress=False)
    assert rep.steps == 3 and rep.config["seq_len"] == 16 and rep.curve == []
    with pytest.raises(ValueError, match="hold 6 sequences, the budget needs 8"):
        heal(student, teacher, ids, tokens=128, seq_len=None, batch_size=2, progress=False)


# ----------------------------------------------------------------------------- errors

def test_errors_are_clear_and_early():
    teacher, tok = _teacher()
    student = _student(teacher)
    with pytest.raises(ValueError, match=r"less than one optimizer step: .* 2 \* 32 \* 3 = 192; "
                                         r"the minimum is 192"):
        heal(student, teacher, TRAIN, tokenizer=tok, tokens=100, grad_accum=3, **SMALL)
    with pytest.raises(ValueError, match="no KronLinear or LowRankLinear"):
        heal(teacher, teacher, TRAIN, tokenizer=tok, tokens=64, **SMALL)
    with pytest.raises(ValueError, match="train must be one of"):
        heal(student, teacher, TRAIN, tokenizer=tok, tokens=64, train="all", **SMALL)
    with pytest.raises(ValueError, match="both 0"):
        heal(student, teacher, TRAIN, tokenizer=tok, tokens=64, kl_weight=0, **SMALL)
    from transformers import LlamaConfig, LlamaForCausalLM

    big = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"different vocabularies \(256 and 300"):
        heal(student, big, TRAIN, tokenizer=tok, tokens=64, **SMALL)


class _ShiftedTokenizer(ByteTokenizer):
    def encode(self, text, add_special_tokens=False):
        return [(b + 1) % 256 for b in text.encode()]


def test_check_same_vocabulary_compares_the_tokenizers():
    teacher, tok = _teacher()
    check_same_vocabulary(teacher, teacher, tok, ByteTokenizer())
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocabulary(teacher, teacher, tok, _ShiftedTokenizer())


# ----------------------------------------------------------------------------- disjointness

def test_overlap_measures():
    ids = torch.arange(1000)
    assert token_overlap(ids.reshape(10, 100), ids[150:250], n=8) == pytest.approx(
        (93 - 8 + 1 - 0) / 93, abs=0.2)  # windows across the row boundary at 200 are not in
    assert token_overlap(ids.reshape(10, 100), torch.arange(2000, 2100), n=8) == 0.0
    assert token_overlap(ids[None], ids[:5], n=8) == 0.0  # shorter than n
    assert text_overlap(TRAIN, HELD_OUT) == 0.0
    assert text_overlap(TRAIN + HELD_OUT, HELD_OUT) == 1.0


def test_training_on_the_evaluated_text_is_refused():
    teacher, tok = _teacher()
    student = _student(teacher)
    with pytest.raises(ValueError, match="training and evaluation text overlap: .*eval text "
                                         "'held'"):
        heal(student, teacher, TRAIN + " " + HELD_OUT * 4, tokenizer=tok, tokens=64 * 4,
             eval_text={"held": HELD_OUT}, **SMALL)
    ids = torch.tensor([tok.encode(HELD_OUT)[i:i + 32] for i in range(0, 256, 32)])
    with pytest.raises(ValueError, match=r"[\d.]+% of the 32-token windows of eval text 'eval'"):
        heal(student, teacher, ids, tokenizer=tok, tokens=64, eval_text=HELD_OUT, **SMALL)
    with pytest.warns(UserWarning, match="overlap"):
        _, rep = heal(student, teacher, ids, tokenizer=tok, tokens=64, eval_text=HELD_OUT,
                      allow_overlap=True, **SMALL)
    assert rep.overlap["token_overlap"]["eval"] > 0 and rep.overlap["ngram"] == 32


def test_a_held_out_part_of_a_stored_corpus_is_refused():
    from kronlab.data import split_corpus

    teacher, tok = _teacher()
    student = _student(teacher)
    held = split_corpus("austen")[1]
    with pytest.raises(ValueError, match="held-out part of the stored corpus 'austen'"):
        heal(student, teacher, held[:20000], tokenizer=tok, tokens=64, **SMALL)


def test_default_training_text_is_the_calibration_parts():
    from kronlab.data import split_corpus

    text = default_training_text()
    for name in defaults.HEAL_TEXTS:
        calib, held = split_corpus(name)
        assert calib[:1000] in text and calib[-1000:] in text
        assert text_overlap(text, held, probes=32) == 0.0
    assert len(text) == sum(len(split_corpus(n)[0]) for n in defaults.HEAL_TEXTS) + 4


# ----------------------------------------------------------------------------- kronlab heal

def _flat(text: str) -> str:
    return " ".join(text.split())


def _byte_tokenizer():
    """A transformers tokenizer whose tokens are the 256 bytes (tests/test_cli.py's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """A tiny Llama teacher folder, a kronlab save compressed from it, and text files."""
    root = tmp_path_factory.mktemp("heal")
    teacher, _ = _teacher()
    teacher.save_pretrained(root / "teacher")
    _byte_tokenizer().save_pretrained(root / "teacher")
    (root / "train.txt").write_text(TRAIN)
    (root / "held.txt").write_text(HELD_OUT)
    assert main(["compress", "--model", str(root / "teacher"), "--method", "svd", "--ratio",
                 "0.5", "--no-output-error", "--out", str(root / "save")]) == 0
    return root


def _heal_args(root, out, *extra):
    return ["heal", "--model", str(root / "save"), "--out", str(out), "--text",
            str(root / "train.txt"), "--eval-text", str(root / "held.txt"), "--tokens", "256",
            "--seq-len", "32", "--batch-size", "2", "--eval-every", "128", "--eval-tokens",
            "128", "--window", "64", "--lr", "3e-3", *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(kronlab.models, "load_model", boom)
    monkeypatch.setattr(kronlab.io, "load_compressed", boom)


def test_cli_heal_argument_errors(saves, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    austen = tmp_path / "persuasion.txt"
    from kronlab.data import split_corpus

    austen.write_text(split_corpus("austen")[1][:30000])
    cases = [
        (["--model", str(saves / "teacher")],
         r"--model .*teacher is not a kronlab save \(no kronlab.json\): compress it first with "
         r"`kronlab compress`"),
        (["--tokens", "10"], r"--tokens 10 is less than one optimizer step: --batch-size \* "
                             r"--seq-len \* --grad-accum = 2 \* 32 \* 1 = 64; the minimum is "
                             r"--tokens 64"),
        (["--grad-accum", "3", "--tokens", "100"], r"the minimum is --tokens 192"),
        (["--text", str(saves / "held.txt")], r"contains passages of --eval-text .*held.txt: "
                                              r"training and evaluation text must be disjoint"),
        (["--text", str(austen)], r"held-out part of the stored corpus 'austen'"),
        (["--text", "missing.txt"], r"--text 'missing.txt': no such file, and not a stored "
                                    r"corpus"),
        (["--eval-tokens", "32"], r"--eval-tokens 32 is less than --window 64"),
        (["--teacher", "/nonexistent/model"], r"--teacher: model '/nonexistent/model' not "
                                              r"found"),
        (["--warmup", "1"], r"argument --warmup: must be in \[0, 1\), got 1"),
        (["--lr", "0"], r"argument --lr: must be a positive number, got 0"),
        (["--train", "all"], r"argument --train: invalid choice: 'all'"),
        (["--kl-weight", "0"], r"--kl-weight and --nll-weight are both 0"),
        (["--device", "tpu"], r"--device 'tpu' is not a device"),
    ]
    for extra, message in cases:
        args = _heal_args(saves, out)
        # a later option wins in argparse, except for the repeatable --text/--eval-text
        if extra[0] == "--text":
            i = args.index("--text")
            args[i + 1] = extra[1]
            extra = extra[2:]
        assert main(args + extra) == 2, extra
        err = _flat(capsys.readouterr().err)
        assert re.search(message, err), (message, err)
        assert not out.exists()
    # the output folder and the checkpoint
    assert main(_heal_args(saves, saves / "save", "--overwrite")) == 2
    assert "is --model: write the healed model to a new folder" in _flat(capsys.readouterr().err)
    out.mkdir()
    (out / "kronlab.json").write_text("{}")
    assert main(_heal_args(saves, out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    ckpt = tmp_path / "new.heal-checkpoint"
    ckpt.mkdir()
    assert main(_heal_args(saves, tmp_path / "new")) == 2
    assert "pass --resume to continue it" in _flat(capsys.readouterr().err)


def test_cli_heal_refuses_a_teacher_with_another_vocabulary(saves, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    _byte_tokenizer().save_pretrained(other)
    assert main(_heal_args(saves, tmp_path / "out", "--teacher", str(other))) == 2
    err = _flat(capsys.readouterr().err)
    assert "different vocabularies (256 and 300 output tokens)" in err
    assert not (tmp_path / "out").exists()


def test_cli_heal_round_trip_and_resume(saves, tmp_path, capsys, monkeypatch):
    out = tmp_path / "healed"
    assert main(_heal_args(saves, out)) == 0
    stdout = capsys.readouterr().out
    settings = next(line for line in stdout.splitlines() if line.startswith("settings:"))
    for part in (f"teacher={saves / 'teacher'} (recorded in save/kronlab.json)",
                 "tokens=256 (4 steps of 2 x 32 x 1)", "lr=0.003", "train=factors",
                 f"warmup={defaults.HEAL_WARMUP:g}", "teacher_logits=on the fly",
                 "eval_text=held", "device=cpu", "resume=no"):
        assert part in settings, part
    assert re.search(r"held: perplexity [\d.]+ -> [\d.]+", stdout)
    assert re.search(r"256 tokens at [\d.]+ tokens/s", stdout)
    assert not (tmp_path / "healed.heal-checkpoint").exists()  # removed after the save

    manifest = json.loads((out / "kronlab.json").read_text())
    original = json.loads((saves / "save" / "kronlab.json").read_text())
    assert manifest["model_dtype"] == original["model_dtype"]  # --dtype auto
    extra = manifest["config_extra"]
    assert extra["report"] == original["config_extra"]["report"]  # the compression's, kept
    heal_rec = extra["heal"]
    assert [p["tokens"] for p in heal_rec["report"]["curve"]] == [0, 128, 256]
    assert heal_rec["report"]["config"]["steps"] == 4 and heal_rec["tokens"] == 256
    assert set(heal_rec["timings"]) == {"load", "heal", "save"}
    model, tok = load_compressed(out)
    assert tok is not None and len(heal_rec["report"]["losses"]) == 4
    res = tmp_path / "res.json"
    assert main(["evaluate", "--model", str(out), "--text", str(saves / "held.txt"),
                 "--window", "64", "--max-tokens", "128", "--json", str(res)]) == 0
    ppl = json.loads(res.read_text())["perplexity"]["held"]["perplexity"]
    assert ppl == pytest.approx(heal_rec["report"]["curve"][-1]["perplexity"]["held"], rel=1e-2)

    # interrupted after 2 steps, then resumed: the same model as the uninterrupted run
    real = kronlab.heal.heal

    def interrupted(*args, **kwargs):
        real(*args, **{**kwargs, "stop_after": 2})
        raise KeyboardInterrupt

    monkeypatch.setattr(kronlab.heal, "heal", interrupted)
    out2 = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        main(_heal_args(saves, out2))
    monkeypatch.setattr(kronlab.heal, "heal", real)
    assert (tmp_path / "again.heal-checkpoint" / CHECKPOINT).is_file() and not out2.exists()
    capsys.readouterr()
    assert main(_heal_args(saves, out2)) == 2
    assert main(_heal_args(saves, out2, "--resume")) == 0
    assert "resume: continuing from" in capsys.readouterr().out
    a, _ = load_compressed(out)
    b, _ = load_compressed(out2)
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), b.state_dict()[k].float(), atol=1e-6), k


def test_cli_heal_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["heal", "--help"])
    text = _flat(capsys.readouterr().out)
    for option, value in [("--tokens", defaults.HEAL_TOKENS), ("--seq-len", defaults.HEAL_SEQ_LEN),
                          ("--batch-size", defaults.HEAL_BATCH_SIZE),
                          ("--grad-accum", defaults.HEAL_GRAD_ACCUM),
                          ("--lr", defaults.HEAL_LR), ("--warmup", defaults.HEAL_WARMUP),
                          ("--nll-weight", defaults.HEAL_NLL_WEIGHT),
                          ("--train", defaults.HEAL_TRAIN),
                          ("--eval-every", defaults.HEAL_EVAL_EVERY),
                          ("--eval-tokens", defaults.EVAL_TOKENS), ("--seed", defaults.SEED),
                          ("--threads", defaults.THREADS)]:
        assert re.search(re.escape(option) + r"\b.*?\(default: " + re.escape(str(value)), text), \
            option
    assert f"default: {','.join(defaults.HEAL_TEXTS)}" in text
    from kronlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
               and "heal" in a.choices).choices["heal"]
    assert all(action.help for action in sub._actions)


# ----------------------------------------------------------------------------- sweep, benchmark

def _script(path: str):
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(f"_test_{name}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heal_sweep_on_a_tiny_model(saves, tmp_path, monkeypatch, capsys):
    teacher, _ = _teacher()
    monkeypatch.setattr(kronlab.models, "load_model", lambda *a, **k: (teacher, ByteTokenizer()))
    sweep = _script("scripts/heal_sweep.py")
    out, work = tmp_path / "heal_sweep.json", tmp_path / "work"
    args = ["--text", str(saves / "train.txt"), "--eval", str(saves / "held.txt"),
            "--calibration", str(saves / "train.txt"), "--calib-tokens", "128",
            "--calib-seq-len", "64", "--tokens", "256", "--seq-len", "32", "--batch-size", "2",
            "--eval-every", "128", "--eval-tokens", "128", "--window", "64", "--lr", "3e-3",
            "--ratios", "0.8", "0.6", "--methods", "svd-aa", "kron-aa", "--out", str(out),
            "--work", str(work)]
    assert sweep.main(args) == 0
    res = json.loads(out.read_text())
    assert [(r["method"], r["ratio"]) for r in res["runs"]] == [
        ("svd-aa", 0.8), ("kron-aa", 0.8), ("svd-aa", 0.6), ("kron-aa", 0.6)]
    assert set(res["dense"]) == {"held"}
    for run in res["runs"]:
        assert set(run["ppl_before"]) == set(run["ppl_after"]) == {"held"}
        assert [p["tokens"] for p in run["heal"]["curve"]] == [0, 128, 256]
        assert run["heal"]["config"]["data_sha256"] == res["runs"][0]["heal"]["config"][
            "data_sha256"]  # the same training tokens for every run
        assert run["compress"]["layer_params_kept"] <= run["ratio"] + 1e-9
        assert run["tokens_per_second"] > 0 and run["machine"]["command"]
    assert not any(work.iterdir())  # students and checkpoints removed once recorded
    with pytest.raises(SystemExit, match="pass --resume"):
        sweep.main(args)
    assert sweep.main(args + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out

    # interrupted during the second run's healing, then resumed: the same numbers
    real, calls = kronlab.heal.heal, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            real(*a, **{**k, "stop_after": 2})
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kronlab.heal, "heal", interrupted)
    out2 = tmp_path / "again.json"
    args2 = args[:args.index("--ratios")] + ["--ratios", "0.8", "--out", str(out2), "--work",
                                             str(work)]
    with pytest.raises(KeyboardInterrupt):
        sweep.main(args2)
    assert (work / "kron-aa-0.8" / "student" / "kronlab.json").is_file()
    assert (work / "kron-aa-0.8" / "checkpoint" / CHECKPOINT).is_file()
    monkeypatch.setattr(kronlab.heal, "heal", real)
    assert sweep.main(args2 + ["--resume"]) == 0
    assert "the compressed student of the interrupted run" in capsys.readouterr().out
    again = json.loads(out2.read_text())["runs"]
    assert again[1]["heal"]["resumed_from_step"] == 2
    for a, b in zip(again, res["runs"][:2], strict=True):
        assert a["ppl_after"]["held"] == pytest.approx(b["ppl_after"]["held"], rel=1e-5)


def test_bench_heal_on_a_tiny_model(monkeypatch):
    bench = _script("benchmarks/bench_heal.py")
    teacher, tok = _teacher()
    result = bench.measure(teacher, tok, ratio=0.8, blocks=1, batch_size=2, seq_len=32,
                           calib_text=TRAIN, calib_tokens=128, repeats=1, model_name="tiny")
    rows = {r["student"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "kron-fisher", "svd-aa"}  # the student heal_sweep heals
    assert result["config"]["kron_method"] == "kron-fisher" and result["config"]["macs_cap"] == 1.0
    assert rows["kron-fisher"]["macs_kept"] <= 1.0
    assert all(r["tokens_per_second"] > 0 and r["trained_parameters"] > 0 for r in rows.values())
    assert rows["dense"]["trained_parameters"] == 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3
    assert all(p.requires_grad for p in teacher.parameters())  # left as it was
    assert "tokens/s" in bench.report(result)
    json.dumps(result)
    with pytest.raises(ValueError, match="Kronecker method"):
        bench.measure(teacher, tok, kron_method="svd-aa", blocks=1, calib_text=TRAIN)

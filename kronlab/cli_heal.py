"""kronlab heal: distil a compressed model (a kronlab save) from its dense teacher.

Like ``compress`` and ``evaluate`` (:mod:`kronlab.cli_llm`), the command first checks
every argument (the save, the teacher, the texts and their disjointness, the numbers, the
output folder, the checkpoint, the device), prints one ``settings:`` line, and only then
loads the models. After loading it checks that student and teacher share the vocabulary,
then trains with :func:`kronlab.heal.heal` and writes the healed model atomically in the
format ``kronlab compress`` writes, so ``load_compressed`` and ``kronlab evaluate`` read it.
A checkpoint is kept beside the output (``OUT.heal-checkpoint``) until the save is
complete: an interrupted run continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .cli import HelpFormatter, UsageError, missing_extra
from .cli_llm import (
    check_device,
    check_model,
    check_out,
    check_text,
    int_at_least,
    positive_float,
    stored_corpora,
    text_name,
)
from .defaults import (
    EVAL_TEXTS,
    EVAL_TOKENS,
    HEAL_BATCH_SIZE,
    HEAL_CACHE_TOP_K,
    HEAL_EVAL_EVERY,
    HEAL_GRAD_ACCUM,
    HEAL_KL_WEIGHT,
    HEAL_LR,
    HEAL_NLL_WEIGHT,
    HEAL_SEQ_LEN,
    HEAL_TEMPERATURE,
    HEAL_TEXTS,
    HEAL_TOKENS,
    HEAL_TRAIN,
    HEAL_WARMUP,
    HEAL_WEIGHT_DECAY,
    SEED,
    THREADS,
    WINDOW,
)

__all__ = ["add_command", "checkpoint_dir"]

PROG = "kronlab heal"
_SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_dir(out) -> Path:
    """Where ``kronlab heal --out OUT`` keeps its checkpoint: ``OUT.heal-checkpoint``."""
    out = Path(out).expanduser()
    return out.with_name(out.name + ".heal-checkpoint")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _sources(values, default, option: str) -> dict[str, str]:
    """name -> source of comma-separated / repeated text options, each checked."""
    sources = [s.strip() for v in (values or [",".join(default)]) for s in v.split(",")]
    names: dict[str, str] = {}
    for source in (s for s in sources if s):
        check_text(source, option, PROG)
        name = text_name(source)
        if name in names:
            raise UsageError(f"{option} {names[name]!r} and {source!r} would both be reported "
                             f"as {name!r}; give each text once", PROG)
        names[name] = source
    if not names:
        raise UsageError(f"{option} names no text", PROG)
    return names


def _check_student(spec: str) -> dict:
    """The manifest of ``--model``, which must be a kronlab save."""
    path = Path(spec).expanduser()
    if not (path / "kronlab.json").is_file():
        raise UsageError(f"--model {spec} is not a kronlab save (no kronlab.json): compress it "
                         "first with `kronlab compress`", PROG)
    check_model(spec, PROG)
    from .io import read_manifest

    return read_manifest(path)


def _check_teacher(spec: str | None, manifest: dict, model: str) -> tuple[str, str, str]:
    """(teacher spec, its kind, where it came from)."""
    how = "--teacher"
    if spec is None:
        spec = (manifest.get("config_extra") or {}).get("model")
        if spec is None:
            raise UsageError(f"--teacher is needed: {model}/kronlab.json does not record the "
                             "model it was compressed from", PROG)
        how = f"recorded in {Path(model).name}/kronlab.json"
    try:
        kind = check_model(spec, PROG)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--model", "--teacher", 1)
                         + ("" if how == "--teacher" else f" (the teacher {how}; pass "
                                                          "--teacher)"), PROG) from None
    return spec, kind, how


def _heal_settings(args) -> tuple[dict, dict]:
    """Check every argument of ``kronlab heal``; return (settings, texts read)."""
    hint = missing_extra(("transformers", "safetensors", "tqdm"), "llm")
    if hint:
        raise UsageError(hint, PROG)
    manifest = _check_student(args.model)
    teacher, teacher_kind, teacher_how = _check_teacher(args.teacher, manifest, args.model)
    train = _sources(args.text, HEAL_TEXTS, "--text")
    evals = _sources(args.eval_text, EVAL_TEXTS, "--eval-text")
    per_step = args.batch_size * args.seq_len * args.grad_accum
    if args.tokens < per_step:
        raise UsageError(f"--tokens {args.tokens} is less than one optimizer step: --batch-size "
                         f"* --seq-len * --grad-accum = {args.batch_size} * {args.seq_len} * "
                         f"{args.grad_accum} = {per_step}; the minimum is --tokens {per_step}",
                         PROG)
    if args.eval_tokens < args.window:
        raise UsageError(f"--eval-tokens {args.eval_tokens} is less than --window "
                         f"{args.window}; lower --window or raise --eval-tokens", PROG)
    if args.kl_weight == 0 and args.nll_weight == 0:
        raise UsageError("--kl-weight and --nll-weight are both 0: nothing to train", PROG)
    out = check_out(args.out, args.overwrite, PROG)
    if out.resolve() == Path(args.model).expanduser().resolve():
        raise UsageError(f"--out {args.out} is --model: write the healed model to a new folder "
                         "(the compressed one stays as it is)", PROG)
    ckpt = checkpoint_dir(out)
    if ckpt.exists() and not args.resume:
        raise UsageError(f"{ckpt} holds the checkpoint of an interrupted run: pass --resume to "
                         "continue it, or remove it to start again", PROG)
    device = check_device(args.device, PROG)

    # disjointness, on the text (the tokens are checked again after loading)
    from .data import load_text
    from .heal import held_out_in, text_overlap

    texts = {"train": {}, "eval": {}}
    for name, source in evals.items():
        if source != "wikitext2":
            texts["eval"][name] = load_text(source, "evaluation")
    for name, source in train.items():
        if source == "wikitext2":
            continue
        text = texts["train"][name] = load_text(source, "calibration")
        if source not in stored_corpora():
            held = held_out_in(text)
            if held:
                raise UsageError(f"--text {source} contains passages of the held-out part of "
                                 f"the stored corpus {held[0]!r}, on which perplexity is "
                                 "measured; train on other text", PROG)
        for ev_name, ev in texts["eval"].items():
            if text_overlap(text, ev) > 0:
                raise UsageError(f"--text {source} contains passages of --eval-text "
                                 f"{evals[ev_name]}: training and evaluation text must be "
                                 "disjoint", PROG)
    dtype = manifest["model_dtype"] if args.dtype == "auto" else args.dtype
    settings = {
        "model": args.model, "teacher": teacher, "teacher_kind": teacher_kind,
        "teacher_source": teacher_how, "texts": train, "eval_texts": evals,
        "tokens": args.tokens // per_step * per_step, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
        "warmup": args.warmup, "weight_decay": args.weight_decay,
        "kl_weight": args.kl_weight, "nll_weight": args.nll_weight,
        "temperature": args.temperature, "train": args.train, "eval_every": args.eval_every,
        "eval_tokens": args.eval_tokens, "window": args.window,
        "cache_teacher": args.cache_teacher, "cache_top_k": args.cache_top_k,
        "grad_checkpointing": args.grad_checkpointing, "seed": args.seed, "device": device,
        "threads": args.threads, "dtype": dtype, "out": str(out), "checkpoint": str(ckpt),
        "resume": args.resume,
    }
    return settings, texts


def _settings_line(s: dict) -> str:
    texts = ", ".join(f"{n} (calibration part)" if src in stored_corpora() else n
                      for n, src in s["texts"].items())
    evals = ", ".join(f"{n} (held-out part)" if src in stored_corpora() else n
                      for n, src in s["eval_texts"].items())
    steps = s["tokens"] // (s["batch_size"] * s["seq_len"] * s["grad_accum"])
    parts = [f"model={s['model']}", f"teacher={s['teacher']} ({s['teacher_source']})",
             f"text={texts}", f"tokens={s['tokens']} ({steps} steps of {s['batch_size']} x "
                              f"{s['seq_len']} x {s['grad_accum']})",
             f"lr={s['lr']:g}", f"warmup={s['warmup']:g}", f"weight_decay={s['weight_decay']:g}",
             f"kl_weight={s['kl_weight']:g}", f"nll_weight={s['nll_weight']:g}",
             f"temperature={s['temperature']:g}", f"train={s['train']}",
             f"eval_text={evals}", f"eval_every={s['eval_every']}",
             f"eval_tokens={s['eval_tokens']}", f"window={s['window']}",
             f"teacher_logits={'cached top-' + str(s['cache_top_k']) + ' in ' + s['cache_teacher'] if s['cache_teacher'] else 'on the fly'}",
             f"grad_checkpointing={s['grad_checkpointing']}", f"seed={s['seed']}",
             f"device={s['device']}", f"threads={s['threads']}", f"dtype={s['dtype']}",
             f"resume={'yes' if s['resume'] else 'no'}"]
    return "settings: " + ", ".join(parts)


def _cmd_heal(args) -> int:
    s, texts = _heal_settings(args)
    print(_settings_line(s), flush=True)
    ckpt = Path(s["checkpoint"])
    if s["resume"]:
        from .heal import CHECKPOINT

        print(f"resume: continuing from {ckpt / CHECKPOINT}" if (ckpt / CHECKPOINT).is_file()
              else f"resume: no checkpoint in {ckpt}; starting from the beginning", flush=True)
    from .runtime import configure_threads

    configure_threads(args.threads)

    import torch

    from .data import DOCUMENT_SEPARATOR, load_text
    from .heal import check_same_vocabulary, heal
    from .io import load_compressed, read_manifest, save_compressed, update_config_extra
    from .models import load_model
    from .runtime import Stopwatch, machine_info

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    sw = Stopwatch()
    with sw.phase("load"):
        student, tokenizer = load_compressed(Path(s["model"]).expanduser(), device=s["device"],
                                             dtype=torch.float32)
        if s["teacher_kind"] == "kronlab":
            teacher, teacher_tok = load_compressed(Path(s["teacher"]).expanduser(),
                                                   device=s["device"], dtype=torch.float32)
        else:
            teacher, teacher_tok = load_model(s["teacher"], device=s["device"],
                                              dtype=torch.float32)
    print(f"loaded {s['model']} and the teacher {s['teacher']} in {sw.seconds['load']:.1f} s",
          flush=True)
    try:
        check_same_vocabulary(student, teacher, tokenizer or teacher_tok, teacher_tok)
    except ValueError as exc:
        raise UsageError(f"--teacher {s['teacher']}: {exc}", PROG) from None
    tokenizer = tokenizer or teacher_tok
    train_text = DOCUMENT_SEPARATOR.join(
        texts["train"].get(n) or load_text(src, "calibration") for n, src in s["texts"].items())
    evals = {n: texts["eval"].get(n) or load_text(src, "evaluation")
             for n, src in s["eval_texts"].items()}
    with sw.phase("heal"):
        healed, report = heal(
            student, teacher, train_text, tokenizer=tokenizer, tokens=s["tokens"],
            seq_len=s["seq_len"], batch_size=s["batch_size"], grad_accum=s["grad_accum"],
            lr=s["lr"], warmup=s["warmup"], weight_decay=s["weight_decay"],
            kl_weight=s["kl_weight"], nll_weight=s["nll_weight"],
            temperature=s["temperature"], train=s["train"], eval_text=evals,
            eval_every=s["eval_every"], eval_tokens=s["eval_tokens"], window=s["window"],
            cache_teacher=s["cache_teacher"] or False, cache_top_k=s["cache_top_k"],
            checkpoint_dir=ckpt, resume=s["resume"],
            grad_checkpointing={"on": True, "off": False}.get(s["grad_checkpointing"], "auto"),
            seed=s["seed"], device=s["device"], in_place=True)
    print(report.summary())
    extra = dict(read_manifest(Path(s["model"]).expanduser()).get("config_extra") or {})
    extra["heal"] = {**{k: v for k, v in s.items() if k not in ("out", "checkpoint")},
                     "report": report.to_dict(),
                     "machine": machine_info(s["device"], load_start=load_start)}
    out = Path(s["out"])
    with sw.phase("save"):
        save_compressed(healed, out, tokenizer=tokenizer, config_extra=extra, dtype=s["dtype"])
    update_config_extra(out, {"heal": {**extra["heal"], "timings": {
        k: round(v, 3) for k, v in sw.seconds.items()}}})
    shutil.rmtree(ckpt, ignore_errors=True)  # the save holds the result now
    print(f"saved {out} ({s['dtype']}); `kronlab evaluate --model {out}` evaluates it")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in sw.seconds.items())
          + f" (total {sw.total:.1f} s)")
    return 0


def add_command(sub) -> None:
    """Add ``heal`` to the ``kronlab`` subcommands."""
    from .heal import TRAIN_MODES

    corpora = ", ".join(stored_corpora()) or "none found"
    h = sub.add_parser(
        "heal", help="distil a compressed model from its dense teacher",
        formatter_class=HelpFormatter,
        description="Train the factors of a compressed model (a kronlab save) so that its "
                    "next-token distribution matches the dense teacher's (knowledge "
                    "distillation, KL at a temperature plus optional next-token loss), and "
                    "save the healed model. Training text is the calibration part of stored "
                    "corpora, never the held-out part that perplexity is measured on. Every "
                    "default below comes from kronlab.defaults. Interrupted? Rerun with "
                    "--resume.")
    h.add_argument("--model", required=True,
                   help="the compressed model: a kronlab save (from `kronlab compress`)")
    h.add_argument("--out", required=True, help="folder to save the healed model in")
    h.add_argument("--teacher", default=None,
                   help="the dense model the student was compressed from: 'smollm2', a local "
                        "transformers folder, a .gguf file or a hub id (default: the model "
                        "recorded in the save's kronlab.json)")
    h.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier kronlab save")
    h.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint OUT.heal-checkpoint "
                        "(same arguments); without one, start from the beginning")
    h.add_argument("--text", action="append", metavar="CORPUS[,CORPUS]",
                   help=f"training text, comma-separated or repeated: a stored corpus "
                        f"({corpora}: its calibration part), 'wikitext2' (train split; online) "
                        f"or a UTF-8 text file (default: {','.join(HEAL_TEXTS)}, "
                        "kronlab.defaults.HEAL_TEXTS)")
    h.add_argument("--tokens", type=int_at_least(1), default=HEAL_TOKENS,
                   help="training tokens, rounded down to whole optimizer steps (at least "
                        "--batch-size * --seq-len * --grad-accum)")
    h.add_argument("--seq-len", type=int_at_least(2), default=HEAL_SEQ_LEN,
                   help="tokens per training sequence")
    h.add_argument("--batch-size", type=int_at_least(1), default=HEAL_BATCH_SIZE,
                   help="sequences per forward pass")
    h.add_argument("--grad-accum", type=int_at_least(1), default=HEAL_GRAD_ACCUM,
                   help="forward passes per optimizer step")
    h.add_argument("--lr", type=positive_float, default=HEAL_LR,
                   help="AdamW peak learning rate (linear warm-up, then cosine decay to 0)")
    h.add_argument("--warmup", type=_fraction, default=HEAL_WARMUP,
                   help="fraction of the optimizer steps spent in warm-up")
    h.add_argument("--weight-decay", type=_non_negative, default=HEAL_WEIGHT_DECAY,
                   help="AdamW weight decay of the factors (norms and biases get none)")
    h.add_argument("--kl-weight", type=_non_negative, default=HEAL_KL_WEIGHT,
                   help="weight of T^2 KL(teacher || student)")
    h.add_argument("--nll-weight", type=_non_negative, default=HEAL_NLL_WEIGHT,
                   help="weight of the next-token loss on the training text")
    h.add_argument("--temperature", type=positive_float, default=HEAL_TEMPERATURE,
                   help="softmax temperature T of the KL term")
    h.add_argument("--train", default=HEAL_TRAIN, choices=TRAIN_MODES,
                   help="factors: KronLinear A, B and LowRankLinear U, V; "
                        "factors+norms+biases: also every norm and bias")
    h.add_argument("--eval-text", action="append", metavar="CORPUS[,CORPUS]",
                   help=f"held-out text for the perplexity curve, comma-separated or repeated: "
                        f"a stored corpus ({corpora}: its held-out part), 'wikitext2' (test "
                        f"split) or a text file (default: {','.join(EVAL_TEXTS)}, "
                        "kronlab.defaults.EVAL_TEXTS)")
    h.add_argument("--eval-every", type=int_at_least(0), default=HEAL_EVAL_EVERY,
                   help="measure perplexity every this many training tokens (0: before and "
                        "after only); checkpoints are written at the same points")
    h.add_argument("--eval-tokens", type=int_at_least(2), default=EVAL_TOKENS,
                   help="score the first this many tokens of each --eval-text")
    h.add_argument("--window", type=int_at_least(2), default=WINDOW,
                   help="tokens per perplexity window")
    h.add_argument("--cache-teacher", default=None, metavar="DIR",
                   help="keep the teacher's top-k log-probabilities of every training sequence "
                        "in DIR (built once, reused by later runs on the same tokens); the "
                        "loss is then the KL over the top-k tokens plus the rest, a lower "
                        "bound (default: teacher logits on the fly, exact KL)")
    h.add_argument("--cache-top-k", type=int_at_least(1), default=HEAL_CACHE_TOP_K,
                   help="tokens per position kept by --cache-teacher (8k+4 bytes a token)")
    h.add_argument("--grad-checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="recompute each block in the backward pass instead of storing its "
                        "activations; auto: when the Kronecker intermediates of a micro-batch "
                        "exceed kronlab.defaults.HEAL_ACTIVATION_LIMIT")
    h.add_argument("--seed", type=int_at_least(0), default=SEED,
                   help="seed of the training sequences' start positions")
    h.add_argument("--dtype", default="auto", choices=_SAVE_DTYPES,
                   help="dtype of the saved weights; auto: the dtype of the --model save. "
                        "Training always runs on float32 weights")
    h.add_argument("--device", default="cpu",
                   help="where to train: cpu, cuda or cuda:N (bfloat16 autocast on CUDA)")
    h.add_argument("--threads", type=int_at_least(1), default=THREADS,
                   help="CPU threads for torch (default: %(default)s, kronlab.defaults.THREADS)")
    h.set_defaults(func=_cmd_heal)

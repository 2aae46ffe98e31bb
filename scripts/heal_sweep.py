"""Heal compressed SmolLM2 students by distillation; record perplexity before/after and curves.

    python scripts/heal_sweep.py                         # issue 12's sweep (CPU: hours)
    python scripts/heal_sweep.py --device cuda           # the same on a GPU
    python scripts/heal_sweep.py --resume                # continue an interrupted sweep

For every ratio (default 0.8, 0.6) and method (default ``svd-aa`` and ``kron-aa``, the best
Kronecker method of the recorded sweep), the dense model is compressed with the book's
protocol (:mod:`kronlab.defaults`: calibration statistics collected once and shared) and
the student is healed with :func:`kronlab.heal.heal` on the same token budget, the same
training tokens (the calibration parts of :data:`kronlab.defaults.HEAL_TEXTS`) and the
same settings. The held-out perplexity of every evaluation text (the held-out parts of
:data:`kronlab.defaults.EVAL_TEXTS`) is measured before healing, every ``--eval-every``
training tokens and after: the curve.

Writes ``data/results/heal_sweep.json`` atomically after every run: the configuration,
the machine, the dense perplexities, and per run the compression summary, the healing
report (configuration, curve, losses, tokens/s, timings, overlap checks) and its date and
machine. ``--resume`` skips finished runs and continues a run that was interrupted from
its checkpoint; the compressed student of a run in progress is kept in ``--work`` (its
compression, minutes for kron-aa, is not redone) and removed when the run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.defaults import (  # noqa: E402
    ALS_SWEEPS,
    CALIB_TOKENS,
    CALIBRATION,
    EVAL_TEXTS,
    EVAL_TOKENS,
    HEAL_BATCH_SIZE,
    HEAL_EVAL_EVERY,
    HEAL_GRAD_ACCUM,
    HEAL_LR,
    HEAL_NLL_WEIGHT,
    HEAL_SEQ_LEN,
    HEAL_TEXTS,
    HEAL_TOKENS,
    HEAL_TRAIN,
    PERMUTE,
    SEED,
    SEQ_LEN,
    SHAPE_POLICY,
    THREADS,
    WINDOW,
)
from kronlab.paths import repo_root, results_dir, write_atomic  # noqa: E402
from kronlab.results import resumed_config  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

NAME = "heal_sweep"
# options that plan the sweep (which runs, where, how fast); the others define the
# results, and a file can be resumed only under the same values of those
PLAN_KEYS = ("methods", "ratios", "device", "threads", "work")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="the dense model (default: smollm2)")
    p.add_argument("--methods", nargs="+", default=["svd-aa", "kron-aa"],
                   help="methods of kronlab.compress.METHODS")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--calibration", default=CALIBRATION, help="compression calibration text")
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    p.add_argument("--calib-seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS)
    p.add_argument("--macs-cap", type=float, default=None,
                   help="Kronecker methods only: keep each layer's forward MACs within this "
                        "fraction of the dense layer's (the recorded sweep's best kron-fisher "
                        "used 1.0)")
    p.add_argument("--text", nargs="+", default=list(HEAL_TEXTS),
                   help="training texts: stored corpora (their calibration parts) or files")
    p.add_argument("--tokens", type=int, default=HEAL_TOKENS, help="training tokens per run")
    p.add_argument("--seq-len", type=int, default=HEAL_SEQ_LEN)
    p.add_argument("--batch-size", type=int, default=HEAL_BATCH_SIZE)
    p.add_argument("--grad-accum", type=int, default=HEAL_GRAD_ACCUM)
    p.add_argument("--lr", type=float, default=HEAL_LR)
    p.add_argument("--nll-weight", type=float, default=HEAL_NLL_WEIGHT)
    p.add_argument("--train", default=HEAL_TRAIN, choices=["factors", "factors+norms+biases"])
    p.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS),
                   help="evaluation texts: stored corpora (their held-out parts) or files")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    p.add_argument("--eval-every", type=int, default=HEAL_EVAL_EVERY)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--cache-teacher", default=None, metavar="DIR",
                   help="share one top-k teacher cache between the runs (a lower-bound KL); "
                        "default: teacher logits on the fly")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--work", default=str(repo_root() / "_build" / NAME),
                   help="students and checkpoints of runs in progress")
    p.add_argument("--out", default=str(results_dir() / f"{NAME}.json"))
    p.add_argument("--resume", action="store_true")
    return p


def _write(obj, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    from kronlab.compress import METHODS

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; valid (kronlab.compress.METHODS): {', '.join(METHODS)}")
    per_step = args.seq_len * args.batch_size * args.grad_accum
    if args.tokens < per_step:
        p.error(f"--tokens {args.tokens} is less than one optimizer step ({per_step} tokens)")

    from kronlab.calibration import collect_statistics
    from kronlab.compress import compress
    from kronlab.data import DOCUMENT_SEPARATOR, calibration_token_batches, load_text
    from kronlab.evaluate import perplexity
    from kronlab.heal import heal
    from kronlab.io import load_compressed, save_compressed
    from kronlab.models import find_linear_layers, load_model
    from kronlab.runtime import machine_info

    out, work = Path(args.out), Path(args.work)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    results = {"config": config, "machine": machine_info(args.device, load_start=load_start),
               "dense": {}, "runs": []}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        try:
            old["config"] = resumed_config(old["config"], config, PLAN_KEYS,
                                           ("methods", "ratios"), out)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        results = old
        print(f"resuming: {len(results['runs'])} runs already in {out}", flush=True)
    elif out.exists():
        raise SystemExit(f"{out} exists: pass --resume to add to it, or choose another --out")

    done = {(r["method"], r["ratio"]) for r in results["runs"]}
    plan = [(m, r) for r in args.ratios for m in args.methods if (m, r) not in done]
    if not plan:
        print(f"nothing to do: every run is in {out}")
        return 0

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    results["model_load_seconds"] = time.perf_counter() - t0
    eval_texts = {Path(n).stem if Path(n).is_file() else n: load_text(n, "evaluation")
                  for n in args.eval}
    train_text = DOCUMENT_SEPARATOR.join(load_text(n, "calibration") for n in args.text)
    if not results["dense"]:
        for name, text in eval_texts.items():
            results["dense"][name] = perplexity(model, tok, text, window=args.window,
                                                max_tokens=args.eval_tokens, progress=False)
            print(f"dense {name}: {results['dense'][name]['perplexity']:.3f}", flush=True)
        _write(results, out)

    names = list(find_linear_layers(model))
    stats = None
    for method, ratio in plan:
        tag = f"{method}-{ratio:g}"
        student_dir, ckpt = work / tag / "student", work / tag / "checkpoint"
        run_load = os.getloadavg() if hasattr(os, "getloadavg") else None
        run = {"method": method, "ratio": ratio, "date": _now()}
        if (student_dir / "kronlab.json").is_file():
            student, _ = load_compressed(student_dir, device=args.device)
            meta = json.loads((student_dir / "kronlab.json").read_text())["config_extra"]
            run.update(compress_seconds=meta["compress_seconds"], compress=meta["compress"])
            print(f"{tag}: the compressed student of the interrupted run, from {student_dir}",
                  flush=True)
        else:
            if stats is None:
                calib = calibration_token_batches(tok, load_text(args.calibration, "calibration"),
                                                  n_tokens=args.calib_tokens,
                                                  seq_len=args.calib_seq_len, seed=args.seed)
                fisher = any(m.endswith("-fisher") for m in args.methods)
                t0 = time.perf_counter()
                stats = collect_statistics(model, calib, names, gradients=fisher,
                                           device=args.device)
                results["calibration_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            student, report = compress(model, method=method, ratio=ratio, covariances=stats.cov,
                                       gcovariances=stats.gcov if method.endswith("-fisher")
                                       else None, als_sweeps=args.als_sweeps,
                                       macs_ratio=args.macs_cap if method.startswith("kron")
                                       else None,
                                       permute=PERMUTE if method == "kron-aa" else None,
                                       shape_policy=SHAPE_POLICY, device=args.device,
                                       progress=False)
            run["compress_seconds"] = time.perf_counter() - t0
            run["compress"] = report.summary()
            save_compressed(student, student_dir, config_extra={
                "compress_seconds": run["compress_seconds"], "compress": run["compress"]})
            print(f"{tag}: compressed in {run['compress_seconds']:.0f} s", flush=True)
        ckpt.mkdir(parents=True, exist_ok=True)
        healed, rep = heal(student, model, train_text, tokenizer=tok, tokens=args.tokens,
                           seq_len=args.seq_len, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, lr=args.lr, nll_weight=args.nll_weight,
                           train=args.train, eval_text=eval_texts, eval_every=args.eval_every,
                           eval_tokens=args.eval_tokens, window=args.window,
                           cache_teacher=args.cache_teacher or False, checkpoint_dir=ckpt,
                           resume=True, seed=args.seed, device=args.device, in_place=True)
        run.update(ppl_before=rep.ppl_before, ppl_after=rep.ppl_after,
                   tokens_per_second=rep.tokens_per_second, heal=rep.to_dict(),
                   machine=machine_info(args.device, load_start=run_load))
        results["runs"].append(run)
        _write(results, out)
        shutil.rmtree(work / tag, ignore_errors=True)
        change = ", ".join(f"{k} {rep.ppl_before[k]:.2f} -> {rep.ppl_after[k]:.2f}"
                           for k in rep.ppl_before)
        print(f"{tag}: {change} ({rep.tokens} tokens at {rep.tokens_per_second:.1f} tokens/s)",
              flush=True)
        del student, healed
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

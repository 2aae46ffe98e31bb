"""Which error predicts the damage? Compress one layer alone; measure the loss it costs.

    .venv/bin/python scripts/layer_damage.py --device cuda        # the study (defaults below)
    nice -n 10 .venv/bin/python scripts/layer_damage.py --blocks 0 --ratios 0.6 \\
        --methods kron svd --calib-tokens 1024 --eval-tokens 1024 --out /tmp/ld.json  # smoke run
    .venv/bin/python scripts/layer_damage.py --resume             # add missing rows only

For every block of ``--blocks`` (default 0, 14, 29 of SmolLM2-135M's 30), every linear
layer of that block (its 7 types, or ``--types``), every ratio and every method, the
layer is compressed **alone** with :func:`kronlab.compress.compress_layer` (given the
layer's input covariance ``C`` and, where the method accepts it, its output-gradient
covariance ``G``), swapped into the model with :func:`kronlab.models.set_submodule`,
evaluated, and swapped back. Each row records the layer's relative errors

* ``weight_error``  e_W = ||E||_F / ||W||_F,
* ``output_error``  e_Y = sqrt(tr(E C E^T) / tr(W C W^T)),
* ``fisher_error``  e_F = sqrt(tr(G E C E^T) / tr(G W C W^T)) (the report's when
  compress_layer gives one, else computed here from the same ``C`` and ``G``),
* ``kfac_increase`` N/(2 N_pred) tr(G E C E^T), the K-FAC estimate of the calibration
  loss increase in nats (:meth:`kronlab.calibration.Statistics.kfac_loss_increase`),

with ``E = W - W_hat``, and the damage: ``calib_increase``, the increase of the mean
next-token negative log-likelihood on the calibration tokens (the same tokens as ``C``
and ``G``), and ``eval_increase``, that of the held-out text (``--eval``'s
:func:`kronlab.data.split_corpus` evaluation part, its first ``--eval-tokens`` tokens in
windows of ``--window``; ``eval_ppl`` is its perplexity). ``correlations`` holds the
Spearman rank correlation of each increase with each error, over all rows and per layer
type (``n`` rows each).

Writes ``data/results/layer_damage.json`` atomically after every row (so ``--resume``
continues an interrupted run; rows already present are skipped, and the plan options
may grow): the configuration, the statistics' sizes and memory, the dense baseline of
the last session, the rows, the correlations and ``kronlab.runtime.machine_info()`` of
each session. Everything runs on ``--device`` (cuda or cpu). With ``--reuse-prefix`` (the
default) a row's evaluation starts at its layer's block: the blocks before it are
unchanged, so their outputs on the calibration and held-out tokens are recorded once on
the dense model and looked up (:class:`kronlab.models.BlockInputCache`), which gives the
same numbers as a full forward (checked per block at dense, ``prefix_check``). On 2 CPU
cores a row takes 20-90 s at the defaults (252 rows), most of it the head's 49,152-way
softmax and the blocks from the layer's on; on a GPU a few seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.defaults import CALIB_TOKENS, CALIBRATION, SEED, SEQ_LEN, THREADS, WINDOW  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.results import resumed_config  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

__all__ = ["build_parser", "calibration_nll", "correlations", "main", "spearman"]

DEFAULT_METHODS = ["kron", "kron-aa", "kron-fisher", "svd", "svd-aa", "svd-fisher"]
# Options that choose which rows to run; the others define the results, and a file can
# be resumed only under the same values of those.
PLAN_KEYS = ("blocks", "types", "ratios", "methods", "threads", "device", "batch_size",
             "reuse_prefix")
ERRORS = ("weight_error", "output_error", "fisher_error", "kfac_increase")
DAMAGES = ("calib_increase", "eval_increase")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: the offline SmolLM2-135M)")
    p.add_argument("--blocks", nargs="+", type=int, default=[0, 14, 29])
    p.add_argument("--types", nargs="+", default=None,
                   help="layer types (kronlab.models.layer_type, e.g. mlp.up_proj); default all")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="methods of kronlab.compress.METHODS")
    p.add_argument("--calibration", default=CALIBRATION, help="stored corpus for C, G and the "
                   "calibration loss (its split_corpus calibration part)")
    p.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval", default="sotu", help="stored corpus whose held-out part is evaluated")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"torch CPU threads (default {THREADS}; 0 leaves torch's default)")
    p.add_argument("--reuse-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate a row from its layer's block on: the blocks before it are "
                        "unchanged, so their outputs are recorded once on the dense model and "
                        "looked up (kronlab.models.BlockInputCache; checked against the full "
                        "forward at dense per block); --no-reuse-prefix runs every block")
    p.add_argument("--out", type=Path, default=results_dir() / "layer_damage.json")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out, add the missing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get average ranks); NaN below 3 points or if constant.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 6)
    0.8
    """
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # average ranks of ties
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def correlations(rows: list[dict]) -> dict:
    """``{damage: {"all" | layer type: {error: rho, ..., "n": rows}}}`` (Spearman).

    Each correlation uses the rows where both values are finite numbers.
    """
    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    groups = {"all": rows}
    for r in rows:
        groups.setdefault(r["type"], []).append(r)
    out: dict = {}
    for damage in DAMAGES:
        out[damage] = {}
        for group, rs in groups.items():
            entry: dict = {"n": len(rs)}
            for err in ERRORS:
                pairs = [(r[err], r[damage]) for r in rs if finite(r.get(err)) and finite(r.get(damage))]
                entry[err] = spearman(*zip(*pairs, strict=True)) if len(pairs) >= 3 else float("nan")
            out[damage][group] = entry
    return out


def calibration_nll(model, batches, device) -> dict:
    """Mean next-token negative log-likelihood (nats) over token batches, summed in float64.

    Each (b, T) batch predicts its tokens 2..T from the ones before (as
    :func:`kronlab.evaluate.perplexity` does within a window). Returns ``nll``,
    ``nll_sum`` and ``n_predicted``.
    """
    import torch
    import torch.nn.functional as F

    nll_sum, n_pred = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            logits = model(input_ids=b, use_cache=False).logits
            pred = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64)
            nll_sum += float(F.cross_entropy(pred, b[:, 1:].reshape(-1), reduction="sum"))
            n_pred += b.shape[0] * (b.shape[1] - 1)
    return {"nll": nll_sum / n_pred, "nll_sum": nll_sum, "n_predicted": n_pred}


def _write(results: dict, out: Path) -> None:
    results["correlations"] = correlations(results["rows"])
    # NaN is not JSON: correlations that cannot be computed are written as null
    write_atomic(out, json.dumps(_nan_to_none(results), indent=1, default=str,
                                 allow_nan=False) + "\n")


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    configure_threads(args.threads or None)  # before torch is imported
    import inspect

    import torch

    from kronlab.calibration import collect_statistics
    from kronlab.compress import METHODS, compress_layer
    from kronlab.data import calibration_token_batches, split_corpus
    from kronlab.evaluate import perplexity
    from kronlab.models import (
        BlockInputCache,
        block_index,
        find_linear_layers,
        layer_type,
        linear_weight,
        load_model,
        set_submodule,
    )
    from kronlab.runtime import machine_info

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; valid (kronlab.compress.METHODS): {', '.join(METHODS)}")
    bad = [r for r in args.ratios if not 0 < r <= 1]
    if bad:
        p.error(f"ratios must lie in (0, 1], got {bad}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    takes_gcov = "gcov" in inspect.signature(compress_layer).parameters
    out: Path = args.out
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "progress")}
    results = {"description": __doc__.split("\n\n")[0], "config": config, "sessions": [],
               "statistics": {}, "dense": {}, "rows": [], "correlations": {}}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        try:
            old["config"] = resumed_config(old["config"], config, PLAN_KEYS,
                                           ("blocks", "ratios", "methods"), out)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        results = old
        oc = results["config"]
        oc["types"] = (None if oc["types"] is None or config["types"] is None
                       else list(dict.fromkeys(oc["types"] + config["types"])))
        oc.update(threads=config["threads"], device=config["device"],
                  batch_size=config["batch_size"], reuse_prefix=config["reuse_prefix"])
        print(f"resuming: {len(results['rows'])} rows already in {out}")

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    seconds = {"load": time.perf_counter() - t0}
    layers = find_linear_layers(model)
    blocks_here = sorted({block_index(n) for n in layers if block_index(n) is not None})
    missing = [b for b in args.blocks if b not in blocks_here]
    if missing:
        p.error(f"blocks {missing} not in the model (blocks {blocks_here[0]}..{blocks_here[-1]})")
    names = [n for n in layers if block_index(n) in args.blocks
             and (args.types is None or layer_type(n) in args.types)]
    if not names:
        types_here = sorted({layer_type(n) for n in layers})
        p.error(f"no layer of types {args.types}; the model's types: {', '.join(types_here)}")

    batches = calibration_token_batches(tok, split_corpus(args.calibration)[0],
                                        n_tokens=args.calib_tokens, seq_len=args.seq_len,
                                        seed=args.seed)
    eval_text = split_corpus(args.eval)[1]
    stats = collect_statistics(model, batches, names, device=args.device,
                               batch_size=args.batch_size, progress=args.progress)
    seconds["statistics"] = stats.seconds
    results["statistics"] = {
        "n_tokens": stats.n_tokens, "n_sequences": stats.n_sequences,
        "n_predicted": stats.n_predicted, "loss": stats.loss, "layers": len(names),
        "accumulator_bytes": stats.accumulator_bytes, "peak_bytes": stats.peak_bytes,
        "seconds": stats.seconds}
    calib_batches = list(batches.split(args.batch_size))

    def evaluate() -> tuple[dict, dict]:
        return (calibration_nll(model, calib_batches, args.device),
                perplexity(model, tok, eval_text, window=args.window, max_tokens=args.eval_tokens,
                           progress=False))

    cache = BlockInputCache(model, args.blocks if args.reuse_prefix else [])
    t0 = time.perf_counter()
    with cache.record():
        dense_calib, dense_eval = evaluate()
    seconds["dense"] = time.perf_counter() - t0
    results["dense"] = {"calib": dense_calib, "eval": dense_eval, "device": args.device}
    print(f"dense: calibration nll {dense_calib['nll']:.4f}, {args.eval} held-out perplexity "
          f"{dense_eval['perplexity']:.3f} ({stats.n_tokens} calibration tokens; statistics "
          f"{stats.accumulator_bytes / 2**20:.0f} MiB, {stats.seconds:.0f} s)", flush=True)

    plan = [(name, ratio, method) for name in names for ratio in args.ratios
            for method in args.methods]
    done = {(r["layer"], r["ratio"], r["method"]) for r in results["rows"]}
    todo = [t for t in plan if t not in done]
    session = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "rows_planned": len(plan), "rows_to_run": len(todo), "takes_gcov": takes_gcov,
               "seconds": seconds}
    results["sessions"].append(session)
    if args.reuse_prefix:
        session["prefix_cache_bytes"] = cache.n_bytes
        session["prefix_check"] = {}
    from tqdm.auto import tqdm

    def check_prefix(block: int) -> None:
        """The dense model evaluated with blocks 0..block-1 looked up equals the full forward."""
        t0 = time.perf_counter()
        with cache.skip(block):
            calib, ev = evaluate()
        dev = max(abs(calib["nll"] - dense_calib["nll"]) / dense_calib["nll"],
                  abs(ev["nll"] - dense_eval["nll"]) / dense_eval["nll"])
        session["prefix_check"][str(block)] = {"max_relative_deviation": dev,
                                               "seconds": time.perf_counter() - t0}
        print(f"block {block}: dense nll with blocks 0..{block - 1} looked up deviates "
              f"{dev:.1e} (relative) from the full forward", flush=True)
        if dev > 1e-6:
            raise SystemExit(f"the recorded block inputs do not reproduce the full forward "
                             f"(relative deviation {dev:.2e} at block {block}); rerun with "
                             "--no-reuse-prefix")

    for name, ratio, method in tqdm(todo, desc="layers", unit="row", disable=not args.progress):
        W, bias = linear_weight(model.get_submodule(name))
        kwargs = {"cov": stats.cov[name]}
        if takes_gcov:
            kwargs["gcov"] = stats.gcov[name]
        t0 = time.perf_counter()
        new, rep = compress_layer(W, bias, method=method, ratio=ratio, name=name, **kwargs)
        t_fit = time.perf_counter() - t0
        new = new.to(W.device)
        E = W.detach().to(torch.float64) - new.to_dense().to(torch.float64)
        kfac = stats.kfac_loss_increase(name, E)
        fisher = getattr(rep, "fisher_error", None)
        fisher_source = "report"
        if fisher is None:
            fisher = math.sqrt(kfac / stats.kfac_loss_increase(name, W))
            fisher_source = "script"
        block = block_index(name)
        if args.reuse_prefix and block > 0 and str(block) not in session["prefix_check"]:
            check_prefix(block)
        old = set_submodule(model, name, new)
        t0 = time.perf_counter()
        try:
            if args.reuse_prefix:
                with cache.skip(block):
                    calib, ev = evaluate()
            else:
                calib, ev = evaluate()
        finally:
            set_submodule(model, name, old)
        row = {"layer": name, "block": block_index(name), "type": layer_type(name),
               "shape": list(W.shape), "ratio": ratio, "method": method, "rank": rep.rank,
               "a_shape": rep.a_shape, "b_shape": rep.b_shape, "params": rep.params,
               "dense_params": rep.dense_params, "weight_error": rep.weight_error,
               "output_error": rep.output_error, "fisher_error": fisher,
               "fisher_error_from": fisher_source, "kfac_increase": kfac,
               "calib_nll": calib["nll"], "calib_increase": calib["nll"] - dense_calib["nll"],
               "eval_nll": ev["nll"], "eval_ppl": ev["perplexity"],
               "eval_increase": ev["nll"] - dense_eval["nll"],
               "fit_seconds": t_fit, "eval_seconds": time.perf_counter() - t0,
               "device": args.device, "prefix_reused": bool(args.reuse_prefix and block > 0),
               "info": rep.info}
        results["rows"].append(row)
        session["machine"] = machine_info(args.device, load_start=load_start)
        _write(results, out)
    session["machine"] = machine_info(args.device, load_start=load_start)
    _write(results, out)
    corr = results["correlations"]
    print(f"{len(results['rows'])} rows; Spearman correlation over all rows (n = "
          f"{corr['calib_increase']['all']['n']}):")
    for damage in DAMAGES:
        c = corr[damage]["all"]
        print(f"  {damage:15s} " + "  ".join(f"{e} {c[e]:+.3f}" for e in ERRORS))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

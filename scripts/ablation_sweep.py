"""Ablation of rotations, budget allocation and closed-loop calibration on SmolLM2.

    python scripts/ablation_sweep.py                      # the issue-11 ablation (long)
    python scripts/ablation_sweep.py --ratios 0.8 --methods svd-aa --variants none \\
        --layers 'model.layers.0.*' --calib-tokens 1024 --eval-tokens 512   # a quick check

For each seed (of the calibration token sample), ratio, method and variant, compress the
model and record the perplexity on the held-out part of each evaluation corpus. Variants:

* ``none``: :func:`kronlab.compress.compress` at a uniform ratio (open loop);
* ``allocation``: per-layer ratios from :func:`kronlab.allocate.allocate`, scored by
  ``--alloc-metric`` (``fisher``: the K-FAC loss increase for every method, ``G``
  collected from the calibration tokens; ``own``: the method's own metric, the output
  error weighted by output energy for the ``-aa`` methods) with every layer's ratio at
  least ``--alloc-min-ratio`` (none by default). These settings are part of a run's
  identity (its ``allocation_key``, e.g. ``fisher`` or ``output, floor 0.4``), so runs
  with other settings are added to the same file, not skipped by ``--resume``;
* ``closed-loop``: :func:`kronlab.closed_loop.compress_closed_loop` (each block's ``C``
  on the partly compressed model; the Fisher ``G`` stays open loop), fitted to the dense
  layer's outputs on those inputs or, with ``--closed-loop-target dense``, to the dense
  model's outputs (asymmetric; part of the run's identity, label ``asymmetric <damping>``);
* ``rotation`` (Kronecker methods only; a low-rank error is rotation invariant): fold the
  norms, choose one residual-stream ``Q`` by :func:`kronlab.rotate.procrustes_rotation`
  with the method's objective, rotate, rotate the statistics exactly, and compress with
  the Procrustes factor shapes fixed (``compress(structures=...)``); with
  ``--rotation-scope block`` one ``Q`` per decoder block instead, whose ``L - 1`` skip
  maps are paid from the ratio's budget (:func:`kronlab.rotate.per_block_layer_ratio`;
  part of the run's identity, label ``per-block Q``); ``--rotation-q hadamard`` or
  ``random`` replace the Procrustes Q by the baselines (label ``hadamard Q``, ``random Q``);
* ``all``: rotation (Kronecker only) + allocation + closed loop.

Kronecker methods run with ``--macs-cap`` (forward MACs per token at most that fraction of
the dense layers'). Each run records the layer parameters kept, the whole model's
parameters (rotation matrices and any untied head included), the MACs kept, the
compression time split into phases (statistics, rotation, allocation, fit; the dense
statistics of a seed are collected once and shared by its runs, their cost is recorded
with every run that uses them), and the peak resident memory of the run.

Writes ``data/results/llm_ablation.json`` atomically after every run (``--resume``
continues a file made with the same results-defining settings); the command line is in
``machine["command"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    SEQ_LEN,
    THREADS,
    WINDOW,
)
from kronlab.closed_loop import CLOSED_LOOP_TARGETS  # noqa: E402
from kronlab.rotate import per_block_layer_ratio, rotation_a_shapes  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.results import allocation_key, resumed_config, run_settings_key  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

VARIANTS = ("none", "allocation", "closed-loop", "rotation", "all")
#: what each variant adds (``all`` has no rotation for low-rank methods)
COMPONENTS = {"none": (), "allocation": ("allocation",), "closed-loop": ("closed-loop",),
              "rotation": ("rotation",), "all": ("rotation", "allocation", "closed-loop")}
PLAN_KEYS = ("methods", "ratios", "variants", "seeds", "threads", "device", "alloc_metric",
             "alloc_min_ratio", "closed_loop_target", "closed_loop_damping", "rotation_scope",
             "rotation_q")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--methods", nargs="+", default=["svd-aa", "kron-fisher"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="calibration token samples (kronlab.data.calibration_token_batches)")
    p.add_argument("--macs-cap", type=float, default=1.0,
                   help="forward MACs cap of the Kronecker methods (fraction of dense); "
                        "0 or negative: none")
    p.add_argument("--calibration", default=CALIBRATION)
    p.add_argument("--calib-tokens", "--tokens", dest="calib_tokens", type=int,
                   default=CALIB_TOKENS)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS))
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--als-sweeps", type=int, default=ALS_SWEEPS)
    p.add_argument("--layers", nargs="+", default=None,
                   help="name patterns of the layers to compress (default: every block layer)")
    p.add_argument("--tied-head", default="mix", choices=["mix", "untie"],
                   help="rotation: how a tied head takes the final norm (mix: d^2 extra "
                        "parameters; untie: vocab x d)")
    p.add_argument("--rotation-shapes", default="rotatable",
                   choices=["rotatable", "sqrt", "chooser"],
                   help="rotation: Kronecker factor shapes, 'rotatable' (the chooser's best, "
                        "within the ratio and MACs cap, among the shapes a rotation can "
                        "change), 'sqrt' (m1, n1 the divisors nearest sqrt(m), sqrt(n); "
                        "expensive in MACs at high rank) or 'chooser' "
                        "(procrustes_rotation's own choice; often rotation invariant)")
    p.add_argument("--rotation-scope", default="global", choices=["global", "block"],
                   help="rotation: one Q for the residual stream (global, no parameters) or "
                        "one per decoder block (block: L-1 skip maps of d^2 parameters, paid "
                        "from the ratio's budget)")
    p.add_argument("--rotation-q", default="procrustes",
                   choices=["procrustes", "hadamard", "random"],
                   help="rotation: Q chosen by Procrustes steps, or the baselines (a Hadamard "
                        "matrix; a random orthogonal one drawn with the calibration seed)")
    p.add_argument("--procrustes-iters", type=int, default=20, help="Frobenius rounds")
    p.add_argument("--procrustes-weighted-rounds", type=int, default=1)
    p.add_argument("--alloc-measure", default="fit", choices=["fit", "spectrum"])
    p.add_argument("--alloc-metric", default="fisher", choices=["fisher", "own"],
                   help="allocation: score every method by the K-FAC (Fisher) loss increase "
                        "(default; collects G), or by the method's own metric ('own')")
    p.add_argument("--closed-loop-target", default="compressed", choices=CLOSED_LOOP_TARGETS,
                   help="closed loop: fit each layer to the dense layer's outputs on the "
                        "compressed inputs ('compressed', symmetric) or to the dense model's "
                        "outputs ('dense', asymmetric; kronlab.closed_loop.asymmetric_target)")
    p.add_argument("--closed-loop-damping", type=float, default=0.01,
                   help="closed loop, target 'dense': the ridge toward W, relative to "
                        "mean(diag C)")
    p.add_argument("--alloc-min-ratio", type=float, default=None,
                   help="allocation: the least ratio any layer may get (default: none)")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(results_dir() / "llm_ablation.json"))
    p.add_argument("--resume", action="store_true")
    return p


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident memory: ``VmHWM`` (reset by :func:`_reset_peak_rss`) where Linux has
    it, else ``getrusage``'s ``ru_maxrss`` (the whole process's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_key(run: dict) -> tuple:
    """A recorded run's identity: seed, ratio, method, variant and its settings (allocation,
    closed-loop target)."""
    return run["seed"], run["ratio"], run["method"], run["variant"], run_settings_key(run)


def _json_structures(structures) -> dict:
    return {t: {k: ([int(x) for x in v] if k == "a_shape" else v) for k, v in s.items()}
            for t, s in structures.items()}


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    configure_threads(args.threads)
    from kronlab.compress import METHODS, objective_of

    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    for r in args.ratios:
        if not 0 < r <= 1:
            p.error(f"--ratios must be in (0, 1], got {r}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    if args.alloc_min_ratio is not None and not 0 < args.alloc_min_ratio <= min(args.ratios):
        p.error(f"--alloc-min-ratio must lie in (0, {min(args.ratios):g}] (at most the smallest "
                f"of --ratios), got {args.alloc_min_ratio}")

    if args.rotation_q == "hadamard" and args.rotation_scope == "block":
        p.error("--rotation-q hadamard is one fixed Q, the same for every block: use "
                "--rotation-scope global (or --rotation-q procrustes/random per block)")
    if args.closed_loop_damping < 0:
        p.error(f"--closed-loop-damping must be >= 0, got {args.closed_loop_damping}")
    if args.closed_loop_target == "dense" and any(
            objective_of(m) == "weight" for m in args.methods
            if any("closed-loop" in COMPONENTS[v] for v in args.variants)):
        p.error("--closed-loop-target dense fits in the metric of the compressed inputs: it "
                "needs activation-aware methods (-aa, -fisher), not "
                f"{[m for m in args.methods if objective_of(m) == 'weight']}")

    import torch

    from kronlab.allocate import allocate
    from kronlab.calibration import collect_statistics
    from kronlab.closed_loop import compress_closed_loop
    from kronlab.compress import compress
    from kronlab.data import calibration_token_batches, split_corpus
    from kronlab.evaluate import perplexity
    from kronlab.models import find_linear_layers, load_model
    from kronlab.rotate import fold_norms, procrustes_rotation, rotate_residual, rotate_statistics
    from kronlab.runtime import machine_info

    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"config": config, "machine": machine_info(args.device, load_start=load_start),
               "dense": {}, "runs": []}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        try:
            old["config"] = resumed_config(old["config"], config, PLAN_KEYS,
                                           ("methods", "ratios", "variants", "seeds"), out)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        results = old
        results.setdefault("commands", []).append(
            machine_info(args.device, load_start=load_start).get("command"))
        print(f"resuming: {len(results['runs'])} runs already in {out}")

    def alloc_metric(method: str) -> str:
        """The metric the allocation of ``method`` is scored by under ``--alloc-metric``
        (``allocate`` is given C always, so a method's own metric is at least the output's)."""
        return "fisher" if args.alloc_metric == "fisher" or objective_of(method) == "fisher" \
            else "output"

    cl_target = args.closed_loop_target
    plan = []
    for seed in args.seeds:  # a seed's runs share its statistics
        for ratio in args.ratios:
            for method in args.methods:
                for variant in args.variants:
                    if variant == "rotation" and not method.startswith("kron"):
                        continue  # a low-rank error does not change under a rotation
                    akey = (allocation_key(alloc_metric(method), args.alloc_min_ratio)
                            if "allocation" in COMPONENTS[variant] else "")
                    tkey = cl_target if "closed-loop" in COMPONENTS[variant] else "compressed"
                    scope = args.rotation_scope if "rotation" in COMPONENTS[variant] and \
                        method.startswith("kron") else "global"
                    rq = args.rotation_q if "rotation" in COMPONENTS[variant] and \
                        method.startswith("kron") else "procrustes"
                    key = run_settings_key({"allocation_key": akey, "closed_loop_target": tkey,
                                            "closed_loop_damping": args.closed_loop_damping,
                                            "rotation_scope": scope, "rotation_q": rq})
                    plan.append((seed, ratio, method, variant, key, akey, tkey))
    done = {run_key(r) for r in results["runs"]}
    todo = [x for x in plan if x[:5] not in done]
    if not todo:
        print(f"nothing to do: all {len(plan)} runs are in {out}")
        return 0

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    model.eval()
    results["model_load_seconds"] = time.perf_counter() - t0
    eval_texts = {name: split_corpus(name)[1] for name in args.eval}
    calib_text = split_corpus(args.calibration)[0]
    names = list(find_linear_layers(model, include=args.layers))
    fisher = any(objective_of(m) == "fisher"
                 or ("allocation" in COMPONENTS[v] and alloc_metric(m) == "fisher")
                 for _, _, m, v, *_ in todo)

    def evaluate(m) -> dict:
        return {name: perplexity(m, tok, text, window=args.window, max_tokens=args.eval_tokens,
                                 progress=False)
                for name, text in eval_texts.items()}

    if not results["dense"]:
        results["dense"] = {"ppl": evaluate(model), "parameters": _count(model)}
        write_atomic(out, json.dumps(results, separators=(",", ":"), default=str))
    print("dense: " + ", ".join(f"{k} {v['perplexity']:.2f}"
                                for k, v in results["dense"]["ppl"].items()), flush=True)

    cache: dict = {}  # per seed: batches, dense stats, folded model and its stats

    def seed_data(seed):
        if cache.get("seed") != seed:
            cache.clear()
            batches = calibration_token_batches(tok, calib_text, n_tokens=args.calib_tokens,
                                                seq_len=args.seq_len, seed=seed)
            t = time.perf_counter()
            stats = collect_statistics(model, batches, names, gradients=fisher,
                                       device=args.device, progress=False)
            cache.update(seed=seed, batches=batches, stats=stats,
                         stats_seconds=time.perf_counter() - t)
        return cache

    def folded_data(seed):
        data = seed_data(seed)
        if "folded" not in data:
            t = time.perf_counter()
            folded = fold_norms(model, tied_head=args.tied_head)
            fold_seconds = time.perf_counter() - t
            t = time.perf_counter()
            fstats = collect_statistics(folded, data["batches"], names, gradients=fisher,
                                        device=args.device, progress=False)
            data.update(folded=folded, fstats=fstats, fold_seconds=fold_seconds,
                        fstats_seconds=time.perf_counter() - t)
        return data

    for seed, ratio, method, variant, skey, akey, tkey in todo:
        data = seed_data(seed)
        kron = method.startswith("kron")
        macs = args.macs_cap if kron and args.macs_cap and args.macs_cap > 0 else None
        comps = [c for c in COMPONENTS[variant] if kron or c != "rotation"]
        use_g = objective_of(method) == "fisher"
        rss_scope = "run" if _reset_peak_rss() and os.path.exists("/proc/self/status") \
            else "process"
        run_load = os.getloadavg() if hasattr(os, "getloadavg") else None
        phases = {"statistics": data["stats_seconds"], "rotation": 0.0, "allocation": 0.0,
                  "fit": 0.0}
        run = {"seed": seed, "ratio": ratio, "method": method, "variant": variant,
               "components": comps, "macs_ratio": macs, "statistics_shared": True}
        if akey:
            run["allocation_key"] = akey
        if "closed-loop" in comps:
            run["closed_loop_target"] = tkey
            run["closed_loop_damping"] = args.closed_loop_damping if tkey == "dense" else None
        t_run = time.perf_counter()
        base, stats, structures = model, data["stats"], None
        fit_ratio = ratio  # of the layers (per-block rotations pay their skip maps from it)
        if "rotation" in comps:
            fd = folded_data(seed)
            phases["statistics"] = fd["fstats_seconds"]
            t = time.perf_counter()
            per_block = args.rotation_scope == "block"
            skip = 0
            if per_block:
                fit_ratio, skip = per_block_layer_ratio(fd["folded"], names, ratio)
                run["rotation_scope"] = "block"
            if args.rotation_shapes == "chooser":
                shapes = None
            elif args.rotation_shapes == "sqrt":
                shapes = rotation_a_shapes(fd["folded"], names)
            else:
                shapes = rotation_a_shapes(fd["folded"], names, method=method, ratio=fit_ratio,
                                           macs_ratio=macs, stats=fd["fstats"])
            if args.rotation_q == "procrustes":
                res = procrustes_rotation(fd["folded"], fd["fstats"], method=method,
                                          ratio=fit_ratio, iters=args.procrustes_iters,
                                          weighted_rounds=args.procrustes_weighted_rounds,
                                          shapes=shapes, layers=args.layers,
                                          per_block=per_block, als_sweeps=args.als_sweeps,
                                          device=args.device, progress=False)
            else:  # a baseline Q: no Procrustes step (iters 0, no weighted round)
                run["rotation_q"] = args.rotation_q
                res = procrustes_rotation(fd["folded"], method=method, ratio=fit_ratio,
                                          iters=0, weighted=False, init=args.rotation_q,
                                          seed=seed, shapes=shapes, layers=args.layers,
                                          per_block=per_block, device=args.device,
                                          progress=False)
            base = rotate_residual(fd["folded"], res.Q)
            stats = rotate_statistics(fd["fstats"], fd["folded"], res.Q)
            phases["rotation"] = fd["fold_seconds"] + (time.perf_counter() - t)
            # the shapes are fixed; the rank follows each layer's ratio and the MACs cap
            # (equal to the Procrustes rank when the cap does not bind)
            structures = {t_: {"a_shape": s["a_shape"]} for t_, s in res.structures.items()
                          if "a_shape" in s}
            run["rotation"] = {"procrustes": res.to_dict(), "tied_head": args.tied_head,
                               "shapes": args.rotation_shapes,
                               "scope": args.rotation_scope, "skip_parameters": skip,
                               "q": args.rotation_q,
                               "layer_ratio": fit_ratio,
                               "extra_parameters": base.kronlab_rotation["extra_parameters"]}
        ratios = None
        if "allocation" in comps:
            t = time.perf_counter()
            a_shapes = None if structures is None else {k: v["a_shape"]
                                                        for k, v in structures.items()}
            alloc_g = alloc_metric(method) == "fisher"
            alloc = allocate(base, stats if alloc_g else stats.cov, method=method, ratio=fit_ratio,
                             macs_ratio=macs, layers=args.layers, a_shapes=a_shapes,
                             measure=args.alloc_measure, als_sweeps=args.als_sweeps,
                             min_ratio=args.alloc_min_ratio, progress=False)
            phases["allocation"] = time.perf_counter() - t
            ratios = alloc.ratios
            if structures is None and alloc.a_shapes:
                # the shapes the curves assumed (else compress would choose each type's
                # shape on its first layer at that layer's allocated ratio)
                structures = {t_: {"a_shape": tuple(v)} for t_, v in alloc.a_shapes.items()}
            run["allocation"] = {"ratios": alloc.ratios, "metric": alloc.metric,
                                 "predicted_loss": alloc.predicted_loss,
                                 "uniform_loss": alloc.uniform_loss,
                                 "fallback_uniform": alloc.fallback_uniform,
                                 "solver": alloc.solver,
                                 "solver_losses": alloc.config["solver_losses"],
                                 "min_ratio": args.alloc_min_ratio}
        common = dict(method=method, ratio=fit_ratio, ratios=ratios, structures=structures,
                      gcovariances=stats.gcov if use_g else None, macs_ratio=macs,
                      layers=args.layers, als_sweeps=args.als_sweeps, device=args.device,
                      progress=False)
        cl_options = ({"target": tkey, "damping": args.closed_loop_damping}
                      if tkey == "dense" else {})
        t = time.perf_counter()
        if "closed-loop" in comps:
            cmodel, report = compress_closed_loop(base, data["batches"], **common, **cl_options)
            cl = report.config
            phases["statistics"] = cl["statistics_seconds"] + cl["propagation_seconds"] + (
                phases["statistics"] if use_g else 0.0)  # G: open loop
            run["statistics_shared"] = use_g
            phases["fit"] = time.perf_counter() - t - cl["statistics_seconds"] \
                - cl["propagation_seconds"]
        else:
            cmodel, report = compress(base, covariances=stats.cov, **common)
            phases["fit"] = time.perf_counter() - t
        run["compress_wall_seconds"] = time.perf_counter() - t_run
        summary = report.summary()
        run.update(phases=phases, compress_seconds=sum(phases.values()),
                   layer_params_kept=summary["layer_params_kept"],
                   layer_params_after=summary["layer_params_after"],
                   layer_params_before=summary["layer_params_before"],
                   model_params=_count(cmodel), dense_model_params=_count(model),
                   macs_kept=summary["macs_kept"],
                   structures=None if structures is None else _json_structures(structures),
                   report=report.to_dict())
        run["model_params_kept"] = run["model_params"] / run["dense_model_params"]
        run["ppl"] = evaluate(cmodel)
        run["peak_rss_bytes"] = _peak_rss_bytes()
        run["peak_rss_scope"] = rss_scope
        run["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run["machine"] = machine_info(args.device, load_start=run_load)
        results["runs"].append(run)
        write_atomic(out, json.dumps(results, separators=(",", ":"), default=str))
        ppl = ", ".join(f"{k} {v['perplexity']:.2f}" for k, v in run["ppl"].items())
        label = variant + (f" [{skey}]" if skey else "")
        print(f"seed {seed} {method:11s} {ratio:.2f} {label:11s}: {ppl}; params kept "
              f"{run['model_params_kept']:.3f}, MACs {run['macs_kept']:.3f}, "
              f"{run['compress_seconds']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
        del cmodel, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

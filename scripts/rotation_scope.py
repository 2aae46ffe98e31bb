"""One global rotation or one per block? The Procrustes objective on SmolLM2, at equal budget.

    .venv/bin/python scripts/rotation_scope.py                   # ratios 0.8 and 0.6 (~20 min)
    .venv/bin/python scripts/rotation_scope.py --ratios 0.8 --layers 'model.layers.0.*' \\
        --iters 2 --out /tmp/scope.json                          # a quick check

For each ratio, fold SmolLM2's norms and choose residual-stream rotations by
:func:`kronlab.rotate.procrustes_rotation` (``--iters`` Frobenius rounds, plain
Kronecker fits of the rotatable factor shapes, :func:`kronlab.rotate.rotation_a_shapes`
with ``--macs-ratio``) in three settings:

* ``global``: one Q for the whole stream (no parameters), every layer at ``ratio``;
* ``block, same ratio``: one Q per block, layers still at ``ratio`` (the skip maps
  not paid: what the extra freedom alone buys);
* ``block, paid``: one Q per block with its ``L - 1`` skip maps paid from the budget
  (:func:`kronlab.rotate.per_block_layer_ratio`): the fair comparison with ``global``;
* ``hadamard``, ``random``: the baselines, one fixed Q (:func:`kronlab.rotate.hadamard`,
  :func:`kronlab.rotate.random_orthogonal` with ``--seed``) and no Procrustes step.

Each records the objective ``sum ||W_l Q - W_hat_l||^2`` (readers; writers ``Q^T W_l``)
relative to ``sum ||W_l||^2`` at the start (``Q = I``) and after every round, the layer
ratio, the skip maps' parameters and the time (for the baselines: ``start`` at
``Q = I``, ``end`` at their Q). This is the Frobenius proxy that
Procrustes minimises first, not perplexity (the ablation, ``scripts/ablation_sweep.py
--rotation-scope block``, measures that). Writes ``data/results/rotation_scope.json``
atomically; ``--resume`` keeps the recorded (ratio, setting) pairs and adds the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.defaults import THREADS  # noqa: E402
from kronlab.paths import results_dir, write_atomic  # noqa: E402
from kronlab.runtime import configure_threads  # noqa: E402

SETTINGS = ("global", "block, same ratio", "block, paid", "hadamard", "random")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.6])
    p.add_argument("--macs-ratio", type=float, default=1.0,
                   help="MACs cap of the factor shapes (fraction of dense); 0: none")
    p.add_argument("--iters", type=int, default=6, help="Frobenius rounds")
    p.add_argument("--layers", nargs="+", default=None)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--seed", type=int, default=0, help="seed of the random Q")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--out", default=str(results_dir() / "rotation_scope.json"))
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for r in args.ratios:
        if not 0 < r <= 1:
            p.error(f"--ratios must be in (0, 1], got {r}")
    if args.iters < 1:
        p.error(f"--iters must be at least 1, got {args.iters}")
    configure_threads(args.threads)
    import torch

    from kronlab.models import find_linear_layers, load_model
    from kronlab.rotate import (
        fold_norms,
        per_block_layer_ratio,
        procrustes_rotation,
        residual_layout,
        rotation_a_shapes,
    )
    from kronlab.runtime import machine_info

    model, _ = load_model(args.model)
    folded = fold_norms(model, tied_head="mix")
    del model
    lay = residual_layout(folded)
    on_stream = set(lay.readers) | set(lay.writers)
    names = [n for n in find_linear_layers(folded, include=args.layers) if n in on_stream]
    total = sum(folded.get_submodule(n).weight.numel() for n in names)
    macs = args.macs_ratio if args.macs_ratio > 0 else None
    out_path = Path(args.out)
    runs = []
    config = {k: v for k, v in vars(args).items() if k not in ("out", "resume")}
    commands = []
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        keep = ("model", "macs_ratio", "iters", "layers", "seed")
        diff = [k for k in keep if k in old["config"] and old["config"][k] != config[k]]
        if diff:
            raise SystemExit(f"--resume: {out_path} was made with other settings {diff}; use "
                             "another --out")
        runs = old["runs"]
        commands = old.get("commands", [])
        recorded = {"ratios": [r["ratio"] for r in runs], "settings": [r["setting"] for r in runs]}
        for key in ("ratios", "settings"):
            config[key] = list(dict.fromkeys(old["config"].get(key, recorded[key]) + config[key]))
    commands.append(" ".join(sys.argv))
    done = {(r["ratio"], r["setting"]) for r in runs}
    norm2 = sum(float((folded.get_submodule(n).weight.detach().double() ** 2).sum())
                for n in names)
    shape_cache: dict = {}
    for ratio in args.ratios:
        paid, skip = per_block_layer_ratio(folded, names, ratio)
        for setting in args.settings:
            if (ratio, setting) in done:
                continue
            per_block = setting.startswith("block")
            layer_ratio = paid if setting == "block, paid" else ratio
            t = time.perf_counter()
            if layer_ratio not in shape_cache:
                shape_cache[layer_ratio] = rotation_a_shapes(folded, names, ratio=layer_ratio,
                                                             macs_ratio=macs)
            shapes = shape_cache[layer_ratio]
            fixed = setting in ("hadamard", "random")
            with torch.no_grad():
                res = procrustes_rotation(folded, method="kron", ratio=layer_ratio,
                                          iters=1 if fixed else args.iters, weighted=False,
                                          shapes=shapes, layers=names, per_block=per_block,
                                          init=setting if fixed else None, seed=args.seed,
                                          progress=False)
            if fixed:  # the objective at the fixed Q (the Procrustes step is not taken)
                at_q = res.history[0]["objective_fit"] / norm2
                start = next((r["start"] for r in runs if r["ratio"] == ratio
                              and r["setting"] == "global"), None)
                if start is None:
                    start = procrustes_rotation(
                        folded, method="kron", ratio=layer_ratio, iters=1, weighted=False,
                        shapes=shapes, layers=names, progress=False
                    ).history[0]["objective_fit"] / norm2
                rel = [start, at_q]
            else:
                rel = [res.history[0]["objective_fit"] / norm2] + [
                    h["objective"] / norm2 for h in res.history]
            run = {"ratio": ratio, "setting": setting, "layer_ratio": layer_ratio,
                   "skip_parameters": skip if per_block else 0,
                   "budget_kept": (layer_ratio * total + (skip if per_block else 0)) / total,
                   "shapes": {k: [int(x) for x in v] for k, v in shapes.items()},
                   "ranks": {k: int(v["rank"]) for k, v in res.structures.items()},
                   "relative_objective": rel, "start": rel[0], "end": rel[-1],
                   "seconds": time.perf_counter() - t}
            runs.append(run)
            print(f"ratio {ratio:.2f} {setting:17s}: layers keep {layer_ratio:.3f}, objective "
                  f"{rel[0]:.4f} -> {rel[-1]:.4f} ({run['seconds']:.0f} s)", flush=True)
            out = {"config": config, "commands": commands, "layers": len(names), "layer_parameters": total,
                   "blocks": len(lay.blocks), "hidden_size": lay.hidden_size, "runs": runs,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": machine_info("cpu")}
            write_atomic(out_path, json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

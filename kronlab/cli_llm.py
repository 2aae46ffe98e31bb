"""``kronlab compress`` and ``kronlab evaluate``: the LLM commands of the CLI."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["add_commands"]


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not (0 < value <= 1) or math.isnan(value):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {value}")
    return value


def _load_any(spec):
    """A kronlab save directory, or anything :func:`kronlab.models.load_model` takes."""
    from .io import load_compressed
    from .models import load_model

    if spec and (Path(spec) / "kronlab.json").is_file():
        return load_compressed(spec)
    return load_model(spec)


def _cmd_compress(args) -> int:
    from .compress import METHODS, compress
    from .data import calibration_token_batches, load_text
    from .io import save_compressed

    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; valid methods: {', '.join(METHODS)}")
    ratio = _ratio(args.ratio)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    model, tokenizer = _load_any(args.model)
    print(f"loaded {args.model or 'smollm2 (default)'} in {time.perf_counter() - t0:.1f} s")
    calib = None
    if args.method.endswith("-aa") or not args.no_output_error:
        calib_text = load_text(args.calibration, "calibration")
        calib = calibration_token_batches(tokenizer, calib_text, n_tokens=args.calib_tokens,
                                          seq_len=args.seq_len, seed=args.seed)
    layers = args.layers.split(",") if args.layers else None
    cmodel, report = compress(model, method=args.method, ratio=ratio, calibration=calib,
                              layers=layers, macs_ratio=args.macs_ratio, permute=args.permute,
                              als_iters=args.als_iters, in_place=True)
    print(report.table())
    config = {"model": args.model or "smollm2", "calibration": args.calibration,
              "calib_tokens": args.calib_tokens, "seq_len": args.seq_len, "seed": args.seed,
              "report": report.to_dict()}
    save_compressed(cmodel, out, tokenizer=tokenizer, config_extra=config)
    print(f"saved {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .data import load_text
    from .evaluate import count_parameters, generate_sample, perplexity

    model, tokenizer = _load_any(args.model)
    results = {"model": args.model or "smollm2", "parameters": count_parameters(model)}
    texts = args.text or ["sotu"]
    for name in texts:
        text = load_text(name, "evaluation")
        res = perplexity(model, tokenizer, text, window=args.window, max_tokens=args.max_tokens)
        results[f"ppl/{name}"] = res
        print(f"{name:>12s}: perplexity {res['perplexity']:.3f} over {res['n_tokens']} tokens")
    if args.generate:
        sample = generate_sample(model, tokenizer, args.generate, max_new_tokens=40)
        results["sample"] = sample
        print(f"sample: {sample}")
    print(f"parameters: {results['parameters']:,}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def add_commands(sub) -> None:
    c = sub.add_parser("compress", help="compress a causal LM and save it")
    c.add_argument("--model", default=None,
                   help="local transformers dir, .gguf file, hub id (online) or a kronlab save; "
                        "default: the offline SmolLM2-135M-Instruct")
    c.add_argument("--method", required=True, help="kron | kron-aa | svd | svd-aa")
    c.add_argument("--ratio", required=True, help="fraction of the layers' parameters kept, (0, 1]")
    c.add_argument("--macs-ratio", type=float, default=None,
                   help="also cap forward multiply-adds at this fraction of the dense layer's")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--layers", default=None, help="comma-separated name patterns (fnmatch)")
    c.add_argument("--calibration", default="sotu", help="calibration text: a stored corpus (its calibration part), "
                        "'wikitext2' (online, train split) or a text file")
    c.add_argument("--calib-tokens", type=int, default=16384)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--permute", default=None, choices=[None, "variance"])
    c.add_argument("--als-iters", type=int, default=3)
    c.add_argument("--no-output-error", action="store_true",
                   help="skip calibration for plain methods (no output error in the report)")
    c.set_defaults(func=_cmd_compress)

    e = sub.add_parser("evaluate", help="perplexity (and a sample) of a model or a kronlab save")
    e.add_argument("--model", default=None)
    e.add_argument("--text", action="append",
                   help="a stored corpus (its held-out part), 'wikitext2' (online, test "
                        "split) or a text file; repeatable")
    e.add_argument("--window", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=16384)
    e.add_argument("--generate", default=None, help="prompt for a greedy sample")
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=_cmd_evaluate)

"""kronlab compress and kronlab evaluate: the LLM commands of the command line.

Each command first checks every argument (model spec, texts, numbers, output path,
device), prints one ``settings:`` line with every value in use (the defaults come from
:mod:`kronlab.defaults`), and only then loads a model. Heavy packages (transformers,
safetensors) are imported inside the commands, so ``kronlab --help`` runs on the base
install and a missing extra is reported as ``pip install 'kronlab[llm]'``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from pathlib import Path

from .cli import HelpFormatter, UsageError, missing_extra
from .defaults import (
    ALS_SWEEPS,
    CALIB_TOKENS,
    CALIBRATION,
    EVAL_TEXTS,
    EVAL_TOKENS,
    PERMUTE,
    SEED,
    SEQ_LEN,
    SHAPE_POLICY,
    THREADS,
    WINDOW,
)

__all__ = ["add_commands", "check_device", "check_model", "check_out", "check_text",
           "compress_settings", "int_at_least", "positive_float", "stored_corpora",
           "text_name"]

_LLM_MODULES = ("transformers", "safetensors", "tqdm")

_SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_EVAL_DTYPES = ("float32", "bfloat16", "float16", "saved")
_MODEL_HELP = ("'smollm2' (the offline SmolLM2-135M-Instruct GGUF), a kronlab save, a local "
               "transformers folder, a .gguf file, or a Hugging Face hub id owner/name "
               "(online)")
_TEXT_HELP = ("a stored corpus ({corpora}: its {part} part), 'wikitext2' ({split} split; needs "
              "the datasets package and the internet) or a UTF-8 text file")


# ----------------------------------------------------------------------------- argument types

def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if math.isnan(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (the fraction of each layer's parameters kept), got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


# ----------------------------------------------------------------------------- checks

def stored_corpora() -> list[str]:
    from .data import list_corpora

    try:
        return list_corpora()
    except FileNotFoundError:
        return []


def text_name(source: str) -> str:
    """The name a text is reported under: the corpus name, ``wikitext2``, or a file's stem."""
    if source in stored_corpora() or source == "wikitext2":
        return source
    return Path(source).stem


def check_text(source: str, option: str, prog: str) -> None:
    corpora = stored_corpora()
    if source in corpora:
        return
    if source == "wikitext2":
        hint = missing_extra(("datasets",), "llm")
        if hint:
            raise UsageError(f"{option} wikitext2 needs the `datasets` package "
                             f"(`pip install datasets`) and the internet; offline, use a "
                             f"stored corpus: {', '.join(corpora)}", prog)
        return
    path = Path(source).expanduser()
    valid = (f"valid: a stored corpus ({', '.join(corpora) or 'none found in data/corpora'}), "
             f"'wikitext2' (needs `datasets` and the internet) or the path of a UTF-8 text file")
    if path.is_dir():
        raise UsageError(f"{option} {source!r} is a folder, not a text file; {valid}", prog)
    if not path.is_file():
        raise UsageError(f"{option} {source!r}: no such file, and not a stored corpus; {valid}",
                         prog)
    if path.stat().st_size == 0:
        raise UsageError(f"{option} {source!r} is an empty file", prog)


def check_model(spec: str | None, prog: str) -> str:
    """The kind of model ``spec`` names ("kronlab", "gguf", "local", "hub"), or a UsageError."""
    if spec is not None and (Path(spec).expanduser() / "kronlab.json").is_file():
        from .io import WEIGHTS, read_manifest

        path = Path(spec).expanduser()
        try:
            read_manifest(path)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--model {spec}: {exc}", prog) from None
        if not (path / WEIGHTS).is_file():
            raise UsageError(f"--model {spec} has kronlab.json but no {WEIGHTS}: the save is "
                             "incomplete", prog)
        return "kronlab"
    from .models import resolve_model_spec

    try:
        _, gguf_file, kind = resolve_model_spec(spec)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--model: {exc} Or a kronlab save (a folder with kronlab.json).",
                         prog) from None
    if gguf_file is not None:
        hint = missing_extra(("gguf",), "llm")
        if hint:
            raise UsageError(f"--model {spec or 'smollm2'} is a GGUF file: {hint}", prog)
    return kind


def _writable_ancestor(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p


def check_out(out: str, overwrite: bool, prog: str) -> Path:
    path = Path(out).expanduser()
    if path.exists():
        if not overwrite:
            raise UsageError(f"--out {out} exists; pass --overwrite to replace it, or choose "
                             "a new folder", prog)
        if not path.is_dir():
            raise UsageError(f"--out {out} is a file; --out names a folder (the save)", prog)
        if any(path.iterdir()) and not (path / "kronlab.json").is_file():
            raise UsageError(f"--out {out} is a folder that is not a kronlab save (no "
                             "kronlab.json); refusing to replace it, choose a new folder", prog)
    where = _writable_ancestor(path.parent)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create files in {where}", prog)
    return path


def _check_json(out: str | None, prog: str) -> None:
    if out is None:
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"--json {out} is a folder; give a file name", prog)
    where = _writable_ancestor(path.parent)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"--json {out}: cannot create files in {where}", prog)


def check_device(text: str, prog: str) -> str:
    import torch

    valid = "valid: cpu, cuda, cuda:N"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device; {valid}", prog) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is available here; use "
                             "--device cpu", prog)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here", prog)
    elif dev.type != "cpu":
        raise UsageError(f"--device {text!r}: {valid}", prog)
    return str(dev)


def _patterns(values, option: str, prog: str) -> list[str] | None:
    """Name patterns from repeated/comma-separated values; ``re:`` patterns are kept whole."""
    if not values:
        return None
    out: list[str] = []
    for value in values:
        parts = [value] if value.startswith("re:") else value.split(",")
        for p in (p.strip() for p in parts):
            if not p:
                continue
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise UsageError(f"{option} {p!r} is not a valid regular expression: {exc}",
                                     prog) from None
            out.append(p)
    return out or None


def _require_llm(prog: str) -> None:
    hint = missing_extra(_LLM_MODULES, "llm")
    if hint:
        raise UsageError(hint, prog)


def _threads(threads: int) -> None:
    from .runtime import configure_threads

    configure_threads(threads)


# ----------------------------------------------------------------------------- reporting

def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def _seconds(sw) -> str:
    parts = [f"{k} {v:.1f} s" for k, v in sw.seconds.items()]
    return ", ".join(parts) + f" (total {sw.total:.1f} s)"


def _source_file_bytes(model, kind: str) -> tuple[int | None, str]:
    """Bytes of the files the model was loaded from, and a label naming them."""
    source = getattr(model, "kronlab_info", {}).get("source")
    if source is None or kind == "hub":
        return None, "hub download"
    path = Path(source)
    if path.is_file():
        return path.stat().st_size, path.name
    files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    return sum(p.stat().st_size for p in files), f"{len(files)} weight file(s) in {path.name}"


def _source_dtype(spec, kind: str, model) -> tuple[str, str]:
    """The dtype the source model was trained and published in, and where that comes from."""
    import json

    from .models import DEFAULT_MODEL

    known = ("float32", "bfloat16", "float16")
    if kind == "kronlab":
        from .io import read_manifest

        return (read_manifest(Path(spec).expanduser())["model_dtype"],
                "the dtype of the kronlab save read")
    if kind in ("local", "hub"):
        if kind == "local":
            config = json.loads((Path(spec).expanduser() / "config.json").read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec).to_dict()
        name = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
        if name in known:
            return name, "the dtype in the source's config.json"
    if kind == "gguf":
        note = getattr(model, "kronlab_info", {}).get("quantisation", "")
        m = re.search(r"GGUF \S*?(BF16|F16|F32)\b", note)
        if m:
            return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[m.group(1)], \
                "the GGUF file type"
        if spec is None or str(spec).lower() == DEFAULT_MODEL:
            return "bfloat16", ("SmolLM2-135M-Instruct was trained and published in bfloat16 "
                                "(the GGUF holds 4-bit weights)")
    return "float32", "the source records no dtype"


# ----------------------------------------------------------------------------- compress

def compress_settings(args) -> dict:
    """Check every argument of ``kronlab compress``; return the settings in use."""
    prog = "kronlab compress"
    _require_llm(prog)
    kind = check_model(args.model, prog)
    if args.calib_tokens < args.seq_len:
        raise UsageError(f"--calib-tokens {args.calib_tokens} is less than --seq-len "
                         f"{args.seq_len}: one calibration sequence needs --seq-len tokens", prog)
    from .compress import METHODS, objective_of

    data_free = objective_of(args.method) == "weight"
    if args.no_output_error and not data_free:
        free = ", ".join(m for m in METHODS if objective_of(m) == "weight")
        raise UsageError(f"--no-output-error applies to the methods that fit the weights "
                         f"alone ({free}); {args.method} needs calibration", prog)
    calibrate = not (data_free and args.no_output_error)
    _check_pipeline(args, calibrate, prog)
    if calibrate:
        check_text(args.calibration, "--calibration", prog)
    out = check_out(args.out, args.overwrite, prog)
    device = check_device(args.device, prog)
    n_seq = math.ceil(args.calib_tokens / args.seq_len)
    return {
        "model": args.model or "smollm2", "model_kind": kind, "method": args.method,
        "ratio": args.ratio, "macs_ratio": args.macs_ratio,
        "calibration": args.calibration if calibrate else None,
        "calib_tokens": n_seq * args.seq_len if calibrate else None,
        "seq_len": args.seq_len if calibrate else None, "seed": args.seed,
        "als_sweeps": args.als_sweeps, "permute": None if args.permute == "none" else args.permute,
        "shape_policy": args.shape_policy,
        "layers": _patterns(args.layers, "--layers", prog),
        "exclude": _patterns(args.exclude, "--exclude", prog),
        "device": device, "threads": args.threads, "dtype": args.dtype, "out": str(out),
        "rotate": args.rotate, "allocate": args.allocate, "closed_loop": args.closed_loop,
        "rotate_scope": args.rotate_scope if args.rotate != "none" else None,
        "alloc_metric": args.alloc_metric if args.allocate else None,
        "alloc_min_ratio": args.alloc_min_ratio,
        "closed_loop_target": args.closed_loop_target if args.closed_loop else None,
    }


#: ``kronlab compress --rotate`` choices: no rotation, or the residual-stream Q
ROTATIONS = ("none", "procrustes", "hadamard", "random")
#: ``--rotate-scope``: one Q for the whole stream, or one per decoder block (skip maps paid)
ROTATE_SCOPES = ("global", "block")


def _check_pipeline(args, calibrate: bool, prog: str) -> None:
    """Reject --rotate/--allocate/--closed-loop combinations that cannot work (before loading)."""
    if args.rotate != "none" and not args.method.startswith("kron"):
        raise UsageError(f"--rotate {args.rotate} with {args.method}: a rotation of the residual "
                         "stream leaves every low-rank error unchanged (rotation invariant); use "
                         "a kron method, or --rotate none", prog)
    if args.rotate_scope != "global" and args.rotate in ("none", "hadamard"):
        raise UsageError(f"--rotate-scope {args.rotate_scope} gives each decoder block its own Q; "
                         + ("add --rotate procrustes or random" if args.rotate == "none" else
                            "--rotate hadamard is one fixed Q, the same for every block (no "
                            "skip maps needed): use --rotate-scope global, or procrustes/random"),
                         prog)
    if args.rotate != "none" and args.shape_policy != "per-type":
        raise UsageError(f"--rotate {args.rotate} fixes one factor shape per layer type; use "
                         "--shape-policy per-type", prog)
    if args.allocate and args.ratio >= 1:
        raise UsageError("--allocate with --ratio 1: every layer keeps all its parameters, "
                         "there is no budget to spread; use a ratio below 1", prog)
    if not args.allocate and args.alloc_min_ratio is not None:
        raise UsageError("--alloc-min-ratio bounds the ratios of --allocate; add --allocate "
                         "or drop it", prog)
    if args.alloc_min_ratio is not None and not 0 < args.alloc_min_ratio <= args.ratio:
        raise UsageError(f"--alloc-min-ratio must lie in (0, --ratio {args.ratio:g}], got "
                         f"{args.alloc_min_ratio:g}", prog)
    if args.allocate and args.alloc_metric == "fisher" and not calibrate:
        raise UsageError("--alloc-metric fisher scores layers by the loss gradients on "
                         "calibration text; drop --no-output-error or use --alloc-metric own",
                         prog)
    if args.closed_loop and not calibrate:
        raise UsageError("--closed-loop collects statistics on calibration text; drop "
                         "--no-output-error", prog)
    if args.closed_loop_target != "compressed" and not args.closed_loop:
        raise UsageError("--closed-loop-target chooses what --closed-loop fits; add "
                         "--closed-loop or drop it", prog)
    if args.closed_loop_target == "dense" and args.method in ("svd", "kron"):
        raise UsageError(f"--closed-loop-target dense fits in the metric of the compressed "
                         f"inputs; {args.method} ignores activations: use an -aa or -fisher "
                         "method", prog)


def _settings_line(s: dict) -> str:
    if s["calibration"] is None:
        calib = "none (--no-output-error)"
    else:
        calib = (f"{s['calibration']} ({s['calib_tokens']} tokens = "
                 f"{s['calib_tokens'] // s['seq_len']} x seq-len {s['seq_len']}, seed {s['seed']})")
    layers = ", ".join(s["layers"]) if s["layers"] else "every linear layer in the decoder blocks"
    parts = [f"model={s['model']}", f"method={s['method']}", f"ratio={s['ratio']:g}",
             f"macs_ratio={'none' if s['macs_ratio'] is None else format(s['macs_ratio'], 'g')}",
             f"calibration={calib}", f"als_sweeps={s['als_sweeps']}",
             f"permute={s['permute'] or 'none'}", f"shape_policy={s['shape_policy']}",
             f"layers={layers}", f"exclude={', '.join(s['exclude']) if s['exclude'] else 'none'}",
             f"device={s['device']}", f"threads={s['threads']}", f"dtype={s['dtype']}",
             f"rotate={s['rotate']}" + (f" ({s['rotate_scope']})" if s['rotate_scope'] else ""),
             f"allocate={'yes' if s['allocate'] else 'no'}"
             + (f" (metric {s['alloc_metric']}" + ("" if s['alloc_min_ratio'] is None
                else f", floor {s['alloc_min_ratio']:g}") + ")" if s['allocate'] else ""),
             f"closed_loop={'yes' if s['closed_loop'] else 'no'}"
             + (f" (target {s['closed_loop_target']})" if s['closed_loop'] else "")]
    return "settings: " + ", ".join(parts)


def _cmd_compress(args) -> int:
    settings = compress_settings(args)
    print(_settings_line(settings), flush=True)
    _threads(args.threads)

    import torch

    from .calibration import collect_covariances
    from .compress import compress, objective_of
    from .data import calibration_token_batches, load_text
    from .evaluate import weight_memory_bytes
    from .io import save_compressed, update_config_extra
    from .models import find_linear_layers
    from .runtime import Stopwatch, machine_info

    s = settings
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    sw = Stopwatch()
    with sw.phase("load"):
        model, tokenizer = _load(args.model, s["model_kind"], s["device"], torch.float32)
    targets = find_linear_layers(model, include=s["layers"], exclude=s["exclude"])
    if not targets:
        example = ", ".join(list(find_linear_layers(model, include="*"))[:3])
        raise ValueError(f"no linear layers match --layers {s['layers'] or '(default)'} / "
                         f"--exclude {s['exclude']}; names look like {example}")
    source_bytes, source_label = _source_file_bytes(model, s["model_kind"])
    memory_bytes = weight_memory_bytes(model, include_buffers=False)
    print(f"loaded {s['model']} in {sw.seconds['load']:.1f} s: {len(targets)} layers to "
          f"compress; source file {_mb(source_bytes)} ({source_label}), weights in memory "
          f"{_mb(memory_bytes)} (float32)")
    if s["dtype"] == "auto":
        dtype, why = _source_dtype(args.model, s["model_kind"], model)
        print(f"dtype: saving in {dtype} (auto: {why}; --dtype float32 keeps the fitted "
              "weights exactly)", flush=True)
    else:
        dtype, why = s["dtype"], "--dtype"

    covariances = batches = None
    pipeline = s["rotate"] != "none" or s["allocate"] or s["closed_loop"]
    if pipeline:
        cmodel, report, extra = _compress_pipeline(model, tokenizer, targets, s, sw)
    else:
        extra = {}
        if s["calibration"] is not None:
            with sw.phase("statistics"):
                text = load_text(s["calibration"], "calibration")
                batches = calibration_token_batches(tokenizer, text, n_tokens=s["calib_tokens"],
                                                    seq_len=s["seq_len"], seed=s["seed"])
                if objective_of(s["method"]) != "fisher":  # Fisher needs gradients
                    covariances = collect_covariances(model, batches, list(targets))
        with sw.phase("fit"):
            cmodel, report = compress(model, method=s["method"], ratio=s["ratio"],
                                      calibration=batches if covariances is None else None,
                                      covariances=covariances,
                                      layers=s["layers"], exclude=s["exclude"],
                                      macs_ratio=s["macs_ratio"], permute=s["permute"],
                                      als_sweeps=s["als_sweeps"], shape_policy=s["shape_policy"],
                                      in_place=True, device=s["device"])
    # statistics compress collected itself (the pipeline has moved its own already)
    moved = 0.0 if pipeline else (report.config.get("statistics_seconds") or 0.0)
    if moved:
        sw.seconds["fit"] -= moved
        sw.seconds["statistics"] = sw.seconds.get("statistics", 0.0) + moved
    print(report.table())
    config = {**{k: v for k, v in s.items() if k not in ("out", "model_kind")},
              "dtype": dtype, "dtype_reason": why, "model_info": getattr(model, "kronlab_info", {}),
              "report": report.to_dict(), "timings": dict(sw.seconds), **extra,
              "sizes": {"source_file_bytes": source_bytes, "memory_bytes_float32": memory_bytes},
              "machine": machine_info(s["device"], load_start=load_start)}
    out = Path(s["out"])
    with sw.phase("save"):
        save_compressed(cmodel, out, tokenizer=tokenizer, config_extra=config, dtype=dtype)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    update_config_extra(out, {"timings": {k: round(v, 3) for k, v in sw.seconds.items()},
                              "sizes": {**config["sizes"], "written_bytes": written}})
    print(f"saved {out} ({dtype}): {_mb(written)} written; before: source file "
          f"{_mb(source_bytes)}, dense weights in memory {_mb(memory_bytes)} (float32)")
    print(f"timings: {_seconds(sw)}")
    return 0


def _load(spec, kind: str, device: str, dtype):
    """(model, tokenizer) of a checked spec; ``dtype=None`` keeps a kronlab save's dtype."""
    import torch

    if kind == "kronlab":
        from .io import load_compressed

        return load_compressed(Path(spec).expanduser(), device=device, dtype=dtype)
    from .models import load_model

    return load_model(spec, device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- evaluate

def _evaluate_settings(args) -> dict:
    prog = "kronlab evaluate"
    _require_llm(prog)
    kind = check_model(args.model, prog)
    texts = list(args.text) if args.text else list(EVAL_TEXTS)
    names: dict[str, str] = {}
    for source in texts:
        check_text(source, "--text", prog)
        name = text_name(source)
        if name in names:
            raise UsageError(f"--text {names[name]!r} and {source!r} would both be reported "
                             f"as {name!r}; rename one file", prog)
        names[name] = source
    if args.max_tokens < args.window:
        raise UsageError(f"--max-tokens {args.max_tokens} is less than --window {args.window}: "
                         "every text would be one short window; lower --window or raise "
                         "--max-tokens", prog)
    _check_json(args.json, prog)
    device = check_device(args.device, prog)
    if args.dtype == "saved" and kind != "kronlab":
        raise UsageError("--dtype saved applies to kronlab saves; give float32, bfloat16 or "
                         "float16 for other models", prog)
    return {"model": args.model or "smollm2", "model_kind": kind, "texts": names,
            "texts_default": not args.text, "window": args.window,
            "max_tokens": args.max_tokens, "batch_size": args.batch_size, "dtype": args.dtype,
            "device": device, "threads": args.threads}


def _text_record(source: str, text: str) -> dict:
    if source in stored_corpora():
        kind = "stored corpus, held-out part"
    elif source == "wikitext2":
        kind = "wikitext-2-raw-v1, test split"
    else:
        kind = f"file {Path(source).name}"
    return {"source": kind, "characters": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _cmd_evaluate(args) -> int:
    s = _evaluate_settings(args)
    texts = ", ".join(s["texts"])
    if s["texts_default"]:
        texts += " (the default, kronlab.defaults.EVAL_TEXTS; choose with --text)"
    dtype_note = {"float32": "float32 (the default: bfloat16 matmuls are slow on CPUs)",
                  "saved": "as saved"}.get(s["dtype"], s["dtype"])
    print(f"settings: model={s['model']}, texts={texts}, window={s['window']}, "
          f"max_tokens={s['max_tokens']}, batch_size={s['batch_size']}, dtype={dtype_note}, "
          f"device={s['device']}, threads={s['threads']}", flush=True)
    _threads(args.threads)

    import torch

    from .data import load_text
    from .evaluate import count_parameters, generate_sample, perplexity, weight_memory_bytes
    from .paths import write_atomic
    from .runtime import Stopwatch

    sw = Stopwatch()
    dtype = None if s["dtype"] == "saved" else getattr(torch, s["dtype"])
    with sw.phase("load"):
        model, tokenizer = _load(args.model, s["model_kind"], s["device"], dtype)
    loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
    saved = getattr(model, "kronlab_info", {}).get("saved_dtype")
    how = f" (saved as {saved}, upcast on load; --dtype saved keeps {saved})" \
        if saved and saved != loaded else ""
    print(f"loaded {s['model']} in {sw.seconds['load']:.1f} s as {loaded}{how}", flush=True)
    results = {"model": s["model"], "dtype": loaded, "saved_dtype": saved,
               "parameters": count_parameters(model),
               "weight_bytes": weight_memory_bytes(model, include_buffers=False),
               "settings": {k: s[k] for k in ("window", "max_tokens", "batch_size", "device",
                                              "threads")},
               "texts": {}, "perplexity": {}}
    with sw.phase("perplexity"):
        for name, source in s["texts"].items():
            text = load_text(source, "evaluation")
            res = perplexity(model, tokenizer, text, window=s["window"],
                             max_tokens=s["max_tokens"], batch_size=s["batch_size"])
            results["texts"][name] = _text_record(source, text)
            results["perplexity"][name] = res
            print(f"{name:>12s}: perplexity {res['perplexity']:.3f} over {res['n_tokens']} "
                  f"tokens", flush=True)
    if args.generate:
        with sw.phase("generate"):
            sample = generate_sample(model, tokenizer, args.generate,
                                     max_new_tokens=args.max_new_tokens)
        results["sample"] = {"prompt": args.generate, "text": sample}
        print(f"sample: {args.generate}{sample}")
    results["timings"] = {k: round(v, 3) for k, v in sw.seconds.items()}
    print(f"parameters: {results['parameters']:,}")
    print(f"timings: {_seconds(sw)}")
    if args.json:
        import json

        write_atomic(Path(args.json).expanduser(), json.dumps(results, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


# ----------------------------------------------------------------------------- parsers

def _add_runtime(p) -> None:
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int_at_least(1), default=THREADS,
                   help="CPU threads for torch (default: %(default)s, "
                        "kronlab.defaults.THREADS)")


def _compress_pipeline(model, tokenizer, targets, s, sw):
    """``kronlab compress`` with --rotate / --allocate / --closed-loop, in that order, on
    ``model`` in place: fold and rotate the residual stream (statistics rotated exactly),
    spread the budget, then fit (closed loop: block by block). Returns (model, report, extra)."""
    from .allocate import allocate
    from .calibration import collect_statistics
    from .closed_loop import compress_closed_loop
    from .compress import compress, objective_of
    from .data import calibration_token_batches, load_text
    from .rotate import (
        fold_norms,
        rotation_a_shapes,
        hadamard,
        per_block_layer_ratio,
        procrustes_rotation,
        random_orthogonal,
        residual_layout,
        rotate_residual,
        rotate_statistics,
    )

    objective = objective_of(s["method"])
    extra: dict = {}
    if s["rotate"] != "none":
        residual_layout(model)  # a clear error for architectures the rotation cannot keep exact
        with sw.phase("rotation"):
            # untie (not mix): a saved model must load as an ordinary architecture
            fold_norms(model, tied_head="untie", in_place=True)
    stats = batches = None
    if s["calibration"] is not None:
        with sw.phase("statistics"):
            text = load_text(s["calibration"], "calibration")
            batches = calibration_token_batches(tokenizer, text, n_tokens=s["calib_tokens"],
                                                seq_len=s["seq_len"], seed=s["seed"])
            fisher_alloc = s["allocate"] and s["alloc_metric"] == "fisher"
            if not s["closed_loop"] or objective == "fisher" or s["allocate"] \
                    or s["rotate"] == "procrustes":
                stats = collect_statistics(model, batches, list(targets),
                                           gradients=objective == "fisher" or fisher_alloc,
                                           device=s["device"])
    structures = None
    ratio = s["ratio"]  # of the layers; per-block rotations pay their skip maps from it
    per_block = s["rotate_scope"] == "block"
    if s["rotate"] != "none":
        with sw.phase("rotation"):
            lay = residual_layout(model)
            d = lay.hidden_size
            if per_block:
                ratio, skip = per_block_layer_ratio(model, list(targets), s["ratio"])
                extra["per_block"] = {"skip_parameters": skip, "layer_ratio": ratio}
                print(f"per-block rotations: {skip:,} skip-map parameters paid from the "
                      f"budget; the layers keep {ratio:.4f}", flush=True)
            # shapes a rotation can change (the chooser's own are mostly rotation invariant)
            shapes = rotation_a_shapes(model, targets, method=s["method"], ratio=ratio,
                                       macs_ratio=s["macs_ratio"], stats=stats)
            structures = {t: {"a_shape": a} for t, a in shapes.items()}
            if s["rotate"] == "procrustes":
                res = procrustes_rotation(model, stats, method=s["method"], ratio=ratio,
                                          layers=s["layers"], exclude=s["exclude"],
                                          shapes=shapes, per_block=per_block,
                                          device=s["device"], progress=False)
                Q = res.Q
                extra["procrustes"] = res.to_dict()
            elif s["rotate"] == "hadamard":
                Q = hadamard(d)
            elif per_block:  # a random Q per block with layers to compress (seed + block)
                Q = procrustes_rotation(model, method=s["method"], ratio=ratio, iters=0,
                                        weighted=False, init="random", seed=s["seed"],
                                        shapes=shapes, layers=s["layers"],
                                        exclude=s["exclude"], per_block=True,
                                        device=s["device"], progress=False).Q
            else:
                Q = random_orthogonal(d, s["seed"])
            if stats is not None:
                stats = rotate_statistics(stats, model, Q)
            rotate_residual(model, Q, in_place=True)
        extra["rotation"] = {"kind": s["rotate"], "tied_head": "untie",
                             "scope": s["rotate_scope"],
                             "extra_parameters": model.kronlab_rotation["extra_parameters"]}
        print(f"rotation: {s['rotate']} ({s['rotate_scope']}), "
              f"{extra['rotation']['extra_parameters']:,} extra parameters (untied head"
              + (", skip maps)" if per_block else ")"), flush=True)
    ratios = None
    if s["allocate"]:
        with sw.phase("allocation"):
            by_fisher = objective == "fisher" or s["alloc_metric"] == "fisher"
            alloc = allocate(model, stats if by_fisher else
                             (None if stats is None else stats.cov), method=s["method"],
                             min_ratio=s["alloc_min_ratio"],
                             ratio=ratio, macs_ratio=s["macs_ratio"], layers=s["layers"],
                             exclude=s["exclude"], shape_policy=s["shape_policy"],
                             a_shapes=None if structures is None else
                             {t: v["a_shape"] for t, v in structures.items()},
                             als_sweeps=s["als_sweeps"])
        ratios = alloc.ratios
        if structures is None and alloc.a_shapes and s["shape_policy"] == "per-type":
            # fit the shapes the curves assumed, not each type's choice at its first
            # layer's allocated ratio
            structures = {t: {"a_shape": tuple(a)} for t, a in alloc.a_shapes.items()}
        extra["allocation"] = {"ratios": ratios, "metric": alloc.metric,
                               "min_ratio": s["alloc_min_ratio"],
                               "predicted_loss": alloc.predicted_loss,
                               "uniform_loss": alloc.uniform_loss, "solver": alloc.solver,
                               "fallback_uniform": alloc.fallback_uniform}
    common = dict(method=s["method"], ratio=ratio, ratios=ratios, structures=structures,
                  layers=s["layers"], exclude=s["exclude"], macs_ratio=s["macs_ratio"],
                  permute=s["permute"], als_sweeps=s["als_sweeps"],
                  shape_policy=s["shape_policy"], in_place=True, device=s["device"])
    # G reaches the fits of the -fisher methods only (an allocation may have used it)
    gcov = stats.gcov if stats is not None and objective == "fisher" else None
    with sw.phase("fit"):
        if s["closed_loop"]:
            cmodel, report = compress_closed_loop(
                model, batches, gcovariances=gcov, target=s["closed_loop_target"], **common)
        else:
            cmodel, report = compress(
                model, covariances=None if stats is None else stats.cov,
                gcovariances=gcov, **common)
    if s["closed_loop"]:  # the closed-loop block forwards are statistics, not fitting
        moved = report.config["statistics_seconds"] + report.config["propagation_seconds"]
        sw.seconds["fit"] -= moved
        sw.seconds["statistics"] = sw.seconds.get("statistics", 0.0) + moved
    return cmodel, report, extra


def add_commands(sub) -> None:
    """Add ``compress`` and ``evaluate`` to the ``kronlab`` subcommands."""
    from .compress import METHOD_DESCRIPTIONS, METHODS, SHAPE_POLICIES

    corpora = ", ".join(stored_corpora()) or "none found"
    c = sub.add_parser(
        "compress", help="compress a causal LM and save it", formatter_class=HelpFormatter,
        description="Replace the linear layers of a causal LM by Kronecker sums or low-rank "
                    "products within a parameter budget, and save the result. Every default "
                    "below is the value kronlab.defaults records for the book's runs.")
    c.add_argument("--method", required=True, choices=METHODS,
                   help="; ".join(f"{m}: {METHOD_DESCRIPTIONS[m]}" for m in METHODS))
    c.add_argument("--ratio", required=True, type=_ratio,
                   help="fraction of each compressed layer's parameters kept, in (0, 1]")
    c.add_argument("--out", required=True, help="folder to save the compressed model in")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier kronlab save")
    c.add_argument("--model", default=None,
                   help=f"the model to compress: {_MODEL_HELP} (default: smollm2)")
    c.add_argument("--macs-ratio", type=positive_float, default=None,
                   help="also cap each layer's forward multiply-adds at this fraction of the "
                        "dense layer's (default: no cap)")
    c.add_argument("--calibration", default=CALIBRATION,
                   help="calibration text: " + _TEXT_HELP.format(corpora=corpora,
                                                                  part="calibration",
                                                                  split="train"))
    c.add_argument("--calib-tokens", type=int_at_least(1), default=CALIB_TOKENS,
                   help="calibration tokens, rounded up to whole sequences of --seq-len")
    c.add_argument("--seq-len", type=int_at_least(1), default=SEQ_LEN,
                   help="tokens per calibration sequence")
    c.add_argument("--seed", type=int_at_least(0), default=SEED,
                   help="seed of the calibration sequences' start positions (and of the Q of "
                        "--rotate random)")
    c.add_argument("--als-sweeps", type=int_at_least(0), default=ALS_SWEEPS,
                   help="ALS sweeps of the activation-aware Kronecker fit (0: its closed-form "
                        "start only)")
    c.add_argument("--permute", default=PERMUTE if PERMUTE is not None else "none",
                   choices=("variance", "none"),
                   help="input-channel permutation of kron-aa: variance sorts the channels "
                        "by variance; none keeps their order")
    c.add_argument("--shape-policy", default=SHAPE_POLICY, choices=SHAPE_POLICIES,
                   help="per-type: choose factor shape and rank once per layer type and reuse "
                        "them; per-layer: choose them for every layer")
    c.add_argument("--layers", action="append", metavar="PATTERNS",
                   help="compress only layers whose names match: shell globs, comma-separated "
                        "or repeated (e.g. 'model.layers.*.mlp.*'), or 're:REGEX' (default: "
                        "every linear layer in the decoder blocks)")
    c.add_argument("--exclude", action="append", metavar="PATTERNS",
                   help="leave out layers whose names match (same forms as --layers; "
                        "default: none)")
    c.add_argument("--dtype", default="auto", choices=_SAVE_DTYPES,
                   help="dtype of the saved weights; auto: the source model's training dtype "
                        "(its config; bfloat16 for SmolLM2), else float32. The fit always "
                        "runs in float32")
    c.add_argument("--no-output-error", action="store_true",
                   help="methods that fit the weights alone (kron, svd): skip calibration, "
                        "so the report has no output error")
    c.add_argument("--rotate", default="none", choices=ROTATIONS,
                   help="Kronecker methods: fold the norms and rotate the residual stream by "
                        "one orthogonal Q before compressing (the model's function is "
                        "unchanged; a tied head is untied, vocab x hidden more parameters). "
                        "Each layer type's factor shape is fixed: the chooser's best among the "
                        "shapes a rotation can change (not low-rank-like). procrustes: Q chosen for the method's fit; "
                        "hadamard, random (--seed): baselines. Low-rank "
                        "methods are rotation invariant and rejected")
    c.add_argument("--rotate-scope", default="global", choices=ROTATE_SCOPES,
                   help="--rotate procrustes/random: one Q for the whole residual stream "
                        "(global, no parameters) or one per decoder block (block: L-1 skip "
                        "maps of hidden^2 parameters each, paid from --ratio's budget; SmolLM2: "
                        "9.6 M, 0.091 of its layers')")
    c.add_argument("--allocate", action="store_true",
                   help="spread the parameter budget (and --macs-ratio) over the layers to "
                        "minimise the predicted loss (kronlab.allocate) instead of giving "
                        "every layer --ratio")
    c.add_argument("--alloc-metric", default="fisher", choices=["fisher", "own"],
                   help="--allocate: score every layer by the K-FAC (Fisher) loss increase, "
                        "collecting the loss gradients on the calibration text (fisher), or by "
                        "the method's own metric (own: output error weighted by output energy "
                        "for the -aa methods, which starved SmolLM2's first block: "
                        "data/results/llm_ablation.json)")
    c.add_argument("--alloc-min-ratio", type=float, default=None,
                   help="--allocate: the least fraction any layer may keep (default: none)")
    c.add_argument("--closed-loop", action="store_true",
                   help="fit block by block, each block's input covariances measured on the "
                        "model whose earlier blocks are already compressed (Fisher G stays "
                        "open loop); costs about one more pass over the calibration tokens")
    c.add_argument("--closed-loop-target", default="compressed",
                   choices=["compressed", "dense"],
                   help="--closed-loop: fit each layer to the dense layer's outputs on its "
                        "compressed inputs ('compressed', as GPTQ) or to the dense model's "
                        "outputs ('dense', asymmetric as GPTAQ: can undo upstream error; one "
                        "more block forward per block)")
    _add_runtime(c)
    c.set_defaults(func=_cmd_compress)

    e = sub.add_parser(
        "evaluate", help="perplexity (and a sample) of a model or a kronlab save",
        formatter_class=HelpFormatter,
        description="Perplexity of a causal LM or a kronlab save on held-out text, in "
                    "non-overlapping windows, and optionally a greedy sample.")
    e.add_argument("--model", default=None,
                   help=f"the model to evaluate: {_MODEL_HELP} (default: smollm2)")
    e.add_argument("--text", action="append",
                   help="evaluation text, repeatable: " + _TEXT_HELP.format(
                       corpora=corpora, part="held-out", split="test")
                   + f" (default: {', '.join(EVAL_TEXTS)}, kronlab.defaults.EVAL_TEXTS)")
    e.add_argument("--window", type=int_at_least(2), default=WINDOW,
                   help="tokens per perplexity window (windows do not overlap)")
    e.add_argument("--max-tokens", type=int_at_least(2), default=EVAL_TOKENS,
                   help="score the first this many tokens of each text (at least --window)")
    e.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="windows per forward pass")
    e.add_argument("--dtype", default="float32", choices=_EVAL_DTYPES,
                   help="dtype to evaluate in; saved: a kronlab save's own dtype (bfloat16 "
                        "is slow on CPUs, so saves are upcast to float32 by default)")
    e.add_argument("--generate", default=None, metavar="PROMPT",
                   help="also print a greedy continuation of PROMPT")
    e.add_argument("--max-new-tokens", type=int_at_least(1), default=40,
                   help="length of the --generate sample, in tokens")
    e.add_argument("--json", default=None, metavar="PATH",
                   help="write the results as JSON: perplexity per text name, parameters, "
                        "timings")
    _add_runtime(e)
    e.set_defaults(func=_cmd_evaluate)

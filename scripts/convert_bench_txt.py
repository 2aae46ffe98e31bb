"""One-off: convert the recorded benchmark text files of commit c61dfc0 into JSON.

    .venv/bin/python scripts/convert_bench_txt.py          # writes data/results/bench_*.json
    .venv/bin/python scripts/convert_bench_txt.py --check  # parse and compare, write nothing

Until that commit the benchmarks wrote ``data/results/bench_{nkp,layers,compress}.txt``;
they now write JSON (rows, summary, config, machine) read by
:func:`kronlab.results.load_benchmark`. This script reads each text file from git
(``git show c61dfc0:data/results/<name>.txt``), parses every line (an unrecognised
line is an error, so nothing is dropped), and writes ``data/results/<name>.json`` in
the benchmarks' JSON layout with a ``provenance`` field. Numbers are kept as printed
(rounded as in the text); what the text did not record is absent, not filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kronlab.paths import results_dir, write_atomic  # noqa: E402

COMMIT = "c61dfc0"
NAMES = ("bench_nkp", "bench_layers", "bench_compress")

__all__ = ["COMMIT", "NAMES", "convert", "main", "old_text"]


def old_text(name: str) -> str:
    """``data/results/<name>.txt`` as recorded in commit :data:`COMMIT`."""
    return subprocess.run(["git", "show", f"{COMMIT}:data/results/{name}.txt"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout


def _provenance(name: str) -> str:
    return (f"converted from data/results/{name}.txt of commit {COMMIT} by "
            "scripts/convert_bench_txt.py (no benchmark was rerun); numbers as printed there "
            "(rounded), fields the text did not record are absent")


def _num(s: str) -> int | float:
    return int(s) if re.fullmatch(r"[-+]?\d+", s) else float(s)


def _loads(s: str) -> list[float]:
    return [float(v) for v in s.split(", ")]


class _Lines:
    """The lines of a text, consumed in order; ``match`` fails loudly."""

    def __init__(self, text: str, name: str):
        self.lines = text.rstrip("\n").split("\n")
        self.i = 0
        self.name = name

    def peek(self) -> str | None:
        return self.lines[self.i] if self.i < len(self.lines) else None

    def next(self) -> str:
        line = self.peek()
        if line is None:
            raise ValueError(f"{self.name}: unexpected end of file")
        self.i += 1
        return line

    def match(self, pattern: str) -> re.Match:
        line = self.next()
        m = re.fullmatch(pattern, line)
        if m is None:
            raise ValueError(f"{self.name} line {self.i}: {line!r} does not match {pattern!r}")
        return m

    def blank(self) -> None:
        self.match(r"")

    def done(self) -> None:
        if self.peek() is not None:
            raise ValueError(f"{self.name} line {self.i + 1}: unparsed {self.peek()!r}")


# ----------------------------------------------------------------------------- bench_layers

def convert_layers(text: str) -> dict:
    L = _Lines(text, "bench_layers.txt")
    title = L.next()
    batch = L.match(r"batch \(1, (\d+), n\); median of (\d+) interleaved rounds \((\d+) for "
                    r"4096x4096\) after (\d+) warm-up rounds; input permutation and bias included\.")
    notes = [batch.group(0), L.next(), L.next()]
    L.blank()
    L.match(r"\s*shape\s+layer\s+config\s+params\s+FLOPs\s+dense ms\s+layer ms\s+speed-up\s+realised")
    rows = []
    while L.peek():
        tok = L.next().split()
        shape, layer, *config, p, fl, dms, lms, sp, rz = tok
        m, n = (int(v) for v in shape.split("x"))
        if layer == "kron":
            a, r, order = config
            a_shape, rank = [int(v) for v in a[2:].split("x")], int(r[2:])
        elif layer == "lowrank":
            (r,), a_shape, order = config, None, None
            rank = int(r[2:])
        else:
            raise ValueError(f"bench_layers.txt: unknown layer {layer!r}")
        rows.append({"shape": shape, "m": m, "n": n, "layer": layer, "a_shape": a_shape,
                     "rank": rank, "order": order, "config": " ".join(config),
                     "params_ratio": float(p), "flop_ratio": float(fl), "dense_ms": float(dms),
                     "layer_ms": float(lms), "speedup": float(sp), "realised": float(rz)})
    L.blank()
    meets = L.match(r"Kronecker layers with FLOP ratio < 1 realising at least half of it as "
                    r"speed-up: (\d+) of (\d+) \(target from the issue: all\)\.")
    median = L.match(r"median realised fraction, Kronecker layers with FLOP ratio < 1: ([\d.]+)")
    L.blank()
    machine = {"date_utc": L.match(r"date \(UTC\): (\S+)").group(1)}
    m = L.match(r"platform: (\S+); python (\S+)")
    machine |= {"platform": m.group(1), "python": m.group(2)}
    m = L.match(r"processor: (.+); logical cores: (\d+); torch threads: (\d+)")
    machine |= {"processor": m.group(1), "logical_cores": int(m.group(2)),
                "torch_threads": int(m.group(3))}
    machine["omp_wait_policy"] = L.match(r"OMP_WAIT_POLICY=(\S+)").group(1)
    m = L.match(r"torch: (\S+); device: (\S+)")
    machine |= {"torch": m.group(1), "device": m.group(2)}
    machine["load_start"] = _loads(L.match(r"load average at start \(1, 5, 15 min\): (.+)").group(1))
    machine["load_end"] = _loads(L.match(r"load average at end \(1, 5, 15 min\): (.+)").group(1))
    notes.append(L.match(r"note: .*").group(0))
    wall = int(L.match(r"benchmark wall time: (\d+) s").group(1))
    machine["command"] = L.match(r"command: (.*?)\s*").group(1)
    L.done()
    tokens, repeats, big_repeats, warmup = (int(v) for v in batch.groups())
    cases: dict = {}
    for r in rows:
        if r["layer"] == "kron":
            cases.setdefault((r["m"], r["n"], tuple(r["a_shape"])), []).append(r["rank"])
    config = {"device": machine["device"], "dtype": title.rsplit(", ", 1)[1], "tokens": tokens,
              "repeats": repeats, "big_repeats": big_repeats, "warmup": warmup,
              "threads": machine["torch_threads"],
              "cases": [[m, n, list(a), ranks] for (m, n, a), ranks in cases.items()]}
    summary = {"n": int(meets.group(2)), "meets_half": int(meets.group(1)),
               "median_realised": float(median.group(1))}
    return {"benchmark": "bench_layers", "title": title, "config": config, "notes": notes,
            "rows": rows, "summary": summary, "wall_seconds": wall, "machine": machine,
            "provenance": _provenance("bench_layers")}


# ----------------------------------------------------------------------------- bench_nkp

def convert_nkp(text: str) -> dict:
    L = _Lines(text, "bench_nkp.txt")
    title = L.match(r"kronlab benchmark: (.+)").group(1)
    m = L.match(r"date (\S+)  platform (\S+)  cpus (\d+)  torch threads (\d+)")
    machine = {"date": m.group(1), "platform": m.group(2), "logical_cores": int(m.group(3)),
               "torch_threads": int(m.group(4))}
    m = L.match(r"python (\S+)  numpy (\S+)  torch (\S+)")
    machine |= {"python": m.group(1), "numpy": m.group(2), "torch": m.group(3)}
    m = L.match(r"command: (.*?)  load average at start ([\d.]+) \(the machine is shared\)")
    machine |= {"command": m.group(1), "load_start": [float(m.group(2))]}
    L.blank()
    m = L.match(r"== \(a\) randomized vs exact SVD of R\(W\): W (\d+)x(\d+), a_shape \((\d+), (\d+)\) ==")
    size_m, size_n, a1, a2 = (int(v) for v in m.groups())
    a_shape = [a1, a2]
    m = L.match(r"exact full SVD of R\(W\) \((\d+)x(\d+)\): ([\d.]+) s \(rank-independent; errors "
                r"for smaller ranks from the same SVD\)")
    if (int(m.group(1)), int(m.group(2))) != (size_m, size_n):
        raise ValueError("bench_nkp.txt: exact SVD size differs from part (a)'s")
    exact = float(m.group(3))
    rows = []
    while L.peek().startswith("  rank"):
        m = L.match(r"  rank\s+(\d+): randomized\s+([\d.]+) s  speedup\s+([\d.]+)x  rel\.err "
                    r"([\d.]+) vs exact ([\d.]+) \(diff ([-+][\d.]+e[-+]\d+)\)  "
                    r"(target met|TARGET MISSED)")
        rows.append({"part": "svd", "m": size_m, "n": size_n, "a_shape": a_shape,
                     "rank": int(m.group(1)), "randomized_seconds": float(m.group(2)),
                     "speedup": float(m.group(3)), "error_randomized": float(m.group(4)),
                     "error_exact": float(m.group(5)), "error_diff": float(m.group(6)),
                     "target_met": m.group(7) == "target met"})
    m = L.match(r"\(a\) target >= (\d+)x and \|err diff\| <= ([\d.e-]+): (met|NOT met)")
    parts = {"svd": {"m": size_m, "n": size_n, "a_shape": a_shape, "exact_seconds": exact,
                     "target_speedup": _num(m.group(1)), "target_error_diff": float(m.group(2)),
                     "target_met": m.group(3) == "met"}}
    L.blank()
    m = L.match(r"== \(b\) activation-aware ALS vs plain at (\d+)x(\d+), a_shape \((\d+), (\d+)\) ==")
    if [int(v) for v in m.groups()] != [size_m, size_n, *a_shape]:
        raise ValueError("bench_nkp.txt: part (b)'s size differs from part (a)'s")
    target_b = None
    while L.peek().startswith("  rank"):
        m = L.match(r"  rank\s+(\d+): ALS \((\w+), (\d+) sweeps, start (\w+)\)\s+([\d.]+) s =\s+"
                    r"([\d.]+)x plain randomized,\s+([\d.]+)x plain exact; output err plain "
                    r"([\d.]+) -> ALS ([\d.]+)  (target met|TARGET \(<=(\d+)x plain randomized\) MISSED)")
        if m.group(11):
            target_b = int(m.group(11))
        rows.append({"part": "als", "m": size_m, "n": size_n, "a_shape": a_shape,
                     "rank": int(m.group(1)), "solver": m.group(2), "sweeps": int(m.group(3)),
                     "start": m.group(4), "seconds": float(m.group(5)),
                     "time_vs_randomized": float(m.group(6)), "time_vs_exact": float(m.group(7)),
                     "error_plain": float(m.group(8)), "error_als": float(m.group(9)),
                     "target_met": m.group(10) == "target met"})
    note = L.match(r"  (\(the one-time .*\))").group(1)
    parts["als"] = {"m": size_m, "n": size_n, "a_shape": a_shape,
                    "target_time_vs_randomized": target_b, "note": note}
    L.blank()
    m = L.match(r"== \(c\) per-layer ALS at SmolLM2-135M shapes, ~(\d+)% parameters kept, "
                r"(\d+) sweeps ==")
    keep, sweeps = int(m.group(1)) / 100, int(m.group(2))
    while not L.peek().startswith("(c)"):
        m = L.match(r"  (\S+)\s+(\d+)x(\d+) a_shape \((\d+),(\d+)\) rank\s+(\d+) \((\d+)% params, "
                    r"solver (\w+)\): ALS\s+([\d.]+) s \(x(\d+) layers\)")
        e = L.match(r"      output err: plain ([\d.]+), ALS ([\d.]+), ALS\+permute=variance "
                    r"([\d.]+) \(([\d.]+) s\), SVD-LLM low rank r=(\d+) ([\d.]+)")
        rows.append({"part": "layers", "name": m.group(1), "m": int(m.group(2)),
                     "n": int(m.group(3)), "a_shape": [int(m.group(4)), int(m.group(5))],
                     "rank": int(m.group(6)), "params_fraction": int(m.group(7)) / 100,
                     "solver": m.group(8), "seconds": float(m.group(9)),
                     "n_layers": int(m.group(10)), "error_plain": float(e.group(1)),
                     "error_als": float(e.group(2)), "error_als_variance": float(e.group(3)),
                     "seconds_variance": float(e.group(4)), "lowrank_rank": int(e.group(5)),
                     "error_lowrank": float(e.group(6))})
    m = L.match(r"\(c\) estimated whole model \((\d+) layers\): (\d+) s = ([\d.]+) min "
                r"\(target < (\d+) min: (met|NOT met)\)")
    parts["layers"] = {"keep": keep, "sweeps": sweeps, "model_layers": int(m.group(1)),
                       "estimated_model_seconds": int(m.group(2)),
                       "estimated_model_minutes": float(m.group(3)),
                       "target_minutes": int(m.group(4)), "target_met": m.group(5) == "met"}
    machine["load_end"] = [float(L.match(r"load average at end ([\d.]+)").group(1))]
    L.done()
    config = {"quick": False, "size": size_m, "a_shape": a_shape,
              "ranks": [r["rank"] for r in rows if r["part"] == "svd"], "keep": keep,
              "als_sweeps": sweeps, "threads": machine["torch_threads"]}
    return {"benchmark": "bench_nkp", "title": title, "config": config, "parts": parts,
            "rows": rows, "machine": machine, "provenance": _provenance("bench_nkp")}


# ----------------------------------------------------------------------------- bench_compress

def convert_compress(text: str) -> dict:
    L = _Lines(text, "bench_compress.txt")
    title = L.match(r"kronlab benchmark: (.+)").group(1)
    m = L.match(r"date (\S+)  platform (\S+)  cpus (\d+)  torch threads (\d+)  OMP_WAIT_POLICY (\S+)")
    machine = {"date": m.group(1), "platform": m.group(2), "logical_cores": int(m.group(3)),
               "torch_threads": int(m.group(4)), "omp_wait_policy": m.group(5)}
    m = L.match(r"torch (\S+)  command: (.*?)  load average at start ([\d.]+)")
    machine |= {"torch": m.group(1), "command": m.group(2), "load_start": [float(m.group(3))]}
    m = L.match(r"(\d+) layers; calibration (\d+) (\w+) tokens, covariances in ([\d.]+) s; ratio "
                r"([\d.]+), (\d+) ALS sweeps, permute=(\w+) \(kron-aa\), shapes per layer type")
    n_layers, calib_tokens, corpus, t_cov, ratio, sweeps, permute = m.groups()
    L.blank()
    totals, rows = {}, []
    while L.peek():
        m = L.match(r"(\S+)\s+total\s+([\d.]+) s  \((.*)\)")
        method = m.group(1)
        totals[method] = float(m.group(2))
        pieces = m.group(3).split("), ")
        for piece in pieces:
            t = re.fullmatch(r"(\w+) ([\d.]+) s \((\d+), mean ([\d.]+)\)?", piece)
            if t is None:
                raise ValueError(f"bench_compress.txt: cannot parse {piece!r} of {method}")
            rows.append({"method": method, "layer_type": t.group(1), "seconds": float(t.group(2)),
                         "n_layers": int(t.group(3)), "mean_seconds": float(t.group(4))})
    L.blank()
    m = L.match(r"kron-aa, whole model: (\d+) s = ([\d.]+) min \(target < (\d+) min: (met|NOT met)\)")
    summary = {"kron_aa_seconds": int(m.group(1)), "kron_aa_minutes": float(m.group(2)),
               "time_ratios": {}, "target_minutes": int(m.group(3)),
               "target_met": m.group(4) == "met"}
    while L.peek().startswith("kron-aa / "):
        m = L.match(r"(kron-aa / \S+) time: ([\d.]+)x")
        summary["time_ratios"][m.group(1)] = float(m.group(2))
    machine["load_end"] = [float(L.match(r"load average at end ([\d.]+)").group(1))]
    L.done()
    config = {"model": "smollm2", "methods": list(totals), "ratio": float(ratio), "blocks": None,
              "calibration": corpus.lower(), "calib_tokens": int(calib_tokens),
              "als_sweeps": int(sweeps), "permute": permute, "shape_policy": "per-type",
              "threads": machine["torch_threads"]}
    return {"benchmark": "bench_compress", "title": title, "config": config,
            "n_layers": int(n_layers), "covariance_seconds": float(t_cov), "totals": totals,
            "rows": rows, "summary": summary, "machine": machine,
            "provenance": _provenance("bench_compress")}


_CONVERTERS = {"bench_nkp": convert_nkp, "bench_layers": convert_layers,
               "bench_compress": convert_compress}


def convert(name: str, text: str | None = None) -> dict:
    """The JSON dict of benchmark ``name`` from its text (default: :func:`old_text`)."""
    return _CONVERTERS[name](old_text(name) if text is None else text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the JSON files in data/results, write nothing")
    args = ap.parse_args(argv)
    status = 0
    for name in NAMES:
        data = convert(name)
        path = results_dir() / f"{name}.json"
        text = json.dumps(data, indent=1) + "\n"
        if args.check:
            same = path.exists() and json.loads(path.read_text()) == data
            print(f"{path}: {'same' if same else 'DIFFERS'}")
            status |= not same
        else:
            write_atomic(path, text)
            print(f"wrote {path} ({len(data['rows'])} rows)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

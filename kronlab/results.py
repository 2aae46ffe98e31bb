"""Recorded results in ``data/results``: the one module that reads them.

The book's chapters and the scripts read every recorded result through these functions;
a missing or malformed file fails with an error that names the command that writes it.

- ``llm_sweep.json``, written by ``scripts/run_llm_experiments.py``: :func:`load_sweep`,
  :func:`sweep_frame`, :func:`sweep_command`, :func:`sweep_prompt`,
  :func:`error_ppl_correlation`;
- ``dense_smollm2.json``, written by ``scripts/record_dense.py``: :func:`dense_reference`;
- ``layer_damage.json``, written by ``scripts/layer_damage.py``: :func:`load_layer_damage`,
  :func:`damage_frame`;
- ``llm_ablation.json``, written by ``scripts/ablation_sweep.py``: :func:`load_ablation`,
  :func:`ablation_frame`;
- ``heal_sweep.json``, written by ``scripts/heal_sweep.py``: :func:`load_heal`,
  :func:`heal_frame`, :func:`heal_curves`;
- ``bench_nkp.json``, ``bench_layers.json``, ``bench_compress.json``, written by
  ``benchmarks/<name>.py``: :func:`load_benchmark`.

Every file holds its configuration (``config``) and a ``machine`` dict
(:func:`kronlab.runtime.machine_info`: the command that wrote it, date, processor,
threads, OpenMP wait policy, torch, load average). A benchmark file holds structured
``rows`` (one dict per measurement, the same keys as the script's printed table) and a
``summary``; files converted from the text files of earlier versions say so in
``provenance``.

This module imports neither torch nor pandas at import time (pandas loads in
:func:`sweep_frame`), so a script can read it before :func:`kronlab.runtime.configure_threads`.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import results_dir

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "settings_differences",
    "resumed_config",
    "allocation_key",
    "run_allocation_key",
    "run_settings_key",
    "BENCHMARKS",
    "DENSE_COMMAND",
    "SWEEP_COMMAND",
    "LAYER_DAMAGE_COMMAND",
    "SWEEP_PROMPT",
    "damage_frame",
    "dense_reference",
    "error_ppl_correlation",
    "load_benchmark",
    "load_heal",
    "load_ablation",
    "ablation_frame",
    "ABLATION_COMMAND",
    "heal_frame",
    "heal_curves",
    "HEAL_COMMAND",
    "load_layer_damage",
    "load_sweep",
    "sweep_command",
    "sweep_config",
    "sweep_frame",
    "sweep_prompt",
]

SWEEP_COMMAND = "python scripts/run_llm_experiments.py"
DENSE_COMMAND = ".venv/bin/python scripts/record_dense.py"
LAYER_DAMAGE_COMMAND = ".venv/bin/python scripts/layer_damage.py"
HEAL_COMMAND = ".venv/bin/python scripts/heal_sweep.py"
ABLATION_COMMAND = ".venv/bin/python scripts/ablation_sweep.py"
#: the command that writes ``data/results/rotation_scope.json``
ROTATION_SCOPE_COMMAND = ".venv/bin/python scripts/rotation_scope.py"
#: Benchmark name (the file ``data/results/<name>.json``) -> the command that writes it.
BENCHMARKS = {
    "bench_nkp": ".venv/bin/python benchmarks/bench_nkp.py",
    "bench_layers": ".venv/bin/python benchmarks/bench_layers.py",
    "bench_compress": ".venv/bin/python benchmarks/bench_compress.py",
    "bench_heal": ".venv/bin/python benchmarks/bench_heal.py",
}
#: The prompt of the greedy generation samples in the LLM sweep. Sweeps record it
#: (``"prompt"``); files written before they did used this one, which
#: ``scripts/run_llm_experiments.py`` has used since its first version.
SWEEP_PROMPT = "The most important duty of a government is"

# Configuration keys renamed since a sweep was recorded: old name -> current option name.
_RENAMED_CONFIG_KEYS = {"als_iters": "als_sweeps"}


def _read_json(path: Path, what: str, command: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}; it is written by `{command}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rewrite it with `{command}`") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; rewrite it "
                         f"with `{command}`")
    return data


# ----------------------------------------------------------------------------- benchmarks

def load_benchmark(name: str, path=None) -> dict:
    """A recorded benchmark: ``name`` is one of :data:`BENCHMARKS` (``"bench_nkp"``, ``"bench_layers"``,
    ``"bench_compress"``, ``"bench_heal"``).

    Reads ``path`` (default ``data/results/<name>.json``). Returns the file's dict:
    ``benchmark`` (= name), ``config``, ``rows`` (a list of dicts, one per measurement;
    ``pandas.DataFrame(b["rows"])`` makes the table), ``summary``, ``machine`` and,
    for files converted from an older text format, ``provenance``.

    Raises ``ValueError`` for an unknown name or a file that is not this benchmark's,
    and ``FileNotFoundError``, naming the command that writes it, for a missing file.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    command = BENCHMARKS[name]
    path = results_dir() / f"{name}.json" if path is None else Path(path)
    data = _read_json(path, f"recorded benchmark {name!r}", command)
    if data.get("benchmark") != name or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a {name} result (expected keys 'benchmark': {name!r} and "
                         f"a list 'rows'); rewrite it with `{command}`")
    return data


# ----------------------------------------------------------------------------- dense model

def dense_reference(path=None) -> dict:
    """The dense SmolLM2 baseline: ``data/results/dense_smollm2.json`` (or ``path``).

    Returns the file's dict: ``config`` (evaluation corpora, tokens, window), ``model``
    (:func:`kronlab.models.model_info`), ``parameters``, ``weight_memory_bytes``,
    ``perplexity`` (corpus -> the dict of :func:`kronlab.evaluate.perplexity`),
    ``seconds`` and ``machine``. A missing file names the command that writes it.
    """
    path = results_dir() / "dense_smollm2.json" if path is None else Path(path)
    data = _read_json(path, "dense-model reference", DENSE_COMMAND)
    missing = [k for k in ("config", "perplexity", "machine") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a dense-model reference (missing keys {missing}); "
                         f"rewrite it with `{DENSE_COMMAND}`")
    return data


# ----------------------------------------------------------------------------- layer damage

#: Columns of :func:`damage_frame`, in order (a row of ``layer_damage.json`` may lack some).
DAMAGE_COLUMNS = ("layer", "block", "type", "ratio", "method", "rank", "a_shape", "b_shape",
                  "params", "dense_params", "weight_error", "output_error", "fisher_error",
                  "kfac_increase", "calib_increase", "eval_increase", "eval_ppl")


def load_layer_damage(path=None) -> dict:
    """The layer-damage study: ``data/results/layer_damage.json`` (or ``path``).

    Written by ``scripts/layer_damage.py`` (one layer compressed alone per row, its
    errors e_W, e_Y, e_F, the K-FAC predicted loss increase and the measured increases).
    Returns the file's dict: ``config``, ``rows`` (a list of dicts), ``dense``,
    ``correlations``, ``sessions`` (each with its ``machine``). A missing file raises
    ``FileNotFoundError`` naming the script; a file without ``config`` and a list
    ``rows`` raises ``ValueError``.
    """
    path = results_dir() / "layer_damage.json" if path is None else Path(path)
    data = _read_json(path, "layer-damage study", LAYER_DAMAGE_COMMAND)
    if "config" not in data or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a layer-damage study (expected keys 'config' and a "
                         f"list 'rows'); rewrite it with `{LAYER_DAMAGE_COMMAND}`")
    return data


def damage_frame(data: dict) -> pd.DataFrame:
    """One row per (layer, ratio, method) of a layer-damage study (:func:`load_layer_damage`).

    Columns :data:`DAMAGE_COLUMNS` (``a_shape``/``b_shape`` as tuples; a missing value is
    NaN). A (layer, ratio, method) recorded twice (a resumed run) keeps its last row.
    Sorted by block, type, ratio (descending) and method.
    """
    import pandas as pd

    rows = []
    for r in data["rows"]:
        row = {k: r.get(k) for k in DAMAGE_COLUMNS}
        for k in ("a_shape", "b_shape"):
            if row[k] is not None:
                row[k] = tuple(row[k])
        row["ratio"] = float(row["ratio"]) if row["ratio"] is not None else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(DAMAGE_COLUMNS))
    if len(df):
        df = df.drop_duplicates(["layer", "ratio", "method"], keep="last")
        num = ["weight_error", "output_error", "fisher_error", "kfac_increase",
               "calib_increase", "eval_increase", "eval_ppl"]
        df[num] = df[num].astype(float)
        df = df.sort_values(["block", "type", "ratio", "method"],
                            ascending=[True, True, False, True]).reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------- LLM sweeps

def load_sweep(path=None) -> dict:
    """Read an LLM sweep JSON (default ``data/results/llm_sweep.json``).

    A missing file raises ``FileNotFoundError`` with the command that writes it; a file
    without ``config``, ``dense`` and ``runs`` raises ``ValueError``.
    """
    path = results_dir() / "llm_sweep.json" if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no LLM sweep at {path}. It is written by `{SWEEP_COMMAND}` (the book's default "
            f"sweep, ~hours on 2 CPU cores) or, for a quick development file, `{SWEEP_COMMAND} "
            "--ratios 0.6 --methods kron svd --calib-tokens 1024 --eval-tokens 1024 --out "
            "/tmp/sweep_dev.json` and the chapter parameter sweep_path.")
    sweep = _read_json(path, "LLM sweep", SWEEP_COMMAND)
    missing = [k for k in ("config", "dense", "runs") if k not in sweep]
    if missing:
        raise ValueError(f"{path} is not an LLM sweep (missing keys {missing}); expected the "
                         f"output of `{SWEEP_COMMAND}`")
    return sweep


def sweep_config(sweep: dict) -> dict:
    """A sweep's configuration under the script's current option names.

    Sweeps recorded before ``--als-iters`` became ``--als-sweeps`` store ``als_iters``;
    it is returned as ``als_sweeps`` (same meaning: ALS sweeps of ``kron-aa``).
    """
    return {_RENAMED_CONFIG_KEYS.get(k, k): v for k, v in sweep["config"].items()}


def sweep_command(sweep: dict, out=None) -> str:
    """The one command that reproduces a sweep's configuration (``--out`` if ``out`` is given)."""
    flags = []
    for key, value in sweep_config(sweep).items():
        if value is None or value is False:
            continue
        opt = "--" + key.replace("_", "-")
        if value is True:
            flags.append(opt)
        else:
            vals = value if isinstance(value, list) else [value]
            flags.append(opt + " " + " ".join(shlex.quote(str(v)) for v in vals))
    cmd = " ".join([SWEEP_COMMAND] + flags)
    return cmd + (f" --out {shlex.quote(str(out))}" if out is not None else "")


def sweep_prompt(sweep: dict) -> str:
    """The prompt of the sweep's generation samples (``sweep["dense"]["sample"]`` and each
    run's ``"sample"`` continue it): the recorded ``"prompt"``, else :data:`SWEEP_PROMPT`."""
    return sweep.get("prompt", SWEEP_PROMPT)


def sweep_frame(sweep: dict) -> pd.DataFrame:
    """One row per compressed run of a sweep (the dict from :func:`load_sweep`).

    Columns: method, ratio, macs_ratio (None = parameter budget only), the report summary's
    ``model_params_kept``, ``layer_params_kept``, ``macs_kept``, ``mean_weight_error``
    (e_W), ``mean_output_error`` (e_Y), ``compress_seconds``, and per evaluation corpus
    ``ppl_<corpus>`` and ``dlogppl_<corpus>`` = log(ppl / dense ppl) (the change of the
    mean negative log-likelihood per token, nats).
    """
    import pandas as pd

    corpora = [k for k, v in sweep["dense"].items() if isinstance(v, dict) and "perplexity" in v]
    rows = []
    for run in sweep["runs"]:
        s = run["report"]["summary"]
        row = {"method": run["method"], "ratio": float(run["ratio"]),
               "macs_ratio": run.get("macs_ratio"),
               "model_params_kept": s["model_params_kept"],
               "layer_params_kept": s["layer_params_kept"], "macs_kept": s["macs_kept"],
               "mean_weight_error": s["mean_weight_error"],
               "mean_output_error": s["mean_output_error"],
               "compress_seconds": run.get("compress_seconds", s.get("seconds"))}
        for c in corpora:
            if c in run.get("ppl", {}):
                p = run["ppl"][c]["perplexity"]
                row[f"ppl_{c}"] = p
                row[f"dlogppl_{c}"] = math.log(p / sweep["dense"][c]["perplexity"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["macs_ratio"] = df["macs_ratio"].astype(object).where(df["macs_ratio"].notna(), None)
        df = df.sort_values(["method", "ratio"], ascending=[True, False]).reset_index(drop=True)
    return df


def error_ppl_correlation(frame: pd.DataFrame, corpus: str) -> dict:
    """Spearman rank correlations of ``dlogppl_<corpus>`` with mean e_W and mean e_Y.

    Uses the runs where both are known. Returns ``{"n": runs, "weight": rho_W,
    "output": rho_Y}`` (NaN when fewer than 3 runs or a column is constant).
    """
    col = f"dlogppl_{corpus}"
    if col not in frame:
        raise KeyError(f"no column {col!r}; corpora in the frame: "
                       f"{[c[8:] for c in frame.columns if c.startswith('dlogppl_')]}")
    d = frame[[col, "mean_weight_error", "mean_output_error"]].dropna().astype(float)
    out = {"n": len(d)}
    for key, c in (("weight", "mean_weight_error"), ("output", "mean_output_error")):
        ok = len(d) >= 3 and d[c].nunique() > 1 and d[col].nunique() > 1
        out[key] = float(d[col].corr(d[c], method="spearman")) if ok else float("nan")
    return out


def resumed_config(old_config: dict, config: dict, plan_keys, union_keys, path) -> dict:
    """The configuration of a recorded file that ``--resume`` continues with ``config``.

    Raises ``ValueError`` naming the results-defining settings
    (:func:`settings_differences`) on which the two differ; otherwise returns
    ``old_config`` with each of ``union_keys`` (lists: methods, ratios, ...) the union of
    both, in order.

    >>> resumed_config({"ratios": [0.8], "seed": 0}, {"ratios": [0.6], "seed": 0}, ["ratios"],
    ...                ["ratios"], "f.json")
    {'ratios': [0.8, 0.6], 'seed': 0}
    """
    diff = settings_differences(old_config, config, plan_keys)
    if diff:
        raise ValueError(f"--resume: {path} was made with different settings {diff}; "
                         "use another --out")
    merged = dict(old_config)
    for key in union_keys:
        merged[key] = list(dict.fromkeys(old_config[key] + config[key]))
    return merged


def settings_differences(old_config: dict, config: dict, plan_keys) -> list[str]:
    """The results-defining settings (all but ``plan_keys``) on which two configs differ.

    A recorded file can be resumed (``--resume``) only when this is empty: the plan keys
    (which runs) may differ, everything else defines what the numbers mean.

    >>> settings_differences({"ratios": [0.8], "seed": 0}, {"ratios": [0.6], "seed": 1}, ["ratios"])
    ['seed']
    """
    same = {k: v for k, v in config.items() if k not in plan_keys}
    old_same = {k: v for k, v in old_config.items() if k not in plan_keys}
    return sorted(k for k in set(same) | set(old_same) if same.get(k) != old_same.get(k))


# ----------------------------------------------------------------------------- rotation scope

def load_rotation_scope(path=None) -> dict:
    """One global rotation against one per block: ``data/results/rotation_scope.json``.

    Written by ``scripts/rotation_scope.py``. Returns the file's dict: ``config``,
    ``layers``, ``layer_parameters``, ``blocks``, ``hidden_size``, ``machine`` and ``runs``,
    one per (ratio, setting) with ``layer_ratio``, ``skip_parameters``, ``budget_kept``,
    ``shapes``, ``ranks``, ``relative_objective`` (the Procrustes objective over
    ``sum ||W||^2`` at the start and after every round), ``start``, ``end`` and
    ``seconds``. A missing file names the command that writes it.
    """
    path = results_dir() / "rotation_scope.json" if path is None else Path(path)
    data = _read_json(path, "rotation-scope comparison", ROTATION_SCOPE_COMMAND)
    if not isinstance(data.get("runs"), list) or "layer_parameters" not in data:
        raise ValueError(f"{path} is not a rotation-scope comparison (expected a list 'runs' "
                         f"and 'layer_parameters'); rewrite it with `{ROTATION_SCOPE_COMMAND}`")
    return data


def rotation_scope_frame(data: dict) -> pd.DataFrame:
    """One row per run of :func:`load_rotation_scope`'s dict: ratio, setting, layer_ratio,
    budget_kept, skip_parameters, start, end, reduction (``1 - end / start``), seconds;
    sorted by ratio (descending) in the script's setting order."""
    import pandas as pd

    rows = [{"ratio": float(r["ratio"]), "setting": r["setting"],
             "layer_ratio": r["layer_ratio"], "budget_kept": r["budget_kept"],
             "skip_parameters": r["skip_parameters"], "start": r["start"], "end": r["end"],
             "reduction": 1 - r["end"] / r["start"] if r["start"] else float("nan"),
             "seconds": r.get("seconds")} for r in data["runs"]]
    df = pd.DataFrame(rows)
    if len(df):
        order = {s: i for i, s in enumerate(dict.fromkeys(df.setting))}
        df = df.assign(_o=df.setting.map(order)).sort_values(
            ["ratio", "_o"], ascending=[False, True]).drop(columns="_o").reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------- healing

def load_heal(path=None) -> dict:
    """The healing sweep: ``data/results/heal_sweep.json`` (or ``path``).

    Written by ``scripts/heal_sweep.py``: compressed SmolLM2 students distilled toward the
    dense model. Returns the file's dict: ``config`` (the script's options), ``machine``,
    ``dense`` (corpus -> :func:`kronlab.evaluate.perplexity` dict) and ``runs``, one per
    (method, ratio), each with ``compress`` (the compression summary), ``ppl_before``,
    ``ppl_after`` (corpus -> perplexity), ``tokens_per_second``, ``heal`` (the
    :class:`kronlab.heal.HealReport` as a dict: ``curve``, ``losses``, ``seconds``, ...) and
    its own ``machine``. A missing file names the command that writes it.
    """
    path = results_dir() / "heal_sweep.json" if path is None else Path(path)
    data = _read_json(path, "healing sweep", HEAL_COMMAND)
    if "config" not in data or not isinstance(data.get("runs"), list) or "dense" not in data:
        raise ValueError(f"{path} is not a healing sweep (expected keys 'config', 'dense' and a "
                         f"list 'runs'); rewrite it with `{HEAL_COMMAND}`")
    return data


def _run_label(run: dict, config: dict) -> str:
    method = run["method"]
    cap = config.get("macs_cap")
    return f"{method} (MACs<={cap:g})" if cap is not None and method.startswith("kron") else method


def heal_frame(data: dict) -> pd.DataFrame:
    """One row per healed run of :func:`load_heal`'s dict.

    Columns: method, label (the method, with its MACs cap when the sweep had one), ratio,
    layer_params_kept, macs_kept, tokens (trained), tokens_per_second, train_seconds,
    compress_seconds, and per evaluation corpus ``before_<c>``, ``after_<c>`` (perplexity)
    and ``after_over_dense_<c>``.
    """
    import pandas as pd

    rows = []
    for run in data["runs"]:
        s = run.get("compress", {})
        h = run.get("heal", {})
        row = {"method": run["method"], "label": _run_label(run, data["config"]),
               "ratio": float(run["ratio"]),
               "layer_params_kept": s.get("layer_params_kept"), "macs_kept": s.get("macs_kept"),
               "tokens": h.get("tokens"), "tokens_per_second": run.get("tokens_per_second"),
               "train_seconds": h.get("seconds", {}).get("train"),
               "compress_seconds": run.get("compress_seconds")}
        for c, before in (run.get("ppl_before") or {}).items():
            after = run["ppl_after"][c]
            row[f"before_{c}"] = before
            row[f"after_{c}"] = after
            dense = data["dense"].get(c, {}).get("perplexity")
            row[f"after_over_dense_{c}"] = after / dense if dense else float("nan")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["ratio", "method"], ascending=[False, True]).reset_index(drop=True)
    return df


def heal_curves(data: dict) -> pd.DataFrame:
    """The perplexity-against-training-tokens curves of :func:`load_heal`'s dict, long form.

    One row per (run, evaluation point, corpus): method, label, ratio, tokens, corpus,
    perplexity, over_dense (perplexity / the dense model's on that corpus).
    """
    import pandas as pd

    rows = []
    for run in data["runs"]:
        for point in run.get("heal", {}).get("curve", []):
            for c, p in point["perplexity"].items():
                dense = data["dense"].get(c, {}).get("perplexity")
                rows.append({"method": run["method"], "label": _run_label(run, data["config"]),
                             "ratio": float(run["ratio"]), "tokens": point["tokens"],
                             "corpus": c, "perplexity": p,
                             "over_dense": p / dense if dense else float("nan")})
    return pd.DataFrame(rows, columns=["method", "label", "ratio", "tokens", "corpus",
                                       "perplexity", "over_dense"])


# ----------------------------------------------------------------------------- ablation

#: The ablation's variants in reading order (``scripts/ablation_sweep.py``).
ABLATION_VARIANTS = ("none", "allocation", "closed-loop", "rotation", "all")


def load_ablation(path=None) -> dict:
    """The rotation / allocation / closed-loop ablation: ``data/results/llm_ablation.json``.

    Written by ``scripts/ablation_sweep.py``. Returns the file's dict: ``config``,
    ``machine``, ``dense`` (``{"ppl": {corpus: perplexity dict}, "parameters": n}``) and
    ``runs``, one per (seed, ratio, method, variant) with ``components``, ``macs_ratio``,
    ``layer_params_kept``, ``model_params_kept`` (rotation matrices and an untied head
    included), ``macs_kept``, ``phases`` (seconds: statistics, rotation, allocation, fit),
    ``compress_seconds``, ``ppl``, ``peak_rss_bytes`` and optional ``rotation`` /
    ``allocation`` details. A missing file names the command that writes it.
    """
    path = results_dir() / "llm_ablation.json" if path is None else Path(path)
    data = _read_json(path, "rotation/allocation/closed-loop ablation", ABLATION_COMMAND)
    if "config" not in data or not isinstance(data.get("runs"), list) or "dense" not in data:
        raise ValueError(f"{path} is not an ablation (expected keys 'config', 'dense' and a "
                         f"list 'runs'); rewrite it with `{ABLATION_COMMAND}`")
    return data


def allocation_key(metric: str, min_ratio: float | None) -> str:
    """An allocation's settings as a label: ``"fisher"``, ``"output, floor 0.4"``.

    >>> allocation_key("output", None), allocation_key("fisher", 0.4)
    ('output', 'fisher, floor 0.4')
    """
    return metric if min_ratio is None else f"{metric}, floor {min_ratio:g}"


def run_allocation_key(run: dict) -> str:
    """The allocation settings of an ablation run (``""`` without allocation); runs recorded
    before the settings were keyed carry them in their ``allocation`` entry."""
    key = run.get("allocation_key")
    if key is None and "allocation" in run:
        a = run["allocation"]
        key = allocation_key(a["metric"], a.get("min_ratio"))
    return key or ""


def run_settings_key(run: dict) -> str:
    """An ablation run's settings beyond its variant, as the label that keeps runs apart:
    the allocation's (:func:`run_allocation_key`), ``"asymmetric <damping>"`` for a
    closed loop fitted to the dense model's outputs (``closed_loop_target == "dense"``)
    ``"hadamard Q"`` / ``"random Q"`` for the rotation baselines and ``"per-block Q"`` for
    rotations with one Q per decoder block.

    >>> run_settings_key({"allocation_key": "fisher", "closed_loop_target": "dense",
    ...                   "closed_loop_damping": 0.1})
    'fisher, asymmetric 0.1'
    >>> run_settings_key({"closed_loop_target": "compressed"})
    ''
    >>> run_settings_key({"rotation_scope": "block"})
    'per-block Q'
    >>> run_settings_key({"rotation_q": "hadamard"})
    'hadamard Q'
    """
    parts = [run_allocation_key(run)]
    if run.get("closed_loop_target") == "dense":
        parts.append(f"asymmetric {run.get('closed_loop_damping', 0.01):g}")
    if run.get("rotation_q", "procrustes") != "procrustes":
        parts.append(f"{run['rotation_q']} Q")
    if run.get("rotation_scope") == "block":
        parts.append("per-block Q")
    return ", ".join(p for p in parts if p)


def ablation_frame(data: dict) -> pd.DataFrame:
    """One row per run of :func:`load_ablation`'s dict.

    Columns: seed, ratio, method, variant, allocation, layer_params_kept,
    model_params_kept, macs_kept, compress_seconds, the four phase times
    (``seconds_<phase>``), peak_rss_gib, and per corpus ``ppl_<c>`` and ``over_dense_<c>``.
    ``allocation`` is the allocation's settings (its metric, and floor if any: ``"fisher"``,
    ``"output, floor 0.4"``; empty for variants without allocation) and, where set, is
    appended to ``variant`` in brackets (``"allocation [fisher]"``), so runs with other
    allocation settings stay apart. Sorted by ratio (descending), method, variant in
    :data:`ABLATION_VARIANTS` order, allocation, seed.
    """
    import pandas as pd

    dense = {c: v["perplexity"] for c, v in data["dense"].get("ppl", {}).items()}
    rows = []
    for run in data["runs"]:
        akey, skey = run_allocation_key(run), run_settings_key(run)
        row = {"seed": run["seed"], "ratio": float(run["ratio"]), "method": run["method"],
               "variant": run["variant"] + (f" [{skey}]" if skey else ""), "allocation": akey,
               "closed_loop_target": run.get("closed_loop_target", ""),
               "layer_params_kept": run.get("layer_params_kept"),
               "model_params_kept": run.get("model_params_kept"),
               "macs_kept": run.get("macs_kept"), "compress_seconds": run.get("compress_seconds"),
               "peak_rss_gib": (run["peak_rss_bytes"] / 2**30 if run.get("peak_rss_bytes")
                                else float("nan"))}
        for phase, sec in run.get("phases", {}).items():
            row[f"seconds_{phase}"] = sec
        for c, v in run.get("ppl", {}).items():
            row[f"ppl_{c}"] = v["perplexity"]
            row[f"over_dense_{c}"] = v["perplexity"] / dense[c] if c in dense else float("nan")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        order = {v: i for i, v in enumerate(ABLATION_VARIANTS)}
        df["_v"] = df["variant"].map(lambda v: order.get(v.split(" [")[0], len(order)))
        df = (df.sort_values(["ratio", "method", "_v", "allocation", "seed"],
                             ascending=[False, True, True, True, True])
                .drop(columns="_v").reset_index(drop=True))
    return df

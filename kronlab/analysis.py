"""Measurements the book makes on real layers and on recorded LLM sweeps.

Spectra (how much of a weight's energy, plain or whitened, a given number of
parameters can hold), how Kronecker-like a calibration covariance is, and a tidy
view of ``data/results/llm_sweep.json`` (written by ``scripts/run_llm_experiments.py``).

Notation (the book's): ``W`` (m x n) ~ sum_i ``A_i`` (m1 x n1) kron ``B_i`` (m2 x n2),
``C = X^T X / N`` (n x n) the input covariance, ``R`` the Van Loan-Pitsianis rearrangement.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._linalg import check_cov, psd_sqrt_pair, sq_singular_values, to_work
from ._nkp import _parse_perm, _whiten, kronecker_factor_cov
from ._rearrange import _divisors, check_a_shape, rearrange

__all__ = [
    "SWEEP_COMMAND",
    "block_index",
    "cumulative_energy",
    "diagonal_outlier_ratio",
    "divisor_near",
    "energy_curve",
    "error_ppl_correlation",
    "kronecker_likeness",
    "layer_kind",
    "load_sweep",
    "rearranged_spectrum",
    "sweep_command",
    "sweep_frame",
]

SWEEP_COMMAND = "python scripts/run_llm_experiments.py"


# ----------------------------------------------------------------------------- names

def layer_kind(name: str) -> str:
    """The layer type from a module name: ``"model.layers.3.mlp.up_proj"`` -> ``"up_proj"``."""
    return name.rsplit(".", 1)[-1]


def block_index(name: str) -> int | None:
    """The decoder block of a module name (the first ``.<digits>.`` in it), or None."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def divisor_near(k: int, target: float) -> int:
    """The divisor of ``k`` closest to ``target`` on a log scale (ties: the smaller).

    Picks factor shapes by size: ``divisor_near(576, 576 ** 0.5) == 24``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not target > 0:
        raise ValueError(f"target must be positive, got {target}")
    return min(_divisors(k), key=lambda d: (abs(math.log(d / target)), d))


# ----------------------------------------------------------------------------- spectra

def cumulative_energy(s) -> np.ndarray:
    """``E_k = sum_{i<=k} s_i^2 / sum_i s_i^2`` for singular values ``s`` (any order)."""
    s2 = np.sort(np.asarray(s, dtype=np.float64) ** 2)[::-1]
    tot = s2.sum()
    if not tot > 0:
        raise ValueError("all singular values are zero: the energy is undefined")
    return np.cumsum(s2) / tot


def rearranged_spectrum(W, a_shape=None, cov=None, *, damping: float = 1e-6) -> np.ndarray:
    r"""Singular values of the matrix whose truncated SVD is each method's optimum.

    ============  ============  ==============================================================
    a_shape       cov           singular values of
    ============  ============  ==============================================================
    None          None          ``W`` (truncated SVD, "svd")
    None          C (n, n)      ``W C^{1/2}`` (whitened low rank, "svd-aa")
    (m1, n1)      None          ``R(W)`` (Van Loan-Pitsianis, "kron")
    (m1, n1)      C (n, n)      ``R(W (C1^{1/2} kron C2^{1/2}))`` with ``C ~ C1 kron C2``
                                (:func:`kronlab.kronecker_factor_cov`): kron-aa's closed-form
                                start, exact when C is a Kronecker product
    ============  ============  ==============================================================

    ``C`` is damped by ``damping * mean(diag C)``. Returned descending, float64 numpy.
    Cost: one Gram product and eigendecomposition of the smaller side (<= (m n)^{3/2}).

    >>> W = np.kron(np.arange(6.).reshape(2, 3), np.eye(4))
    >>> s = rearranged_spectrum(W, (2, 3)); bool(s[0] > 0 and np.allclose(s[1:], 0))
    True
    """
    Wt = to_work(W, name="W")
    m, n = Wt.shape
    C = None if cov is None else check_cov(to_work(cov, Wt.device, name="cov"), n)
    if a_shape is None:
        M = Wt if C is None else Wt @ psd_sqrt_pair(C, damping)[0]
    else:
        m1, n1, _, _ = check_a_shape((m, n), a_shape)
        if C is not None:
            C1, C2 = kronecker_factor_cov(C, n1, damping=damping)
            Wt = _whiten(Wt, psd_sqrt_pair(C1, damping)[0], psd_sqrt_pair(C2, damping)[0])
        M = rearrange(Wt, (m1, n1))
    return np.sqrt(sq_singular_values(M).cpu().numpy())


def energy_curve(W, a_shape=None, cov=None, *, damping: float = 1e-6) -> pd.DataFrame:
    """Energy held by the best rank-k term of each method, against the parameters it costs.

    One row per rank ``k``: ``params`` = ``k (m1 n1 + m2 n2)`` for a Kronecker sum
    (``a_shape`` given) or ``k (m + n)`` for low rank; ``param_fraction = params / (m n)``;
    ``energy`` = :func:`cumulative_energy` of :func:`rearranged_spectrum` and
    ``error = sqrt(1 - energy)``, the relative (output, with ``cov``) error of the optimum
    (exact for plain methods and svd-aa; for kron-aa the error of the closed-form start).
    """
    Wt = to_work(W, name="W")
    m, n = Wt.shape
    s = rearranged_spectrum(Wt, a_shape, cov, damping=damping)
    e = cumulative_energy(s)
    k = np.arange(1, len(e) + 1)
    if a_shape is None:
        per = m + n
    else:
        m1, n1, m2, n2 = check_a_shape((m, n), a_shape)
        per = m1 * n1 + m2 * n2
    return pd.DataFrame({"rank": k, "params": k * per, "param_fraction": k * per / (m * n),
                         "energy": e, "error": np.sqrt(np.clip(1.0 - e, 0.0, None))})


# ----------------------------------------------------------------------------- covariances

def kronecker_likeness(C, n1: int, *, permute=None) -> float:
    r"""Relative distance of ``C`` to its nearest Kronecker product, ``C1`` (n1 x n1) kron ``C2``.

    ``min ||C - C1 kron C2||_F / ||C||_F = sqrt(1 - sigma_1^2 / sum_i sigma_i^2)`` with
    ``sigma_i`` the singular values of ``R(C)`` for ``a_shape = (n1, n1)`` (Van Loan and
    Pitsianis, 1993). 0 means C is a Kronecker product; 1 means no Kronecker product
    helps. ``permute`` reorders the channels first (``C[p][:, p]``): ``None``,
    ``"variance"`` (decreasing ``diag(C)``, as in :func:`kronlab.nearest_kronecker`) or a
    permutation array of length n. Cost: one (n1^2 x n2^2) Gram eigendecomposition.

    >>> C1, C2 = np.diag([1., 2.]), np.eye(3) + 0.5
    >>> round(kronecker_likeness(np.kron(C1, C2), 2), 12)
    0.0
    """
    Ct = to_work(C, name="cov")
    Ct = check_cov(Ct, Ct.shape[0])
    n = Ct.shape[0]
    if n1 < 1 or n % n1:
        raise ValueError(f"n1={n1} must divide n={n}; valid n1: {_divisors(n)}")
    p = _parse_perm(permute, n, Ct)
    if p is not None:
        p = p.to(Ct.device)
        Ct = Ct[p][:, p]
    s2 = sq_singular_values(rearrange(Ct, (n1, n1))).cpu().numpy()
    tot = float(s2.sum())
    if not tot > 0:
        raise ValueError("C is zero")
    return math.sqrt(max(1.0 - float(s2[0]) / tot, 0.0))


def diagonal_outlier_ratio(C) -> float:
    """``max(diag C) / median(diag C)``: how far the loudest input channel stands out."""
    d = np.asarray(torch.diagonal(to_work(C, name="cov")).cpu())
    med = float(np.median(d))
    if not med > 0:
        raise ValueError("the median channel variance is not positive")
    return float(d.max()) / med


# ----------------------------------------------------------------------------- sweeps

def load_sweep(path) -> dict:
    """Read an LLM sweep JSON; a missing file raises with the command that writes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no LLM sweep at {path}. It is written by `{SWEEP_COMMAND}` (the book's default "
            f"sweep, ~hours on 2 CPU cores) or, for a quick development file, `{SWEEP_COMMAND} "
            "--ratios 0.6 --methods kron svd --calib-tokens 1024 --eval-tokens 1024 --out "
            "/tmp/sweep_dev.json` and the chapter parameter sweep_path.")
    with open(path) as f:
        sweep = json.load(f)
    missing = [k for k in ("config", "dense", "runs") if k not in sweep]
    if missing:
        raise ValueError(f"{path} is not an LLM sweep (missing keys {missing}); expected the "
                         f"output of `{SWEEP_COMMAND}`")
    return sweep


def sweep_command(sweep: dict, out=None) -> str:
    """The one command that reproduces a sweep's configuration (``--out`` if ``out`` is given)."""
    flags = []
    for key, value in sweep["config"].items():
        if value is None or value is False:
            continue
        opt = "--" + key.replace("_", "-")
        if value is True:
            flags.append(opt)
        else:
            vals = value if isinstance(value, list) else [value]
            flags.append(opt + " " + " ".join(str(v) for v in vals))
    cmd = " ".join([SWEEP_COMMAND] + flags)
    return cmd + (f" --out {out}" if out is not None else "")


def sweep_frame(sweep: dict) -> pd.DataFrame:
    """One row per compressed run of a sweep (the dict from :func:`load_sweep`).

    Columns: method, ratio, macs_ratio (None = parameter budget only), the report summary's
    ``model_params_kept``, ``layer_params_kept``, ``macs_kept``, ``mean_weight_error``
    (e_W), ``mean_output_error`` (e_Y), ``compress_seconds``, and per evaluation corpus
    ``ppl_<corpus>`` and ``dlogppl_<corpus>`` = log(ppl / dense ppl) (the change of the
    mean negative log-likelihood per token, nats).
    """
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

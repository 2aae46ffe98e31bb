"""Measurements the book makes on real layers: spectra and Kronecker-likeness of covariances.

Spectra (how much of a weight's energy, plain or whitened, a given number of
parameters can hold) and how Kronecker-like a calibration covariance is. Recorded
results (``data/results``, e.g. the LLM sweep) are read by :mod:`kronlab.results`.

Notation (the book's): ``W`` (m x n) ~ sum_i ``A_i`` (m1 x n1) kron ``B_i`` (m2 x n2),
``C = X^T X / N`` (n x n) the input covariance, ``R`` the Van Loan-Pitsianis rearrangement.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ._linalg import check_cov, psd_sqrt_pair, sq_singular_values, to_work
from ._nkp import kronecker_factor_cov, parse_permutation, whiten_kron
from ._rearrange import check_a_shape, divisors, rearrange
from .defaults import DAMPING

__all__ = [
    "cumulative_energy",
    "diagonal_outlier_ratio",
    "divisor_near",
    "energy_curve",
    "kronecker_likeness",
    "rearranged_spectrum",
]

# ----------------------------------------------------------------------------- names

def divisor_near(k: int, target: float) -> int:
    """The divisor of ``k`` closest to ``target`` on a log scale (ties: the smaller).

    Picks factor shapes by size: ``divisor_near(576, 576 ** 0.5) == 24``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not target > 0:
        raise ValueError(f"target must be positive, got {target}")
    return min(divisors(k), key=lambda d: (abs(math.log(d / target)), d))


# ----------------------------------------------------------------------------- spectra

def cumulative_energy(s) -> np.ndarray:
    """``E_k = sum_{i<=k} s_i^2 / sum_i s_i^2`` for singular values ``s`` (any order)."""
    s2 = np.sort(np.asarray(s, dtype=np.float64) ** 2)[::-1]
    tot = s2.sum()
    if not tot > 0:
        raise ValueError("all singular values are zero: the energy is undefined")
    return np.cumsum(s2) / tot


def rearranged_spectrum(W, a_shape=None, cov=None, *, damping: float = DAMPING) -> np.ndarray:
    r"""Singular values of the matrix whose truncated SVD is each method's optimum.

    ============  ============  ==============================================================
    a_shape       cov           singular values of
    ============  ============  ==============================================================
    None          None          ``W`` (truncated SVD, "svd")
    None          C (n, n)      ``W C^{1/2}`` (whitened low rank, "svd-aa")
    (m1, n1)      None          ``R(W)`` (Van Loan-Pitsianis, "kron")
    (m1, n1)      C (n, n)      ``R(W (C1^{1/2} kron C2^{1/2}))`` with ``C ~ C1 kron C2``
                                (:func:`kronlab.kronecker_factor_cov`): the spectrum kron-aa's
                                closed-form start truncates. Its discarded energy is the
                                start's error in the ``C1 kron C2`` metric, which equals the
                                true output error only when C is a Kronecker product; on real
                                covariances it can be far smaller (measure the true error with
                                :func:`kronlab.relative_error` and ``cov=C``)
    ============  ============  ==============================================================

    ``C`` is damped by ``damping * mean(diag C)``. Returned descending, float64 numpy.
    Cost: one Gram product and eigendecomposition of the smaller side (<= (m n)^{3/2}).

    >>> W = np.kron(np.arange(6.).reshape(2, 3), np.eye(4))
    >>> s = rearranged_spectrum(W, (2, 3)); bool(s[0] > 0 and s[1] < 1e-6 * s[0])
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
            Wt = whiten_kron(Wt, psd_sqrt_pair(C1, damping)[0], psd_sqrt_pair(C2, damping)[0])
        M = rearrange(Wt, (m1, n1))
    return np.sqrt(sq_singular_values(M).cpu().numpy())


def energy_curve(W, a_shape=None, cov=None, *, damping: float = DAMPING) -> pd.DataFrame:
    """Energy held by the best rank-k term of each method, against the parameters it costs.

    One row per rank ``k``: ``params`` = ``k (m1 n1 + m2 n2)`` for a Kronecker sum
    (``a_shape`` given) or ``k (m + n)`` for low rank; ``param_fraction = params / (m n)``;
    ``energy`` = :func:`cumulative_energy` of :func:`rearranged_spectrum` and
    ``error = sqrt(1 - energy)``: the relative (output, with ``cov``) error of the optimum for
    the plain methods and svd-aa. For a Kronecker shape with ``cov`` it is an error in the
    ``C1 kron C2`` metric (see :func:`rearranged_spectrum`), NOT the output error of any fit:
    use it to compare spectra, never as kron-aa's error.
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
        raise ValueError(f"n1={n1} must divide n={n}; valid n1: {divisors(n)}")
    p = parse_permutation(permute, n, Ct)
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

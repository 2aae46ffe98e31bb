"""Fit one weight with every method at the same parameter budget and compare the errors."""

from __future__ import annotations

import numbers

from ._lowrank import low_rank, low_rank_rank_for_budget
from ._nkp import nearest_kronecker, relative_error
from ._rearrange import check_a_shape
from .defaults import ALS_SWEEPS

#: every method :func:`fit_methods` knows; ``kron-aa-perm`` is ``kron-aa`` after sorting
#: the input channels by variance (``permute="variance"``).
COMPARE_METHODS = ("kron", "kron-aa", "kron-aa-perm", "svd", "svd-aa")


def fit_methods(W, a_shape, rank: int, *, cov, methods=("kron", "kron-aa", "svd", "svd-aa"),
                als_sweeps: int = ALS_SWEEPS) -> dict:
    """Fits of ``W`` (m x n) by each method at the parameters of a rank-``rank`` Kronecker sum.

    The Kronecker methods fit ``sum_{i<rank} A_i kron B_i`` with ``A_i`` of shape
    ``a_shape = (m1, n1)``, which has ``P = rank (m1 n1 + m2 n2)`` parameters; the
    low-rank methods use the largest rank ``k`` with ``k (m + n) <= P``
    (:func:`low_rank_rank_for_budget`). Objectives: ``kron`` and ``svd`` minimise
    ``||W - W_hat||_F``; ``kron-aa``, ``kron-aa-perm`` and ``svd-aa`` minimise
    ``tr((W - W_hat) C (W - W_hat)^T)`` for the input covariance ``cov`` (n x n).
    ``als_sweeps`` is the number of ALS sweeps of the activation-aware Kronecker fits.

    Returns ``{method: KronFactors | LowRankFactors}`` in the order of ``methods``.
    """
    unknown = [mth for mth in methods if mth not in COMPARE_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {', '.join(COMPARE_METHODS)}")
    m, n = W.shape
    m1, n1, m2, n2 = check_a_shape((m, n), a_shape)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    rank = int(rank)
    k = low_rank_rank_for_budget(m, n, rank * (m1 * n1 + m2 * n2))
    fit = {
        "kron": lambda: nearest_kronecker(W, a_shape, rank),
        "kron-aa": lambda: nearest_kronecker(W, a_shape, rank, cov=cov, als_sweeps=als_sweeps),
        "kron-aa-perm": lambda: nearest_kronecker(W, a_shape, rank, cov=cov, als_sweeps=als_sweeps,
                                                  permute="variance"),
        "svd": lambda: low_rank(W, k),
        "svd-aa": lambda: low_rank(W, k, cov=cov),
    }
    return {mth: fit[mth]() for mth in methods}


def method_errors(W, fits: dict, cov):
    """One row per fit: ``method``, ``params`` (fraction of ``m n``), ``e_W``, ``e_Y``.

    ``e_W = ||W - W_hat||_F / ||W||_F`` and
    ``e_Y = sqrt(tr(E C E^T) / tr(W C W^T))`` with ``E = W - W_hat`` (the relative output
    error on activations of covariance ``cov``), both by :func:`relative_error`.
    """
    import pandas as pd

    m, n = W.shape
    return pd.DataFrame([
        {"method": mth, "params": f.num_params / (m * n),
         "e_W": float(relative_error(W, f)), "e_Y": float(relative_error(W, f, cov=cov))}
        for mth, f in fits.items()])

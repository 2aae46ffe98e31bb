"""Low-rank baselines with the same conventions as the Kronecker solvers."""

from __future__ import annotations

import torch

from ._factors import LowRankFactors
from ._linalg import check_cov, check_finite, damped_cholesky, from_work, to_work, truncated_svd

__all__ = ["low_rank", "low_rank_rank_for_budget"]


def low_rank_rank_for_budget(m: int, n: int, param_budget: int) -> int:
    """Largest rank ``r`` with ``r * (m + n) <= param_budget``, capped at ``min(m, n)``.

    >>> low_rank_rank_for_budget(1536, 576, 0.6 * 1536 * 576)
    251
    """
    m, n = int(m), int(n)
    if m < 1 or n < 1:
        raise ValueError(f"m and n must be positive, got {(m, n)}")
    r = int(param_budget // (m + n))
    if r < 1:
        raise ValueError(f"param_budget={param_budget} is below the {m + n} parameters of a rank-1 "
                         f"factorisation of a {m}x{n} matrix")
    return min(r, min(m, n))


def low_rank(W, rank: int, *, cov=None, method: str = "auto", damping: float = 1e-6,
             n_oversamples: int = 10, n_power_iter: int = 4, seed: int = 0,
             device=None) -> LowRankFactors:
    r"""Best rank-``rank`` approximation ``W_hat = U V``, plain or activation-aware.

    ``cov=None``: ``min ||W - U V||_F`` by truncated SVD (Eckart-Young); the squared error is
    the sum of the discarded squared singular values of W.

    ``cov = C`` (n x n): ``min ||(W - U V) C^{1/2}||_F`` by whitening with the Cholesky factor
    ``C = L L^T`` (SVD-LLM, Wang et al. 2025): ``W L = P S Q^T``, keep ``rank`` terms and
    un-whiten ``V <- S_r^{1/2} Q_r^T L^{-1}`` (a triangular solve). Since
    ``||E C^{1/2}||_F = ||E L||_F`` the output error equals the discarded singular values of
    ``W L``. C is damped to ``C + lam * mean(diag C) * I`` (``info["damping"]``).

    Shapes: W (m, n) -> U (m, rank), V (rank, n), each carrying ``sqrt(sigma)``.
    Cost: one SVD of an m x n matrix (randomized for large W and small rank), plus
    O(n^3) for the Cholesky factor and O(m n^2) for ``W L``.
    """
    Wt = to_work(W, device, name="W")
    if Wt.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {tuple(Wt.shape)}")
    check_finite(Wt, "W")
    m, n = Wt.shape
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= min(m, n):
        raise ValueError(f"rank must be an integer in [1, {min(m, n)}] = [1, min(m, n)], got {rank!r}")
    r = int(rank)
    kw = {"n_oversamples": n_oversamples, "n_power_iter": n_power_iter, "seed": seed}
    info: dict = {}
    if cov is None:
        P, S, Qh, allS, used = truncated_svd(Wt, r, method, **kw)
        sq = S.clamp(min=0).sqrt()
        U, V = P * sq, sq[:, None] * Qh
        info["method"] = used
    else:
        C = check_cov(to_work(cov, Wt.device, name="cov"), n)
        L, lam = damped_cholesky(C, damping)
        P, S, Qh, allS, used = truncated_svd(Wt @ L, r, method, **kw)
        sq = S.clamp(min=0).sqrt()
        U = P * sq
        # V = sqrt(S) Qh L^{-1}  <=>  V L = sqrt(S) Qh  <=>  L^T V^T = (sqrt(S) Qh)^T
        V = torch.linalg.solve_triangular(L.T, (sq[:, None] * Qh).T, upper=True).T
        info.update(method=f"whitened-{used}", damping=lam)
    return LowRankFactors(U=from_work(U, W), V=from_work(V, W), singular_values=from_work(allS, W),
                          info=info)

"""Low-rank baselines with the same conventions as the Kronecker solvers."""

from __future__ import annotations

import torch

from ._factors import LowRankFactors
from ._linalg import (
    GCOV_MAX_DAMPING,
    check_cov,
    check_finite,
    damped_cholesky,
    from_work,
    gcov_valid,
    parse_gcov,
    to_work,
    truncated_svd,
)

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


def low_rank(W, rank: int, *, cov=None, gcov=None, method: str = "auto", damping: float = 1e-6,
             gdamping: float = 1e-6, n_oversamples: int = 10, n_power_iter: int = 4, seed: int = 0,
             device=None) -> LowRankFactors:
    r"""Best rank-``rank`` approximation ``W_hat = U V``, plain, activation-aware or loss-aware.

    ``cov=None``: ``min ||W - U V||_F`` by truncated SVD (Eckart-Young); the squared error is
    the sum of the discarded squared singular values of W.

    ``cov = C`` (n x n): ``min ||(W - U V) C^{1/2}||_F`` by whitening with the Cholesky factor
    ``C = L L^T`` (SVD-LLM, Wang et al. 2025): ``W L = P S Q^T``, keep ``rank`` terms and
    un-whiten ``V <- S_r^{1/2} Q_r^T L^{-1}`` (a triangular solve). Since
    ``||E C^{1/2}||_F = ||E L||_F`` the output error equals the discarded singular values of
    ``W L``. C is damped to ``C + lam * mean(diag C) * I`` (``info["damping"]``).

    ``gcov = G`` (m x m, the covariance of the loss gradients w.r.t. the outputs; or a
    Kronecker pair ``(G1, G2)``, formed densely): the loss-aware (K-FAC Fisher) objective
    ``min tr(G E C E^T) = ||Lg^T E Lc||_F^2`` with ``G = Lg Lg^T``, ``C = Lc Lc^T`` (C = I
    when cov is None), in closed form: ``Lg^T W Lc = P S Q^T``, ``U = Lg^{-T} P_r S_r^{1/2}``,
    ``V = S_r^{1/2} Q_r^T Lc^{-1}`` (two triangular solves). Every rank-r ``U V`` is
    ``Lg^{-T} (rank-r) Lc^{-1}``, so by Eckart-Young the error ``tr(G E C E^T)`` is exactly
    the sum of the discarded ``sigma_i^2`` of ``Lg^T W Lc``. G is damped like C with
    ``gdamping`` (``info["gdamping"]``; a G that needs more than
    :data:`kronlab._linalg.GCOV_MAX_DAMPING` is refused); both dampings are reported.

    Shapes: W (m, n) -> U (m, rank), V (rank, n), each carrying ``sqrt(sigma)``.
    Cost: one SVD of an m x n matrix (randomized for large W and small rank), plus
    O(n^3) for the Cholesky factor and O(m n^2) for ``W L`` (with gcov also O(m^3) and
    O(m^2 n)).
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
    if gcov is not None:
        _, G = parse_gcov(gcov, None, None, Wt.device, m=m)
        G = torch.kron(*G) if isinstance(G, tuple) else G
        Lg, glam = damped_cholesky(G, gdamping, max_damping=max(GCOV_MAX_DAMPING, gdamping),
                                   name="gcov", valid=gcov_valid(m))
        M = Lg.T @ Wt
        lam = None
        if cov is not None:
            C = check_cov(to_work(cov, Wt.device, name="cov"), n)
            L, lam = damped_cholesky(C, damping)
            M = M @ L
        P, S, Qh, allS, used = truncated_svd(M, r, method, **kw)
        sq = S.clamp(min=0).sqrt()
        # U = Lg^{-T} P sqrt(S)  <=>  Lg^T U = P sqrt(S)
        U = torch.linalg.solve_triangular(Lg.T, P * sq, upper=True)
        V = sq[:, None] * Qh
        if cov is not None:
            V = torch.linalg.solve_triangular(L.T, V.T, upper=True).T
        info.update(method=f"two-sided-whitened-{used}", objective="fisher", damping=lam,
                    gdamping=glam)
    elif cov is None:
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

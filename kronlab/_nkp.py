"""Nearest sums of Kronecker products: plain, activation-aware and loss-aware.

Notation (the book's): ``W`` is m x n with m = m1*m2, n = n1*n2 and
``W_hat = sum_i A_i kron B_i`` with ``A_i`` m1 x n1, ``B_i`` m2 x n2. ``C`` is the
layer's input covariance (n x n); the activation-aware objective is the output error

    f(A, B) = ||(W - W_hat) C^{1/2}||_F^2 = tr((W - W_hat) C (W - W_hat)^T).

The loss-aware (K-FAC Fisher) objective adds ``G`` (m x m), the covariance of the loss
gradients w.r.t. the layer's outputs:

    f(A, B) = tr(G (W - W_hat) C (W - W_hat)^T) = ||G^{1/2} (W - W_hat) C^{1/2}||_F^2.

``R(W)`` is the Van Loan-Pitsianis rearrangement (:func:`kronlab.rearrange`), with
``R(W_hat) = Ahat^T Bhat`` where ``Ahat`` (r, m1 n1) and ``Bhat`` (r, m2 n2) hold the
row-major ravels of the factors.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._factors import KronFactors, LowRankFactors
from ._linalg import (
    GCOV_MAX_DAMPING,
    check_cov,
    check_finite,
    damped_cholesky,
    from_work,
    gcov_valid,
    is_pair,
    parse_gcov,
    psd_sqrt_pair,
    to_work,
    truncated_svd,
)
from ._rearrange import check_a_shape, inverse_rearrange, rearrange
from .defaults import (
    ALS_SWEEPS,
    ALS_TOL,
    CG_MAX_ITER,
    CG_TOL,
    DAMPING,
    DIRECT_SOLVER_MAX,
    INIT,
    N_OVERSAMPLES,
    N_POWER_ITER,
    SEED,
)

__all__ = [
    "ALS_STARTS",
    "FisherObjective",
    "HalfStep",
    "TwoSidedHalfStep",
    "GCOV_MAX_DAMPING",
    "als_refine",
    "damped_cov",
    "kronecker_factor_cov",
    "nearest_kronecker",
    "nearest_kronecker_kron_cov",
    "nearest_kronecker_plain",
    "parse_permutation",
    "relative_error",
    "whiten_kron",
    "whiten_kron_left",
]


# ----------------------------------------------------------------------------- checks

def _check_weight(W, device=None) -> torch.Tensor:
    Wt = to_work(W, device, name="W")
    if Wt.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {tuple(Wt.shape)}")
    check_finite(Wt, "W")
    return Wt


def _check_rank(rank, m1, n1, m2, n2) -> int:
    rmax = min(m1 * n1, m2 * n2)
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= rmax:
        raise ValueError(f"rank must be an integer in [1, {rmax}] = [1, min(m1*n1, m2*n2)] "
                         f"for a_shape={(m1, n1)}, b_shape={(m2, n2)}; got {rank!r}")
    return int(rank)


def _parse_cov(cov, n1, n2, device):
    """``None``, a pair ``(C1, C2)`` (Kronecker-factored) or a dense ``C`` (n x n)."""
    n = n1 * n2
    if cov is None:
        return None, None
    if isinstance(cov, (tuple, list)) and len(cov) == 2 and len(getattr(cov[0], "shape", np.shape(cov[0]))) == 2:
        C1 = to_work(cov[0], device, name="cov[0]")
        C2 = to_work(cov[1], device, name="cov[1]")
        if tuple(C1.shape) != (n1, n1) or tuple(C2.shape) != (n2, n2):
            raise ValueError(f"cov=(C1, C2) has shapes {tuple(C1.shape)}, {tuple(C2.shape)}; expected "
                             f"({n1}, {n1}) and ({n2}, {n2}) for a_shape n1={n1}, n2={n2}, "
                             f"or a dense ({n}, {n}) covariance")
        return "kron", (check_cov(C1, n1, "cov[0]"), check_cov(C2, n2, "cov[1]"))
    C = to_work(cov, device, name="cov")
    if C.ndim != 2 or tuple(C.shape) != (n, n):
        raise ValueError(f"cov has shape {tuple(C.shape)}; expected the dense ({n}, {n}) input covariance "
                         f"or a pair of ({n1}, {n1}) and ({n2}, {n2}) Kronecker factors")
    return "dense", check_cov(C, n)


def _damped_pair(pair, damping, name, valid):
    """Damped Kronecker factors and their symmetric roots: ``((P1, P2), (S1, S2), (S1i, S2i), lam)``
    with ``Pk = Sk^2`` the factor with eigenvalues raised by ``damping * mean(diag)``."""
    S1, S1i, lam = psd_sqrt_pair(pair[0], damping, name=f"{name}[0]", valid=valid)
    S2, S2i, _ = psd_sqrt_pair(pair[1], damping, name=f"{name}[1]", valid=valid)
    P1, P2 = S1 @ S1, S2 @ S2
    return (0.5 * (P1 + P1.T), 0.5 * (P2 + P2.T)), (S1, S2), (S1i, S2i), lam


def parse_permutation(permute, n: int, C=None):
    """The input-channel permutation ``permute`` as a LongTensor of length n, or None.

    ``None``; ``"variance"`` (channels by decreasing ``diag(C)``, stable; needs C); or an
    integer array holding a permutation of ``range(n)``.
    """
    if permute is None:
        return None
    if isinstance(permute, str):
        if permute != "variance":
            raise ValueError(f"permute must be None, 'variance' or a permutation array of length {n}; "
                             f"got {permute!r}")
        if C is None:
            raise ValueError("permute='variance' needs a dense cov (it sorts channels by diag(C))")
        # stable sort by decreasing variance: high-variance channels first
        return torch.argsort(-torch.diagonal(C), stable=True)
    p = torch.as_tensor(np.asarray(permute.cpu() if isinstance(permute, torch.Tensor) else permute))
    if p.ndim != 1 or p.numel() != n or p.dtype.is_floating_point or \
            not torch.equal(torch.sort(p).values, torch.arange(n, dtype=p.dtype)):
        raise ValueError(f"permute array must be a permutation of range({n})")
    return p.to(torch.long)


# ----------------------------------------------------------------------------- helpers

def _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2):
    """Balanced factors ``A_i = sqrt(s_i) U[:, i]``, ``B_i = sqrt(s_i) Vh[i]`` as (r, ., .)."""
    rs = S[:r].clamp(min=0).sqrt()
    A = (U[:, :r] * rs).T.reshape(r, m1, n1)
    B = (rs[:, None] * Vh[:r]).reshape(r, m2, n2)
    return A.contiguous(), B.contiguous()


def _dense(A, B):
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return inverse_rearrange(A.reshape(r, -1).T @ B.reshape(r, -1), (m1, n1), (m2, n2))


def whiten_kron(W, S1, S2):
    """``W (S1 kron S2)`` without the Kronecker product: two small products, O(m n (n1 + n2)).

    Shapes: W (m, n1 n2) torch, S1 (n1, n1), S2 (n2, n2) -> (m, n1 n2).
    """
    m = W.shape[0]
    n1, n2 = S1.shape[0], S2.shape[0]
    Y = (W.reshape(m * n1, n2) @ S2).reshape(m, n1, n2)
    Y = torch.einsum("ajk,jJ->aJk", Y, S1)
    return Y.reshape(m, n1 * n2)


def _orthogonalize(A, B):
    """Re-express ``sum_i A_i kron B_i`` with orthogonal, balanced, importance-ordered terms.

    QR of ``Ahat^T`` and ``Bhat^T`` and an r x r SVD: ``W_hat`` is unchanged (up to rounding),
    the new terms are the SVD of ``R(W_hat)``. Returns ``(A, B, sigma)``.
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    Q1, R1 = torch.linalg.qr(A.reshape(r, -1).T)
    Q2, R2 = torch.linalg.qr(B.reshape(r, -1).T)
    U, S, Vh = torch.linalg.svd(R1 @ R2.T)
    A2, B2 = _factors_from_svd(Q1 @ U, S, Vh @ Q2.T, r, m1, n1, m2, n2)
    return A2, B2, S


def kronecker_factor_cov(C, n1: int, *, damping: float = DAMPING):
    """Nearest Kronecker factorisation ``C ~ C1 kron C2`` of a covariance, made symmetric PSD.

    Minimises ``||C - C1 kron C2||_F`` (rank-1 SVD of ``R(C)`` with ``a_shape=(n1, n1)``),
    splits the scale evenly, symmetrises, fixes the sign so both traces are positive and
    raises eigenvalues to ``damping * mean(diag)``. Shapes: C (n, n) -> C1 (n1, n1),
    C2 (n2, n2). Cost: one rank-1 (randomized when large) SVD of an (n1^2, n2^2) matrix,
    O(n^2) per power step.
    Works on float64 torch tensors (internal helper; accepts numpy too).
    """
    Ct = to_work(C, name="cov") if not isinstance(C, torch.Tensor) else C.to(torch.float64)
    n = Ct.shape[0]
    if n % n1:
        raise ValueError(f"n1={n1} does not divide n={n}")
    n2 = n // n1
    Rc = rearrange(Ct, (n1, n1))
    # randomized (k + 10 columns, 4 power steps) for large R(C): on realistic covariances it
    # matched the exact s_1 to 6 digits even with s_2 / s_1 = 0.96, at 1/10-1/50 of the time
    U, S, Vh, _, _ = truncated_svd(Rc, 1, method="auto")
    s = float(S[0])
    C1 = (U[:, 0] * s ** 0.5).reshape(n1, n1)
    C2 = (Vh[0] * s ** 0.5).reshape(n2, n2)
    if float(torch.trace(C1)) < 0:
        C1, C2 = -C1, -C2
    out = []
    for Ck in (C1, C2):
        Ck = 0.5 * (Ck + Ck.T)
        ev, V = torch.linalg.eigh(Ck)
        floor = damping * float(torch.diagonal(Ck).mean().clamp(min=1e-300))
        out.append((V * ev.clamp(min=floor)) @ V.T)
    return out[0], out[1]


# ----------------------------------------------------------------------------- ALS

class HalfStep:
    """The quadratic in the left factor ``X`` (r, p1, q1) with the right factor ``F`` fixed.

    ``W_hat = sum_i X_i kron F_i``; ``C`` is in this orientation's column order, ``RWC`` is
    ``R(W C)`` with a_shape (p1, q1). The B-step uses the same code on the commuted problem
    (rows and columns re-indexed so that ``A kron B`` becomes ``B kron A``).
    """

    def __init__(self, C, RWC, p1, q1, p2, q2):
        self.C, self.RWC = C, RWC
        self.p1, self.q1, self.p2, self.q2 = p1, q1, p2, q2

    def rhs(self, F):
        """``h[a, i, j] = sum_{b,k} F_i[b, k] (W C)[(a,b),(j,k)]``; cost r m n."""
        r = F.shape[0]
        H = self.RWC @ F.reshape(r, -1).T  # (p1 q1, r)
        return H.reshape(self.p1, self.q1, r).permute(0, 2, 1)  # (p1, r, q1)

    def gram_apply(self, X, F):
        """``G x`` for all p1 rows at once without forming G: R^{-1}(Xhat^T Fhat) C, then R(.) Fhat^T.

        Cost ``2 r m n + m n^2`` (versus ``(r q1)^2 p1`` with G formed).
        """
        r = F.shape[0]
        Fh = F.reshape(r, -1)
        Xh = X.permute(1, 0, 2).reshape(r, -1)
        What = inverse_rearrange(Xh.T @ Fh, (self.p1, self.q1), (self.p2, self.q2))
        Z = rearrange(What @ self.C, (self.p1, self.q1)) @ Fh.T
        return Z.reshape(self.p1, self.q1, r).permute(0, 2, 1)

    def gram(self, F):
        """The Gram matrix ``G[(i,j),(i',j')] = sum_{k,k'} (F_i^T F_i')[k,k'] C[(j,k),(j',k')]``.

        Two GEMMs: ``M = [F_i^T F_i']`` (r^2, q2^2) at cost r^2 p2 q2^2, then ``M C'^T`` with
        ``C'[(j,j'),(k,k')] = C[(j,k),(j',k')]`` at cost r^2 q1^2 q2^2 = r^2 n^2.
        """
        r = F.shape[0]
        q1, q2, p2 = self.q1, self.q2, self.p2
        Ft = F.permute(0, 2, 1).reshape(r * q2, p2)
        M = (Ft @ Ft.T).reshape(r, q2, r, q2).permute(0, 2, 1, 3).reshape(r * r, q2 * q2)
        Cp = self.C.reshape(q1, q2, q1, q2).permute(0, 2, 1, 3).reshape(q1 * q1, q2 * q2)
        G = (M @ Cp.T).reshape(r, r, q1, q1).permute(0, 2, 1, 3).reshape(r * q1, r * q1)
        return 0.5 * (G + G.T)

    def solve_direct(self, F, X0):
        """Exact block minimiser: Cholesky of G (size r q1), all p1 rows as right-hand sides."""
        r = F.shape[0]
        G = self.gram(F)
        H = self.rhs(F).reshape(self.p1, r * self.q1).T
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            Xv = torch.cholesky_solve(H, L)
        else:  # rank-deficient F (e.g. a zero term): minimum-norm minimiser
            Xv = torch.linalg.lstsq(G, H, rcond=None, driver="gelsd").solution if G.device.type == "cpu" \
                else torch.linalg.pinv(G, hermitian=True) @ H
        return Xv.T.reshape(self.p1, r, self.q1), 0

    def _preconditioner(self, F):
        """Block-Jacobi: the exact diagonal blocks ``G_ii`` (q1 x q1, one per term).

        ``G_ii[j, j'] = sum_{k,k'} (F_i^T F_i)[k,k'] C[(j,k),(j',k')]``. Cost
        ``r n^2 + r q1^3 / 3`` to build and factor, ``2 r q1^2 p1`` per application.
        It keeps all of C's structure (heavy-tailed channel scales included) and drops only
        the coupling between terms, which the SVD-based starts make weak. (A Kronecker
        preconditioner ``K kron C1`` from ``C ~ C1 kron C2`` was tried and is much weaker on
        real, non-Kronecker covariances.)
        """
        r = F.shape[0]
        q1, q2 = self.q1, self.q2
        M = torch.einsum("ibk,ibl->ikl", F, F).reshape(r, q2 * q2)
        Cp = self.C.reshape(q1, q2, q1, q2).permute(0, 2, 1, 3).reshape(q1 * q1, q2 * q2)
        # G_ii is symmetric by construction and Cholesky/eigh read one triangle only, so it is
        # neither symmetrised nor copied (at rank 251 with q1 = 384 it is 300 MB)
        G = (M @ Cp.T).reshape(r, q1, q1)
        # Batched Cholesky of G_ii + delta_i I (delta_i = 1e-10 mean diag; ~25x cheaper than
        # the eigendecompositions it replaced, which took 3/4 of the ALS time at rank 335 with
        # q1 = 384). A block that is still not positive definite (a zero term) falls back to
        # a clamped eigendecomposition. Any SPD preconditioner keeps CG exact and monotone.
        diag = torch.diagonal(G, dim1=1, dim2=2)
        scale = diag.mean(dim=1)
        # a zero term (F_i = 0) has G_ii = 0: regularise it relative to the other blocks
        scale = scale.clamp(min=max(1e-12 * float(scale.max()), 1e-300))
        diag.add_((1e-10 * scale)[:, None])
        L, info = torch.linalg.cholesky_ex(G)
        bad = torch.nonzero(info).flatten()
        if bad.numel():
            ev, V = torch.linalg.eigh(G[bad])
            ev = ev.clamp(min=1e-10 * float(scale.max()))
            L[bad] = torch.linalg.cholesky((V * ev[:, None, :]) @ V.transpose(1, 2))

        def apply(R):  # R (p1, r, q1) -> G_ii^{-1} R[a, i] for every row a and term i
            # two triangular solves: measured 3x faster than cholesky_solve for few rows p1
            Y = torch.linalg.solve_triangular(L, R.permute(1, 2, 0), upper=False)
            Z = torch.linalg.solve_triangular(L.mH, Y, upper=True)  # (r, q1, p1)
            return Z.permute(2, 0, 1)

        return apply

    def solve_cg(self, F, X0, max_iter, rtol):
        """Preconditioned conjugate gradients on ``G x_a = h_a`` for every row a, from ``X0``.

        CG started at the current iterate decreases each row's quadratic monotonically, so an
        inexact half-step still never increases f.
        """
        H = self.rhs(F)
        X = X0.clone()
        Rres = H - self.gram_apply(X, F)
        Pinv = self._preconditioner(F)
        hn = H.flatten(1).norm(dim=1).clamp(min=1e-300)
        Z = Pinv(Rres)
        P = Z
        rz = (Rres * Z).sum(dim=(1, 2))
        it = 0
        for it in range(1, max_iter + 1):
            GP = self.gram_apply(P, F)
            pgp = (P * GP).sum(dim=(1, 2))
            alpha = torch.where(pgp > 0, rz / pgp.clamp(min=1e-300), torch.zeros_like(pgp))
            X = X + alpha[:, None, None] * P
            Rres = Rres - alpha[:, None, None] * GP
            if float((Rres.flatten(1).norm(dim=1) / hn).max()) < rtol:
                break
            Z = Pinv(Rres)
            rz_new = (Rres * Z).sum(dim=(1, 2))
            beta = torch.where(rz > 0, rz_new / rz.clamp(min=1e-300), torch.zeros_like(rz))
            P = Z + beta[:, None, None] * P
            rz = rz_new
        return X, it


def _commute(Mat, p1, p2, q1, q2):
    """Re-index ``M[(a,b),(j,k)] -> M[(b,a),(k,j)]`` (so that A kron B becomes B kron A)."""
    return Mat.reshape(p1, p2, q1, q2).permute(1, 0, 3, 2).reshape(p1 * p2, q1 * q2)


class _Objective:
    """``f(A, B) = tr((W - W_hat) C (W - W_hat)^T)`` with ``W C`` computed once.

    Dense: ``E = W - W_hat``, then ``<E C, E>`` (cost r m n + m n^2; accurate down to tiny f).
    Expanded, when ``4 r^2 <= m`` and the layer is large: ``tr(W C W^T) - 2 <R(W_hat), R(W C)>
    + sum_{i,i'} <(A_i^T A_i') kron (B_i^T B_i'), C>`` (cost r m n + r^2 n^2), which loses
    accuracy only when f is below ~1e-12 of ``tr(W C W^T)``.
    """

    def __init__(self, W, C, WC=None):
        self.W, self.C = W, C
        self.WC = W @ C if WC is None else WC
        self.total = float((self.WC * W).sum())

    def __call__(self, A, B):
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        m, n = self.W.shape
        if 4 * r * r > m or m * n < 2**20:
            E = self.W - _dense(A, B)
            return float(((E @ self.C) * E).sum())
        Ah, Bh = A.reshape(r, -1), B.reshape(r, -1)
        cross = float(((Ah @ rearrange(self.WC, (m1, n1))) * Bh).sum())
        At = A.permute(0, 2, 1).reshape(r * n1, m1)
        MA = (At @ At.T).reshape(r, n1, r, n1).permute(0, 2, 1, 3).reshape(r * r, n1 * n1)
        Bt = B.permute(0, 2, 1).reshape(r * n2, m2)
        MB = (Bt @ Bt.T).reshape(r, n2, r, n2).permute(0, 2, 1, 3).reshape(r * r, n2 * n2)
        Cp = self.C.reshape(n1, n2, n1, n2).permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2)
        quad = float(((MA @ Cp) * MB).sum())
        return max(self.total - 2 * cross + quad, 0.0)


def _als(W, C, A, B, *, max_iter, tol, solver, cg_max_iter, cg_tol, obj=None, verbose=False):
    """Alternating exact (or monotone PCG) block minimisation of f(A, B); see nearest_kronecker."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    obj = _Objective(W, C) if obj is None else obj
    WC = obj.WC
    RWC = rearrange(WC, (m1, n1))
    Cs = _commute(C, n1, n2, n1, n2)
    pa = HalfStep(C, RWC, m1, n1, m2, n2)
    pb = HalfStep(Cs, RWC.T.contiguous(), m2, n2, m1, n1)
    if solver == "auto":
        solver = "direct" if r * max(n1, n2) <= DIRECT_SOLVER_MAX else "cg"
    if solver not in ("direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")

    f = obj(A, B)
    history = [f]
    cg_counts = []
    # factors oriented for the problems: X is (r, p1, q1) with rows first -> (p1, r, q1) layout
    for sweep in range(max_iter):
        f_old = f
        for prob, which in ((pa, "A"), (pb, "B")):
            X0, F = (A, B) if which == "A" else (B, A)
            if solver == "direct":
                Xn, its = prob.solve_direct(F, X0.permute(1, 0, 2))
            else:
                Xn, its = prob.solve_cg(F, X0.permute(1, 0, 2), cg_max_iter, cg_tol)
            cg_counts.append(its)
            Xn = Xn.permute(1, 0, 2).contiguous()
            if which == "A":
                A = Xn
            else:
                B = Xn
        f_new = obj(A, B)
        history.append(f_new)
        f = f_new
        if verbose:
            print(f"ALS sweep {sweep + 1}: f = {f:.6e}")
        if f_old <= 0 or (f_old - f_new) <= tol * f_old:
            break
    return A, B, history, {"solver": solver, "cg_iterations": cg_counts}


# ----------------------------------------------------------------------------- two-sided ALS

#: elements of the intermediate tensor per chunk when the two-sided Gram is formed
_GRAM_CHUNK = 2**23


def whiten_kron_left(S1, S2, W):
    """``(S1 kron S2) W`` without the Kronecker product: two small products, O(m n (m1 + m2)).

    The row-side analogue of :func:`whiten_kron`. Shapes: S1 (m1, m1), S2 (m2, m2),
    W (m1 m2, n) torch -> (m1 m2, n).
    """
    m1, m2 = S1.shape[0], S2.shape[0]
    n = W.shape[1]
    Y = S2 @ W.reshape(m1, m2, n)  # the row index b of every block row a
    return (S1 @ Y.reshape(m1, m2 * n)).reshape(m1 * m2, n)


def _left(G, E):
    """``G E`` for G None (identity), a Kronecker pair ``(G1, G2)`` or dense (m, m)."""
    if G is None:
        return E
    if isinstance(G, tuple):
        return whiten_kron_left(G[0], G[1], E)
    return G @ E


def _right(E, C):
    """``E C`` for C None (identity), a Kronecker pair ``(C1, C2)`` or dense (n, n)."""
    if C is None:
        return E
    if isinstance(C, tuple):
        return whiten_kron(E, C[0], C[1])
    return E @ C


class FisherObjective:
    """``f(A, B) = tr(G E C E^T) = <G E C, E>``, ``E = W - W_hat``, computed densely.

    G and C are each None (identity), a Kronecker pair or dense. ``G W C`` is computed
    once; each evaluation costs ``r m n + m^2 n + m n^2`` (dense G and C) and is accurate
    down to f ~ 1e-16 tr(G W C W^T) (no expansion, no cancellation).
    """

    def __init__(self, W, G, C):
        self.W, self.G, self.C = W, G, C
        self.GWC = _right(_left(G, W), C)
        self.total = float((self.GWC * W).sum())

    def __call__(self, A, B):
        E = self.W - _dense(A, B)
        return float((_right(_left(self.G, E), self.C) * E).sum())


def _chol_damped(M):
    """Batched lower Cholesky factors of the SPD-ish blocks M (..., k, k).

    A block that is not numerically positive definite (a zero term, a rank-deficient
    weight) is raised by 1e-10 of its mean diagonal (a zero block by 1e-12 of the largest
    mean diagonal), and one that still fails is rebuilt from its eigendecomposition with
    clamped eigenvalues: any SPD preconditioner keeps CG exact and monotone.
    """
    L, info = torch.linalg.cholesky_ex(M)
    bad = torch.nonzero(info.reshape(-1)).flatten()
    if not bad.numel():
        return L
    k = M.shape[-1]
    Mf = M.reshape(-1, k, k)
    Lf = L.reshape(-1, k, k)
    scale = torch.diagonal(Mf, dim1=-2, dim2=-1).mean(dim=-1)
    top = max(float(scale.max()), 1e-300)
    Mb = Mf[bad] + (1e-10 * scale[bad].clamp(min=1e-12 * top))[:, None, None] * \
        torch.eye(k, dtype=M.dtype, device=M.device)
    Lb, info_b = torch.linalg.cholesky_ex(Mb)
    still = torch.nonzero(info_b).flatten()
    if still.numel():
        ev, V = torch.linalg.eigh(Mb[still])
        ev = ev.clamp(min=1e-10 * top)
        Lb[still] = torch.linalg.cholesky((V * ev[:, None, :]) @ V.transpose(-1, -2))
    Lf[bad] = Lb
    return Lf.reshape(M.shape)


class TwoSidedHalfStep:
    """The quadratic in the left factor ``X`` (r, p1, q1) under ``f = tr(G E C E^T)``, F fixed.

    ``W_hat(X) = sum_i X_i kron F_i``. Setting the gradient to zero gives the normal
    equations ``Gram(X) = H`` with the Gram operator ``Gram(X) = R(G W_hat(X) C) Fhat^T`` and
    ``H = R(G W C) Fhat^T`` (``RGWC`` holds ``R(G W C)``). Unlike the one-sided problem
    (:class:`HalfStep`) the p1 rows of X's blocks couple through G: one system of
    ``r p1 q1`` unknowns. ``gfac = (G1, G2)`` and ``cfac = (C1, C2)`` are SPD Kronecker
    approximations ``G ~ G1 kron G2`` (p1, p2) and ``C ~ C1 kron C2`` (q1, q2), used only by
    the preconditioner. The B-step uses the same code on the commuted problem.
    """

    def __init__(self, G, C, RGWC, p1, q1, p2, q2, gfac=None, cfac=None):
        self.G, self.C, self.RGWC = G, C, RGWC
        self.p1, self.q1, self.p2, self.q2 = p1, q1, p2, q2
        self.gfac, self.cfac = gfac, cfac

    def what(self, X, F):
        r = F.shape[0]
        return inverse_rearrange(X.reshape(r, -1).T @ F.reshape(r, -1), (self.p1, self.q1),
                                 (self.p2, self.q2))

    def rhs(self, F):
        """``H = R(G W C) Fhat^T`` as (r, p1, q1); cost r m n."""
        r = F.shape[0]
        return (self.RGWC @ F.reshape(r, -1).T).T.reshape(r, self.p1, self.q1)

    def gram_apply(self, X, F):
        """``R(G W_hat(X) C) Fhat^T`` without any Kronecker product or Gram matrix.

        Cost ``2 r m n + m^2 n + m n^2``: W_hat(X), two dense products, the contraction.
        """
        r = F.shape[0]
        Y = (self.G @ self.what(X, F)) @ self.C
        return (rearrange(Y, (self.p1, self.q1)) @ F.reshape(r, -1).T).T.reshape(r, self.p1, self.q1)

    def gram(self, F):
        """The full Gram ``[(i,a,j),(l,a',j')] = sum_{b,b',k,k'} F_i[b,k] F_l[b',k']
        G[(a,b),(a',b')] C[(j,k),(j',k')]`` (N = r p1 q1 square).

        Contracted G-first (intermediate ``(p1 q2)^2 r`` per term) or C-first (``(p2 q1)^2 r``),
        whichever is smaller, in chunks of terms. Cost ``r^2 p1^2 q1^2 q2^2`` (G-first) or
        ``r^2 p1^2 p2^2 q1^2`` (C-first), plus the cheaper first contractions.
        """
        r = F.shape[0]
        p1, q1, p2, q2 = self.p1, self.q1, self.p2, self.q2
        G4 = self.G.reshape(p1, p2, p1, p2)
        C4 = self.C.reshape(q1, q2, q1, q2)
        g_first = p1 * q2 <= p2 * q1
        per_term = r * (p1 * q2) ** 2 if g_first else r * (p2 * q1) ** 2
        step = max(1, _GRAM_CHUNK // max(per_term, 1))
        out = torch.empty(r, p1, q1, r, p1, q1, dtype=F.dtype, device=F.device)
        for s in range(0, r, step):
            Fi = F[s:s + step]
            if g_first:
                T = torch.einsum("abAB,ibk->iaAkB", G4, Fi)
                T = torch.einsum("iaAkB,lBK->iaAklK", T, F)
                out[s:s + step] = torch.einsum("iaAklK,jkJK->iajlAJ", T, C4)
            else:
                T = torch.einsum("ibk,jkJK->ibjJK", Fi, C4)
                T = torch.einsum("ibjJK,lBK->ibjJlB", T, F)
                out[s:s + step] = torch.einsum("abAB,ibjJlB->iajlAJ", G4, T)
        N = r * p1 * q1
        M = out.reshape(N, N)
        return 0.5 * (M + M.T)

    def solve_direct(self, F, X0):
        """Exact block minimiser: Cholesky of the full Gram (size r p1 q1, cost N^3 / 3)."""
        r = F.shape[0]
        M = self.gram(F)
        H = self.rhs(F).reshape(-1, 1)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            x = torch.cholesky_solve(H, L)
        else:  # rank-deficient F (e.g. a zero term): minimum-norm minimiser
            x = torch.linalg.lstsq(M, H, rcond=None, driver="gelsd").solution if M.device.type == "cpu" \
                else torch.linalg.pinv(M, hermitian=True) @ H
        return x.reshape(r, self.p1, self.q1), 0

    def preconditioner(self, F, kind):
        """An SPD approximation of the Gram's inverse, as a function R (r, p1, q1) -> Z.

        ``"rows"``: block-Jacobi with the EXACT diagonal blocks of the Gram for each (term i,
        row a) pair, q1 x q1 each: ``sum_{k,k'} (F_i^T G_aa F_i)[k,k'] C[(j,k),(j',k')]``
        with ``G_aa`` the (a, a) diagonal block (p2 x p2) of G. It keeps C's structure and
        G's within-row structure exactly (heavy-tailed channel scales on both sides) and
        drops only G's coupling between rows and the coupling between terms; with G = I it
        is the one-sided preconditioner of :class:`HalfStep`, row by row. Cost
        ``p1 r (p2 q2 (p2 + q2) + n^2)`` to build, ``p1 r q1^3 / 3`` to factor,
        ``2 r p1 q1^2`` per application; memory ``p1 r q1^2``.

        ``"cols"``: the mirror image, exact p1 x p1 blocks for each (term i, column j):
        ``sum_{b,b'} (F_i C_jj F_i^T)[b,b'] G[(a,b),(a',b')]``. Cost ``q1 r (... + m^2)``,
        memory ``q1 r p1^2``.

        ``"kron"``: the whole Gram under the nearest Kronecker factorisations ``G ~ G1 kron
        G2``, ``C ~ C1 kron C2`` (:func:`kronecker_factor_cov`), which is ``K kron G1 kron
        C1`` with the r x r term coupling ``K[i, l] = tr(G2 F_l C2 F_i^T)``, inverted factor
        by factor. Exact when G and C are Kronecker, and therefore always exact at the
        low-rank shapes (a_shape (m, 1) or (1, n): there G1 kron G2 = G, C1 kron C2 = C, and
        CG converges in one step). Weak on realistic, far-from-Kronecker weights. Cost
        ``r m2 n2 (m2 + n2 + r)`` and ``p1^3 + q1^3 + r^3``; memory ``r^2 + p1^2 + q1^2``.

        ``"block"``: per-term blocks ``Gb_i kron Cb_i / s_i`` (exact G contracted with
        ``F_i C2 F_i^T``, exact C with ``F_i^T G2 F_i``, ``s_i = tr(G2 F_i C2 F_i^T)``): the
        fallback when the others do not fit. Memory ``r (p1^2 + q1^2)``, cost ``r (m^2 + n^2)``.

        Measured (two sweeps of 12 CG steps from the same start, realistic G and C,
        power-law W, 384 x 192 and 128 x 96): "rows" and "cols" end at 2-3x lower f than
        "block", 6-200x lower than "kron", 15x lower than no preconditioner; but still ~9x
        above exact half-steps at 128 x 96 (the preconditioned spectrum spans 1e-5..50: the
        coupling of all terms through a few heavy channels is not in the diagonal blocks).
        """
        r = F.shape[0]
        p1, q1, p2, q2 = self.p1, self.q1, self.p2, self.q2
        if kind in ("rows", "cols"):
            if kind == "rows":   # blocks over j for each (a, i)
                W4, S4, nb, nc, sb, sc = self.G, self.C, p1, q1, p2, q2
                Fn = F
            else:                # blocks over a for each (j, i)
                W4, S4, nb, nc, sb, sc = self.C, self.G, q1, p1, q2, p2
                Fn = F.transpose(1, 2)
            # D: the diagonal blocks (nb, sb, sb) of the weight on this side; Sp: the other
            # side's weight as (nc^2, sc^2), so that one GEMM contracts every (sc x sc) block
            # M[a, i] = F_i^T D_a F_i (rows; F_i D_j F_i^T for cols) with it
            D = W4.reshape(nb, sb, nb, sb).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            Sp = S4.reshape(nc, sc, nc, sc).permute(0, 2, 1, 3).reshape(nc * nc, sc * sc)
            Fb = Fn.permute(1, 0, 2).reshape(sb, r * sc)               # (sb, r sc)
            blocks = torch.empty(nb, r, nc, nc, dtype=F.dtype, device=F.device)
            step = max(1, _GRAM_CHUNK // max(r * sc * max(sc, sb), 1))
            for s0 in range(0, nb, step):
                Dc = D[s0:s0 + step]
                c = Dc.shape[0]
                Y = (Dc.reshape(c * sb, sb) @ Fb).reshape(c, sb, r, sc)   # D_a F_i, one GEMM
                M = torch.einsum("ibk,cbil->cikl", Fn, Y)                 # (c, r, sc, sc)
                blocks[s0:s0 + step] = (M.reshape(-1, sc * sc) @ Sp.T).reshape(c, r, nc, nc)
            # explicit block inverses: one batched mat-vec per application (measured 5x faster
            # than two batched triangular solves with one right-hand side each)
            Binv = torch.cholesky_inverse(_chol_damped(blocks))
            del blocks

            def apply(R):
                Rb = R.transpose(0, 1) if kind == "rows" else R.permute(2, 0, 1)  # (nb, r, nc)
                Z = (Binv @ Rb.unsqueeze(-1)).squeeze(-1)
                return Z.transpose(0, 1) if kind == "rows" else Z.permute(1, 2, 0)

            return apply
        G1, G2 = self.gfac
        C1, C2 = self.cfac
        if kind == "kron":
            Y = G2 @ F @ C2
            K = F.reshape(r, -1) @ Y.reshape(r, -1).T
            LK = _chol_damped(0.5 * (K + K.T))
            LG = _chol_damped(G1)
            LC = _chol_damped(C1)

            def apply(R):
                Z = torch.cholesky_solve(R.reshape(r, -1), LK).reshape(r, p1, q1)
                Z = torch.cholesky_solve(Z, LG)
                return torch.cholesky_solve(Z.transpose(1, 2), LC).transpose(1, 2)

            return apply
        if kind != "block":
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
        Mg = F @ C2 @ F.transpose(1, 2)                      # (r, p2, p2)
        Mc = F.transpose(1, 2) @ G2 @ F                      # (r, q2, q2)
        sc = (Mg * G2).sum(dim=(1, 2))
        sc = sc.clamp(min=max(1e-12 * float(sc.max()), 1e-300))
        Gp = self.G.reshape(p1, p2, p1, p2).permute(0, 2, 1, 3).reshape(p1 * p1, p2 * p2)
        Cp = self.C.reshape(q1, q2, q1, q2).permute(0, 2, 1, 3).reshape(q1 * q1, q2 * q2)
        LG = _chol_damped((Mg.reshape(r, -1) @ Gp.T).reshape(r, p1, p1))
        LC = _chol_damped((Mc.reshape(r, -1) @ Cp.T).reshape(r, q1, q1))

        def apply(R):
            Z = torch.cholesky_solve(R, LG)
            Z = torch.cholesky_solve(Z.transpose(1, 2), LC).transpose(1, 2)
            return Z * sc[:, None, None]

        return apply

    def solve_cg(self, F, X0, max_iter, rtol, precond):
        """Preconditioned CG on ``Gram(X) = H`` from ``X0`` (one system, all r p1 q1 unknowns).

        CG started at the current iterate decreases the quadratic at every step, so an
        inexact half-step never increases f. Stops when the preconditioned residual
        ``<R, P R>`` has fallen by ``rtol^2`` from its value at the warm start (relative to
        the right-hand side instead, later sweeps near a slow ALS fixed point would stop at
        once and stall), or after ``max_iter`` steps. Returns ``(X, steps)``.
        """
        H = self.rhs(F)
        X = X0.clone()
        R = H - self.gram_apply(X, F)
        Pinv = self.preconditioner(F, precond)
        Z = Pinv(R)
        P = Z.clone()
        rz = float(torch.vdot(R.reshape(-1), Z.reshape(-1)))
        rz0 = rz
        steps = 0
        while steps < max_iter and rz > rtol ** 2 * rz0 and rz > 0:
            GP = self.gram_apply(P, F)
            pgp = float(torch.vdot(P.reshape(-1), GP.reshape(-1)))
            if not pgp > 0:
                break
            alpha = rz / pgp
            X.add_(P, alpha=alpha)
            R.sub_(GP, alpha=alpha)
            steps += 1
            Z = Pinv(R)
            rz_new = float(torch.vdot(R.reshape(-1), Z.reshape(-1)))
            P = P.mul_(rz_new / rz).add_(Z)
            rz = rz_new
        return X, steps


#: the preconditioners of the two-sided CG half-steps (see :meth:`TwoSidedHalfStep.preconditioner`)
PRECONDITIONERS = ("auto", "rows", "cols", "kron", "block")
#: largest preconditioner (elements) "auto" builds, and its largest build cost in Gram products
_PRECOND_MEM = 2**25
_PRECOND_COST = 8


def _choose_preconditioner(p1, q1, p2, q2, r):
    """``"auto"``: "kron" at the low-rank shapes (exact there); else the cheaper to build of
    "rows" and "cols" that fits in memory and costs at most a few Gram products; else
    "block"; else "kron"."""
    m, n = p1 * p2, q1 * q2
    if (q1 == 1 and p2 == 1) or (p1 == 1 and q2 == 1):
        return "kron"
    product = 2 * r * m * n + m * m * n + m * n * n
    cands = [(p1 * r * (p2 * q2 * (p2 + q2) + n * n), p1 * r * q1 * q1, "rows"),
             (q1 * r * (p2 * q2 * (p2 + q2) + m * m), q1 * r * p1 * p1, "cols")]
    ok = [(cost, kind) for cost, mem, kind in cands
          if mem <= _PRECOND_MEM and cost <= _PRECOND_COST * product]
    if ok:
        return min(ok)[1]
    if r * (p1 * p1 + q1 * q1) <= _PRECOND_MEM:
        return "block"
    return "kron"


def _als2(W, G, C, A, B, *, max_iter, tol, solver, cg_max_iter, cg_tol, obj=None,
          precond="auto", f0=None, verbose=False):
    """Alternating exact (or monotone PCG) block minimisation of ``tr(G E C E^T)``; see
    :func:`als_refine`. ``f0``: f at (A, B) when already known."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    obj = FisherObjective(W, G, C) if obj is None else obj
    RGWC = rearrange(obj.GWC, (m1, n1))
    if solver == "auto":
        solver = "direct" if r * max(m1 * n1, m2 * n2) <= DIRECT_SOLVER_MAX else "cg"
    if solver not in ("direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if precond not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {precond!r}")
    kinds = {"A": precond, "B": precond}
    if precond == "auto":
        kinds = {"A": _choose_preconditioner(m1, n1, m2, n2, r),
                 "B": _choose_preconditioner(m2, n2, m1, n1, r)}
    gfac = cfac = (None, None)
    if solver == "cg" and {"kron", "block"} & set(kinds.values()):
        gfac = kronecker_factor_cov(G, m1)
        cfac = kronecker_factor_cov(C, n1)
    pa = TwoSidedHalfStep(G, C, RGWC, m1, n1, m2, n2, gfac, cfac)
    pb = TwoSidedHalfStep(_commute(G, m1, m2, m1, m2), _commute(C, n1, n2, n1, n2), RGWC.T.contiguous(),
                   m2, n2, m1, n1, gfac[::-1], cfac[::-1])
    f = obj(A, B) if f0 is None else f0
    history = [f]
    cg_counts = []
    for sweep in range(max_iter):
        f_old = f
        for prob, which in ((pa, "A"), (pb, "B")):
            X0, F = (A, B) if which == "A" else (B, A)
            if solver == "direct":
                Xn, its = prob.solve_direct(F, X0)
            else:
                Xn, its = prob.solve_cg(F, X0, cg_max_iter, cg_tol, kinds[which])
            cg_counts.append(its)
            if which == "A":
                A = Xn.contiguous()
            else:
                B = Xn.contiguous()
        f = obj(A, B)
        history.append(f)
        if verbose:
            print(f"two-sided ALS sweep {sweep + 1}: f = {f:.6e}")
        if f_old <= 0 or (f_old - f) <= tol * f_old:
            break
    info = {"solver": solver, "cg_iterations": cg_counts}
    if solver == "cg":
        info["preconditioner"] = f"{kinds['A']}/{kinds['B']}"
    return A, B, history, info


# ----------------------------------------------------------------------------- public

#: the named starts of the activation-aware ALS (``init=``); a KronFactors is accepted too
ALS_STARTS = ("plain", "kronecker", "best")


def _svd_kw(n_oversamples, n_power_iter, seed) -> dict:
    return {"n_oversamples": n_oversamples, "n_power_iter": n_power_iter, "seed": seed}


def _finish(A, B, sv, history, info, like, perm=None, t0=None) -> KronFactors:
    if t0 is not None:
        info["seconds"] = time.perf_counter() - t0
    return KronFactors(
        A=from_work(A, like), B=from_work(B, like),
        perm=None if perm is None else (perm if isinstance(like, torch.Tensor) else perm.cpu().numpy()),
        singular_values=from_work(sv, like), history=[float(h) for h in history], info=info)


def _plain_fit(Wt, m1, n1, m2, n2, r, method, svd_kw):
    """Van Loan-Pitsianis on a work tensor: ``(A, B, all singular values, relative error, used)``."""
    U, S, Vh, allS, used = truncated_svd(rearrange(Wt, (m1, n1)), r, method, **svd_kw)
    A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
    tot = float((Wt * Wt).sum())
    err2 = max(tot - float((S[:r] ** 2).sum()), 0.0)
    return A, B, allS, ((err2 / tot) ** 0.5 if tot > 0 else 0.0), used


def _kron_cov_fit(Wt, C1, C2, m1, n1, m2, n2, r, method, svd_kw, damping):
    """Closed form under ``C = C1 kron C2``: ``(A, B, singular values, rel. error, used, lam)``."""
    S1, S1i, lam = psd_sqrt_pair(C1, damping)
    S2, S2i, _ = psd_sqrt_pair(C2, damping)
    Wh = whiten_kron(Wt, S1, S2)
    U, S, Vh, allS, used = truncated_svd(rearrange(Wh, (m1, n1)), r, method, **svd_kw)
    A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
    tot = float((Wh * Wh).sum())
    err2 = max(tot - float((S[:r] ** 2).sum()), 0.0)
    return A @ S1i, B @ S2i, allS, ((err2 / tot) ** 0.5 if tot > 0 else 0.0), used, lam


def _kron2_fit(Wt, Gpair, Cpair, m1, n1, m2, n2, r, method, svd_kw, damping, gdamping):
    """Closed form under ``G = G1 kron G2`` and ``C = C1 kron C2`` (either may be None = I).

    ``(S_G1 kron S_G2) W (S_C1 kron S_C2)`` (two-sided blockwise whitening), Van Loan-Pitsianis,
    un-whitening of both sides. Returns ``(A, B, singular values, rel. error, used, lam, glam)``.
    """
    valid_g = gcov_valid(m1 * m2, m1, m2)
    Wh = Wt
    if Gpair is not None:
        _, (T1, T2), (T1i, T2i), glam = _damped_pair(Gpair, gdamping, "gcov", valid_g)
        Wh = whiten_kron_left(T1, T2, Wh)
    else:
        glam = None
    if Cpair is not None:
        S1, S1i, lam = psd_sqrt_pair(Cpair[0], damping)
        S2, S2i, _ = psd_sqrt_pair(Cpair[1], damping)
        Wh = whiten_kron(Wh, S1, S2)
    else:
        lam = None
    U, S, Vh, allS, used = truncated_svd(rearrange(Wh, (m1, n1)), r, method, **svd_kw)
    A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
    tot = float((Wh * Wh).sum())
    err2 = max(tot - float((S[:r] ** 2).sum()), 0.0)
    if Gpair is not None:
        A, B = T1i @ A, T2i @ B
    if Cpair is not None:
        A, B = A @ S1i, B @ S2i
    return A, B, allS, ((err2 / tot) ** 0.5 if tot > 0 else 0.0), used, lam, glam


def nearest_kronecker_plain(W, a_shape, rank: int = 1, *, method: str = "auto",
                            n_oversamples: int = N_OVERSAMPLES, n_power_iter: int = N_POWER_ITER,
                            seed: int = SEED, device=None) -> KronFactors:
    r"""Van Loan-Pitsianis: ``min ||W - sum_i A_i kron B_i||_F`` by a truncated SVD of ``R(W)``.

    ``||W - W_hat||_F = ||R(W) - Ahat^T Bhat||_F``, so the optimum is the truncated SVD of
    ``R(W)`` (Eckart-Young) and the squared error is the sum of the discarded
    ``sigma_i^2``; each term gets ``sqrt(sigma_i)`` on both sides. ``method`` chooses the
    SVD: ``"exact"`` (O(p q min(p, q)) for R of shape (p, q)), ``"randomized"`` (Halko,
    Martinsson and Tropp 2011, O(q_iter p q (rank + n_oversamples))) or ``"auto"``.
    Shapes: W (m, n) -> A (rank, m1, n1), B (rank, m2, n2).

    >>> import numpy as np
    >>> F = nearest_kronecker_plain(np.kron(np.eye(2), np.ones((3, 3))), (2, 2))
    >>> F.rank, F.info["relative_error"] < 1e-6
    (1, True)
    """
    t0 = time.perf_counter()
    Wt = _check_weight(W, device)
    m1, n1, m2, n2 = check_a_shape(tuple(Wt.shape), a_shape)
    r = _check_rank(rank, m1, n1, m2, n2)
    A, B, sv, err, used = _plain_fit(Wt, m1, n1, m2, n2, r, method,
                                     _svd_kw(n_oversamples, n_power_iter, seed))
    info = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": r, "method": used,
            "relative_error": err}
    return _finish(A, B, sv, [], info, W, t0=t0)


def nearest_kronecker_kron_cov(W, a_shape, rank: int, cov, *, gcov=None, method: str = "auto",
                               damping: float = DAMPING, gdamping: float = DAMPING,
                               n_oversamples: int = N_OVERSAMPLES, n_power_iter: int = N_POWER_ITER,
                               seed: int = SEED, device=None) -> KronFactors:
    r"""Exact optimum under Kronecker-factored weights, by whitening: no iterations.

    Objective, with ``cov = (C1, C2)`` and optionally ``gcov = (G1, G2)``::

        min ||(W - W_hat)(C1 kron C2)^{1/2}||_F^2                           (gcov=None)
        min tr(G E C E^T) = ||(G1 kron G2)^{1/2} E (C1 kron C2)^{1/2}||_F^2   (E = W - W_hat)

    With ``S_k = C_k^{1/2}`` and ``T_k = G_k^{1/2}``, ``(T1 kron T2)(A kron B)(S1 kron S2)
    = (T1 A S1) kron (T2 B S2)``: the nearest sum (Van Loan and Pitsianis) to the whitened
    ``(T1 kron T2) W (S1 kron S2)`` (computed blockwise by :func:`whiten_kron_left` and
    :func:`whiten_kron`, O(m n (m1 + m2 + n1 + n2)), no Kronecker product formed),
    un-whitened by ``A_i <- T1^{-1} A_i S1^{-1}``, ``B_i <- T2^{-1} B_i S2^{-1}``, is the
    optimum, and its squared relative error is the discarded energy of the whitened
    ``R(.)``. ``cov`` may be None when ``gcov`` is given (C = I). Factors are damped by
    ``damping * mean(diag)`` (``info["damping"]``) and ``gdamping * mean(diag)``
    (``info["gdamping"]``). Cost: the whitening, eigendecompositions of the four factors
    (O(m1^3 + m2^3 + n1^3 + n2^3)) and one truncated SVD of an (m1 n1, m2 n2) matrix.

    Shapes: C1 (n1, n1), C2 (n2, n2), G1 (m1, m1), G2 (m2, m2) -> A (rank, m1, n1),
    B (rank, m2, n2).
    """
    t0 = time.perf_counter()
    Wt = _check_weight(W, device)
    m1, n1, m2, n2 = check_a_shape(tuple(Wt.shape), a_shape)
    r = _check_rank(rank, m1, n1, m2, n2)
    kind, C = _parse_cov(cov, n1, n2, Wt.device)
    gkind, G = parse_gcov(gcov, m1, m2, Wt.device)
    if gkind == "dense":
        raise ValueError("nearest_kronecker_kron_cov needs gcov=(G1, G2), a pair of Kronecker "
                         "factors (or None); use nearest_kronecker for a dense gcov")
    if kind != "kron" and not (kind is None and gkind == "kron"):
        raise ValueError("nearest_kronecker_kron_cov needs cov=(C1, C2), a pair of Kronecker "
                         "factors (cov=None only with gcov=(G1, G2)); use nearest_kronecker for "
                         "a dense covariance")
    svd_kw = _svd_kw(n_oversamples, n_power_iter, seed)
    if gkind is None:
        A, B, sv, err, used, lam = _kron_cov_fit(Wt, C[0], C[1], m1, n1, m2, n2, r, method,
                                                 svd_kw, damping)
        info = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": r, "method": f"whitened-{used}",
                "damping": lam, "relative_error": err}
        return _finish(A, B, sv, [], info, W, t0=t0)
    A, B, sv, err, used, lam, glam = _kron2_fit(Wt, G, C, m1, n1, m2, n2, r, method, svd_kw,
                                                damping, gdamping)
    info = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": r,
            "method": f"two-sided-whitened-{used}", "objective": "fisher", "damping": lam,
            "gdamping": glam, "relative_error": err}
    return _finish(A, B, sv, [], info, W, t0=t0)


def damped_cov(C, damping: float = DAMPING, *, name: str = "cov", max_damping: float | None = None):
    """``(C + lam * mean(diag C) * I, lam)`` with the smallest ``lam >= damping`` (raised tenfold)
    that makes the Cholesky factorisation succeed: the covariance every fit actually uses.

    With ``max_damping`` (as for a gcov: :data:`GCOV_MAX_DAMPING`) a matrix that needs more
    is refused with a ValueError naming ``name``."""
    valid = (gcov_valid(C.shape[0]) if name == "gcov" else "a covariance X^T X / N")
    _, lam = damped_cholesky(C, damping, max_damping=max_damping, name=name, valid=valid)
    scale = float(torch.diagonal(C).mean())
    n = C.shape[0]
    return C + (lam * (scale if scale > 0 else 1.0)) * torch.eye(n, dtype=C.dtype, device=C.device), lam


def als_refine(W, cov, init: KronFactors, *, gcov=None, als_sweeps: int = ALS_SWEEPS,
               tol: float = ALS_TOL, solver: str = "auto", cg_max_iter: int = CG_MAX_ITER,
               cg_tol: float = CG_TOL, preconditioner: str = "auto", device=None) -> KronFactors:
    r"""Alternating least squares on ``f(A, B) = tr((W - W_hat) C (W - W_hat)^T)`` from ``init``.

    With ``B`` fixed, f is, for each of the m1 row indices ``a`` of A's blocks, a quadratic
    ``x_a^T G x_a - 2 h_a^T x_a`` in the ``r n1`` unknowns ``x_a[(i, j)] = A_i[a, j]`` with
    one Gram matrix for all rows, ``G[(i,j),(i',j')] = sum_{k,k'} (B_i^T B_i')[k,k']
    C[(j,k),(j',k')]``, and ``h_a[(i,j)] = sum_{b,k} B_i[b,k] (W C)[(a,b),(j,k)]``; the
    B-step is the same with the factors' roles commuted. ``solver="direct"`` forms G (cost
    r^2 n^2) and solves by Cholesky (cost (r n1)^3 / 3): the exact block minimiser.
    ``solver="cg"`` runs at most ``cg_max_iter`` preconditioned CG steps from the current
    iterate with products ``R^{-1}(Xhat^T Bhat) C`` (cost 2 r m n + m n^2 each; no G), block-
    Jacobi preconditioned by G's exact q1 x q1 diagonal blocks; CG from a warm start lowers
    every row's quadratic, so f never increases. ``"auto"`` is direct when
    ``r * max(n1, n2) <= DIRECT_SOLVER_MAX``. Stops when a sweep lowers f by less than
    ``tol`` relatively, or after ``als_sweeps`` sweeps.

    ``cov`` is used as given (no damping: see :func:`damped_cov`); ``W`` and ``cov`` are in
    the column order of ``init`` (``init.perm`` is kept). Returns the refined
    :class:`KronFactors` (terms re-orthogonalised), ``history`` = f at the start and after
    each sweep, ``info["relative_error"] = sqrt(f / tr(W C W^T))``.

    **Two-sided (loss-aware, K-FAC Fisher) objective**, ``gcov = G`` (m, m) or a pair
    ``(G1, G2)`` (used densely here; ``cov=None`` means C = I)::

        f(A, B) = tr(G E C E^T) = ||G^{1/2} E C^{1/2}||_F^2,   E = W - sum_i A_i kron B_i

    With B fixed f is quadratic in A, but the m1 rows of A's blocks now couple through G:
    one system of ``r m1 n1`` unknowns with the Gram operator ``X -> R(G W_hat(X) C) Bhat^T``
    (``W_hat(X) = sum_i X_i kron B_i``) and right-hand side ``R(G W C) Bhat^T``.
    ``solver="direct"`` forms the full Gram (size ``N = r m1 n1``; cost about
    ``N^2 min(m1 n2, m2 n1)^2 / r`` to form, ``N^3 / 3`` to factor): the exact block
    minimiser. ``solver="cg"`` runs at most ``cg_max_iter`` preconditioned CG steps from the
    current iterate, each one product with the Gram operator (cost ``2 r m n + m^2 n + m n^2``,
    no Kronecker product or Gram formed), so f never increases. ``preconditioner`` (CG only,
    see :meth:`TwoSidedHalfStep.preconditioner`): ``"rows"`` / ``"cols"`` (block-Jacobi with the
    exact diagonal blocks of the Gram per (term, row of the factor's blocks) / per (term,
    column): C's and G's heavy-tailed channel scales are kept), ``"kron"`` (the whole Gram
    under the nearest Kronecker factorisations of G and C: exact when they are Kronecker and
    at the low-rank shapes (m, 1), (1, n)), ``"block"`` (per-term blocks, the fallback), or
    ``"auto"`` ("kron" at the low-rank shapes, else the cheaper of "rows" and "cols" that
    fits in memory). ``"auto"`` solver: direct when ``r * max(m1 n1, m2 n2) <=
    DIRECT_SOLVER_MAX``. ``gcov`` is used as given (no damping:
    see :func:`damped_cov`); ``info["objective"] = "fisher"``, ``relative_error =
    sqrt(f / tr(G W C W^T))``. With ``gcov=None`` this is exactly the one-sided ALS above.
    """
    t0 = time.perf_counter()
    Wt = _check_weight(W, device)
    m, n = Wt.shape
    if not isinstance(init, KronFactors):
        raise ValueError(f"init must be a KronFactors, got {type(init).__name__}")
    if init.shape != (m, n):
        raise ValueError(f"init approximates a {init.shape} matrix, W is {(m, n)}")
    if gcov is not None:
        return _als_refine_fisher(Wt, cov, gcov, init, W, t0, max_iter=int(als_sweeps), tol=tol,
                                  solver=solver, cg_max_iter=cg_max_iter, cg_tol=cg_tol,
                                  precond=preconditioner)
    C = check_cov(to_work(cov, Wt.device, name="cov"), n)
    A = to_work(init.A, Wt.device, name="init.A")
    B = to_work(init.B, Wt.device, name="init.B")
    (m1, n1), (m2, n2) = init.a_shape, init.b_shape
    obj = _Objective(Wt, C)
    A, B, history, als_info = _als(Wt, C, A, B, max_iter=int(als_sweeps), tol=tol, solver=solver,
                                   cg_max_iter=cg_max_iter, cg_tol=cg_tol, obj=obj)
    A, B, sv = _orthogonalize(A, B)
    tot = obj.total
    info = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": init.rank, "method": "als",
            "relative_error": (history[-1] / tot) ** 0.5 if tot > 0 else 0.0,
            "iterations": len(history) - 1, "als_seconds": time.perf_counter() - t0, **als_info}
    return _finish(A, B, sv, history, info, W, perm=None, t0=t0)


def _als_refine_fisher(Wt, cov, gcov, init, like, t0, **kw):
    """als_refine with a gcov: dense two-sided ALS (pairs are formed densely)."""
    m, n = Wt.shape
    (m1, n1), (m2, n2) = init.a_shape, init.b_shape
    _, G = parse_gcov(gcov, m1, m2, Wt.device)
    G = torch.kron(*G) if isinstance(G, tuple) else G
    if cov is None:
        C = torch.eye(n, dtype=Wt.dtype, device=Wt.device)
    else:
        kind, C = _parse_cov(cov, n1, n2, Wt.device)
        C = torch.kron(*C) if kind == "kron" else C
    A = to_work(init.A, Wt.device, name="init.A")
    B = to_work(init.B, Wt.device, name="init.B")
    obj = FisherObjective(Wt, G, C)
    A, B, history, als_info = _als2(Wt, G, C, A, B, obj=obj, **kw)
    A, B, sv = _orthogonalize(A, B)
    tot = obj.total
    info = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": init.rank, "method": "als",
            "objective": "fisher", "als": "two-sided",
            "relative_error": (max(history[-1], 0.0) / tot) ** 0.5 if tot > 0 else 0.0,
            "iterations": len(history) - 1, "als_seconds": time.perf_counter() - t0, **als_info}
    return _finish(A, B, sv, history, info, like, perm=None, t0=t0)


def nearest_kronecker(W, a_shape, rank: int = 1, *, cov=None, gcov=None, init=INIT,
                      method: str = "auto", permute=None, als_sweeps: int = ALS_SWEEPS,
                      tol: float = ALS_TOL, solver: str = "auto", cg_max_iter: int = CG_MAX_ITER,
                      cg_tol: float = CG_TOL, preconditioner: str = "auto", warmup_sweeps="auto",
                      damping: float = DAMPING, gdamping: float = DAMPING,
                      n_oversamples: int = N_OVERSAMPLES, n_power_iter: int = N_POWER_ITER,
                      seed: int = SEED, device=None) -> KronFactors:
    r"""Nearest sum of ``rank`` Kronecker products to ``W``: plain, activation-aware or loss-aware.

    Objective::

        cov=None      min ||W - sum_i A_i kron B_i||_F                (closed form)
        cov=(C1, C2)  min ||(W - W_hat) (C1 kron C2)^{1/2}||_F        (closed form)
        cov=C         min f(A, B) = tr((W - W_hat) C (W - W_hat)^T)  (ALS)

    The three cases are :func:`nearest_kronecker_plain` (Van Loan and Pitsianis, 1993),
    :func:`nearest_kronecker_kron_cov` and :func:`als_refine`; see them for the algebra
    and costs. For a dense C, ALS starts from ``init``: ``"plain"`` (the Van Loan-Pitsianis
    optimum), ``"kronecker"`` (the closed form under the nearest Kronecker factorisation
    ``C ~ C1 kron C2``, :func:`kronecker_factor_cov`), ``"best"`` (whichever of the two has
    the lower f; ``info["start_objectives"]`` has both) or a :class:`KronFactors` of the
    right shapes (in the permuted column order when ``permute`` is given). C is damped to
    ``C + damping * mean(diag C) * I`` (raised tenfold until Cholesky succeeds;
    ``info["damping"]``) and f is measured with the damped C.

    Loss-aware (K-FAC Fisher) objective, ``gcov = G`` (m, m) the covariance of the loss
    gradients w.r.t. the layer's outputs, or a pair ``(G1 (m1, m1), G2 (m2, m2))``::

        min f(A, B) = tr(G E C E^T) = ||G^{1/2} E C^{1/2}||_F^2,   E = W - W_hat

    (C = I when cov is None). Both weights Kronecker (gcov a pair, cov None or a pair): the
    closed form of :func:`nearest_kronecker_kron_cov` (two-sided whitening). A factor
    dimension of 1 makes a dense weight trivially Kronecker (n1 = 1: C = [1] kron C; m1 = 1:
    G = [1] kron G), so at the low-rank shapes (m, 1), (1, n) the fit is that closed form
    (equal to :func:`kronlab.low_rank` with ``gcov``; ``init`` and ``als_sweeps`` then do not
    apply) and at other thin shapes one-sided. One weight
    dense: ALS from ``init`` (same starts, with ``"kronecker"`` the closed form under
    ``G ~ G1 kron G2`` via ``kronecker_factor_cov(G, m1)`` and ``C ~ C1 kron C2``; ``"best"``
    the lower TRUE f). Where one side is Kronecker the problem is exactly a one-sided one
    and is solved as such (``info["als"]``): gcov a pair and C dense -> the activation-aware
    ALS on ``(T1 kron T2) W`` (``T_k = G_k^{1/2}``); G dense and cov None or a pair -> the
    activation-aware ALS on ``(W (S1 kron S2))^T`` with G as its covariance (a_shape
    ``(n1, m1)``). Both dense -> the two-sided ALS of :func:`als_refine` (``gcov=``), led by
    ``warmup_sweeps`` activation-aware sweeps (G ignored; each kept only if it lowers the
    true f; ``"auto"``: one when the two-sided half-steps use CG), because those are well
    conditioned and get further per second (``info["sweeps"]`` says which ran).
    ``permute`` acts on input channels (columns) only and needs a dense cov; G is untouched.
    G is damped to ``G + lam * mean(diag G) * I`` with ``lam`` from ``gdamping`` upward
    (``info["gdamping"]``; a G that needs more than :data:`GCOV_MAX_DAMPING` is refused);
    pairs are damped factor by factor. f and ``relative_error = sqrt(f / tr(G W C W^T))``
    are measured with the damped G and C.

    Parameters
    ----------
    W : array (m, n), numpy or torch (any device)
    a_shape : (m1, n1), dividing (m, n); ``b_shape = (m / m1, n / n1)``
    rank : int in [1, min(m1 n1, m2 n2)]
    cov : None, dense (n, n) covariance ``X^T X / N``, or a pair ``(C1 (n1, n1), C2 (n2, n2))``
    gcov : None, dense (m, m) output-gradient covariance, or a pair ``(G1 (m1, m1), G2 (m2, m2))``
    init : "plain" | "kronecker" | "best" | KronFactors (dense cov only)
    method : "auto" | "exact" | "randomized" (the truncated SVDs)
    permute : None | "variance" | int array (n,)
        Input-channel permutation applied first (``W[:, perm]``, ``C[perm][:, perm]``);
        ``"variance"`` sorts channels by decreasing ``diag(C)``. Stored in ``perm``.
    als_sweeps, tol : ALS sweeps and relative-decrease stopping tolerance.
    solver, cg_max_iter, cg_tol, preconditioner : ALS half-step solver (see :func:`als_refine`).
    warmup_sweeps : "auto" or int; leading activation-aware sweeps of the two-sided ALS.
    damping : relative ridge on C (and on C1, C2).
    gdamping : relative ridge on G (and on G1, G2).
    n_oversamples, n_power_iter, seed : randomized SVD settings.
    device : torch device to compute on (default: W's device; CPU for numpy).

    Returns
    -------
    KronFactors
        ``A`` (rank, m1, n1), ``B`` (rank, m2, n2) in W's kind, device and dtype.
        ``singular_values``: of the (whitened) rearranged matrix (all for the exact SVD,
        the computed ones for the randomized); for ALS those of ``R(W_hat)`` after the final
        re-orthogonalisation. ``history``: ALS objective values. ``info``: method, damping,
        ``relative_error`` (plain: Frobenius; with cov: output error), timings.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.kron(np.ones((2, 3)), np.eye(4))
    >>> F = nearest_kronecker(W, (2, 3))
    >>> F.A.shape, F.B.shape, bool(np.allclose(F.to_dense(), W))
    ((1, 2, 3), (1, 4, 4), True)
    """
    t0 = time.perf_counter()
    Wt = _check_weight(W, device)
    m, n = Wt.shape
    m1, n1, m2, n2 = check_a_shape((m, n), a_shape)
    r = _check_rank(rank, m1, n1, m2, n2)
    kind, C = _parse_cov(cov, n1, n2, Wt.device)
    svd_kw = {"method": method, "n_oversamples": n_oversamples, "n_power_iter": n_power_iter,
              "seed": seed}
    gkind, G = parse_gcov(gcov, m1, m2, Wt.device)
    start = _check_init(init, kind, (m, n), (m1, n1), r, gkind)
    if gkind is not None:
        F = _nearest_kronecker_fisher(
            Wt, (m1, n1, m2, n2), r, kind, C, gkind, G, start, permute,
            als_kw={"max_iter": int(als_sweeps), "tol": tol, "solver": solver,
                    "cg_max_iter": cg_max_iter, "cg_tol": cg_tol},
            precond=preconditioner, warmup=warmup_sweeps, damping=damping, gdamping=gdamping,
            method=method, svd_kw=_svd_kw(n_oversamples, n_power_iter, seed))
        return _finish_from(F, W, t0)
    if kind is None:
        if permute is not None:
            raise ValueError("permute needs a dense cov (the plain objective does not depend on "
                             "the column order of the factors' blocks)")
        return _finish_from(nearest_kronecker_plain(Wt, (m1, n1), r, **svd_kw), W, t0)
    if kind == "kron":
        if permute is not None:
            raise ValueError("permute needs a dense cov: permuting channels breaks the (C1, C2) "
                             "Kronecker structure (pass kron(C1, C2) densely instead)")
        return _finish_from(nearest_kronecker_kron_cov(Wt, (m1, n1), r, C, damping=damping,
                                                       **svd_kw), W, t0)
    if isinstance(start, KronFactors) and start.perm is not None:
        if permute is None:
            permute = start.perm
    perm = parse_permutation(permute, n, C)
    if perm is not None:
        perm = perm.to(Wt.device)
        Wt = Wt[:, perm]
        C = C[perm][:, perm]
    Cd, lam = damped_cov(C, damping)
    obj = _Objective(Wt, Cd)
    starts: dict = {}
    if isinstance(start, KronFactors):
        F0 = KronFactors(to_work(start.A, Wt.device), to_work(start.B, Wt.device))
        start_name = "given"
    else:
        cands = {}
        if start in ("plain", "best"):
            A, B, *_ = _plain_fit(Wt, m1, n1, m2, n2, r, method, _svd_kw(n_oversamples, n_power_iter, seed))
            cands["plain"] = (A, B)
        if start in ("kronecker", "best"):
            C1, C2 = kronecker_factor_cov(Cd, n1, damping=damping)
            A, B, *_ = _kron_cov_fit(Wt, C1, C2, m1, n1, m2, n2, r, method,
                                     _svd_kw(n_oversamples, n_power_iter, seed), damping)
            cands["kronecker"] = (A, B)
        starts = {k: obj(*ab) for k, ab in cands.items()}
        start_name = min(starts, key=lambda k: (starts[k], k != "plain"))
        F0 = KronFactors(*cands[start_name])
    F = als_refine(Wt, Cd, F0, als_sweeps=als_sweeps, tol=tol, solver=solver,
                   cg_max_iter=cg_max_iter, cg_tol=cg_tol)
    info = dict(F.info)
    info.update(start=start_name, start_objectives=starts, damping=lam)
    out = KronFactors(F.A, F.B, perm, F.singular_values, F.history, info)
    return _finish_from(out, W, t0)


def _als2_warm(Wt, Gd, Cd, A, B, obj, precond, warmup, als_kw):
    """Two-sided ALS, led by ``warmup`` activation-aware sweeps (one-sided, G ignored), each
    kept only if it lowers the TRUE f = tr(G E C E^T) (so f never increases).

    Why: the one-sided half-steps are well conditioned (C's heavy-tailed channel scales only)
    and PCG solves them almost exactly in 12 steps; the two-sided ones multiply in G's scales
    and 12 PCG steps go a shorter way. Measured at 1536 x 576, a_shape (32, 24), realistic
    G and C (benchmarks/bench_fisher.py): one warm-up sweep plus one two-sided sweep ends at
    loss-aware error 0.062 vs 0.089 for two two-sided sweeps (80% parameters) and 0.067 vs
    0.076 (60%), in less time. At small sizes (384 x 144) it was the other way round (0.040
    vs 0.033): "auto" is tuned for layer-sized problems. ``"auto"``: one warm-up sweep when
    the two-sided half-steps use CG, none when they are solved exactly.
    """
    max_iter, solver = als_kw["max_iter"], als_kw["solver"]
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if warmup == "auto":
        two_solver = solver if solver != "auto" else (
            "direct" if r * max(m1 * n1, m2 * n2) <= DIRECT_SOLVER_MAX else "cg")
        warmup = 1 if two_solver == "cg" else 0
    if isinstance(warmup, bool) or int(warmup) != warmup or warmup < 0:
        raise ValueError(f"warmup_sweeps must be 'auto' or a non-negative integer, got {warmup!r}")
    f = obj(A, B)
    history, kinds, counts = [f], [], []
    one = None
    for _ in range(min(int(warmup), max_iter)):
        one = _Objective(Wt, Cd) if one is None else one
        A1, B1, _, info1 = _als(Wt, Cd, A, B, obj=one, **{**als_kw, "max_iter": 1, "tol": 0.0})
        f1 = obj(A1, B1)
        if not f1 < f:
            break
        f_old, f, A, B = f, f1, A1, B1
        history.append(f)
        kinds.append("one-sided")
        counts += info1["cg_iterations"]
        if (f_old - f) <= als_kw["tol"] * f_old:
            return A, B, history, {"solver": info1["solver"], "cg_iterations": counts,
                                   "sweeps": kinds}
    rest = max_iter - len(kinds)
    A, B, h2, info = _als2(Wt, Gd, Cd, A, B, obj=obj, precond=precond, f0=f,
                           **{**als_kw, "max_iter": rest})
    history += h2[1:]
    kinds += ["two-sided"] * (len(h2) - 1)
    info["cg_iterations"] = counts + info["cg_iterations"]
    info["sweeps"] = kinds
    return A, B, history, info


def _nearest_kronecker_fisher(Wt, dims, r, kind, C, gkind, G, start, permute, *, als_kw, precond,
                              warmup, damping, gdamping, method, svd_kw) -> KronFactors:
    """nearest_kronecker with a gcov (see its docstring); returns work-tensor KronFactors."""
    t0 = time.perf_counter()
    m1, n1, m2, n2 = dims
    m, n = Wt.shape
    base = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": r, "objective": "fisher"}
    if permute is not None and kind != "dense":
        raise ValueError("permute needs a dense cov (it permutes the input channels, and "
                         "permute='variance' sorts them by diag(C); with Kronecker-factored "
                         "covariances pass kron(C1, C2) densely to permute)")
    valid_g = gcov_valid(m, m1, m2)
    perm = None
    if kind == "dense":
        if isinstance(start, KronFactors) and start.perm is not None and permute is None:
            permute = start.perm
        perm = parse_permutation(permute, n, C)
        if perm is not None:
            perm = perm.to(Wt.device)
            Wt = Wt[:, perm]
            C = C[perm][:, perm]
    # A factor dimension of 1 makes a weight trivially Kronecker (n1 = 1: C = [1] kron C):
    # the problem is then exactly one-sided, or at the low-rank shapes (m, 1) and (1, n) a
    # closed form, both cheaper and better conditioned than the two-sided ALS.
    if kind == "dense" and 1 in (n1, n2):
        one = torch.ones(1, 1, dtype=C.dtype, device=C.device)
        kind, C = "kron", ((one, C) if n1 == 1 else (C, one))
    if gkind == "dense" and 1 in (m1, m2):
        one = torch.ones(1, 1, dtype=G.dtype, device=G.device)
        gkind, G = "kron", ((one, G) if m1 == 1 else (G, one))
    if gkind == "kron" and kind in (None, "kron"):
        F = nearest_kronecker_kron_cov(Wt, (m1, n1), r, C, gcov=G, method=method,
                                       damping=damping, gdamping=gdamping, **svd_kw)
        return KronFactors(F.A, F.B, perm, F.singular_values, F.history, F.info)
    # the weights every fit uses: damped, as dense matrices or Kronecker pairs
    lam = glam = None
    Croot = Groot = None
    if kind == "dense":
        Cd, lam = damped_cov(C, damping)
    elif kind == "kron":
        Cd, Croot, Croot_inv, lam = _damped_pair(C, damping, "cov", "a covariance")
    else:
        Cd = None
    if gkind == "dense":
        Gd, glam = damped_cov(G, gdamping, name="gcov", max_damping=max(GCOV_MAX_DAMPING, gdamping))
    else:
        Gd, Groot, Groot_inv, glam = _damped_pair(G, gdamping, "gcov", valid_g)
    obj = FisherObjective(Wt, Gd, Cd)
    starts: dict = {}
    if isinstance(start, KronFactors):
        A0, B0 = to_work(start.A, Wt.device), to_work(start.B, Wt.device)
        start_name = "given"
    else:
        cands = {}
        if start in ("plain", "best"):
            A, B, *_ = _plain_fit(Wt, m1, n1, m2, n2, r, method, svd_kw)
            cands["plain"] = (A, B)
        if start in ("kronecker", "best"):
            Gp = Gd if gkind == "kron" else kronecker_factor_cov(Gd, m1, damping=gdamping)
            Cp = Cd if kind != "dense" else kronecker_factor_cov(Cd, n1, damping=damping)
            A, B, *_ = _kron2_fit(Wt, Gp, Cp, m1, n1, m2, n2, r, method, svd_kw, damping, gdamping)
            cands["kronecker"] = (A, B)
        starts = {k: obj(*ab) for k, ab in cands.items()}
        start_name = min(starts, key=lambda k: (starts[k], k != "plain"))
        A0, B0 = cands[start_name]
    if gkind == "dense" and kind == "dense":
        route = "two-sided"
        A, B, history, als_info = _als2_warm(Wt, Gd, Cd, A0, B0, obj, precond, warmup, als_kw)
    elif gkind == "kron":
        # (T1 kron T2)(A kron B) = (T1 A) kron (T2 B): one-sided on the G-whitened W, exactly
        route = "one-sided, G1 kron G2 whitened"
        (T1, T2), (T1i, T2i) = Groot, Groot_inv
        Wp = whiten_kron_left(T1, T2, Wt)
        A, B, history, als_info = _als(Wp, Cd, T1 @ A0, T2 @ B0, obj=_Objective(Wp, Cd), **als_kw)
        A, B = T1i @ A, T2i @ B
    else:
        # (A kron B)(S1 kron S2) = (A S1) kron (B S2) and E^T: one-sided with G as covariance
        route = "one-sided, transposed" + (", C1 kron C2 whitened" if kind == "kron" else "")
        Wp = Wt if Croot is None else whiten_kron(Wt, *Croot)
        Ap, Bp = (A0, B0) if Croot is None else (A0 @ Croot[0], B0 @ Croot[1])
        Wp = Wp.T.contiguous()
        A, B, history, als_info = _als(Wp, Gd, Ap.transpose(1, 2).contiguous(),
                                       Bp.transpose(1, 2).contiguous(), obj=_Objective(Wp, Gd),
                                       **als_kw)
        A, B = A.transpose(1, 2), B.transpose(1, 2)
        if Croot is not None:
            A, B = A @ Croot_inv[0], B @ Croot_inv[1]
    A, B, sv = _orthogonalize(A.contiguous(), B.contiguous())
    tot = obj.total
    info = {**base, "method": "als", "als": route,
            "relative_error": (max(history[-1], 0.0) / tot) ** 0.5 if tot > 0 else 0.0,
            "iterations": len(history) - 1, "als_seconds": time.perf_counter() - t0, **als_info,
            "start": start_name, "start_objectives": starts, "damping": lam, "gdamping": glam}
    return KronFactors(A, B, perm, sv, [float(h) for h in history], info)


def _check_init(init, kind, shape, a_shape, r, gkind=None):
    if isinstance(init, KronFactors):
        if kind != "dense" and gkind != "dense":
            raise ValueError("init=KronFactors needs a dense cov or gcov (plain and Kronecker-"
                             "covariance fits are closed forms with nothing to start)")
        if init.shape != tuple(shape) or init.a_shape != tuple(a_shape) or init.rank != r:
            raise ValueError(f"init has shape {init.shape}, a_shape {init.a_shape}, rank "
                             f"{init.rank}; expected {tuple(shape)}, {tuple(a_shape)}, {r}")
        return init
    if not isinstance(init, str) or init not in ALS_STARTS:
        raise ValueError(f"init must be one of {ALS_STARTS} or a KronFactors, got {init!r}")
    return init


def _finish_from(F: KronFactors, like, t0) -> KronFactors:
    """``F`` (computed on work tensors) in the kind, device and dtype of ``like``."""
    perm = F.perm
    if perm is not None and not isinstance(like, torch.Tensor):
        perm = perm.cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
    info = dict(F.info)
    info["seconds"] = time.perf_counter() - t0
    return KronFactors(A=from_work(to_work(F.A), like), B=from_work(to_work(F.B), like), perm=perm,
                       singular_values=None if F.singular_values is None
                       else from_work(to_work(F.singular_values), like),
                       history=list(F.history), info=info)


def relative_error(W, approx, cov=None, gcov=None):
    r"""Relative (output, or loss-aware) error of an approximation of ``W``.

    ``cov=None``: ``||W - W_hat||_F / ||W||_F``; with ``cov = C`` (n x n):
    ``sqrt(tr(E C E^T) / tr(W C W^T))``, ``E = W - W_hat`` (the relative error of the layer's
    outputs on inputs with second moment C); with ``gcov = G`` (m x m, the covariance of the
    loss gradients w.r.t. the outputs): ``sqrt(tr(G E C E^T) / tr(G W C W^T))`` (the K-FAC
    Fisher estimate of the loss increase, relative; C = I when cov is None). ``cov`` and
    ``gcov`` may also be Kronecker pairs ``(C1, C2)``, ``(G1, G2)`` (applied blockwise,
    :func:`whiten_kron`, :func:`whiten_kron_left`). No damping: the weights are used as given.
    ``approx`` is a :class:`KronFactors`, :class:`LowRankFactors` or a dense (m, n) array.
    For KronFactors the dense W_hat is formed by one GEMM ``R^{-1}(Ahat^T Bhat)`` (cost
    r m n, the same as the Gram-identity shortcut ``||W||^2 - 2<R(W), Ahat^T Bhat> +
    ||Ahat^T Bhat||^2``, which would lose accuracy to cancellation below ~1e-8); with cov
    add m n^2 for ``E C``, with gcov m^2 n for ``G E``. Computed in float64; returns a
    Python float.
    """
    Wt = _check_weight(W)
    m, n = Wt.shape
    if isinstance(approx, KronFactors):
        if approx.shape != (m, n):
            raise ValueError(f"approx has shape {approx.shape}, W has {(m, n)}")
        A = to_work(approx.A, Wt.device)
        B = to_work(approx.B, Wt.device)
        Wh = _dense(A, B)
        if approx.perm is not None:
            Wh = Wh[:, torch.argsort(torch.as_tensor(np.asarray(
                approx.perm.cpu() if isinstance(approx.perm, torch.Tensor) else approx.perm)).to(Wt.device))]
    elif isinstance(approx, LowRankFactors):
        Wh = to_work(approx.U, Wt.device) @ to_work(approx.V, Wt.device)
    else:
        Wh = to_work(approx, Wt.device, name="approx")
    if tuple(Wh.shape) != (m, n):
        raise ValueError(f"approx has shape {tuple(Wh.shape)}, W has {(m, n)}")
    E = Wt - Wh
    if cov is None and gcov is None:
        tot = float((Wt * Wt).sum())
        return float((E * E).sum()) ** 0.5 / tot ** 0.5 if tot > 0 else 0.0
    if cov is None:
        C = None
    elif is_pair(cov):
        C1 = to_work(cov[0], Wt.device, name="cov[0]")
        C2 = to_work(cov[1], Wt.device, name="cov[1]")
        if C1.ndim != 2 or C2.ndim != 2 or C1.shape[0] * C2.shape[0] != n:
            raise ValueError(f"cov=(C1, C2) has shapes {tuple(C1.shape)}, {tuple(C2.shape)}; "
                             f"expected square factors with C1.shape[0] * C2.shape[0] = {n}")
        C = (check_cov(C1, C1.shape[0], "cov[0]"), check_cov(C2, C2.shape[0], "cov[1]"))
    else:
        C = check_cov(to_work(cov, Wt.device, name="cov"), n)
    G = None if gcov is None else parse_gcov(gcov, None, None, Wt.device, m=m)[1]
    tot = float((_right(_left(G, Wt), C) * Wt).sum())
    f = float((_right(_left(G, E), C) * E).sum())
    return max(f, 0.0) ** 0.5 / tot ** 0.5 if tot > 0 else 0.0

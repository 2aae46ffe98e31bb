"""Nearest sums of Kronecker products, plain and activation-aware.

Notation (the book's): ``W`` is m x n with m = m1*m2, n = n1*n2 and
``W_hat = sum_i A_i kron B_i`` with ``A_i`` m1 x n1, ``B_i`` m2 x n2. ``C`` is the
layer's input covariance (n x n); the activation-aware objective is the output error

    f(A, B) = ||(W - W_hat) C^{1/2}||_F^2 = tr((W - W_hat) C (W - W_hat)^T).

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
    check_cov,
    check_finite,
    damped_cholesky,
    from_work,
    psd_sqrt_pair,
    to_work,
    truncated_svd,
)
from ._rearrange import check_a_shape, inverse_rearrange, rearrange

__all__ = ["kronecker_factor_cov", "nearest_kronecker", "relative_error"]


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


def _parse_perm(permute, n, C):
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


def _whiten(W, S1, S2):
    """``W (S1 kron S2)`` without the Kronecker product: two small products, O(m n (n1 + n2))."""
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


def kronecker_factor_cov(C, n1: int, *, damping: float = 1e-6):
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

class _Problem:
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
    pa = _Problem(C, RWC, m1, n1, m2, n2)
    pb = _Problem(Cs, RWC.T.contiguous(), m2, n2, m1, n1)
    if solver == "auto":
        solver = "direct" if r * max(n1, n2) <= 1536 else "cg"
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


# ----------------------------------------------------------------------------- public

def nearest_kronecker(W, a_shape, rank: int = 1, *, cov=None, method: str = "auto",
                      permute=None, max_iter: int = 8, tol: float = 1e-4, solver: str = "auto",
                      cg_max_iter: int = 12, cg_tol: float = 1e-3, damping: float = 1e-6,
                      n_oversamples: int = 10, n_power_iter: int = 4, seed: int = 0,
                      device=None) -> KronFactors:
    r"""Nearest sum of ``rank`` Kronecker products to ``W``, plain or activation-aware.

    Objective::

        cov=None      min ||W - sum_i A_i kron B_i||_F
        cov=(C1, C2)  min ||(W - W_hat) (C1 kron C2)^{1/2}||_F        (closed form)
        cov=C         min f(A, B) = tr((W - W_hat) C (W - W_hat)^T)  (ALS)

    **Plain** (Van Loan and Pitsianis, 1993): ``||W - W_hat||_F = ||R(W) - Ahat^T Bhat||_F``,
    so the optimum is the truncated SVD of ``R(W)`` (Eckart-Young); the squared error is the
    sum of the discarded ``sigma_i^2``. Each term gets ``sqrt(sigma_i)`` on both sides.
    ``method="exact"`` is a full SVD (O(p q min(p, q)) for R of shape (p, q));
    ``"randomized"`` is the range finder with power iterations of Halko, Martinsson and
    Tropp (2011), O(q_iter p q (rank + n_oversamples)); ``"auto"`` picks the randomized one
    for large R and small rank.

    **Kronecker-factored covariance** ``C = C1 kron C2``: with ``S_k = C_k^{1/2}``,
    ``(A kron B)(S1 kron S2) = (A S1) kron (B S2)``, so the nearest sum to the whitened
    ``W (S1 kron S2)`` un-whitened by ``A_i <- A_i S1^{-1}``, ``B_i <- B_i S2^{-1}`` is the
    exact optimum and the squared output error is the sum of the discarded squared singular
    values of ``R(W (S1 kron S2))``.

    **General covariance**: alternating least squares. With ``B`` fixed, f is, for each of
    the m1 row indices ``a`` of A's blocks, a quadratic ``x_a^T G x_a - 2 h_a^T x_a`` in the
    ``r n1`` unknowns ``x_a[(i, j)] = A_i[a, j]`` with one Gram matrix shared by all rows,
    ``G[(i,j),(i',j')] = sum_{k,k'} (B_i^T B_i')[k,k'] C[(j,k),(j',k')]``, and
    ``h_a[(i,j)] = sum_{b,k} B_i[b,k] (W C)[(a,b),(j,k)]``; the B-step is the same with the
    roles of the factors commuted. ``solver="direct"`` forms G (cost r^2 n^2) and solves by
    Cholesky (cost (r n1)^3 / 3): the exact block minimiser. ``solver="cg"`` runs at most
    ``cg_max_iter`` preconditioned CG steps from the current iterate using only products
    with G computed as ``R^{-1}(Xhat^T Bhat) C`` (cost 2 r m n + m n^2 each, no G, no
    Kronecker products), preconditioned by G's exact diagonal blocks (one q1 x q1 block per
    term); CG from a warm start lowers every row's quadratic, so f never increases either way.
    ``"auto"`` uses direct when ``r * max(n1, n2) <= 1536``. ALS starts from whichever of the
    plain optimum and the closed form under the nearest Kronecker factorisation of C has
    the lower f, and stops when a sweep lowers f by less than ``tol`` relatively or after
    ``max_iter`` sweeps. ``history`` holds f at the start and after every sweep. C is
    damped to ``C + damping * mean(diag C) * I`` (raised tenfold until Cholesky succeeds);
    ``info["damping"]`` reports it and f is measured with the damped C.

    Parameters
    ----------
    W : array (m, n), numpy or torch (any device)
    a_shape : (m1, n1), dividing (m, n); ``b_shape = (m / m1, n / n1)``
    rank : int in [1, min(m1 n1, m2 n2)]
    cov : None, dense (n, n) covariance ``X^T X / N``, or a pair ``(C1 (n1, n1), C2 (n2, n2))``
    method : "auto" | "exact" | "randomized" (the truncated SVDs)
    permute : None | "variance" | int array (n,)
        Input-channel permutation applied first (``W[:, perm]``, ``C[perm][:, perm]``);
        ``"variance"`` sorts channels by decreasing ``diag(C)``. Stored in ``perm``.
    max_iter, tol : ALS sweeps and relative-decrease stopping tolerance.
    solver, cg_max_iter, cg_tol : ALS half-step solver (see above).
    damping : relative ridge on C (and on C1, C2).
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
    if kind == "kron" and permute is not None:
        raise ValueError("permute needs a dense cov: permuting channels breaks the (C1, C2) "
                         "Kronecker structure (pass kron(C1, C2) densely instead)")
    perm = _parse_perm(permute, n, C if kind == "dense" else None)
    if perm is not None:
        perm = perm.to(Wt.device)
        Wt = Wt[:, perm]
        C = C[perm][:, perm]
    svd_kw = {"n_oversamples": n_oversamples, "n_power_iter": n_power_iter, "seed": seed}
    info: dict = {"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": r}
    history: list = []

    if kind is None:
        U, S, Vh, allS, used = truncated_svd(rearrange(Wt, (m1, n1)), r, method, **svd_kw)
        A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
        tot = float((Wt * Wt).sum())
        err2 = max(tot - float((S[:r] ** 2).sum()), 0.0)
        info.update(method=used, relative_error=(err2 / tot) ** 0.5 if tot > 0 else 0.0)
        sv = allS
    elif kind == "kron":
        S1, S1i, lam = psd_sqrt_pair(C[0], damping)
        S2, S2i, _ = psd_sqrt_pair(C[1], damping)
        Wh = _whiten(Wt, S1, S2)
        U, S, Vh, allS, used = truncated_svd(rearrange(Wh, (m1, n1)), r, method, **svd_kw)
        A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
        A, B = A @ S1i, B @ S2i
        tot = float((Wh * Wh).sum())
        err2 = max(tot - float((S[:r] ** 2).sum()), 0.0)
        info.update(method=f"whitened-{used}", damping=lam,
                    relative_error=(err2 / tot) ** 0.5 if tot > 0 else 0.0)
        sv = allS
    else:
        _, lam = damped_cholesky(C, damping)
        scale = float(torch.diagonal(C).mean())
        Cd = C + (lam * (scale if scale > 0 else 1.0)) * torch.eye(n, dtype=C.dtype, device=C.device)
        # start (a): plain optimum
        U, S, Vh, _, used = truncated_svd(rearrange(Wt, (m1, n1)), r, method, **svd_kw)
        Aa, Ba = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
        # start (b): closed form under C ~ C1 kron C2
        C1, C2 = kronecker_factor_cov(Cd, n1, damping=damping)
        S1, S1i, _ = psd_sqrt_pair(C1, damping)
        S2, S2i, _ = psd_sqrt_pair(C2, damping)
        U, S, Vh, _, _ = truncated_svd(rearrange(_whiten(Wt, S1, S2), (m1, n1)), r, method, **svd_kw)
        Ab, Bb = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
        Ab, Bb = Ab @ S1i, Bb @ S2i
        obj = _Objective(Wt, Cd)
        fa, fb = obj(Aa, Ba), obj(Ab, Bb)
        A, B = (Aa, Ba) if fa <= fb else (Ab, Bb)
        t1 = time.perf_counter()
        A, B, history, als_info = _als(Wt, Cd, A, B, max_iter=max_iter, tol=tol, solver=solver,
                                       cg_max_iter=cg_max_iter, cg_tol=cg_tol, obj=obj)
        A, B, sv = _orthogonalize(A, B)
        tot = obj.total
        info.update(method="als", start="plain" if fa <= fb else "kronecker",
                    start_objectives={"plain": fa, "kronecker": fb}, damping=lam,
                    relative_error=(history[-1] / tot) ** 0.5 if tot > 0 else 0.0,
                    iterations=len(history) - 1, als_seconds=time.perf_counter() - t1, **als_info)
    info["seconds"] = time.perf_counter() - t0
    return KronFactors(
        A=from_work(A, W), B=from_work(B, W),
        perm=None if perm is None else (perm if isinstance(W, torch.Tensor) else perm.cpu().numpy()),
        singular_values=from_work(sv, W), history=[float(h) for h in history], info=info)


def relative_error(W, approx, cov=None):
    r"""Relative (output) error of an approximation of ``W``.

    ``cov=None``: ``||W - W_hat||_F / ||W||_F``; with ``cov = C`` (n x n):
    ``sqrt(tr(E C E^T) / tr(W C W^T))``, ``E = W - W_hat`` (the relative error of the layer's
    outputs on inputs with second moment C). ``approx`` is a :class:`KronFactors`,
    :class:`LowRankFactors` or a dense (m, n) array. For KronFactors the
    dense W_hat is formed by one GEMM ``R^{-1}(Ahat^T Bhat)`` (cost r m n, the same as the
    Gram-identity shortcut ``||W||^2 - 2<R(W), Ahat^T Bhat> + ||Ahat^T Bhat||^2``, which
    would lose accuracy to cancellation below ~1e-8); with cov add m n^2 for ``E C``.
    Computed in float64; returns a Python float.
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
    if cov is None:
        tot = float((Wt * Wt).sum())
        return float((E * E).sum()) ** 0.5 / tot ** 0.5 if tot > 0 else 0.0
    C = check_cov(to_work(cov, Wt.device, name="cov"), n)
    tot = float(((Wt @ C) * Wt).sum())
    return max(float(((E @ C) * E).sum()), 0.0) ** 0.5 / tot ** 0.5 if tot > 0 else 0.0

"""The loss-aware (K-FAC Fisher) objective tr(G E C E^T) checked against dense references.

``G`` (m x m) is the covariance of the loss gradients w.r.t. the layer's outputs, ``C``
(n x n) the input covariance, ``E = W - W_hat``. Dense references: ``np.kron`` sums, the
explicit ``np.trace(G @ E @ C @ E.T)``, ``np.linalg.svd`` of the whitened (rearranged)
matrix, and the full normal-equation Gram built column by column from ``np.kron``.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlab import (
    KronFactors,
    LowRankFactors,
    als_refine,
    low_rank,
    nearest_kronecker,
    nearest_kronecker_kron_cov,
    rearrange,
    relative_error,
    whiten_kron_left,
)

SHAPES = [(2, 3, 4, 2), (3, 3, 3, 3), (4, 2, 3, 5), (3, 2, 2, 3)]  # m1, n1, m2, n2
SEEDS = [0, 1, 2]


def kron_sum(A, B):
    return sum(np.kron(A[i], B[i]) for i in range(A.shape[0]))


def spd(n, rng):
    """A covariance with heavy-tailed channel scales and correlations."""
    X = rng.standard_normal((4 * n + 10, n)) @ rng.standard_normal((n, n))
    X *= np.exp(rng.standard_normal(n))
    return X.T @ X / X.shape[0]


def dense(M):
    return np.kron(*M) if isinstance(M, tuple) else M


def fisher(W, G, C, What):
    """tr(G E C E^T), G and C dense, pairs or None (identity)."""
    m, n = W.shape
    G = np.eye(m) if G is None else dense(G)
    C = np.eye(n) if C is None else dense(C)
    E = W - What
    return float(np.trace(G @ E @ C @ E.T))


def rel(W, G, C, What):
    return np.sqrt(fisher(W, G, C, What) / fisher(W, G, C, np.zeros_like(W)))


def sqrtm(M):
    w, V = np.linalg.eigh(M)
    return (V * np.sqrt(w)) @ V.T


def damped(M, lam):
    return M + lam * np.mean(np.diag(M)) * np.eye(M.shape[0])


def problem(shape, seed):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    return rng, W, spd(m1 * m2, rng), spd(n1 * n2, rng)


# ----------------------------------------------------------------------------- relative_error

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weights", ["dense", "pairs", "g-only", "g-pair-c-dense"])
def test_relative_error_matches_explicit_trace(seed, weights):
    rng = np.random.default_rng(seed)
    m1, n1, m2, n2 = 3, 2, 4, 3
    W = rng.standard_normal((12, 6))
    G1, G2, C1, C2 = spd(m1, rng), spd(m2, rng), spd(n1, rng), spd(n2, rng)
    G, C = {"dense": (spd(12, rng), spd(6, rng)), "pairs": ((G1, G2), (C1, C2)),
            "g-only": (spd(12, rng), None), "g-pair-c-dense": ((G1, G2), spd(6, rng))}[weights]
    F = KronFactors(rng.standard_normal((2, m1, n1)), rng.standard_normal((2, m2, n2)),
                    perm=rng.permutation(6))
    L = LowRankFactors(rng.standard_normal((12, 2)), rng.standard_normal((2, 6)))
    for approx in (F, L, F.to_dense()):
        What = approx if isinstance(approx, np.ndarray) else approx.to_dense()
        assert np.isclose(relative_error(W, approx, cov=C, gcov=G), rel(W, G, C, What), rtol=1e-10)
    # G = I is the activation-aware error, and torch in gives the same float
    assert np.isclose(relative_error(W, F, cov=np.eye(6), gcov=np.eye(12)),
                      relative_error(W, F), rtol=1e-12)
    Gt = tuple(torch.from_numpy(x) for x in G) if isinstance(G, tuple) else torch.from_numpy(G)
    assert np.isclose(relative_error(torch.from_numpy(W), F, cov=C, gcov=Gt),
                      rel(W, G, C, F.to_dense()), rtol=1e-10)


def test_whiten_kron_left_is_the_kronecker_product():
    rng = np.random.default_rng(0)
    S1, S2, W = rng.standard_normal((3, 3)), rng.standard_normal((4, 4)), rng.standard_normal((12, 5))
    got = whiten_kron_left(*(torch.from_numpy(x) for x in (S1, S2, W))).numpy()
    np.testing.assert_allclose(got, np.kron(S1, S2) @ W, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- low rank

@pytest.mark.parametrize("shape", [(8, 5), (6, 12), (10, 10)])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_cov", [True, False])
def test_low_rank_fisher_error_is_discarded_singular_values(shape, seed, with_cov):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    G = spd(shape[0], rng)
    C = spd(shape[1], rng) if with_cov else None
    Lg = np.linalg.cholesky(G)
    Lc = np.linalg.cholesky(C) if with_cov else np.eye(shape[1])
    s = np.linalg.svd(Lg.T @ W @ Lc, compute_uv=False)
    for r in range(1, min(shape)):
        F = low_rank(W, r, cov=C, gcov=G, damping=0.0, gdamping=0.0)
        assert F.U.shape == (shape[0], r) and F.V.shape == (r, shape[1])
        assert np.isclose(fisher(W, G, C, F.to_dense()), (s[r:] ** 2).sum(), rtol=1e-7, atol=1e-9)
        assert np.isclose(relative_error(W, F, cov=C, gcov=G), np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()),
                          rtol=1e-7, atol=1e-10)
        assert F.info["gdamping"] == 0.0 and F.info["objective"] == "fisher"


@pytest.mark.parametrize("seed", SEEDS)
def test_low_rank_fisher_is_optimal(seed):
    """No random rank-r matrix, and no perturbation of the optimum, has a lower tr(G E C E^T);
    the activation-aware (svd-aa) fit is no better either."""
    rng, W, G, C = problem((3, 3, 4, 2), seed)
    r = 3
    F = low_rank(W, r, cov=C, gcov=G, damping=0.0, gdamping=0.0)
    f0 = fisher(W, G, C, F.to_dense())
    assert f0 <= fisher(W, G, C, low_rank(W, r, cov=C, damping=0.0).to_dense()) * (1 + 1e-12)
    for _ in range(50):
        U, V = rng.standard_normal((W.shape[0], r)), rng.standard_normal((r, W.shape[1]))
        assert fisher(W, G, C, U @ V) >= f0
        dU, dV = 1e-5 * rng.standard_normal(F.U.shape), 1e-5 * rng.standard_normal(F.V.shape)
        assert fisher(W, G, C, (F.U + dU) @ (F.V + dV)) >= f0 * (1 - 1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_low_rank_identity_gcov_is_svd_aa(seed):
    rng, W, _, C = problem((3, 3, 4, 2), seed)
    for r in (1, 3, 5):
        Fg = low_rank(W, r, cov=C, gcov=np.eye(W.shape[0]), gdamping=0.0)
        Fa = low_rank(W, r, cov=C)
        np.testing.assert_allclose(Fg.to_dense(), Fa.to_dense(), rtol=1e-9, atol=1e-10)
        # a Kronecker pair is accepted (formed densely)
        Fp = low_rank(W, r, cov=C, gcov=(np.eye(3), np.eye(4)), gdamping=0.0)
        np.testing.assert_allclose(Fp.to_dense(), Fa.to_dense(), rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- Kronecker G and C: closed form

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cov_kind", ["pair", "none"])
def test_two_sided_closed_form_error_identity(shape, seed, cov_kind):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    G1, G2, C1, C2 = spd(m1, rng), spd(m2, rng), spd(n1, rng), spd(n2, rng)
    cov = (C1, C2) if cov_kind == "pair" else None
    Sc = np.kron(sqrtm(C1), sqrtm(C2)) if cov is not None else np.eye(n1 * n2)
    s2 = np.linalg.svd(rearrange(np.kron(sqrtm(G1), sqrtm(G2)) @ W @ Sc, (m1, n1)), compute_uv=False) ** 2
    for r in sorted({1, 2, len(s2) - 1} - {0}):
        F = nearest_kronecker(W, (m1, n1), r, cov=cov, gcov=(G1, G2), damping=0.0, gdamping=0.0)
        assert F.info["objective"] == "fisher" and F.info["method"].startswith("two-sided-whitened")
        assert np.isclose(fisher(W, (G1, G2), cov, F.to_dense()), s2[r:].sum(), rtol=1e-6, atol=1e-9)
        assert np.isclose(F.info["relative_error"], np.sqrt(s2[r:].sum() / s2.sum()), atol=1e-7)
        assert np.isclose(relative_error(W, F, cov=cov, gcov=(G1, G2)), F.info["relative_error"], atol=1e-7)
    # the named function, with the lead's call form
    F2 = nearest_kronecker_kron_cov(W, (m1, n1), 1, cov, gcov=(G1, G2), damping=0.0, gdamping=0.0)
    assert np.isclose(fisher(W, (G1, G2), cov, F2.to_dense()), s2[1:].sum(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (3, 2, 2, 3)])
def test_closed_form_beats_two_sided_als_and_als_reaches_it(seed, shape):
    """Kronecker G and C passed DENSELY run the two-sided ALS: from random starts it never
    beats the closed form, and from the plain start it converges to it."""
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    G1, G2, C1, C2 = spd(m1, rng), spd(m2, rng), spd(n1, rng), spd(n2, rng)
    G, C = np.kron(G1, G2), np.kron(C1, C2)
    r = 2
    f_cf = fisher(W, G, C, nearest_kronecker(W, (m1, n1), r, cov=(C1, C2), gcov=(G1, G2), damping=0.0,
                                             gdamping=0.0).to_dense())
    for _ in range(3):
        F0 = KronFactors(rng.standard_normal((r, m1, n1)), rng.standard_normal((r, m2, n2)))
        hist = als_refine(W, C, F0, gcov=G, als_sweeps=200, tol=1e-12, solver="direct").history
        assert hist[-1] >= f_cf * (1 - 1e-7)
    F = nearest_kronecker(W, (m1, n1), r, cov=C, gcov=G, init="plain", damping=0.0, gdamping=0.0,
                          solver="direct", als_sweeps=3000, tol=1e-14)
    assert F.info["als"] == "two-sided"
    assert np.isclose(F.history[-1], f_cf, rtol=1e-6)
    # the "kronecker" start recovers G1 kron G2 and C1 kron C2 and is already the optimum
    Fk = nearest_kronecker(W, (m1, n1), r, cov=C, gcov=G, init="kronecker", damping=0.0, gdamping=0.0,
                           als_sweeps=0)
    assert np.isclose(Fk.history[0], f_cf, rtol=1e-6)


# ----------------------------------------------------------------------------- two-sided ALS, dense G and C

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_two_sided_als_monotone_and_beats_its_start(shape, seed, solver):
    m1, n1, m2, n2 = shape
    rng, W, G, C = problem(shape, seed)
    r = min(2, m1 * n1, m2 * n2)
    F = nearest_kronecker(W, (m1, n1), r, cov=C, gcov=G, solver=solver, als_sweeps=15, tol=1e-10)
    assert F.info["als"] == "two-sided" and F.info["solver"] == solver
    h = np.array(F.history)
    assert np.all(np.diff(h) <= 1e-10 * h[0]), h
    start = min(F.info["start_objectives"].values())
    assert np.isclose(h[0], start, rtol=1e-12)
    assert h[-1] < start * (1 - 1e-3)
    # the reported objective is the dense reference with the damped G and C
    Gd, Cd = damped(G, F.info["gdamping"]), damped(C, F.info["damping"])
    assert np.isclose(fisher(W, Gd, Cd, F.to_dense()), h[-1], rtol=1e-8)
    assert np.isclose(relative_error(W, F, cov=Cd, gcov=Gd), F.info["relative_error"], rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (3, 2, 2, 3)])
def test_direct_half_steps_are_exact_minimisers(seed, shape):
    """After an exact A-step (and, after a whole sweep, the B-step) no perturbation of the
    stepped factor lowers f; the objective is the dense trace."""
    from kronlab import FisherObjective, TwoSidedHalfStep

    m1, n1, m2, n2 = shape
    rng, W, G, C = problem(shape, seed)
    r = 2
    Wt, Gt, Ct = (torch.from_numpy(x) for x in (W, G, C))
    A0, B0 = torch.from_numpy(rng.standard_normal((r, m1, n1))), torch.from_numpy(rng.standard_normal((r, m2, n2)))
    obj = FisherObjective(Wt, Gt, Ct)
    prob = TwoSidedHalfStep(Gt, Ct, rearrange(obj.GWC, (m1, n1)), m1, n1, m2, n2)
    A1, _ = prob.solve_direct(B0, A0)
    f1 = obj(A1, B0)
    assert np.isclose(f1, fisher(W, G, C, kron_sum(A1.numpy(), B0.numpy())), rtol=1e-10)
    assert f1 <= obj(A0, B0)
    for _ in range(30):
        dA = 1e-4 * torch.from_numpy(rng.standard_normal(A1.shape))
        assert obj(A1 + dA, B0) >= f1 * (1 - 1e-10)
    F = als_refine(W, C, KronFactors(A0.numpy(), B0.numpy()), gcov=G, als_sweeps=1, tol=0.0, solver="direct")
    f = fisher(W, G, C, F.to_dense())
    assert np.isclose(f, F.history[-1], rtol=1e-9) and F.history[-1] <= F.history[0]
    for _ in range(30):  # B was stepped last: the re-orthogonalised factors span the same terms
        B = F.B + 1e-4 * rng.standard_normal(F.B.shape)
        assert fisher(W, G, C, kron_sum(F.A, B)) >= f * (1 - 1e-10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preconditioner", ["auto", "rows", "cols", "kron", "block"])
def test_cg_matches_direct_when_converged(seed, preconditioner):
    rng, W, G, C = problem((3, 4, 4, 3), seed)
    init = nearest_kronecker(W, (3, 4), 2)
    kw = {"gcov": G, "als_sweeps": 6, "tol": 0.0}
    Fd = als_refine(W, C, init, solver="direct", **kw)
    Fc = als_refine(W, C, init, solver="cg", cg_max_iter=400, cg_tol=1e-12,
                    preconditioner=preconditioner, **kw)
    np.testing.assert_allclose(Fc.history, Fd.history, rtol=1e-7)
    assert np.all(np.diff(Fc.history) <= 1e-12 * Fc.history[0])


def _gram_and_operators(shape, G, C, F):
    """The dense Gram M^T (G kron C) M of the A-step (M: X -> sum_i X_i kron F_i) and TwoSidedHalfStep."""
    from kronlab import TwoSidedHalfStep, kronecker_factor_cov

    p1, q1, p2, q2 = shape
    r = F.shape[0]
    N = r * p1 * q1
    M = np.stack([kron_sum(e.reshape(r, p1, q1), F).ravel() for e in np.eye(N)], 1)
    Gram = M.T @ np.kron(G, C) @ M
    Gt, Ct = torch.from_numpy(G), torch.from_numpy(C)
    prob = TwoSidedHalfStep(Gt, Ct, None, p1, q1, p2, q2, kronecker_factor_cov(Gt, p1, damping=0.0),
                     kronecker_factor_cov(Ct, q1, damping=0.0))
    return Gram, prob


@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (3, 1, 1, 4), (3, 2, 2, 3)])
def test_gram_operator_and_preconditioners_against_dense(shape):
    """gram() and gram_apply() are the dense normal-equation Gram; "rows"/"cols" invert its exact
    diagonal blocks; "kron" inverts the whole Gram when G and C are Kronecker; all are symmetric."""
    p1, q1, p2, q2 = shape
    rng = np.random.default_rng(0)
    r = 3
    G, C = spd(p1 * p2, rng), spd(q1 * q2, rng)
    F = rng.standard_normal((r, p2, q2))
    Gram, prob = _gram_and_operators(shape, G, C, F)
    Ft = torch.from_numpy(F)
    np.testing.assert_allclose(prob.gram(Ft).numpy(), Gram, rtol=1e-10, atol=1e-10 * np.abs(Gram).max())
    X = rng.standard_normal((r, p1, q1))
    np.testing.assert_allclose(prob.gram_apply(torch.from_numpy(X), Ft).numpy().ravel(), Gram @ X.ravel(),
                               rtol=1e-10, atol=1e-10 * np.abs(Gram).max())
    N = Gram.shape[0]

    def as_matrix(kind, pr=prob):
        P = pr.preconditioner(Ft, kind)
        return np.stack([P(torch.from_numpy(e.reshape(r, p1, q1))).numpy().ravel() for e in np.eye(N)], 1)

    G6 = Gram.reshape(r, p1, q1, r, p1, q1)
    for kind in ("rows", "cols", "block", "kron"):
        P = as_matrix(kind)
        np.testing.assert_allclose(P, P.T, atol=1e-12 * np.abs(P).max())
        assert np.linalg.eigvalsh(0.5 * (P + P.T)).min() > 0
    P6 = as_matrix("rows").reshape(r, p1, q1, r, p1, q1)
    for i in range(r):
        for a in range(p1):
            np.testing.assert_allclose(P6[i, a, :, i, a, :], np.linalg.inv(G6[i, a, :, i, a, :]), rtol=1e-6)
    P6 = as_matrix("cols").reshape(r, p1, q1, r, p1, q1)
    for i in range(r):
        for j in range(q1):
            np.testing.assert_allclose(P6[i, :, j, i, :, j], np.linalg.inv(G6[i, :, j, i, :, j]), rtol=1e-6)
    # Kronecker G and C: "kron" is the exact inverse
    G, C = np.kron(spd(p1, rng), spd(p2, rng)), np.kron(spd(q1, rng), spd(q2, rng))
    Gram, prob = _gram_and_operators(shape, G, C, F)
    np.testing.assert_allclose(as_matrix("kron", prob) @ Gram, np.eye(N), atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_identity_gcov_equals_one_sided(seed, solver):
    rng, W, _, C = problem((3, 2, 4, 3), seed)
    init = nearest_kronecker(W, (3, 2), 2)
    kw = {"als_sweeps": 5, "tol": 0.0, "solver": solver, "cg_max_iter": 200, "cg_tol": 1e-13}
    one = als_refine(W, C, init, **kw)
    two = als_refine(W, C, init, gcov=np.eye(12), **kw)
    np.testing.assert_allclose(two.history, one.history, rtol=1e-8)
    np.testing.assert_allclose(two.to_dense(), one.to_dense(), rtol=1e-6, atol=1e-8)
    # and through nearest_kronecker (same starts, same damping of C)
    a = nearest_kronecker(W, (3, 2), 2, cov=C, solver="direct", als_sweeps=4, tol=0.0)
    b = nearest_kronecker(W, (3, 2), 2, cov=C, gcov=np.eye(12), gdamping=0.0, solver="direct",
                          als_sweeps=4, tol=0.0)
    np.testing.assert_allclose(b.history, a.history, rtol=1e-8)
    assert b.info["start"] == a.info["start"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weights", ["g-pair/c-dense", "g-dense/c-none", "g-dense/c-pair"])
def test_one_sided_reductions_equal_the_two_sided_als(seed, weights):
    """Where one weight is Kronecker (or absent) nearest_kronecker solves the equivalent
    one-sided problem; the exact two-sided ALS on the dense weights takes the same steps."""
    m1, n1, m2, n2 = 3, 2, 2, 3
    rng, W, Gd_, Cd_ = problem((m1, n1, m2, n2), seed)
    G1, G2, C1, C2 = spd(m1, rng), spd(m2, rng), spd(n1, rng), spd(n2, rng)
    G, C = {"g-pair/c-dense": ((G1, G2), Cd_), "g-dense/c-none": (Gd_, None),
            "g-dense/c-pair": (Gd_, (C1, C2))}[weights]
    init = KronFactors(rng.standard_normal((2, m1, n1)), rng.standard_normal((2, m2, n2)))
    F = nearest_kronecker(W, (m1, n1), 2, cov=C, gcov=G, init=init, damping=0.0, gdamping=0.0,
                          solver="direct", als_sweeps=6, tol=0.0)
    assert F.info["als"].startswith("one-sided")
    Cm = np.eye(n1 * n2) if C is None else dense(C)
    ref = als_refine(W, Cm, init, gcov=dense(G), solver="direct", als_sweeps=6, tol=0.0)
    np.testing.assert_allclose(F.history, ref.history, rtol=1e-7)
    assert np.isclose(fisher(W, G, C, F.to_dense()), F.history[-1], rtol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("thin", ["column", "row"])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_low_rank_shapes_reach_the_two_sided_low_rank_optimum(seed, thin, solver):
    """a_shape (m, 1): A_i a column, B_i a row, W_hat = sum a_i b_i^T; (1, n) the transpose.
    There G = G1 kron G2 and C = C1 kron C2 trivially, so nearest_kronecker is the closed form
    and equals low_rank's; the two-sided ALS from the plain start reaches it to 1e-6."""
    rng = np.random.default_rng(seed)
    m, n, r = 8, 6, 2
    W = rng.standard_normal((m, n))
    G, C = spd(m, rng), spd(n, rng)
    a_shape = (m, 1) if thin == "column" else (1, n)
    best = fisher(W, G, C, low_rank(W, r, cov=C, gcov=G, damping=0.0, gdamping=0.0).to_dense())
    F = nearest_kronecker(W, a_shape, r, cov=C, gcov=G, damping=0.0, gdamping=0.0)
    assert F.info["method"].startswith("two-sided-whitened")
    assert np.isclose(fisher(W, G, C, F.to_dense()), best, rtol=1e-8)
    plain = nearest_kronecker(W, a_shape, r)
    Fa = als_refine(W, C, plain, gcov=G, solver=solver, als_sweeps=500, tol=1e-13, cg_max_iter=50,
                    cg_tol=1e-13)
    assert Fa.info["als"] == "two-sided"
    assert np.isclose(fisher(W, G, C, Fa.to_dense()), best, rtol=1e-6)


@pytest.mark.parametrize("a_shape", [(4, 1), (1, 3), (2, 1)])
def test_thin_shapes_with_dense_weights_are_one_sided(a_shape):
    """n1 = 1 (or m1 = 1, ...) makes C (or G) trivially Kronecker: the fit is the exact
    one-sided reduction, with the same steps as the exact two-sided ALS."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6))
    G, C = spd(8, rng), spd(6, rng)
    m1, n1 = a_shape
    init = KronFactors(rng.standard_normal((2, m1, n1)), rng.standard_normal((2, 8 // m1, 6 // n1)))
    F = nearest_kronecker(W, a_shape, 2, cov=C, gcov=G, init=init, damping=0.0, gdamping=0.0,
                          solver="direct", als_sweeps=5, tol=0.0)
    assert F.info["als"].startswith("one-sided")
    ref = als_refine(W, C, init, gcov=G, solver="direct", als_sweeps=5, tol=0.0)
    np.testing.assert_allclose(F.history, ref.history, rtol=1e-7, atol=1e-12 * ref.history[0])


def test_cg_with_kron_preconditioner_is_exact_at_low_rank_shapes():
    """At a_shape (m, 1) the Gram is G kron (Bhat C Bhat^T): "auto" picks "kron" and one CG
    step per half-step is the exact minimiser."""
    rng, W, G, C = problem((8, 1, 1, 6), 0)
    init = nearest_kronecker(W, (8, 1), 2)
    kw = {"gcov": G, "als_sweeps": 4, "tol": 0.0}
    Fd = als_refine(W, C, init, solver="direct", **kw)
    Fc = als_refine(W, C, init, solver="cg", cg_max_iter=1, **kw)
    assert Fc.info["preconditioner"] == "kron/kron"
    np.testing.assert_allclose(Fc.history, Fd.history, rtol=1e-8)


def test_warmup_sweep_is_kept_only_when_it_lowers_the_true_objective():
    rng, W, G, C = problem((3, 4, 4, 3), 0)
    F = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, solver="cg", als_sweeps=3, tol=0.0)
    assert F.info["sweeps"][0] == "one-sided" and F.info["sweeps"][1:] == ["two-sided"] * 2
    assert np.all(np.diff(F.history) <= 0)
    # at a two-sided stationary point the activation-aware sweep would raise f: it is dropped
    Fopt = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, solver="direct", als_sweeps=400, tol=1e-15)
    F2 = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, init=Fopt, solver="cg", warmup_sweeps=1,
                           als_sweeps=2, tol=0.0)
    assert "one-sided" not in F2.info["sweeps"]
    assert np.all(np.diff(F2.history) <= 1e-12 * F2.history[0])
    F3 = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, solver="cg", warmup_sweeps=0, als_sweeps=2)
    assert F3.info["sweeps"] == ["two-sided"] * len(F3.info["sweeps"])
    with pytest.raises(ValueError, match="warmup_sweeps must be"):
        nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, warmup_sweeps=-1)


# ----------------------------------------------------------------------------- API, damping, permutation

def test_start_only_and_given_init():
    """als_sweeps=0 returns the better start (the chooser's screening call); a KronFactors
    init is refined, also when only G is dense."""
    rng, W, G, C = problem((3, 2, 4, 3), 0)
    F = nearest_kronecker(W, (3, 2), 2, cov=C, gcov=G, init="best", als_sweeps=0)
    assert len(F.history) == 1 and F.history[0] == min(F.info["start_objectives"].values())
    assert F.info["start"] in ("plain", "kronecker")
    F2 = nearest_kronecker(W, (3, 2), 2, cov=C, gcov=G, init=KronFactors(F.A, F.B), als_sweeps=3)
    assert F2.info["start"] == "given" and np.isclose(F2.history[0], F.history[0], rtol=1e-10)
    assert F2.history[-1] <= F2.history[0]
    F3 = nearest_kronecker(W, (3, 2), 2, gcov=G, init=KronFactors(F.A, F.B), als_sweeps=2)
    assert F3.info["als"] == "one-sided, transposed" and F3.info["damping"] is None


def test_permute_acts_on_columns_only():
    rng, W, G, C = problem((3, 4, 4, 3), 0)
    F = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=G, permute="variance", als_sweeps=3)
    assert np.array_equal(F.perm, np.argsort(-np.diag(C), kind="stable"))
    Gd, Cd = damped(G, F.info["gdamping"]), damped(C, F.info["damping"])
    assert np.isclose(fisher(W, Gd, Cd, F.to_dense()), F.history[-1], rtol=1e-8)
    x = rng.standard_normal(12)
    np.testing.assert_allclose(F.to_dense() @ x, kron_sum(F.A, F.B) @ x[F.perm], atol=1e-10)
    # with a Kronecker-factored G (the one-sided route) the permutation is recorded as well
    Fp = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=(spd(3, rng), spd(4, rng)), permute="variance")
    assert np.array_equal(Fp.perm, F.perm)


@pytest.mark.parametrize("case", ["rank-deficient", "badly-scaled"])
def test_degenerate_gcov_is_damped_and_reported(case):
    rng, W, _, C = problem((3, 2, 4, 3), 0)
    if case == "rank-deficient":  # fewer gradient samples than outputs
        g = rng.standard_normal((3, 12))
        G = g.T @ g / 3
    else:
        G = spd(12, rng) * np.outer(s := 10.0 ** rng.uniform(-6, 6, 12), s)
    F = nearest_kronecker(W, (3, 2), 2, cov=C, gcov=G, als_sweeps=5)
    assert F.info["gdamping"] >= 1e-6 and np.all(np.isfinite(F.A)) and np.all(np.isfinite(F.B))
    assert np.all(np.diff(F.history) <= 1e-9 * F.history[0])
    L = low_rank(W, 3, cov=C, gcov=G)
    assert L.info["gdamping"] >= 1e-6 and np.all(np.isfinite(L.U))
    # the damped G is the one the fit measured
    assert np.isclose(fisher(W, damped(G, F.info["gdamping"]), damped(C, F.info["damping"]), F.to_dense()),
                      F.history[-1], rtol=1e-7)


def test_bad_gcov_inputs():
    W, C = np.ones((12, 6)), np.eye(6)
    form = "output-gradient covariance"
    with pytest.raises(ValueError, match=r"gcov has shape \(6, 6\); gcov must be the \(12, 12\) " + form):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=np.eye(6))
    with pytest.raises(ValueError, match=r"pair \(G1 \(3, 3\), G2 \(4, 4\)\)"):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=(np.eye(4), np.eye(3)))
    G = np.eye(12)
    G[0, 1] = 1.0
    with pytest.raises(ValueError, match="gcov is not symmetric.*" + form):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=G)
    with pytest.raises(ValueError, match="gcov has 1 NaN or Inf"):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=np.diag([np.nan] + [1.0] * 11))
    with pytest.raises(ValueError, match="gcov is not positive semidefinite.*" + form):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=-np.eye(12))
    with pytest.raises(ValueError, match="gcov is not positive semidefinite"):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=np.diag([1.0] * 11 + [-1.0]))
    with pytest.raises(ValueError, match=r"gcov\[1\] is not positive semidefinite"):
        nearest_kronecker(W, (3, 2), 1, cov=(np.eye(2), np.eye(3)), gcov=(np.eye(3), -np.eye(4)))
    with pytest.raises(ValueError, match="gcov is not positive semidefinite"):
        low_rank(W, 2, cov=C, gcov=-np.eye(12))
    with pytest.raises(ValueError, match=form):
        low_rank(W, 2, gcov=np.eye(5))
    with pytest.raises(ValueError, match=form):
        relative_error(W, np.zeros((12, 6)), gcov=np.eye(3))
    with pytest.raises(ValueError, match="needs a dense cov"):
        nearest_kronecker(W, (3, 2), 1, gcov=np.eye(12), permute="variance")
    with pytest.raises(ValueError, match="needs a dense cov"):
        nearest_kronecker(W, (3, 2), 1, cov=(np.eye(2), np.eye(3)), gcov=(np.eye(3), np.eye(4)),
                          permute=np.arange(6))
    with pytest.raises(ValueError, match="use nearest_kronecker for a dense gcov"):
        nearest_kronecker_kron_cov(W, (3, 2), 1, (np.eye(2), np.eye(3)), gcov=np.eye(12))
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        nearest_kronecker(W, (3, 2), 1, cov=C, gcov=np.eye(12) + 0.1, solver="cg", preconditioner="ilu")
    with pytest.raises(ValueError, match="init=KronFactors needs a dense cov or gcov"):
        nearest_kronecker(W, (3, 2), 1, cov=(np.eye(2), np.eye(3)), gcov=(np.eye(3), np.eye(4)),
                          init=KronFactors(np.ones((1, 3, 2)), np.ones((1, 4, 3))))


@pytest.mark.parametrize("gkind", ["pair", "dense"])
def test_kind_in_kind_out(gkind):
    rng, W, G, C = problem((3, 4, 4, 3), 0)
    g = (spd(3, rng), spd(4, rng)) if gkind == "pair" else G
    Fn = nearest_kronecker(W, (3, 4), 2, cov=C, gcov=g)
    assert isinstance(Fn.A, np.ndarray) and Fn.A.dtype == np.float64
    gt = tuple(torch.from_numpy(x) for x in g) if gkind == "pair" else torch.from_numpy(g)
    Ft = nearest_kronecker(torch.from_numpy(W).float(), (3, 4), 2, cov=torch.from_numpy(C), gcov=gt)
    assert isinstance(Ft.A, torch.Tensor) and Ft.A.dtype == torch.float32
    np.testing.assert_allclose(Ft.to_dense().numpy(), Fn.to_dense(), rtol=1e-3, atol=1e-3)
    Lt = low_rank(torch.from_numpy(W).float(), 2, cov=torch.from_numpy(C), gcov=gt)
    assert isinstance(Lt.U, torch.Tensor) and Lt.U.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_in_cuda_out():
    W = torch.randn(12, 12, device="cuda")
    G = torch.eye(12, device="cuda") + 0.1
    F = nearest_kronecker(W, (3, 4), 2, cov=torch.eye(12, device="cuda"), gcov=G, solver="cg")
    assert F.A.device.type == "cuda"
    assert low_rank(W, 3, gcov=G).U.device.type == "cuda"


# ----------------------------------------------------------------------------- properties

@settings(max_examples=20, deadline=None)
@given(m1=st.integers(1, 3), n1=st.integers(1, 3), m2=st.integers(1, 3), n2=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_property_closed_form_identity_and_monotone_als(m1, n1, m2, n2, seed, data):
    rng = np.random.default_rng(seed)
    m, n = m1 * m2, n1 * n2
    W = rng.standard_normal((m, n))
    r = data.draw(st.integers(1, min(m1 * n1, m2 * n2)))
    G1, G2, C1, C2 = spd(m1, rng), spd(m2, rng), spd(n1, rng), spd(n2, rng)
    F = nearest_kronecker(W, (m1, n1), r, cov=(C1, C2), gcov=(G1, G2), damping=0.0, gdamping=0.0,
                          method="exact")
    Wh = np.kron(sqrtm(G1), sqrtm(G2)) @ W @ np.kron(sqrtm(C1), sqrtm(C2))
    s2 = np.linalg.svd(rearrange(Wh, (m1, n1)), compute_uv=False) ** 2
    tot = s2.sum()
    assert np.isclose(fisher(W, (G1, G2), (C1, C2), F.to_dense()), s2[r:].sum(), rtol=1e-6, atol=1e-9 * tot)
    G, C = spd(m, rng), spd(n, rng)
    Fa = nearest_kronecker(W, (m1, n1), r, cov=C, gcov=G, als_sweeps=4, tol=0.0, solver="direct")
    Gd, Cd = damped(G, Fa.info["gdamping"]), damped(C, Fa.info["damping"])
    tot = fisher(W, Gd, Cd, 0 * W)
    h = np.array(Fa.history)
    assert np.all(np.diff(h) <= 1e-10 * h[:1].sum() + 1e-14 * tot)
    # (the closed forms' error comes from the discarded energy: good to ~1e-8 absolute)
    assert np.isclose(relative_error(W, Fa, cov=Cd, gcov=Gd), Fa.info["relative_error"], rtol=1e-6,
                      atol=1e-7)

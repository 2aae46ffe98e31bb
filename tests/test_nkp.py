"""nearest_kronecker and relative_error checked against dense references.

Dense references: ``np.kron`` sums, ``np.linalg.svd`` of the rearranged matrix, and the
output error ``tr(E C E^T)`` computed from a dense ``E``.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlab import (
    KronFactors,
    als_refine,
    kronecker_factor_cov,
    nearest_kronecker,
    rearrange,
    relative_error,
)

SHAPES = [(2, 3, 4, 2), (3, 3, 3, 3), (4, 2, 3, 5), (6, 4, 2, 3)]  # m1, n1, m2, n2
SEEDS = [0, 1, 2]


def kron_sum(A, B):
    return sum(np.kron(A[i], B[i]) for i in range(A.shape[0]))


def spd(n, rng, kind="general"):
    """A covariance X^T X / N with heavy-tailed channel scales and correlations."""
    X = rng.standard_normal((4 * n + 10, n)) @ rng.standard_normal((n, n))
    X *= np.exp(rng.standard_normal(n))
    return X.T @ X / X.shape[0]


def objective(W, C, F):
    E = W - F.to_dense()
    return float(np.trace(E @ C @ E.T))


def sq_svals(W, a_shape):
    return np.linalg.svd(rearrange(W, a_shape), compute_uv=False) ** 2


# ----------------------------------------------------------------------------- plain

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_recovers_planted_sum(shape, seed, method):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    r = min(2, m1 * n1, m2 * n2)
    A, B = rng.standard_normal((r, m1, n1)), rng.standard_normal((r, m2, n2))
    W = kron_sum(A, B)
    F = nearest_kronecker(W, (m1, n1), r, method=method)
    assert F.A.shape == (r, m1, n1) and F.B.shape == (r, m2, n2)
    np.testing.assert_allclose(F.to_dense(), W, atol=1e-9 * np.abs(W).max())
    assert relative_error(W, F) < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_plain_error_is_discarded_singular_values(shape, seed):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    s2 = sq_svals(W, (m1, n1))
    for r in range(1, len(s2) + 1):
        F = nearest_kronecker(W, (m1, n1), r, method="exact")
        err2 = np.linalg.norm(W - kron_sum(F.A, F.B)) ** 2
        assert np.isclose(err2, s2[r:].sum(), rtol=1e-8, atol=1e-10)
        assert np.isclose(relative_error(W, F), np.sqrt(s2[r:].sum() / s2.sum()), atol=1e-10)
        # balanced scales: ||A_i|| = ||B_i|| = sqrt(sigma_i)
        na, nb = np.linalg.norm(F.A, axis=(1, 2)), np.linalg.norm(F.B, axis=(1, 2))
        np.testing.assert_allclose(na, nb, rtol=1e-8)
        np.testing.assert_allclose(na * nb, np.sqrt(s2[:r]), rtol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_plain_optimum_is_not_improved_by_perturbation(seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((12, 15))
    F = nearest_kronecker(W, (3, 5), 2)
    f0 = np.linalg.norm(W - F.to_dense()) ** 2
    for _ in range(20):
        A = F.A + 1e-4 * rng.standard_normal(F.A.shape)
        B = F.B + 1e-4 * rng.standard_normal(F.B.shape)
        assert np.linalg.norm(W - kron_sum(A, B)) ** 2 >= f0 - 1e-12


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_randomized_matches_exact(seed, rank):
    rng = np.random.default_rng(seed)
    # decaying spectrum: planted terms of decreasing size plus noise
    r0 = 12
    A, B = rng.standard_normal((r0, 24, 24)), rng.standard_normal((r0, 24, 24))
    A *= (0.7 ** np.arange(r0))[:, None, None]
    W = kron_sum(A, B) + 1e-3 * rng.standard_normal((576, 576))
    ex = nearest_kronecker(W, (24, 24), rank, method="exact")
    fa = nearest_kronecker(W, (24, 24), rank, method="randomized")
    assert fa.info["method"] == "randomized"
    assert abs(relative_error(W, fa) - relative_error(W, ex)) < 1e-6


# ----------------------------------------------------------------------------- Kronecker-factored cov

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_kron_cov_closed_form_error_identity(shape, seed):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    C1, C2 = spd(n1, rng), spd(n2, rng)
    C = np.kron(C1, C2)
    # whitened matrix with the symmetric square roots
    def sqrtm(M):
        w, V = np.linalg.eigh(M)
        return (V * np.sqrt(w)) @ V.T
    Wh = W @ np.kron(sqrtm(C1), sqrtm(C2))
    s2 = sq_svals(Wh, (m1, n1))
    r = min(2, len(s2))
    F = nearest_kronecker(W, (m1, n1), r, cov=(C1, C2), damping=0.0)
    assert np.isclose(objective(W, C, F), s2[r:].sum(), rtol=1e-6, atol=1e-9)
    assert np.isclose(relative_error(W, F, cov=C), np.sqrt(s2[r:].sum() / s2.sum()), atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 2), (3, 2, 2, 4)])
def test_kron_cov_closed_form_beats_als_from_random_starts(seed, shape):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    C1, C2 = spd(n1, rng), spd(n2, rng)
    C = np.kron(C1, C2)
    r = 2
    F = nearest_kronecker(W, (m1, n1), r, cov=(C1, C2), damping=0.0)
    f_cf = objective(W, C, F)
    for _ in range(3):
        F0 = KronFactors(rng.standard_normal((r, m1, n1)), rng.standard_normal((r, m2, n2)))
        hist = als_refine(W, C, F0, als_sweeps=200, tol=1e-12, solver="direct").history
        assert hist[-1] >= f_cf * (1 - 1e-7)
    # and the closed form is stationary for ALS: a sweep does not lower it
    F2 = nearest_kronecker(W, (m1, n1), r, cov=C, damping=0.0, solver="direct", als_sweeps=3)
    assert F2.history[0] <= f_cf * (1 + 1e-7)
    assert F2.history[-1] >= f_cf * (1 - 1e-7)


# ----------------------------------------------------------------------------- ALS, general cov

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_als_monotone_and_beats_its_start(shape, seed, solver):
    m1, n1, m2, n2 = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    C = spd(n1 * n2, rng)
    r = min(2, m1 * n1, m2 * n2)
    F = nearest_kronecker(W, (m1, n1), r, cov=C, solver=solver, als_sweeps=15, tol=1e-10)
    h = np.array(F.history)
    assert np.all(np.diff(h) <= 1e-10 * h[0]), h
    start = min(F.info["start_objectives"].values())
    assert np.isclose(h[0], start)
    assert h[-1] < start * (1 - 1e-3)
    # reported objective == dense reference (with the damped C)
    Cd = C + F.info["damping"] * np.mean(np.diag(C)) * np.eye(C.shape[0])
    assert np.isclose(objective(W, Cd, F), h[-1], rtol=1e-8)
    assert np.isclose(relative_error(W, F, cov=Cd), F.info["relative_error"], rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_als_stationary_point_not_improved_by_perturbation(seed):
    rng = np.random.default_rng(seed)
    m1, n1, m2, n2 = 3, 2, 4, 3
    W = rng.standard_normal((m1 * m2, n1 * n2))
    C = spd(n1 * n2, rng)
    F = nearest_kronecker(W, (m1, n1), 2, cov=C, solver="direct", als_sweeps=2000, tol=1e-15,
                          damping=0.0)
    f0 = objective(W, C, F)
    for _ in range(30):
        A = F.A + 1e-5 * rng.standard_normal(F.A.shape)
        B = F.B + 1e-5 * rng.standard_normal(F.B.shape)
        assert objective(W, C, KronFactors(A, B)) >= f0 * (1 - 1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_cg_matches_direct_when_converged(seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((12, 12))
    C = spd(12, rng)
    kw = {"cov": C, "als_sweeps": 10, "tol": 0.0}
    Fd = nearest_kronecker(W, (3, 4), 2, solver="direct", **kw)
    Fc = nearest_kronecker(W, (3, 4), 2, solver="cg", cg_max_iter=200, cg_tol=1e-13, **kw)
    np.testing.assert_allclose(Fc.history, Fd.history, rtol=1e-7)


@pytest.mark.parametrize("zero_term", [False, True])
def test_cg_preconditioner_is_block_inverse_of_gram(zero_term):
    """Block-Jacobi: G_ii^{-1} on each term's block of the dense Gram; a zero term stays finite."""
    from kronlab import HalfStep

    rng = np.random.default_rng(0)
    p1, q1, p2, q2, r = 3, 4, 2, 5, 3
    C = torch.from_numpy(spd(q1 * q2, rng))
    W = torch.from_numpy(rng.standard_normal((p1 * p2, q1 * q2)))
    F = torch.from_numpy(rng.standard_normal((r, p2, q2)))
    if zero_term:
        F[1] = 0.0
    prob = HalfStep(C, rearrange(W @ C, (p1, q1)), p1, q1, p2, q2)
    G = prob.gram(F).reshape(r, q1, r, q1)
    R = torch.from_numpy(rng.standard_normal((p1, r, q1)))
    Z = prob._preconditioner(F)(R)
    assert torch.isfinite(Z).all()
    for i in range(r):
        if zero_term and i == 1:
            continue
        np.testing.assert_allclose(Z[:, i, :].numpy(), torch.linalg.solve(G[i, :, i, :], R[:, i, :].T).T.numpy(),
                                   rtol=1e-6, atol=1e-9)


def test_permute_variance_recorded_and_consistent():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 12))
    C = spd(12, rng)
    F = nearest_kronecker(W, (3, 4), 2, cov=C, permute="variance")
    assert np.array_equal(F.perm, np.argsort(-np.diag(C), kind="stable"))
    Cd = C + F.info["damping"] * np.mean(np.diag(C)) * np.eye(12)
    assert np.isclose(objective(W, Cd, F), F.history[-1], rtol=1e-8)
    # W_hat x = (sum A_i kron B_i) x[perm]
    x = rng.standard_normal(12)
    np.testing.assert_allclose(F.to_dense() @ x, kron_sum(F.A, F.B) @ x[F.perm], atol=1e-10)
    # explicit permutation array, same result
    F2 = nearest_kronecker(W, (3, 4), 2, cov=C, permute=F.perm)
    np.testing.assert_allclose(F2.history, F.history, rtol=1e-10)


def test_kronecker_factor_cov_exact_on_kronecker():
    rng = np.random.default_rng(0)
    C1, C2 = spd(3, rng), spd(4, rng)
    K1, K2 = kronecker_factor_cov(torch.from_numpy(np.kron(C1, C2)), 3, damping=0.0)
    np.testing.assert_allclose(np.kron(K1.numpy(), K2.numpy()), np.kron(C1, C2), rtol=1e-8, atol=1e-10)
    assert np.linalg.eigvalsh(K1.numpy()).min() > 0 and np.linalg.eigvalsh(K2.numpy()).min() > 0


def test_kronecker_factor_cov_large_is_nearest():
    """At n = 576, n1 = 24 the rank-1 SVD of R(C) (576 x 576) is randomized: still the optimum."""
    from kronlab.synthetic import realistic_cov

    C = torch.from_numpy(realistic_cov(576, seed=3)[0])
    K1, K2 = kronecker_factor_cov(C, 24, damping=0.0)
    s = torch.linalg.svdvals(rearrange(C, (24, 24)))
    best = float((s[1:] ** 2).sum().sqrt())  # ||C - nearest Kronecker product||_F (Van Loan)
    got = float((C - torch.kron(K1, K2)).norm())
    assert got <= best * (1 + 1e-6)


@settings(max_examples=25, deadline=None)
@given(m1=st.integers(1, 4), n1=st.integers(1, 4), m2=st.integers(1, 4), n2=st.integers(1, 4),
       seed=st.integers(0, 2**16), data=st.data())
def test_relative_error_fast_path_matches_dense(m1, n1, m2, n2, seed, data):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    r = data.draw(st.integers(1, min(m1 * n1, m2 * n2)))
    perm = rng.permutation(n1 * n2)
    F = KronFactors(rng.standard_normal((r, m1, n1)), rng.standard_normal((r, m2, n2)), perm=perm)
    D = F.to_dense()
    dense = np.linalg.norm(W - D) / np.linalg.norm(W)
    assert np.isclose(relative_error(W, F), dense, rtol=1e-8)
    assert np.isclose(relative_error(W, D), dense, rtol=1e-12)
    C = np.eye(n1 * n2)
    assert np.isclose(relative_error(W, F, cov=C), dense, rtol=1e-8)


# ----------------------------------------------------------------------------- kinds

@pytest.mark.parametrize("cov", [None, "kron", "dense"])
def test_kind_in_kind_out(cov):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 12))
    covs = {None: None, "kron": (spd(4, rng), spd(3, rng)), "dense": spd(12, rng)}
    c = covs[cov]
    Fn = nearest_kronecker(W, (3, 4), 2, cov=c)
    assert isinstance(Fn.A, np.ndarray) and Fn.A.dtype == np.float64
    ct = None if c is None else (tuple(torch.from_numpy(x) for x in c) if cov == "kron"
                                 else torch.from_numpy(c))
    Ft = nearest_kronecker(torch.from_numpy(W).float(), (3, 4), 2, cov=ct)
    assert isinstance(Ft.A, torch.Tensor) and Ft.A.dtype == torch.float32 and Ft.B.dtype == torch.float32
    assert isinstance(Ft.to_dense(), torch.Tensor)
    np.testing.assert_allclose(Ft.to_dense().numpy(), Fn.to_dense(), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_in_cuda_out():
    W = torch.randn(12, 12, device="cuda")
    F = nearest_kronecker(W, (3, 4), 2, cov=torch.eye(12, device="cuda"))
    assert F.A.device.type == "cuda"


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs():
    W = np.ones((6, 8))
    with pytest.raises(ValueError, match="m1 must be one of"):
        nearest_kronecker(W, (4, 2))
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        nearest_kronecker(W, (2, 2), 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nearest_kronecker(np.full((6, 8), np.nan), (2, 2))
    with pytest.raises(ValueError, match=r"expected the dense \(8, 8\)"):
        nearest_kronecker(W, (2, 2), cov=np.eye(6))
    with pytest.raises(ValueError, match=r"expected \(2, 2\) and \(4, 4\)"):
        nearest_kronecker(W, (2, 2), cov=(np.eye(4), np.eye(2)))
    C = np.eye(8)
    C[0, 1] = 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        nearest_kronecker(W, (2, 2), cov=C)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nearest_kronecker(W, (2, 2), cov=np.full((8, 8), np.inf))
    with pytest.raises(ValueError, match="permutation of range"):
        nearest_kronecker(W, (2, 2), cov=np.eye(8), permute=[0, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="needs a dense cov"):
        nearest_kronecker(W, (2, 2), permute="variance")
    with pytest.raises(ValueError, match="method must be"):
        nearest_kronecker(W, (2, 2), method="lanczos")
    with pytest.raises(ValueError, match="2-D"):
        nearest_kronecker(np.ones(8), (2, 2))


# ----------------------------------------------------------------------------- cases that failed before

def test_regression_zero_matrix():
    """A zero W has zero error, not NaN, and ALS stops at once."""
    W = np.zeros((6, 8))
    F = nearest_kronecker(W, (2, 2), 2, cov=np.eye(8))
    assert relative_error(W, F) == 0.0 and np.all(np.isfinite(F.A))


def test_regression_singular_cov_is_damped():
    """A rank-deficient C (fewer samples than channels) is damped, and the damping reported."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 12))
    C = X.T @ X / 3
    W = rng.standard_normal((12, 12))
    F = nearest_kronecker(W, (3, 4), 2, cov=C)
    assert F.info["damping"] >= 1e-6
    assert np.all(np.isfinite(F.A)) and np.all(np.diff(F.history) <= 1e-9 * F.history[0])

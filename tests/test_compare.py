"""fit_methods / method_errors: equal budgets, each method's objective, dense references."""

import numpy as np
import pytest

from kronlab import COMPARE_METHODS, fit_methods, method_errors, nearest_kronecker


def spd(n, rng):
    X = rng.standard_normal((3 * n, n)) @ rng.standard_normal((n, n))
    X *= np.exp(rng.standard_normal(n))
    return X.T @ X / X.shape[0]


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 36))
    return W, spd(36, rng)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_equal_parameter_budget(problem, rank):
    W, C = problem
    fits = fit_methods(W, (4, 6), rank, cov=C, methods=COMPARE_METHODS)
    assert list(fits) == list(COMPARE_METHODS)
    kron_params = rank * (4 * 6 + 6 * 6)
    for mth in ("kron", "kron-aa", "kron-aa-perm"):
        assert fits[mth].num_params == kron_params and fits[mth].rank == rank
    for mth in ("svd", "svd-aa"):
        # the largest low rank within the Kronecker sum's parameters
        assert fits[mth].num_params <= kron_params < fits[mth].num_params + sum(W.shape)


def test_errors_match_dense_references(problem):
    W, C = problem
    fits = fit_methods(W, (4, 6), 3, cov=C, methods=COMPARE_METHODS, als_sweeps=4)
    df = method_errors(W, fits, C).set_index("method")
    for mth, f in fits.items():
        E = W - f.to_dense()
        assert np.isclose(df.loc[mth, "e_W"], np.linalg.norm(E) / np.linalg.norm(W))
        assert np.isclose(df.loc[mth, "e_Y"], np.sqrt(np.trace(E @ C @ E.T) / np.trace(W @ C @ W.T)))
        assert np.isclose(df.loc[mth, "params"], f.num_params / W.size)
    # each method wins on its own objective
    assert df.loc["kron", "e_W"] <= df.loc["kron-aa", "e_W"] + 1e-12
    assert df.loc["kron-aa", "e_Y"] <= df.loc["kron", "e_Y"] + 1e-12
    assert df.loc["svd", "e_W"] <= df.loc["svd-aa", "e_W"] + 1e-12
    assert df.loc["svd-aa", "e_Y"] <= df.loc["svd", "e_Y"] + 1e-12


def test_isotropic_covariance_makes_aa_plain(problem):
    W, _ = problem
    fits = fit_methods(W, (4, 6), 2, cov=np.eye(36), als_sweeps=3)
    df = method_errors(W, fits, np.eye(36)).set_index("method")
    assert np.isclose(df.loc["kron", "e_Y"], df.loc["kron-aa", "e_Y"], rtol=1e-8)
    assert np.isclose(df.loc["svd", "e_Y"], df.loc["svd-aa", "e_Y"], rtol=1e-6)
    plain = nearest_kronecker(W, (4, 6), 2)
    assert np.allclose(fits["kron"].to_dense(), plain.to_dense())


def test_bad_input(problem):
    W, C = problem
    with pytest.raises(ValueError, match="valid: kron, kron-aa"):
        fit_methods(W, (4, 6), 1, cov=C, methods=["kron", "lora"])
    with pytest.raises(ValueError, match="rank must be a positive int"):
        fit_methods(W, (4, 6), 0, cov=C)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        fit_methods(W, (4, 6), 1.5, cov=C)
    with pytest.raises(ValueError, match="a_shape"):
        fit_methods(W, (5, 6), 1, cov=C)

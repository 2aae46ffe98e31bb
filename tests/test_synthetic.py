"""The synthetic generators produce what their docstrings promise."""

import numpy as np
import pytest

from kronlab import nearest_kronecker, rearrange
from kronlab.synthetic import (
    fit_power_law,
    isotropic_cov,
    kronecker_cov,
    planted_kronecker_sum,
    power_law_matrix,
    realistic_cov,
    sample_activations,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [1, 3])
def test_planted_sum_has_rank_r_rearrangement(seed, rank):
    W, W0 = planted_kronecker_sum((3, 4), (5, 2), rank, noise=0.0, seed=seed)
    assert np.array_equal(W, W0)
    s = np.linalg.svd(rearrange(W0, (3, 4)), compute_uv=False)
    assert s[rank] < 1e-10 * s[0]
    F = nearest_kronecker(W, (3, 4), rank)
    assert np.allclose(F.to_dense(), W0, atol=1e-10 * np.abs(W0).max())


def test_planted_noise_level():
    W, W0 = planted_kronecker_sum((8, 8), (8, 8), 2, noise=0.1, seed=0)
    ratio = np.linalg.norm(W - W0) / np.linalg.norm(W0)
    assert abs(ratio - 0.1) < 0.01


def test_power_law_spectrum():
    W = power_law_matrix(30, 20, exponent=1.0, seed=0)
    s = np.linalg.svd(W, compute_uv=False)
    ref = np.arange(1, 21) ** -1.0
    assert np.allclose(s / s[0], ref)
    assert np.isclose(np.linalg.norm(W), 1.0)


def test_covariances_are_spd():
    C1, C2 = kronecker_cov(4, 5, condition=50.0, seed=0)
    for C in (isotropic_cov(6), C1, C2, np.kron(C1, C2), realistic_cov(40, seed=1)[0]):
        assert np.allclose(C, C.T)
        assert np.linalg.eigvalsh(C).min() > 0
    assert np.isclose(np.linalg.cond(C1), 50.0)


def test_realistic_cov_outliers_dominate():
    C, out = realistic_cov(64, n_outliers=3, outlier_scale=50.0, seed=0)
    d = np.diag(C)
    assert len(out) == 3
    assert set(np.argsort(d)[-3:]) == set(out)


@pytest.mark.parametrize("kron", [False, True])
def test_sample_activations_second_moment(kron):
    C = kronecker_cov(3, 4, condition=10.0, seed=2) if kron else realistic_cov(12, seed=3)[0]
    X = sample_activations(C, 200_000, seed=0)
    Cd = np.kron(*C) if kron else C
    assert np.allclose(X.T @ X / X.shape[0], Cd, atol=0.02 * np.abs(Cd).max())


def test_fit_power_law_exact():
    p, c = fit_power_law([8, 16, 32, 64], [2.0 * s ** 2.5 for s in (8, 16, 32, 64)])
    assert np.isclose(p, 2.5) and np.isclose(c, 2.0)
    with pytest.raises(ValueError):
        fit_power_law([4, 4], [1.0, 2.0])

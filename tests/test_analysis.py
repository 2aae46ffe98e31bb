"""kronlab.analysis: spectra and Kronecker-likeness of covariances."""

import numpy as np
import pytest

import kronlab
from kronlab import analysis


def _spd(n, rng):
    G = rng.standard_normal((n, 2 * n))
    return G @ G.T / (2 * n) + 0.1 * np.eye(n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kronecker_likeness_zero_for_kronecker_product(seed):
    rng = np.random.default_rng(seed)
    C = np.kron(_spd(3, rng), _spd(4, rng))
    assert analysis.kronecker_likeness(C, 3) < 1e-7


@pytest.mark.parametrize("seed", [0, 1])
def test_kronecker_likeness_matches_nearest_kronecker(seed):
    """kappa equals the distance to the rank-1 Van Loan-Pitsianis optimum."""
    rng = np.random.default_rng(seed)
    C = _spd(12, rng)
    F = kronlab.nearest_kronecker(C, (3, 3), 1)
    direct = np.linalg.norm(C - F.to_dense()) / np.linalg.norm(C)
    assert analysis.kronecker_likeness(C, 3) == pytest.approx(direct, rel=1e-8)


def test_kronecker_likeness_variance_permutation_recovers_structure():
    """A Kronecker covariance with shuffled channels is recovered by sorting variances,
    when the variances are distinct and ordered consistently with the Kronecker grid."""
    C1, C2 = np.diag([100.0, 10.0, 1.0]), np.diag([8.0, 4.0, 2.0, 1.5])
    C = np.kron(C1, C2)
    p = np.random.default_rng(0).permutation(12)
    Cs = C[p][:, p]
    assert analysis.kronecker_likeness(Cs, 3) > 0.1
    assert analysis.kronecker_likeness(Cs, 3, permute="variance") < 1e-10


def test_kronecker_likeness_bad_n1():
    with pytest.raises(ValueError, match="valid n1"):
        analysis.kronecker_likeness(np.eye(6), 4)


def test_diagonal_outlier_ratio():
    C = np.diag([1.0, 2.0, 3.0, 40.0, 2.0])
    assert analysis.diagonal_outlier_ratio(C) == pytest.approx(20.0)


@pytest.mark.parametrize("a_shape", [None, (2, 3), (4, 2)])
@pytest.mark.parametrize("with_cov", [False, True])
def test_energy_curve_matches_fitted_error(a_shape, with_cov):
    """1 - E(r) is the squared relative error of the exact optimum (plain, svd-aa, and
    kron-aa's closed form when C is a Kronecker product)."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 12))
    n1 = 3 if a_shape is None else a_shape[1]
    cov = np.kron(_spd(n1, rng), _spd(12 // n1, rng)) if with_cov else None
    curve = analysis.energy_curve(W, a_shape, cov)
    r = 2
    if a_shape is None:
        fit = kronlab.low_rank(W, r, cov=cov)
        per = 8 + 12
    else:
        c = None if cov is None else (kronlab.kronecker_factor_cov(cov, a_shape[1]))
        c = None if c is None else (c[0].numpy(), c[1].numpy())
        fit = kronlab.nearest_kronecker(W, a_shape, r, cov=c)
        per = a_shape[0] * a_shape[1] + (8 // a_shape[0]) * (12 // a_shape[1])
    err = float(kronlab.relative_error(W, fit, cov=cov))
    row = curve.iloc[r - 1]
    assert row["params"] == r * per
    assert row["error"] == pytest.approx(err, rel=1e-5, abs=1e-6)
    assert np.all(np.diff(curve.energy) >= -1e-12) and curve.energy.iloc[-1] == pytest.approx(1.0)


def test_rearranged_spectrum_planted():
    W = np.kron(np.arange(6.0).reshape(2, 3), np.eye(4))
    s = analysis.rearranged_spectrum(W, (2, 3))
    assert s[0] > 0 and np.allclose(s[1:], 0, atol=1e-6)


def test_divisor_near():
    assert analysis.divisor_near(576, 24) == 24
    assert analysis.divisor_near(1536, 1536 ** 0.5) in (32, 48)
    assert analysis.divisor_near(7, 3) == 1 or analysis.divisor_near(7, 3) == 7


def test_names():
    from kronlab.models import block_index, layer_type

    assert layer_type("model.layers.3.mlp.up_proj") == "mlp.up_proj"
    assert layer_type("transformer.h.1.attn.c_proj") != layer_type("transformer.h.1.mlp.c_proj")
    assert block_index("model.layers.3.mlp.up_proj") == 3
    assert block_index("lm_head") is None and layer_type("lm_head") == "lm_head"

"""choose_kron: budgets respected, predicted error equals the realised one, clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlab import choose_kron, factor_shapes, kron_cost, nearest_kronecker, relative_error


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("frac", [0.1, 0.3, 0.6])
def test_choice_is_best_feasible_and_prediction_exact(seed, frac):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((24, 36))
    budget = frac * W.size
    ch = choose_kron(W, param_budget=budget, min_factor_dim=1)
    assert ch.params <= budget
    F = nearest_kronecker(W, ch.a_shape, ch.rank, method="exact")
    assert F.num_params == ch.params and F.forward_macs == ch.macs
    assert np.isclose(relative_error(W, F), ch.error, atol=1e-7)
    # brute force over every non-trivial shape and rank
    best = np.inf
    for a in factor_shapes(*W.shape):
        m2, n2 = W.shape[0] // a[0], W.shape[1] // a[1]
        for r in range(1, min(a[0] * a[1], m2 * n2) + 1):
            if kron_cost(a[0], a[1], m2, n2, r)[0] <= budget:
                best = min(best, relative_error(W, nearest_kronecker(W, a, r, method="exact")))
    assert ch.error <= best + 1e-7


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), pfrac=st.floats(0.05, 1.0), mfrac=st.floats(0.05, 1.0))
def test_macs_budget_respected(seed, pfrac, mfrac):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((16, 24))
    try:
        ch = choose_kron(W, param_budget=pfrac * W.size, macs_budget=mfrac * W.size, min_factor_dim=2)
    except ValueError as e:
        assert "no candidate" in str(e)
        return
    assert ch.params <= pfrac * W.size and ch.macs <= mfrac * W.size
    for row in ch.table:
        assert row["params"] <= pfrac * W.size and row["macs"] <= mfrac * W.size


def test_with_cov_predictor_exact_for_kronecker_cov():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((12, 12))
    C1 = np.diag(rng.uniform(0.5, 2, 3))
    C2 = np.diag(rng.uniform(0.5, 2, 4))
    ch = choose_kron(W, param_budget=60, cov=np.kron(C1, C2), shapes=[(3, 3), (4, 3), (3, 4)])
    assert ch.predictor == "whitened-kronecker-cov"
    if ch.a_shape == (3, 4):  # the only shape whose n1 matches the planted C1
        F = nearest_kronecker(W, ch.a_shape, ch.rank, cov=(C1, C2), damping=0.0)
        assert np.isclose(relative_error(W, F, cov=np.kron(C1, C2)), ch.error, atol=1e-5)


def test_errors():
    W = np.ones((16, 16))
    with pytest.raises(ValueError, match="no candidate a_shape and rank fits"):
        choose_kron(W, param_budget=3)
    with pytest.raises(ValueError, match="m1 must be one of"):
        choose_kron(W, param_budget=100, shapes=[(3, 4)])
    with pytest.raises(ValueError, match="param_budget must be positive"):
        choose_kron(W, param_budget=0)

"""choose_kron: budgets respected, predicted error equals the realised one, clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch

from kronlab import (
    choose_kron,
    factor_shapes,
    kron_cost,
    low_rank,
    nearest_kronecker,
    relative_error,
)


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


def _layer(m, n, seed):
    """A weight with column scales and a covariance with outlier channels (like an LLM's)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)) * rng.uniform(0.2, 2.0, n)
    X = rng.standard_normal((4 * n, n)) * np.exp(rng.standard_normal(n))
    return W, X.T @ X / len(X)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("permute", [None, "variance"])
def test_choice_error_is_the_measured_error_of_the_fit(seed, permute):
    W, C = _layer(12, 24, seed)
    ch = choose_kron(W, param_budget=0.5 * W.size, cov=C, permute=permute, screen=None)
    assert ch.params <= 0.5 * W.size and ch.factors.num_params == ch.params
    assert np.isclose(ch.error, relative_error(W, ch.factors, cov=C), rtol=1e-10)
    measured = [r for r in ch.table if r["start_error"] is not None]
    assert len(measured) == len(ch.table)  # screen=None: every candidate measured
    # the winner is no worse than any candidate's start or refined fit
    for r in measured:
        assert ch.error <= min(e for e in (r["start_error"], r["final_error"]) if e is not None) + 1e-12
    assert ch.predictor == "output" and ch.seconds > 0


def test_start_error_is_full_cov_not_kronecker_metric():
    """The table's start_error is measured under the full C: refitting the start reproduces it."""
    W, C = _layer(12, 24, 3)
    ch = choose_kron(W, param_budget=0.4 * W.size, cov=C, screen=None, top_k=1)
    for r in ch.table[:5]:
        F = nearest_kronecker(W, r["a_shape"], r["rank"], cov=C, als_sweeps=0)
        assert np.isclose(r["start_error"], relative_error(W, F, cov=C), rtol=1e-8)


def test_screen_keeps_low_rank_extremes():
    W, C = _layer(16, 24, 4)
    ch = choose_kron(W, param_budget=0.6 * W.size, cov=C, screen=2, top_k=1)
    kept = {r["a_shape"] for r in ch.table if r["start_error"] is not None}
    assert {(16, 1), (1, 24)} <= kept and len(kept) <= 4


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), frac=st.floats(0.1, 0.9),
       shape=st.sampled_from([(8, 12), (12, 8), (6, 16), (16, 16)]))
def test_low_rank_extreme_is_svd_aa(seed, frac, shape):
    """kron-aa at a_shape (m, 1) reaches the whitened low-rank optimum (svd-aa)."""
    m, n = shape
    W, C = _layer(m, n, seed)
    k = max(1, int(frac * min(m, n)))
    F = nearest_kronecker(W, (m, 1), k, cov=C, damping=1e-12)
    e_kron = relative_error(W, F, cov=C)
    e_svd = relative_error(W, low_rank(W, k, cov=C, damping=1e-12), cov=C)
    assert abs(e_kron - e_svd) <= 1e-6 * max(e_svd, 1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.floats(0.15, 0.95),
       shape=st.sampled_from([(8, 12), (12, 8), (16, 16), (6, 24)]))
def test_compress_layer_kron_aa_never_worse_than_svd_aa(seed, ratio, shape):
    from kronlab.compress import compress_layer

    W, C = _layer(*shape, seed)
    Wt, Ct = torch.from_numpy(W), torch.from_numpy(C)
    try:
        _, rk = compress_layer(Wt, None, method="kron-aa", ratio=ratio, cov=Ct)
        _, rs = compress_layer(Wt, None, method="svd-aa", ratio=ratio, cov=Ct)
    except ValueError as e:  # ratio below one rank-1 low-rank term
        assert "leaves less than one rank-1 term" in str(e) or "no candidate" in str(e)
        return
    assert rk.params <= ratio * W.size
    assert rk.output_error <= rs.output_error * (1 + 1e-9) + 1e-12


def test_errors():
    W = np.ones((16, 16))
    with pytest.raises(ValueError, match="no candidate a_shape and rank fits"):
        choose_kron(W, param_budget=3)
    with pytest.raises(ValueError, match="m1 must be one of"):
        choose_kron(W, param_budget=100, shapes=[(3, 4)])
    with pytest.raises(ValueError, match="param_budget must be positive"):
        choose_kron(W, param_budget=0)

"""low_rank (plain and activation-aware SVD-LLM whitening) against dense references."""

import numpy as np
import pytest
import torch

from kronlab import low_rank, low_rank_rank_for_budget, relative_error

SHAPES = [(8, 5), (6, 12), (20, 20)]


def spd(n, rng):
    X = rng.standard_normal((3 * n, n)) @ rng.standard_normal((n, n))
    X *= np.exp(rng.standard_normal(n))
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_error_is_discarded_singular_values(shape, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    s = np.linalg.svd(W, compute_uv=False)
    for r in range(1, min(shape) + 1):
        F = low_rank(W, r)
        assert F.U.shape == (shape[0], r) and F.V.shape == (r, shape[1])
        assert np.isclose(np.linalg.norm(W - F.U @ F.V) ** 2, (s[r:] ** 2).sum(), atol=1e-9)
        assert F.num_params == r * sum(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_error_identity_and_beats_plain(shape, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    C = spd(shape[1], rng)
    L = np.linalg.cholesky(C)
    s = np.linalg.svd(W @ L, compute_uv=False)
    for r in range(1, min(shape)):
        F = low_rank(W, r, cov=C, damping=0.0)
        E = W - F.to_dense()
        assert np.isclose(np.trace(E @ C @ E.T), (s[r:] ** 2).sum(), rtol=1e-6, atol=1e-9)
        assert relative_error(W, F, cov=C) <= relative_error(W, low_rank(W, r), cov=C) + 1e-12


def test_recovers_planted_low_rank_and_randomized_matches():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((600, 6)) @ rng.standard_normal((6, 700))
    for method in ["exact", "randomized"]:
        F = low_rank(W, 6, method=method)
        assert relative_error(W, F) < 1e-10


def test_kinds():
    W = torch.randn(10, 8, dtype=torch.float32)
    F = low_rank(W, 3, cov=torch.eye(8))
    assert isinstance(F.U, torch.Tensor) and F.U.dtype == torch.float32
    Fn = low_rank(W.numpy(), 3)
    assert isinstance(Fn.U, np.ndarray)


def test_budget_helper_and_bad_inputs():
    assert low_rank_rank_for_budget(10, 20, 95) == 3
    assert low_rank_rank_for_budget(10, 20, 10**6) == 10
    with pytest.raises(ValueError, match="below the 30 parameters"):
        low_rank_rank_for_budget(10, 20, 29)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\]"):
        low_rank(np.ones((5, 7)), 6)
    with pytest.raises(ValueError, match=r"expected \(7, 7\)"):
        low_rank(np.ones((5, 7)), 2, cov=np.eye(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        low_rank(np.full((5, 7), np.nan), 2)

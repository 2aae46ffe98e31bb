"""The Van Loan-Pitsianis rearrangement: isometry, inverse, Kronecker -> rank one."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlab import KronFactors, factor_shapes, inverse_rearrange, rearrange

dims = st.integers(1, 5)


@settings(max_examples=40, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, seed=st.integers(0, 2**16))
def test_kron_maps_to_outer_product(m1, n1, m2, n2, seed):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((m1, n1)), rng.standard_normal((m2, n2))
    R = rearrange(np.kron(A, B), (m1, n1))
    np.testing.assert_allclose(R, np.outer(A.ravel(), B.ravel()), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, seed=st.integers(0, 2**16))
def test_isometry_and_inverse(m1, n1, m2, n2, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m1 * m2, n1 * n2))
    R = rearrange(W, (m1, n1))
    assert R.shape == (m1 * n1, m2 * n2)
    assert np.isclose(np.linalg.norm(R), np.linalg.norm(W))
    np.testing.assert_array_equal(inverse_rearrange(R, (m1, n1), (m2, n2)), W)
    # ||W - A kron B||_F == ||R(W) - vec A vec B^T||_F
    A, B = rng.standard_normal((m1, n1)), rng.standard_normal((m2, n2))
    assert np.isclose(np.linalg.norm(W - np.kron(A, B)),
                      np.linalg.norm(R - np.outer(A.ravel(), B.ravel())))


@pytest.mark.parametrize("shape,a_shape", [((6, 8), (2, 4)), ((12, 10), (3, 5)), ((4, 9), (4, 3))])
def test_torch_matches_numpy(shape, a_shape):
    W = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    Rt = rearrange(torch.from_numpy(W), a_shape)
    assert isinstance(Rt, torch.Tensor)
    np.testing.assert_array_equal(Rt.numpy(), rearrange(W, a_shape))
    b_shape = (shape[0] // a_shape[0], shape[1] // a_shape[1])
    np.testing.assert_array_equal(inverse_rearrange(Rt, a_shape, b_shape).numpy(), W)


def test_whitening_identity_row_major():
    """(A kron B)(S1 kron S2) = (A S1) kron (B S2), the identity the whitened solver relies on."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((2, 5))
    S1, S2 = rng.standard_normal((4, 4)), rng.standard_normal((5, 5))
    np.testing.assert_allclose(np.kron(A, B) @ np.kron(S1, S2), np.kron(A @ S1, B @ S2), atol=1e-12)


def test_to_dense_matches_kron_sum_with_perm():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((3, 2, 3)), rng.standard_normal((3, 4, 2))
    perm = rng.permutation(6)
    K = sum(np.kron(A[i], B[i]) for i in range(3))
    F = KronFactors(A, B, perm=perm)
    D = F.to_dense()
    np.testing.assert_allclose(D[:, perm], K, atol=1e-12)
    x = rng.standard_normal(6)
    np.testing.assert_allclose(D @ x, K @ x[perm], atol=1e-12)


def test_bad_shapes():
    with pytest.raises(ValueError, match="m1 must be one of"):
        rearrange(np.zeros((6, 8)), (4, 2))
    with pytest.raises(ValueError, match="must be"):
        inverse_rearrange(np.zeros((3, 3)), (2, 2), (2, 2))
    assert (1, 1) not in factor_shapes(4, 6) and (4, 6) not in factor_shapes(4, 6)
    assert (1, 1) in factor_shapes(4, 6, include_trivial=True)

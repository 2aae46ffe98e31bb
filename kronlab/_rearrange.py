"""The Van Loan-Pitsianis rearrangement and the valid factor shapes."""

from __future__ import annotations

__all__ = ["check_a_shape", "divisors", "factor_shapes", "inverse_rearrange", "rearrange"]


def divisors(k: int) -> list[int]:
    """The positive divisors of ``k`` in increasing order.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [d for d in range(1, k + 1) if k % d == 0]


def check_a_shape(shape, a_shape) -> tuple[int, int, int, int]:
    """Validate ``a_shape = (m1, n1)`` against a matrix shape (m, n); return (m1, n1, m2, n2)."""
    m, n = int(shape[0]), int(shape[1])
    try:
        m1, n1 = (int(v) for v in a_shape)
    except (TypeError, ValueError):
        raise ValueError(f"a_shape must be a pair (m1, n1) of positive integers, got {a_shape!r}") from None
    if m1 < 1 or n1 < 1 or m % m1 or n % n1:
        raise ValueError(
            f"a_shape={tuple(a_shape)} does not divide the matrix shape {(m, n)}: "
            f"m1 must be one of {divisors(m)} and n1 one of {divisors(n)}"
        )
    return m1, n1, m // m1, n // n1


def rearrange(W, a_shape):
    """The rearrangement R(W) of Van Loan and Pitsianis (1993).

    For W of shape (m1*m2, n1*n2) made of m1 x n1 blocks W_ij (m2 x n2),
    R(W) has shape (m1*n1, m2*n2) with row ``i*n1 + j`` equal to the row-major
    ravel of W_ij. Then, with row-major ``vec``,
    ``||W - A kron B||_F = ||R(W) - vec(A) vec(B)^T||_F``, and R is linear and
    an isometry (a permutation of entries).

    Works on numpy arrays and torch tensors (a reshape and a transpose, no copy
    beyond what the transpose needs).

    >>> import numpy as np
    >>> rearrange(np.zeros((6, 8)), (2, 4)).shape
    (8, 6)
    """
    m1, n1, m2, n2 = check_a_shape(W.shape, a_shape)
    R = W.reshape(m1, m2, n1, n2)
    R = R.transpose(1, 2) if hasattr(R, "permute") else R.transpose(0, 2, 1, 3)
    return R.reshape(m1 * n1, m2 * n2)


def inverse_rearrange(R, a_shape, b_shape):
    """Inverse of :func:`rearrange`: the (m1*m2, n1*n2) matrix whose R is ``R``."""
    m1, n1 = (int(v) for v in a_shape)
    m2, n2 = (int(v) for v in b_shape)
    if tuple(R.shape) != (m1 * n1, m2 * n2):
        raise ValueError(
            f"R has shape {tuple(R.shape)}; for a_shape={(m1, n1)} and b_shape={(m2, n2)} "
            f"it must be {(m1 * n1, m2 * n2)}"
        )
    W = R.reshape(m1, n1, m2, n2)
    W = W.transpose(1, 2) if hasattr(W, "permute") else W.transpose(0, 2, 1, 3)
    return W.reshape(m1 * m2, n1 * n2)


def factor_shapes(m: int, n: int, *, include_trivial: bool = False) -> list[tuple[int, int]]:
    """Every valid ``a_shape = (m1, n1)`` for an m x n matrix.

    The trivial splits where A or B is 1 x 1 (the Kronecker product is then
    a scaled copy of W) are left out unless ``include_trivial``.

    >>> factor_shapes(4, 6)[:3]
    [(1, 2), (1, 3), (1, 6)]
    """
    if int(m) < 1 or int(n) < 1:
        raise ValueError(f"m and n must be positive integers, got {(m, n)}")
    out = []
    for m1 in divisors(m):
        for n1 in divisors(n):
            trivial = (m1 * n1 == 1) or (m1 == m and n1 == n)
            if trivial and not include_trivial:
                continue
            out.append((m1, n1))
    return out

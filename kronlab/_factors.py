"""Containers for factored approximations of a weight matrix.

``KronFactors`` holds ``W_hat = sum_i A[i] kron B[i]`` (optionally with an input
channel permutation); ``LowRankFactors`` holds ``W_hat = U @ V``. Both keep the
arrays in the kind (numpy or torch) and device they were computed for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["KronFactors", "LowRankFactors", "kron_cost", "kron_order_macs", "low_rank_cost"]


def kron_order_macs(m1: int, n1: int, m2: int, n2: int, rank: int, order: str) -> int:
    """Multiply-adds per input vector of ``sum_i (A_i kron B_i) x`` in one contraction order.

    With x reshaped row-major to X (n1 x n2), ``(A kron B) x = vec(A X B^T)``:
    ``"a_first"`` = ``(A X) B^T`` costs ``r m1 n2 (n1 + m2)``; ``"b_first"`` =
    ``A (X B^T)`` costs ``r m2 n1 (n2 + m1)``. Compare with ``m n`` for a dense layer.
    """
    if order == "a_first":
        return int(rank * m1 * n2 * (n1 + m2))
    if order == "b_first":
        return int(rank * m2 * n1 * (n2 + m1))
    raise ValueError(f"order must be 'a_first' or 'b_first', got {order!r}")


def kron_cost(m1: int, n1: int, m2: int, n2: int, rank: int) -> tuple[int, int]:
    """``(params, macs)`` of a rank-``rank`` Kronecker sum: ``r (m1 n1 + m2 n2)`` numbers and
    the multiply-adds per token of the cheaper contraction order (:func:`kron_order_macs`).

    >>> kron_cost(24, 24, 24, 24, 1)          # one 576 x 576 term: 1152 numbers
    (1152, 27648)
    """
    params = int(rank * (m1 * n1 + m2 * n2))
    macs = min(kron_order_macs(m1, n1, m2, n2, rank, "a_first"),
               kron_order_macs(m1, n1, m2, n2, rank, "b_first"))
    return params, macs


def low_rank_cost(m: int, n: int, rank: int) -> tuple[int, int]:
    """``(params, macs)`` of ``U V`` with U (m, rank), V (rank, n): both ``rank (m + n)``."""
    return int(rank * (m + n)), int(rank * (m + n))


@dataclass
class KronFactors:
    """A sum of Kronecker products ``W_hat = (sum_i A[i] kron B[i]) P^T``.

    Attributes
    ----------
    A : array, shape (rank, m1, n1)
    B : array, shape (rank, m2, n2)
    perm : int array of shape (n,) or None
        Input-channel permutation with ``W[:, perm] ~ sum_i A[i] kron B[i]``, so
        that ``W_hat @ x == (sum_i A[i] kron B[i]) @ x[perm]`` (a gather at run
        time). ``None`` means the identity.
    singular_values : array or None
        Singular values of the (possibly whitened) rearranged matrix that
        produced the factors, all of them when known (not only the kept ones).
    history : list of float
        Objective values per iteration for iterative solvers (ALS), else empty.
    info : dict
        Solver details (method, damping, iterations, timings).
    """

    A: Any
    B: Any
    perm: Any = None
    singular_values: Any = None
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def a_shape(self) -> tuple[int, int]:
        return int(self.A.shape[1]), int(self.A.shape[2])

    @property
    def b_shape(self) -> tuple[int, int]:
        return int(self.B.shape[1]), int(self.B.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (m, n) = (m1*m2, n1*n2) of the approximated matrix."""
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return m1 * m2, n1 * n2

    @property
    def num_params(self) -> int:
        """Stored numbers: rank * (m1*n1 + m2*n2) (the permutation is integer metadata)."""
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return kron_cost(m1, n1, m2, n2, self.rank)[0]

    @property
    def forward_macs(self) -> int:
        """Multiply-adds per input vector of the cheaper contraction order (:func:`kron_cost`)."""
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return kron_cost(m1, n1, m2, n2, self.rank)[1]

    def to_dense(self):
        """The dense ``m x n`` matrix ``W_hat`` in the original column order.

        Formed as ``R^{-1}(vec(A)^T vec(B))``: one (m1 n1, r) x (r, m2 n2) product
        (cost ``r*m*n``), no explicit Kronecker products.
        """
        from ._rearrange import inverse_rearrange

        r = self.rank
        Ahat = self.A.reshape(r, -1)
        Bhat = self.B.reshape(r, -1)
        K = inverse_rearrange(Ahat.T @ Bhat, self.a_shape, self.b_shape)
        if self.perm is None:
            return K
        if isinstance(K, torch.Tensor):
            inv = torch.argsort(torch.as_tensor(self.perm, device=K.device))
        else:
            inv = np.argsort(np.asarray(self.perm))
        return K[:, inv]

    def truncate(self, rank: int) -> KronFactors:
        """The first ``rank`` terms (terms are ordered by decreasing importance)."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank must be in [1, {self.rank}], got {rank}")
        return KronFactors(self.A[:rank], self.B[:rank], self.perm, self.singular_values,
                           list(self.history), dict(self.info))


@dataclass
class LowRankFactors:
    """A low-rank product ``W_hat = U @ V`` with U (m, rank) and V (rank, n)."""

    U: Any
    V: Any
    singular_values: Any = None
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[1])

    @property
    def num_params(self) -> int:
        return low_rank_cost(*self.shape, self.rank)[0]

    @property
    def forward_macs(self) -> int:
        return low_rank_cost(*self.shape, self.rank)[1]

    def to_dense(self):
        return self.U @ self.V

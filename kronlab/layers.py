"""Drop-in ``nn.Module`` replacements for a dense linear layer.

``KronLinear`` computes ``y = x W_hat^T + bias`` with
``W_hat = (sum_i A_i kron B_i) P^T`` without ever forming ``W_hat``: with a
token ``x`` (length ``n = n1*n2``) reshaped row-major to ``X`` (n1 x n2),
``(A kron B) x = vec(A X B^T)`` (row-major ``vec``), so a token costs two small
matrix products instead of one ``m x n`` product. ``LowRankLinear`` computes
``y = (x V^T) U^T + bias``.

Both accept any leading batch dimensions, ``(..., n) -> (..., m)``, any floating
dtype, and any device (move them with ``.to()``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._factors import KronFactors, LowRankFactors, kron_order_macs, low_rank_cost

__all__ = ["KronLinear", "LowRankLinear"]

_ORDERS = ("auto", "a_first", "b_first")


def _as_tensor(x, *, dtype=None, device=None):
    """A torch tensor from a numpy array or tensor (a copy, detached)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype).clone()


def _factor_dtype(x, dtype):
    if dtype is not None:
        return dtype
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _init_factor_pair(P, Q, bias, in_features: int, rank: int) -> None:
    """Normal factors whose product has ``Var(W_hat_ij) = 1/(3n)``, as ``nn.Linear``'s init."""
    std = (1.0 / (3.0 * in_features * rank)) ** 0.25
    with torch.no_grad():
        nn.init.normal_(P, std=std)
        nn.init.normal_(Q, std=std)
        if bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(bias, -bound, bound)


class KronLinear(nn.Module):
    r"""Linear layer with weight ``W_hat = (sum_i A_i kron B_i) P^T``.

    ``forward(x) = x[..., perm] @ (sum_i A_i kron B_i)^T + bias``.

    Parameters
    ----------
    rank : int
        Number of Kronecker terms r.
    a_shape, b_shape : (int, int)
        ``(m1, n1)`` and ``(m2, n2)``; the layer maps ``n = n1*n2`` features to
        ``m = m1*m2``.
    bias : bool
        Whether the layer has a learnable bias of shape (m,).
    permuted : bool
        Whether the layer gathers its input with a permutation buffer ``perm``
        (shape (n,), ``W[:, perm] ~ sum_i A_i kron B_i``) before the product.
    order : {"auto", "a_first", "b_first"}
        Contraction order. Per token, ``(A X) B^T`` ("a_first") costs
        ``r*m1*n2*(n1 + m2)`` multiply-adds and ``A (X B^T)`` ("b_first")
        ``r*m2*n1*(n2 + m1)``; "auto" takes the cheaper one (a dense layer costs
        ``m*n``).
    chunk_bytes : int
        On the CPU, tokens are processed in chunks whose intermediate product
        takes about this many bytes (at least 16 tokens), so that it stays in
        cache between the two matrix products, which are then compute-bound
        rather than memory-bound (2-3x faster on a 2-core EPYC, 1 MiB L2 per
        core). On other devices chunks are at least 256 MiB.

    Attributes
    ----------
    A : Parameter, shape (rank, m1, n1)
    B : Parameter, shape (rank, m2, n2)
    bias : Parameter of shape (m,) or None
    perm : buffer of shape (n,) (int64) or None

    Examples
    --------
    >>> layer = KronLinear(4, (8, 6), (3, 2))
    >>> layer(torch.zeros(5, 7, 12)).shape
    torch.Size([5, 7, 24])
    >>> layer.to_dense().shape
    torch.Size([24, 12])
    """

    def __init__(self, rank: int, a_shape, b_shape, *, bias: bool = True,
                 permuted: bool = False, order: str = "auto", chunk_bytes: int = 1 << 20,
                 device=None, dtype=None):
        super().__init__()
        rank = int(rank)
        (m1, n1), (m2, n2) = (tuple(int(v) for v in s) for s in (a_shape, b_shape))
        if rank < 1 or min(m1, n1, m2, n2) < 1:
            raise ValueError(f"rank and all factor dimensions must be positive, got rank={rank}, "
                             f"a_shape={(m1, n1)}, b_shape={(m2, n2)}")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        self.rank, self.a_shape, self.b_shape = rank, (m1, n1), (m2, n2)
        self.in_features, self.out_features = n1 * n2, m1 * m2
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.bias = nn.Parameter(torch.empty(m1 * m2, **kw)) if bias else None
        self.register_buffer(
            "perm", torch.arange(n1 * n2, device=device) if permuted else None)
        self.chunk_bytes = int(chunk_bytes)
        self.order = order
        self.reset_parameters()

    # -- construction -------------------------------------------------------

    def reset_parameters(self) -> None:
        """Random init with ``Var(W_hat_ij) = 1/(3n)`` like ``nn.Linear``'s."""
        _init_factor_pair(self.A, self.B, self.bias, self.in_features, self.rank)

    @classmethod
    def from_factors(cls, factors: KronFactors, bias=None, *, dtype=None, device=None,
                     order: str = "auto", chunk_bytes: int = 1 << 20) -> KronLinear:
        """The layer computing ``factors``' ``W_hat`` (numpy or torch factors).

        ``dtype=None`` keeps the factors' floating dtype; ``device=None`` their device.
        """
        dtype = _factor_dtype(factors.A, dtype)
        A = _as_tensor(factors.A, dtype=dtype, device=device)
        B = _as_tensor(factors.B, dtype=dtype, device=device if device is not None else A.device)
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
            raise ValueError(f"A must be (rank, m1, n1) and B (rank, m2, n2) with the same rank, "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        layer = cls(A.shape[0], A.shape[1:], B.shape[1:], bias=bias is not None,
                    permuted=factors.perm is not None, order=order, chunk_bytes=chunk_bytes,
                    device=A.device, dtype=dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                b = _as_tensor(bias, dtype=dtype, device=A.device).reshape(-1)
                if b.shape[0] != layer.out_features:
                    raise ValueError(f"bias has {b.shape[0]} entries, the layer has "
                                     f"{layer.out_features} outputs")
                layer.bias.copy_(b)
            if factors.perm is not None:
                p = _as_tensor(factors.perm, dtype=torch.long, device=A.device).reshape(-1)
                n = layer.in_features
                if p.shape[0] != n or not torch.equal(torch.sort(p).values,
                                                       torch.arange(n, device=p.device)):
                    raise ValueError(f"perm must be a permutation of range({n})")
                layer.perm.copy_(p)
        return layer

    # -- costs --------------------------------------------------------------

    @property
    def order(self) -> str:
        """The contraction order in use, "a_first" or "b_first"."""
        return self._order

    @order.setter
    def order(self, value: str) -> None:
        if value not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {value!r}")
        if value == "auto":
            a, b = self.order_macs("a_first"), self.order_macs("b_first")
            value = "a_first" if a <= b else "b_first"
        self._order = value

    def order_macs(self, order: str) -> int:
        """Multiply-adds per token of one contraction order."""
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return kron_order_macs(m1, n1, m2, n2, self.rank, order)

    @property
    def forward_macs(self) -> int:
        """Multiply-adds per token of the order in use (bias and gather not counted)."""
        return self.order_macs(self.order)

    @property
    def num_params(self) -> int:
        """``rank*(m1*n1 + m2*n2)`` plus the bias; the permutation is integer metadata."""
        return self.A.numel() + self.B.numel() + (0 if self.bias is None else self.bias.numel())

    # -- computation --------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """The (m, n) weight ``W_hat`` in the original column order (detached)."""
        with torch.no_grad():
            return KronFactors(self.A.detach(), self.B.detach(), self.perm).to_dense()

    def _chunk_tokens(self, x: torch.Tensor) -> int:
        (m1, n1), (m2, n2), r = self.a_shape, self.b_shape, self.rank
        inter = r * (m1 * n2 if self.order == "a_first" else n1 * m2)
        # On accelerators chunks only bound the memory of the intermediate.
        budget = self.chunk_bytes if x.device.type == "cpu" else max(self.chunk_bytes, 1 << 28)
        return max(16, budget // max(1, inter * x.element_size()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2), r = self.a_shape, self.b_shape, self.rank
        n, m = self.in_features, self.out_features
        if x.shape[-1] != n:
            raise ValueError(f"input has {x.shape[-1]} features, KronLinear expects {n}")
        lead = x.shape[:-1]
        x = x.reshape(-1, n)
        T = x.shape[0]
        perm = self.perm
        # Stacked factors laid out so that each product reads its operands
        # contiguously and no intermediate needs a transposing copy.
        if self.order == "a_first":
            # X_t (n1, n2): [A stacked (m1*r, n1) @ X_t] -> (T, m1, r, n2) -> (T*m1, r*n2) @ (r*n2, m2)
            f1 = self.A.permute(1, 0, 2).reshape(m1 * r, n1)
            f2 = self.B.permute(0, 2, 1).reshape(r * n2, m2)

            def block(xc, out=None):
                t = xc.shape[0]
                z = torch.matmul(f1, xc.view(t, n1, n2))
                return torch.matmul(z.view(t * m1, r * n2), f2,
                                    out=None if out is None else out.view(t * m1, m2))
        else:
            # (T*n1, n2) @ (n2, r*m2) -> (T, n1*r, m2); [A stacked (m1, n1*r) @ Z_t] -> (T, m1, m2)
            f1 = self.B.permute(2, 0, 1).reshape(n2, r * m2)
            f2 = self.A.permute(1, 2, 0).reshape(m1, n1 * r)

            def block(xc, out=None):
                t = xc.shape[0]
                z = torch.matmul(xc.view(t * n1, n2), f1)
                return torch.matmul(f2, z.view(t, n1 * r, m2),
                                    out=None if out is None else out.view(t, m1, m2))

        def prepare(xc):  # the gather runs per chunk, so its output is still cached
            return (xc.index_select(1, perm) if perm is not None else xc).contiguous()

        # Chunks of tokens keep the intermediate product in cache (see chunk_bytes).
        chunk = self._chunk_tokens(x)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or self.A.requires_grad or self.B.requires_grad
            or (self.bias is not None and self.bias.requires_grad))
        if T <= chunk:
            y = block(prepare(x)).reshape(T, m)
        elif grad:
            y = torch.cat([block(prepare(x[s:s + chunk])).reshape(-1, m)
                           for s in range(0, T, chunk)])
        else:
            y = x.new_empty(T, m)
            for s in range(0, T, chunk):
                block(prepare(x[s:s + chunk]), out=y[s:s + chunk])
        if self.bias is not None:
            y = y + self.bias if grad else y.add_(self.bias)
        return y.reshape(*lead, m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, a_shape={self.a_shape}, b_shape={self.b_shape}, "
                f"bias={self.bias is not None}, permuted={self.perm is not None}, "
                f"order={self.order!r}")


class LowRankLinear(nn.Module):
    """Linear layer with weight ``W_hat = U V``: ``forward(x) = (x V^T) U^T + bias``.

    Parameters ``U`` (m, rank) and ``V`` (rank, n); ``rank*(m + n)`` multiply-adds
    per token.

    >>> LowRankLinear(3, 10, 6)(torch.zeros(2, 10)).shape
    torch.Size([2, 6])
    """

    def __init__(self, rank: int, in_features: int, out_features: int, *, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.rank, self.in_features, self.out_features = int(rank), int(in_features), int(out_features)
        if min(self.rank, self.in_features, self.out_features) < 1:
            raise ValueError(f"rank, in_features and out_features must be positive, got "
                             f"{(rank, in_features, out_features)}")
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(self.out_features, self.rank, **kw))
        self.V = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with ``Var(W_hat_ij) = 1/(3n)`` like ``nn.Linear``'s."""
        _init_factor_pair(self.U, self.V, self.bias, self.in_features, self.rank)

    @classmethod
    def from_factors(cls, factors: LowRankFactors, bias=None, *, dtype=None,
                     device=None) -> LowRankLinear:
        """The layer computing ``factors.U @ factors.V`` (numpy or torch factors)."""
        dtype = _factor_dtype(factors.U, dtype)
        U = _as_tensor(factors.U, dtype=dtype, device=device)
        V = _as_tensor(factors.V, dtype=dtype, device=U.device)
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"U must be (m, rank) and V (rank, n), got {tuple(U.shape)} "
                             f"and {tuple(V.shape)}")
        layer = cls(U.shape[1], V.shape[1], U.shape[0], bias=bias is not None,
                    device=U.device, dtype=dtype)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                b = _as_tensor(bias, dtype=dtype, device=U.device).reshape(-1)
                if b.shape[0] != layer.out_features:
                    raise ValueError(f"bias has {b.shape[0]} entries, the layer has "
                                     f"{layer.out_features} outputs")
                layer.bias.copy_(b)
        return layer

    @property
    def num_params(self) -> int:
        """``rank*(m + n)`` plus the bias."""
        return self.U.numel() + self.V.numel() + (0 if self.bias is None else self.bias.numel())

    @property
    def forward_macs(self) -> int:
        """Multiply-adds per token, ``rank*(m + n)`` (:func:`kronlab.low_rank_cost`)."""
        return low_rank_cost(self.out_features, self.in_features, self.rank)[1]

    def to_dense(self) -> torch.Tensor:
        """The (m, n) weight ``U V`` (detached)."""
        with torch.no_grad():
            return self.U @ self.V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")

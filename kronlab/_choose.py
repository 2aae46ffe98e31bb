"""Choosing the factor shape and rank of a Kronecker approximation under budgets."""

from __future__ import annotations

from dataclasses import dataclass, field


from ._factors import kron_cost
from ._linalg import check_cov, check_finite, psd_sqrt_pair, sq_singular_values, to_work
from ._nkp import kronecker_factor_cov, whiten_kron
from ._rearrange import check_a_shape, factor_shapes, rearrange

__all__ = ["KronChoice", "choose_kron"]


@dataclass
class KronChoice:
    """The chosen ``a_shape`` and ``rank`` and the table of every candidate considered.

    ``error`` is the predicted relative (output) error, ``params = rank*(m1 n1 + m2 n2)``,
    ``macs`` the forward multiply-adds per token. ``table`` has one dict per candidate
    shape with its best feasible rank (keys a_shape, b_shape, rank, error, params, macs).
    """

    a_shape: tuple
    rank: int
    error: float
    params: int
    macs: int
    predictor: str
    table: list = field(default_factory=list)


def choose_kron(W, *, param_budget, macs_budget=None, cov=None, shapes=None,
                min_factor_dim: int = 4, device=None) -> KronChoice:
    r"""Pick ``a_shape = (m1, n1)`` and ``rank`` minimising the predicted error within budgets.

    For every candidate shape, the squared singular values ``sigma_i^2`` of one rearranged
    matrix give the error of every rank at once (Eckart-Young):
    ``err(r)^2 = sum_{i > r} sigma_i^2 / sum_i sigma_i^2``. The largest rank with
    ``r (m1 n1 + m2 n2) <= param_budget`` (and, if given, forward multiply-adds
    ``min(r m1 n2 (n1 + m2), r m2 n1 (n2 + m1)) <= macs_budget``) is kept per shape, and the
    shape with the lowest error wins (ties: fewer parameters).

    Predictor: with ``cov=None`` the plain ``R(W)`` (exact). With ``cov = C`` the whitened
    ``R(W (C1 kron C2)^{1/2})`` under the nearest Kronecker factorisation ``C ~ C1 kron C2``
    for that shape's n1: exact when C is Kronecker, otherwise the error of the closed-form
    start; ALS (:func:`nearest_kronecker`) typically ends below it, so it ranks shapes
    rather than promising the final error.

    Parameters
    ----------
    W : (m, n) array
    param_budget : number of stored parameters allowed
    macs_budget : multiply-adds per token allowed, or None
    cov : None or dense (n, n) covariance
    shapes : iterable of a_shapes to consider; default: every ``(m1, n1)`` from
        :func:`factor_shapes` with all of m1, n1, m2, n2 >= ``min_factor_dim``
    device : torch device for the computation

    Cost: per shape one Gram product of R (<= sqrt(m n) * m n) and its eigenvalues
    (<= (m n)^{3/2}); a few seconds on 2 CPU cores for 1536 x 576 (210 default shapes).
    """
    Wt = to_work(W, device, name="W")
    if Wt.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {tuple(Wt.shape)}")
    check_finite(Wt, "W")
    m, n = Wt.shape
    if not param_budget > 0:
        raise ValueError(f"param_budget must be positive, got {param_budget!r}")
    if shapes is None:
        shapes = [(a, b) for a, b in factor_shapes(m, n)
                  if min(a, b, m // a, n // b) >= min_factor_dim]
    else:
        shapes = [tuple(int(v) for v in s) for s in shapes]
        for s in shapes:
            check_a_shape((m, n), s)
    C = None if cov is None else check_cov(to_work(cov, Wt.device, name="cov"), n)
    whitened: dict = {}
    table = []
    for (m1, n1) in shapes:
        m2, n2 = m // m1, n // n1
        p1 = m1 * n1 + m2 * n2
        rmax = min(m1 * n1, m2 * n2, int(param_budget // p1))
        if macs_budget is not None:
            per = kron_cost(m1, n1, m2, n2, 1)[1]
            rmax = min(rmax, int(macs_budget // per))
        if rmax < 1:
            continue
        if C is None:
            Wx = Wt
        else:
            if n1 not in whitened:
                C1, C2 = kronecker_factor_cov(C, n1)
                S1, _, _ = psd_sqrt_pair(C1)
                S2, _, _ = psd_sqrt_pair(C2)
                whitened[n1] = whiten_kron(Wt, S1, S2)
            Wx = whitened[n1]
        s2 = sq_singular_values(rearrange(Wx, (m1, n1)))
        tot = float(s2.sum())
        kept = float(s2[:rmax].sum())
        err = (max(tot - kept, 0.0) / tot) ** 0.5 if tot > 0 else 0.0
        params, macs = kron_cost(m1, n1, m2, n2, rmax)
        table.append({"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": rmax, "error": err,
                      "params": params, "macs": macs})
    if not table:
        smallest = min((kron_cost(a, b, m // a, n // b, 1) for a, b in shapes), default=None)
        raise ValueError(
            f"no candidate a_shape and rank fits param_budget={param_budget}"
            + (f" and macs_budget={macs_budget}" if macs_budget is not None else "")
            + (f"; the cheapest rank-1 candidate needs params={smallest[0]}, macs={smallest[1]}"
               if smallest else "; no candidate shapes (lower min_factor_dim or pass shapes)"))
    best = min(table, key=lambda row: (row["error"], row["params"]))
    return KronChoice(a_shape=best["a_shape"], rank=best["rank"], error=best["error"],
                      params=best["params"], macs=best["macs"],
                      predictor="plain" if C is None else "whitened-kronecker-cov", table=table)

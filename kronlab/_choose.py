"""Choosing the factor shape and rank of a Kronecker approximation under budgets.

The family ``W_hat = sum_i A_i kron B_i`` with ``A_i`` (m1 x n1) runs over every pair of
divisors ``(m1, n1)`` of ``(m, n)``. Its thin members are other structures under one name:
``a_shape = (m, 1)`` or ``(1, n)`` makes each term a rank-1 matrix, so low rank is the
family's own special case; ``(m1, 1)`` stacks scaled copies of one ``m2 x n`` block per
term (block low rank across row blocks), ``(1, n1)`` the same across column blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ._factors import KronFactors, kron_cost
from ._linalg import check_cov, check_finite, psd_sqrt_pair, sq_singular_values, to_work
from ._nkp import (
    kronecker_factor_cov,
    nearest_kronecker,
    nearest_kronecker_plain,
    parse_permutation,
    relative_error,
    whiten_kron,
)
from ._rearrange import check_a_shape, factor_shapes, rearrange
from .defaults import ALS_SWEEPS, CHOOSER_SCREEN, CHOOSER_TOP_K, DAMPING

__all__ = ["SHAPE_CLASSES", "KronChoice", "choose_kron", "is_low_rank_shape", "shape_class"]

#: what :func:`shape_class` returns
SHAPE_CLASSES = ("low-rank", "thin", "balanced")


@dataclass
class KronChoice:
    """The chosen ``a_shape`` and ``rank``, the fit, and every candidate considered.

    ``error`` is the measured relative error of ``factors`` (the returned fit) under the
    objective it was chosen for: ``relative_error(W, factors, cov=C, gcov=G)``.
    ``params = rank (m1 n1 + m2 n2)``; ``macs`` are the forward multiply-adds per token.
    ``table`` has one dict per candidate shape (at its largest feasible rank) with keys
    ``a_shape``, ``b_shape``, ``rank``, ``params``, ``macs``, ``predicted`` (the cheap
    screening error, see :func:`choose_kron`), ``start_error`` (the measured error of the
    closed-form start; None if the candidate was screened out) and ``final_error`` (after
    ALS; None if not refined). ``seconds`` is the whole cost of choosing and fitting.
    """

    a_shape: tuple
    rank: int
    error: float
    params: int
    macs: int
    predictor: str
    table: list = field(default_factory=list)
    factors: KronFactors | None = None
    seconds: float = 0.0


def is_low_rank_shape(shape, a_shape) -> bool:
    """True when ``a_shape`` makes every Kronecker term a rank-1 matrix: ``(m, 1)`` or ``(1, n)``.

    >>> is_low_rank_shape((6, 4), (6, 1)), is_low_rank_shape((6, 4), (3, 2))
    (True, False)
    """
    m, n = int(shape[0]), int(shape[1])
    return tuple(int(v) for v in a_shape) in ((m, 1), (1, n))


def shape_class(shape, a_shape) -> str:
    """``"low-rank"`` for ``(m, 1)``/``(1, n)``, ``"thin"`` when another factor dimension is 1,
    else ``"balanced"``.

    >>> [shape_class((8, 6), a) for a in [(8, 1), (2, 1), (4, 3)]]
    ['low-rank', 'thin', 'balanced']
    """
    m, n = int(shape[0]), int(shape[1])
    m1, n1 = (int(v) for v in a_shape)
    if is_low_rank_shape((m, n), (m1, n1)):
        return "low-rank"
    return "thin" if 1 in (m1, n1, m // m1, n // n1) else "balanced"


def _spectrum_errors(Wt, shapes, ranks, C, G, damping):
    """Screening errors: Eckart-Young on ``R(G~^{1/2} W C~^{1/2})`` with ``C~ = C1 kron C2``,
    ``G~ = G1 kron G2`` the nearest Kronecker factorisations (exact errors when C and G are
    None or Kronecker; otherwise an error in another metric, used only to screen)."""
    m, n = Wt.shape
    out = []
    roots_g: dict = {}
    whitened: dict = {}  # W (C1 kron C2)^{1/2} depends on n1 only: one per n1 (<= 21 here)
    for (m1, n1), r in zip(shapes, ranks, strict=True):
        if n1 not in whitened:
            Wx = Wt
            if C is not None:
                C1, C2 = kronecker_factor_cov(C, n1, damping=damping)
                Wx = whiten_kron(Wx, psd_sqrt_pair(C1, damping)[0], psd_sqrt_pair(C2, damping)[0])
            whitened[n1] = Wx
        Wx = whitened[n1]
        if G is not None:  # left side, not cached (one m x n matrix per shape would add up)
            if m1 not in roots_g:
                G1, G2 = kronecker_factor_cov(G, m1, damping=damping)
                roots_g[m1] = (psd_sqrt_pair(G1, damping)[0], psd_sqrt_pair(G2, damping)[0])
            Wx = whiten_kron(Wx.T, *roots_g[m1]).T
        s2 = sq_singular_values(rearrange(Wx, (m1, n1)))
        tot = float(s2.sum())
        out.append((max(tot - float(s2[:r].sum()), 0.0) / tot) ** 0.5 if tot > 0 else 0.0)
    return out


def choose_kron(W, *, param_budget, macs_budget=None, cov=None, gcov=None, shapes=None,
                permute=None, screen: int | None = CHOOSER_SCREEN, top_k: int = CHOOSER_TOP_K,
                als_sweeps: int = ALS_SWEEPS, damping: float = DAMPING,
                min_factor_dim: int = 1, device=None) -> KronChoice:
    r"""Pick ``a_shape = (m1, n1)`` and ``rank``, and fit, minimising the true error within budgets.

    Objective (the one the fit minimises): ``||W - W_hat||_F`` (``cov=None``),
    ``tr(E C E^T)`` (``cov=C``) or ``tr(G E C E^T)`` (``cov=C, gcov=G``), ``E = W - W_hat``.

    1. **Candidates**: every ``(m1, n1)`` of :func:`kronlab.factor_shapes` (the thin shapes
       and the low-rank extremes ``(m, 1)``, ``(1, n)`` included; ``min_factor_dim`` > 1
       drops shapes with a factor dimension below it), each at its largest rank with
       ``r (m1 n1 + m2 n2) <= param_budget`` and, if given, forward multiply-adds
       ``<= macs_budget``.
    2. **Screening** (only when there are more than ``screen`` candidates): Eckart-Young
       errors of the whitened ``R(W)`` under the nearest Kronecker factorisations
       ``C ~ C1 kron C2`` (and ``G ~ G1 kron G2``), one Gram eigendecomposition per shape.
       This is exact for ``cov=None``, for Kronecker-structured C and G, and for the
       shapes where a factor of the covariance is a scalar (``n1 = 1`` or ``n1 = n``, and
       ``m1 = 1`` or ``m1 = m`` for G), and optimistic otherwise: the ``screen`` best
       shapes of each group (exact, optimistic), plus the low-rank extremes, go on.
       ``screen=None`` keeps every candidate.
    3. **Ranking by the true objective**: each remaining shape's closed-form start (the
       better of the plain and the Kronecker-whitened closed forms, as
       ``nearest_kronecker(init="best")`` chooses) is measured under the FULL C (and G),
       never the ``C1 kron C2`` metric.
    4. **Refinement**: ALS (``als_sweeps``) on the ``top_k`` best starts (other than the
       low-rank extremes, whose start is already optimal); the returned fit
       is the one with the lowest measured error among all starts and refined fits, so a
       Kronecker sum is never worse than the low-rank extreme it contains (itself exactly
       the whitened low rank, svd-aa, when C is given: n1 = 1 makes ``C1 kron C2 = C``).

    With ``cov=None`` steps 2-4 collapse: the spectrum errors are exact and the winner is
    fitted by Van Loan-Pitsianis. ``permute`` (with ``cov``) reorders the input channels
    first (see :func:`kronlab.nearest_kronecker`); the returned ``factors`` carry it.

    Parameters
    ----------
    W : (m, n) array
    param_budget : stored numbers allowed
    macs_budget : multiply-adds per token allowed, or None
    cov : None or dense (n, n) input covariance
    gcov : None or dense (m, m) output-gradient covariance (needs ``cov``)
    shapes : a_shapes to consider instead of every valid one
    screen, top_k : candidates kept after screening, and refined by ALS
    als_sweeps, damping : as in :func:`kronlab.nearest_kronecker`
    device : torch device for the computation

    Returns a :class:`KronChoice`; its ``error`` equals
    ``relative_error(W, choice.factors, cov=cov, gcov=gcov)``.

    Cost: screening, per shape one Gram product of R (<= sqrt(m n) m n) and its
    eigenvalues; ranking, per kept shape two truncated SVDs and one objective
    (``m n^2 + m^2 n``); refinement, ``top_k`` ALS fits.
    """
    t0 = time.perf_counter()
    Wt = to_work(W, device, name="W")
    if Wt.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix (m, n), got shape {tuple(Wt.shape)}")
    check_finite(Wt, "W")
    m, n = Wt.shape
    if not param_budget > 0:
        raise ValueError(f"param_budget must be positive, got {param_budget!r}")
    if macs_budget is not None and not macs_budget > 0:
        raise ValueError(f"macs_budget must be positive or None, got {macs_budget!r}")
    if gcov is not None and cov is None:
        raise ValueError("gcov (the output-gradient covariance) needs cov (the input covariance)")
    for name, v in (("top_k", top_k), ("screen", screen)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if shapes is None:
        shapes = [(a, b) for a, b in factor_shapes(m, n)
                  if min(a, b, m // a, n // b) >= min_factor_dim
                  or is_low_rank_shape((m, n), (a, b))]
    else:
        shapes = [tuple(int(v) for v in s) for s in shapes]
        for s in shapes:
            check_a_shape((m, n), s)
    C = None if cov is None else check_cov(to_work(cov, Wt.device, name="cov"), n)
    G = None if gcov is None else check_cov(to_work(gcov, Wt.device, name="gcov"), m, name="gcov")
    perm = None
    if C is not None:
        perm = parse_permutation(permute, n, C)
        if perm is not None:
            perm = perm.to(Wt.device)
            Wt, C = Wt[:, perm], C[perm][:, perm]
    elif permute is not None:
        raise ValueError("permute needs cov (it reorders input channels by their variance)")

    table = []
    for (m1, n1) in shapes:
        m2, n2 = m // m1, n // n1
        rmax = min(m1 * n1, m2 * n2, int(param_budget // (m1 * n1 + m2 * n2)))
        if macs_budget is not None:
            rmax = min(rmax, int(macs_budget // kron_cost(m1, n1, m2, n2, 1)[1]))
        if rmax < 1:
            continue
        params, macs = kron_cost(m1, n1, m2, n2, rmax)
        table.append({"a_shape": (m1, n1), "b_shape": (m2, n2), "rank": rmax, "params": params,
                      "macs": macs, "predicted": None, "start_error": None, "final_error": None})
    if not table:
        smallest = min((kron_cost(a, b, m // a, n // b, 1) for a, b in shapes), default=None)
        raise ValueError(
            f"no candidate a_shape and rank fits param_budget={param_budget}"
            + (f" and macs_budget={macs_budget}" if macs_budget is not None else "")
            + (f"; the cheapest rank-1 candidate needs params={smallest[0]}, macs={smallest[1]}"
               if smallest else "; no candidate shapes (lower min_factor_dim or pass shapes)"))

    exact_screen = C is None
    if exact_screen or (screen is not None and len(table) > screen):
        preds = _spectrum_errors(Wt, [r["a_shape"] for r in table], [r["rank"] for r in table],
                                 C, G, damping)
        for row, p in zip(table, preds, strict=True):
            row["predicted"] = p

    if C is None:  # plain: the spectrum errors are exact (Eckart-Young)
        best = min(table, key=lambda r: (r["predicted"], r["params"]))
        F = nearest_kronecker_plain(Wt, best["a_shape"], best["rank"])
        err = float(F.info["relative_error"])
        best["start_error"] = best["final_error"] = err
        return _choice(best, F, err, "plain", table, W, None, t0)

    if screen is not None and len(table) > screen:
        # Where one factor of the covariance is a scalar (n1 = 1 or n1 = n; for G, m1 = 1 or
        # m1 = m as well), C1 kron C2 = C exactly, so the screening error IS the measured error
        # of the closed-form start: those shapes are ranked exactly and their best `screen`
        # go on; the other shapes' errors are optimistic, so their best `screen` go on too.
        def exact(r):
            m1, n1 = r["a_shape"]
            return n1 in (1, n) and (G is None or m1 in (1, m))

        keep = set()
        for group in ([r for r in table if exact(r)], [r for r in table if not exact(r)]):
            ranked = sorted(group, key=lambda r: (r["predicted"], r["params"]))
            keep |= {id(r) for r in ranked[:screen]}
        keep |= {id(r) for r in table if is_low_rank_shape((m, n), r["a_shape"])}
        kept = [r for r in table if id(r) in keep]
    else:
        kept = table
    fisher = {} if G is None else {"gcov": G}
    fits = {}
    for row in kept:
        F = nearest_kronecker(Wt, row["a_shape"], row["rank"], cov=C, init="best", als_sweeps=0,
                              damping=damping, **fisher)
        row["start_error"] = relative_error(Wt, F, cov=C, **fisher)
        fits[id(row)] = F
    # the low-rank extremes' closed-form start is already the exact optimum (n1 = 1 or m1 = 1
    # makes C1 kron C2 = C and G1 kron G2 = G): ALS there would only cost time and memory
    refine = sorted((r for r in kept if not is_low_rank_shape((m, n), r["a_shape"])),
                    key=lambda r: (r["start_error"], r["params"]))[:int(top_k)]
    for row in refine:
        F0 = fits[id(row)]
        F = nearest_kronecker(Wt, row["a_shape"], row["rank"], cov=C, init=KronFactors(F0.A, F0.B),
                              als_sweeps=als_sweeps, damping=damping, **fisher)
        err = relative_error(Wt, F, cov=C, **fisher)
        row["final_error"] = err
        if err < row["start_error"]:
            fits[id(row)] = F
    best = min(kept, key=lambda r: (min(e for e in (r["start_error"], r["final_error"])
                                        if e is not None), r["params"]))
    F = fits[id(best)]
    err = min(e for e in (best["start_error"], best["final_error"]) if e is not None)
    predictor = "fisher" if G is not None else "output"
    return _choice(best, F, err, predictor, table, W, perm, t0)


def _choice(row, F: KronFactors, err, predictor, table, W, perm, t0) -> KronChoice:
    from ._linalg import from_work

    if perm is not None:
        perm = perm if isinstance(W, torch.Tensor) else perm.cpu().numpy()
    factors = KronFactors(A=from_work(to_work(F.A), W), B=from_work(to_work(F.B), W), perm=perm,
                          singular_values=F.singular_values, history=list(F.history),
                          info=dict(F.info))
    return KronChoice(a_shape=tuple(row["a_shape"]), rank=int(row["rank"]), error=float(err),
                      params=int(row["params"]), macs=int(row["macs"]), predictor=predictor,
                      table=table, factors=factors, seconds=time.perf_counter() - t0)

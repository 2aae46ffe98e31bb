r"""Spread a model's parameter budget over its layers to minimise the predicted loss.

Each layer ``l`` gets an **error-versus-parameters curve**: for every option ``k`` (a rank,
or a kept fraction on a grid), its stored numbers ``p_lk`` and its predicted loss increase

    L_lk = s tr(G_l E_lk C_l E_lk^T)   with G (Fisher, K-FAC; s = N / (2 N_pred), nats),
    L_lk = tr(E_lk C_l E_lk^T)         with C only (output energy lost),
    L_lk = ||E_lk||_F^2                without statistics,

``E_lk = W_l - W_hat_lk`` the error of the fit that ``compress`` makes at that option
(equivalently, relative error squared times the layer's energy ``s tr(G W C W^T)``, etc.;
see :mod:`kronlab.calibration` for the K-FAC scale). Summed over layers this is the
second-order estimate of the model's loss increase when layers' errors do not interact.

The allocation minimises ``sum_l L_l k_l`` subject to ``sum_l p_l k_l <= budget``
(a multiple-choice knapsack) by two solvers, the lower prediction kept:

* the **greedy marginal-gain** algorithm (:func:`greedy_allocation`): every layer
  starts at its cheapest option; the segments of each layer's lower convex hull are
  taken in order of loss decrease per parameter while they fit. For convex curves this
  is optimal up to one segment (exact for the parameter count reached before the first
  segment that does not fit; the classic Lagrangian argument); non-convex curves are
  replaced by their convex hulls, whose points it may then skip, and with few, coarse
  options (Kronecker curves on a 0.1 grid) the segment that does not fit can leave much
  of the budget unspent;
* **dynamic programming** over the parameter count (:func:`knapsack_allocation`):
  exact for any curve up to a parameter resolution of ``budget / 65536`` (counts rounded
  up, so the result fits), the rounding's leftover spent by single upgrades.

The result is never predicted worse than the uniform allocation (equal ratios): if it
were, uniform is returned (``fallback_uniform``).

Curves, by method family:

* **low rank** (svd, svd-aa, svd-fisher): exact for every rank from one full
  factorisation ``W ~ sum_i a_i b_i^T`` (the method's own, by :func:`kronlab.low_rank`):
  ``E_r = sum_{i>r} a_i b_i^T`` and ``L(r) = sum_{i,j>r} (a_i^T G a_j)(b_i^T C b_j)``,
  suffix sums of one k x k matrix. For svd-aa under the output metric this is the
  discarded whitened spectrum.
* **Kronecker** (kron, kron-aa, kron-fisher): the factor shape fixed per layer type (as
  ``compress(shape_policy="per-type")`` chooses it at the uniform ratio) and the rank at
  each ratio of a grid; ``measure="fit"`` fits at every grid point with
  :func:`kronlab.choose_kron` and measures the TRUE loss (cost: one ``compress``-like fit
  per grid point and layer); ``measure="spectrum"`` reads all ranks from one
  :func:`kronlab.analysis.rearranged_spectrum` (exact for plain ``kron`` without
  statistics; otherwise an estimate in the ``C1 kron C2`` metric, for screening).

References: the per-matrix truncation-loss allocation of SVD-LLM v2 (Wang et al., 2025)
and the non-uniform ranks of KFAC-SVD/LEMS (Thoma et al., 2026); the greedy for convex
separable resource allocation (Fox, 1966).

Examples
--------
>>> curves_p = [np.array([1, 2, 3]), np.array([1, 2, 3])]
>>> curves_l = [np.array([9.0, 4.0, 1.0]), np.array([2.0, 1.5, 1.2])]
>>> idx, info = greedy_allocation(curves_p, curves_l, budget=4)
>>> idx, info["loss"]                        # the steep layer gets the extra parameters
([2, 0], 3.0)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ._choose import choose_kron
from ._factors import kron_cost
from ._lowrank import low_rank
from .analysis import rearranged_spectrum
from .compress import METHODS, objective_of
from .defaults import ALS_SWEEPS, CHOOSER_SCREEN, CHOOSER_TOP_K, PERMUTE, SHAPE_POLICY
from .models import find_linear_layers, layer_type, linear_weight

__all__ = ["DEFAULT_GRID", "MEASURES", "SOLVERS", "Allocation", "LayerCurve", "allocate",
           "greedy_allocation", "knapsack_allocation", "layer_curve"]

#: kept fractions at which Kronecker curves are measured (the uniform ratio is added)
DEFAULT_GRID = tuple(round(0.1 * k, 2) for k in range(1, 11))
#: how Kronecker curves are measured
MEASURES = ("fit", "spectrum")
#: how the budget is spread: both solvers (the better kept) or the greedy alone
SOLVERS = ("best", "greedy")
_F64 = torch.float64


@dataclass
class LayerCurve:
    """One layer's options, ascending in parameters.

    ``ratios[k]`` is the value to pass as the layer's ratio to ``compress`` to get option
    ``k`` (``ranks[k]`` terms, ``params[k]`` stored numbers, ``macs[k]`` multiply-adds per
    token); ``loss[k]`` the predicted loss increase (see the module docstring);
    ``energy`` the loss of dropping the layer (``E = W``). ``exact`` says whether the
    losses are those of the fits compress makes (not a screen).
    """

    name: str
    shape: tuple
    metric: str
    ratios: np.ndarray
    ranks: np.ndarray
    params: np.ndarray
    macs: np.ndarray
    loss: np.ndarray
    energy: float
    exact: bool
    a_shape: tuple | None = None


def _metric(cov, gcov) -> str:
    return "fisher" if gcov is not None and cov is not None else "output" if cov is not None \
        else "weight"


def _loss(E, C, G) -> float:
    """``tr(G E C E^T)`` with G or C the identity when None."""
    EC = E if C is None else E @ C
    return float((EC * (E if G is None else G @ E)).sum())


def _ratio_for(params: int, mn: int) -> float:
    """A ratio whose budget ``ratio * m n`` floors to ``params`` (half a parameter of slack)."""
    return min(1.0, (params + 0.5) / mn)


def layer_curve(W, *, method: str, cov=None, gcov=None, loss_scale: float = 1.0,
                grid=DEFAULT_GRID, a_shape=None, measure: str = "fit",
                macs_ratio: float | None = None,
                als_sweeps: int = ALS_SWEEPS, top_k: int = CHOOSER_TOP_K,
                name: str = "layer") -> LayerCurve:
    """Error-versus-parameters curve of one (m x n) layer for ``method``.

    The metric is Fisher with ``cov`` and ``gcov``, output with ``cov``, weight without
    (losses times ``loss_scale``). Low-rank methods: every rank ``r`` with
    ``r (m + n) <= m n``, exact. Kronecker methods: ``a_shape`` (required) at the largest
    rank within each ``grid`` ratio, measured by fitting (``measure="fit"``) or from the
    rearranged spectrum (``"spectrum"``). See the module docstring for the formulas.
    ``macs_ratio`` caps every option's rank as ``compress(macs_ratio=...)`` caps the
    layer's (at most ``macs_ratio m n`` multiply-adds per token), so each option is the
    fit compress makes at its ratio.

    >>> W = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    >>> c = layer_curve(W, method="svd")
    >>> c.ranks.tolist(), c.loss.round(decimals=9).tolist()  # discarded squared singular values
    ([1, 2], [5.0, 1.0])
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    Wt = torch.as_tensor(W).detach().to(_F64)
    m, n = Wt.shape
    mn = m * n
    C = None if cov is None else torch.as_tensor(cov).to(device=Wt.device, dtype=_F64)
    G = None if gcov is None or cov is None else torch.as_tensor(gcov).to(device=Wt.device,
                                                                          dtype=_F64)
    metric = _metric(C, G)
    energy = loss_scale * _loss(Wt, C, G)
    objective = objective_of(method)
    fit_c = C if objective != "weight" else None
    fit_g = {"gcov": G} if objective == "fisher" else {}
    if method.startswith("svd"):
        k = min(m, n)
        F = low_rank(Wt, k, cov=fit_c, method="exact", **fit_g)
        U, V = F.U.to(_F64), F.V.to(_F64)
        UGU = U.T @ U if G is None else U.T @ G @ U
        VCV = V @ V.T if C is None else V @ C @ V.T
        D = UGU * VCV
        T = D.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1)   # T[r, r] = sum D[r:, r:]
        rmax = min(k, mn // (m + n))
        if macs_ratio is not None:
            rmax = min(rmax, int(macs_ratio * mn // (m + n)))
        if rmax < 1:
            raise ValueError(f"layer {name} ({m}x{n}): even rank 1 ({m + n} parameters) "
                             "exceeds the dense layer's; low rank cannot compress it")
        ranks = np.arange(1, rmax + 1)
        tail = torch.diagonal(T).clamp(min=0)
        loss = np.array([float(tail[r]) if r < k else 0.0 for r in ranks]) * loss_scale
        params = ranks * (m + n)
        return LayerCurve(name=name, shape=(m, n), metric=metric,
                          ratios=np.array([_ratio_for(p, mn) for p in params]), ranks=ranks,
                          params=params, macs=params.copy(), loss=loss, energy=energy,
                          exact=True, a_shape=None)
    if a_shape is None:
        raise ValueError("Kronecker curves need the factor shape a_shape (m1, n1)")
    m1, n1 = (int(v) for v in a_shape)
    m2, n2 = m // m1, n // n1
    per, per_macs = kron_cost(m1, n1, m2, n2, 1)
    rcap = min(m1 * n1, m2 * n2)
    if macs_ratio is not None:
        rcap = min(rcap, int(macs_ratio * mn // per_macs))
    ranks = sorted({min(rcap, int(float(g) * mn // per)) for g in grid} - {0})
    if not ranks:
        raise ValueError(f"layer {name} ({m}x{n}), a_shape {a_shape}: no grid ratio in "
                         f"{tuple(grid)} affords one term ({per} parameters, {per_macs} "
                         f"multiply-adds; MACs cap {macs_ratio})")
    if measure == "spectrum":
        s2 = torch.as_tensor(rearranged_spectrum(Wt, (m1, n1), fit_c)) ** 2
        tot = float(s2.sum())
        rel2 = [max(tot - float(s2[:r].sum()), 0.0) / tot if tot > 0 else 0.0 for r in ranks]
        loss = np.array(rel2) * energy
        exact = metric == "weight" and objective == "weight"
    else:
        loss = []
        for r in ranks:
            ch = choose_kron(Wt, param_budget=r * per + 0.5, cov=fit_c, shapes=[(m1, n1)],
                             permute=PERMUTE if fit_c is not None else None, top_k=top_k,
                             als_sweeps=als_sweeps, **fit_g)
            E = Wt - torch.as_tensor(ch.factors.to_dense()).to(_F64)
            loss.append(loss_scale * _loss(E, C, G))
        loss = np.array(loss)
        exact = True
    ranks = np.array(ranks)
    params = ranks * per
    return LayerCurve(name=name, shape=(m, n), metric=metric,
                      ratios=np.array([_ratio_for(p, mn) for p in params]), ranks=ranks,
                      params=params, macs=ranks * per_macs, loss=loss, energy=energy,
                      exact=exact, a_shape=(m1, n1))


def _hull(p, loss):
    """Indices of the lower convex hull of (p, loss) from the first point, loss decreasing."""
    idx = [0]
    for k in range(1, len(p)):
        if loss[k] >= loss[idx[-1]] or p[k] <= p[idx[-1]]:
            continue
        while len(idx) >= 2:
            i, j = idx[-2], idx[-1]
            # drop j if it lies on or above the segment i -> k
            if (loss[j] - loss[i]) * (p[k] - p[i]) >= (loss[k] - loss[i]) * (p[j] - p[i]):
                idx.pop()
            else:
                break
        idx.append(k)
    return idx


def greedy_allocation(params, losses, budget, *, macs=None, macs_budget=None):
    r"""Pick one option per layer minimising ``sum loss`` with ``sum params <= budget``.

    ``params[l]`` (ascending) and ``losses[l]`` are layer ``l``'s options. Greedy marginal
    gain over the lower convex hulls: start at option 0 everywhere, take hull segments in
    decreasing ``-d loss / d params`` while they fit (a layer whose next segment does not
    fit takes no further segment, so each layer moves along its hull in order). With
    ``macs`` and ``macs_budget`` a segment must also fit the multiply-add budget (a
    feasibility check; the order stays per parameter, so the result is then a heuristic).

    Optimality: the *prefix* (the segments taken before the first one that does not fit)
    takes every segment more efficient than some ``lambda`` in every layer, so each layer
    sits at the minimiser of ``loss + lambda params`` over its hull: for convex curves it
    is optimal among all allocations of at most its own parameter count
    (``info["prefix_params"]``), and within one segment's gain of the optimum at
    ``budget``. Segments taken after that only lower the loss further, so the returned
    loss is at most the prefix's.

    Returns ``(indices, info)``; ``info`` has ``params``, ``macs``, ``loss`` (totals),
    ``segments_taken``, ``prefix_params`` and ``prefix_loss``. Cost ``O(K log K)`` for
    ``K`` options in all.
    """
    P, Ls, Ms = _check_curves(params, losses, macs, budget, macs_budget)
    L = len(P)
    start = sum(float(p[0]) for p in P)
    segs = []
    for i in range(L):
        h = _hull(P[i], Ls[i])
        for s, (a, b) in enumerate(zip(h, h[1:], strict=False)):
            gain = Ls[i][a] - Ls[i][b]
            dp = P[i][b] - P[i][a]
            segs.append((-gain / dp, i, s, a, b, dp))
    segs.sort(key=lambda t: (t[0], t[1], t[2]))
    choice = [0] * L
    used = start
    used_m = None if Ms is None else sum(float(x[0]) for x in Ms)
    blocked = [False] * L
    taken = 0
    prefix = None
    for _, i, _s, a, b, dp in segs:
        if blocked[i] or choice[i] != a:
            continue
        dm = 0.0 if Ms is None else Ms[i][b] - Ms[i][a]
        fits = used + dp <= budget * (1 + 1e-12)
        if Ms is not None and macs_budget is not None:
            fits = fits and used_m + dm <= macs_budget * (1 + 1e-12)
        if not fits:
            blocked[i] = True
            if prefix is None:
                prefix = (used, float(sum(Ls[j][choice[j]] for j in range(L))))
            continue
        choice[i] = b
        used += dp
        if Ms is not None:
            used_m += dm
        taken += 1
    loss = float(sum(Ls[i][choice[i]] for i in range(L)))
    if prefix is None:
        prefix = (used, loss)
    info = {"params": used, "macs": used_m, "segments_taken": taken, "loss": loss,
            "prefix_params": prefix[0], "prefix_loss": prefix[1]}
    return choice, info


def _check_curves(params, losses, macs, budget, macs_budget):
    """Validated float64 copies of the options (see :func:`greedy_allocation`); the budgets
    must afford every layer's cheapest option."""
    L = len(params)
    if len(losses) != L:
        raise ValueError(f"params has {L} layers, losses {len(losses)}")
    P = [np.asarray(p, dtype=np.float64) for p in params]
    Ls = [np.asarray(x, dtype=np.float64) for x in losses]
    Ms = None if macs is None else [np.asarray(x, dtype=np.float64) for x in macs]
    for i, (p, x) in enumerate(zip(P, Ls, strict=True)):
        if p.ndim != 1 or p.shape != x.shape or len(p) == 0:
            raise ValueError(f"layer {i}: params and losses must be equal-length 1-D arrays")
        if np.any(np.diff(p) < 0):
            raise ValueError(f"layer {i}: params must be ascending")
        if Ms is not None and Ms[i].shape != p.shape:
            raise ValueError(f"layer {i}: macs must have one entry per option")
    start = sum(float(p[0]) for p in P)
    if start > budget:
        raise ValueError(f"budget {budget:,.0f} is below the {start:,.0f} parameters of the "
                         "cheapest options of all layers")
    if Ms is not None and macs_budget is not None \
            and sum(float(x[0]) for x in Ms) > macs_budget * (1 + 1e-12):
        raise ValueError(f"macs_budget {macs_budget:,.0f} is below the cheapest options' "
                         f"{sum(float(x[0]) for x in Ms):,.0f} multiply-adds")
    return P, Ls, Ms


def knapsack_allocation(params, losses, budget, *, macs=None, macs_budget=None,
                        resolution: float | None = None, max_bins: int = 1 << 16):
    r"""Pick one option per layer minimising ``sum loss`` with ``sum params <= budget``, exactly.

    The multiple-choice knapsack solved by dynamic programming over the parameter count,
    for curves of any shape (no convexity needed, unlike :func:`greedy_allocation`).
    Parameters are counted in units of ``resolution`` (default ``budget / max_bins``),
    each option's count rounded **up**, so the result always fits the true budget; it is
    optimal among the allocations that fit after rounding (at most one unit per layer
    is lost to it), and the true parameters left over are then spent by single upgrades,
    best loss decrease per parameter first.

    With ``macs`` and ``macs_budget`` the multiply-adds enter by a Lagrange multiplier
    ``mu``: the DP minimises ``loss + mu macs`` and ``mu`` is bisected to the least value
    whose solution fits the MACs budget (a heuristic for the second constraint; the
    result always fits both).

    Returns ``(indices, info)`` with ``info`` as :func:`greedy_allocation`'s plus ``unit``
    and ``mu``. Cost ``O(K B)`` per solve for ``K`` options in all and ``B`` bins.

    >>> P = [np.array([1, 2, 3]), np.array([1, 2, 3])]
    >>> L = [np.array([9.0, 8.9, 1.0]), np.array([2.0, 1.5, 1.2])]   # layer 0 is not convex
    >>> knapsack_allocation(P, L, budget=4)[0]
    [2, 0]
    """
    P, Ls, Ms = _check_curves(params, losses, macs, budget, macs_budget)
    nl = len(P)
    use_m = Ms is not None and macs_budget is not None
    unit = float(resolution) if resolution else max(1.0, float(budget) / max_bins)
    nb = int(math.floor(budget / unit + 1e-9))
    W = [np.ceil(p / unit - 1e-9).astype(np.int64) for p in P]
    if sum(int(w[0]) for w in W) > nb:   # rounding made even the cheapest options too big
        unit = float(budget) / max(1, 4 * max_bins)
        nb = int(math.floor(budget / unit + 1e-9))
        W = [np.ceil(p / unit - 1e-9).astype(np.int64) for p in P]

    def solve(mu):
        f = np.zeros(nb + 1)
        arg = np.empty((nl, nb + 1), dtype=np.int32)
        for i in range(nl):
            cost = Ls[i] + (mu * Ms[i] if use_m and mu else 0.0)
            new = np.full(nb + 1, np.inf)
            best = np.full(nb + 1, -1, dtype=np.int32)
            for k in range(len(cost)):
                w = int(W[i][k])
                if w > nb:
                    break
                cand = f[: nb + 1 - w] + cost[k]
                better = cand < new[w:]
                new[w:][better] = cand[better]
                best[w:][better] = k
            f = new
            arg[i] = best
        b = nb
        choice = [0] * nl
        for i in range(nl - 1, -1, -1):
            k = int(arg[i][b])
            choice[i] = k
            b -= int(W[i][k])
        return choice

    def totals(choice):
        used = float(sum(P[i][k] for i, k in enumerate(choice)))
        used_m = None if Ms is None else float(sum(Ms[i][k] for i, k in enumerate(choice)))
        return used, used_m

    def fits_m(choice):
        return not use_m or totals(choice)[1] <= macs_budget * (1 + 1e-12)

    mu = 0.0
    choice = solve(0.0)
    if not fits_m(choice):
        hi = 1.0 * max(1e-300, sum(float(x.max()) for x in Ls)) / max(1.0, float(macs_budget))
        while not fits_m(solve(hi)) and hi < 1e300:
            hi *= 16
        lo = 0.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if fits_m(solve(mid)):
                hi = mid
            else:
                lo = mid
        choice = solve(hi)
        mu = hi
        if not fits_m(choice):  # pragma: no cover - option 0 everywhere fits both budgets
            choice = [0] * nl
    # spend what rounding left: single upgrades, best loss decrease per parameter first
    used, used_m = totals(choice)
    while True:
        best = None
        for i in range(nl):
            k0 = choice[i]
            dp = P[i][k0 + 1:] - P[i][k0]
            gain = Ls[i][k0] - Ls[i][k0 + 1:]
            ok = (gain > 0) & (used + dp <= budget * (1 + 1e-12))
            if use_m:
                ok &= used_m + Ms[i][k0 + 1:] - Ms[i][k0] <= macs_budget * (1 + 1e-12)
            if not ok.any():
                continue
            score = np.where(ok, gain / np.maximum(dp, 1e-12), -np.inf)
            j = int(np.argmax(score))
            if best is None or score[j] > best[0]:
                best = (float(score[j]), i, k0 + 1 + j)
        if best is None:
            break
        choice[best[1]] = best[2]
        used, used_m = totals(choice)
    loss = float(sum(Ls[i][k] for i, k in enumerate(choice)))
    info = {"params": used, "macs": used_m, "loss": loss, "unit": unit, "mu": mu,
            "segments_taken": None, "prefix_params": used, "prefix_loss": loss}
    return choice, info


@dataclass
class Allocation:
    """Per-layer ratios for ``compress(..., ratios=allocation.ratios)`` and what they predict.

    ``predicted_loss`` and ``uniform_loss`` are in the units of ``metric`` (nats for
    "fisher"); ``params`` and ``uniform_params`` count the compressed layers' stored
    numbers; ``budget`` is ``ratio`` times their dense parameters. ``a_shapes`` are the
    Kronecker factor shapes the curves assumed (layer type -> a_shape).
    """

    method: str
    ratio: float
    metric: str
    ratios: dict
    ranks: dict
    predicted_loss: float
    uniform_loss: float
    params: int
    uniform_params: int
    budget: float
    fallback_uniform: bool
    solver: str = "greedy"
    curves: list = field(default_factory=list)
    a_shapes: dict = field(default_factory=dict)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def table(self):
        """One row per layer: name, shape, chosen ratio, rank, params kept, predicted loss."""
        import pandas as pd

        rows = []
        for c in self.curves:
            k = int(np.nonzero(np.isclose(c.ratios, self.ratios[c.name]))[0][0])
            rows.append({"layer": c.name, "shape": f"{c.shape[0]}x{c.shape[1]}",
                         "ratio": float(c.ratios[k]), "rank": int(c.ranks[k]),
                         "params": int(c.params[k]),
                         "kept": float(c.params[k]) / (c.shape[0] * c.shape[1]),
                         "loss": float(c.loss[k]), "energy": c.energy})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "metric": self.metric,
                "ratios": self.ratios, "ranks": self.ranks,
                "predicted_loss": self.predicted_loss, "uniform_loss": self.uniform_loss,
                "params": self.params, "uniform_params": self.uniform_params,
                "budget": self.budget, "fallback_uniform": self.fallback_uniform,
                "solver": self.solver,
                "a_shapes": {k: list(v) for k, v in self.a_shapes.items()},
                "seconds": self.seconds, "config": self.config}


def allocate(model, stats=None, *, method: str, ratio: float, macs_ratio: float | None = None,
             layers=None, exclude=None, grid=DEFAULT_GRID, min_ratio: float | None = None,
             max_ratio: float = 1.0, measure: str = "fit", shape_policy: str = SHAPE_POLICY,
             a_shapes: dict | None = None, als_sweeps: int = ALS_SWEEPS,
             screen: int | None = CHOOSER_SCREEN, top_k: int = CHOOSER_TOP_K,
             solver: str = "best", progress: bool = True) -> Allocation:
    r"""Per-layer kept fractions with ``sum params <= ratio * dense params`` and least predicted loss.

    Parameters
    ----------
    model : the model ``compress`` will be given
    stats : :class:`kronlab.calibration.Statistics` (its ``gcov`` makes the metric the
        K-FAC loss in nats), a dict of covariances (output metric), or None (weight metric)
    method, layers, exclude : as in :func:`kronlab.compress.compress`
    ratio : the whole budget, as the kept fraction of the selected layers' parameters
    macs_ratio : optional budget of forward multiply-adds, as a fraction of the dense layers';
        as in ``compress`` it caps every layer (options above ``macs_ratio m n`` are not
        offered), which also bounds the total
    grid : Kronecker curves: the ratios measured (the uniform ``ratio`` is always added)
    min_ratio, max_ratio : bounds on any layer's ratio (options outside are dropped; the
        uniform option always stays)
    measure : Kronecker curves: "fit" (true losses, one fit per grid point and layer) or
        "spectrum" (one rearranged spectrum per layer; a screen)
    shape_policy : Kronecker: "per-type" chooses each layer type's a_shape once on its
        first layer at the uniform ratio (as ``compress`` does at a uniform ratio),
        "per-layer" every layer's
    a_shapes : layer type -> a_shape, to fix Kronecker shapes instead of choosing them
    solver : "best" (default): both :func:`greedy_allocation` and the exact
        :func:`knapsack_allocation`, the lower predicted loss kept (``solver`` of the
        result names it); "greedy": the greedy alone

    Returns an :class:`Allocation`; pass ``allocation.ratios`` to ``compress(ratios=...)``.
    Note for Kronecker methods: with ``shape_policy="per-type"``, ``compress`` chooses a
    type's shape on its first layer at that layer's allocated ratio, which may differ
    from ``allocation.a_shapes`` (compare with the report's ``a_shape``).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
            or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if shape_policy not in ("per-type", "per-layer"):
        raise ValueError(f"shape_policy must be 'per-type' or 'per-layer', got {shape_policy!r}")
    targets = find_linear_layers(model, include=layers, exclude=exclude)
    if not targets:
        raise ValueError(f"no linear layers match {layers!r}")
    cov = getattr(stats, "cov", stats)
    gcov = getattr(stats, "gcov", None)
    scale = 1.0
    if gcov is not None:
        scale = stats.n_tokens / (2 * stats.n_predicted)
    objective = objective_of(method)
    if objective != "weight" and cov is None:
        raise ValueError(f"method {method!r} needs stats (covariances) for its fits")
    if objective == "fisher" and gcov is None:
        raise ValueError(f"method {method!r} needs stats with gcov (gradients=True)")
    for n in targets:
        if cov is not None and n not in cov or gcov is not None and n not in gcov:
            raise ValueError(f"stats have no entry for layer {n}; collect them for every "
                             "layer that is compressed")
    a_shapes = dict(a_shapes or {})
    grid = sorted({float(g) for g in grid} | {float(ratio)})
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    curves = []
    for name in tqdm(list(targets), desc=f"allocate {method}", disable=not progress):
        W, _ = linear_weight(targets[name])
        C = None if cov is None else cov[name]
        G = None if gcov is None else gcov[name]
        key = layer_type(name) if shape_policy == "per-type" else name
        a_shape = None
        if method.startswith("kron"):
            if key not in a_shapes:
                m, n = W.shape
                fit_c = C if objective != "weight" else None
                ch = choose_kron(W, param_budget=ratio * m * n, cov=fit_c,
                                 macs_budget=None if macs_ratio is None else macs_ratio * m * n,
                                 gcov=G if objective == "fisher" else None,
                                 permute=PERMUTE if fit_c is not None else None,
                                 screen=screen, top_k=top_k, als_sweeps=als_sweeps)
                a_shapes[key] = tuple(ch.a_shape)
            a_shape = a_shapes[key]
        curve = layer_curve(W, method=method, cov=C, gcov=G, loss_scale=scale, grid=grid,
                            a_shape=a_shape, measure=measure, macs_ratio=macs_ratio,
                            als_sweeps=als_sweeps,
                            top_k=top_k, name=name)
        curves.append(_restrict(curve, ratio, min_ratio, max_ratio))
    budget = ratio * sum(c.shape[0] * c.shape[1] for c in curves)
    macs_budget = None if macs_ratio is None else macs_ratio * sum(
        c.shape[0] * c.shape[1] for c in curves)
    uni = [_uniform_index(c, ratio) for c in curves]
    uniform_loss = float(sum(c.loss[k] for c, k in zip(curves, uni, strict=True)))
    uniform_params = int(sum(c.params[k] for c, k in zip(curves, uni, strict=True)))
    args = ([c.params for c in curves], [c.loss for c in curves], budget)
    solved = {"greedy": greedy_allocation(*args, macs=[c.macs for c in curves],
                                          macs_budget=macs_budget)}
    if solver == "best":
        solved["knapsack"] = knapsack_allocation(*args, macs=[c.macs for c in curves],
                                                 macs_budget=macs_budget)
    used = min(solved, key=lambda k: solved[k][1]["loss"])
    idx, info = solved[used]
    fallback = info["loss"] > uniform_loss
    if fallback:
        idx, used = uni, "uniform"
    ratios = {c.name: float(c.ratios[k]) for c, k in zip(curves, idx, strict=True)}
    ranks = {c.name: int(c.ranks[k]) for c, k in zip(curves, idx, strict=True)}
    config = {"method": method, "ratio": ratio, "macs_ratio": macs_ratio, "layers": layers,
              "exclude": exclude, "grid": grid, "min_ratio": min_ratio, "max_ratio": max_ratio,
              "measure": measure, "shape_policy": shape_policy, "als_sweeps": als_sweeps,
              "screen": screen, "top_k": top_k, "loss_scale": scale,
              "n_layers": len(curves), "solver": solver,
              "solver_losses": {k: v[1]["loss"] for k, v in solved.items()}}
    return Allocation(
        method=method, ratio=float(ratio), metric=curves[0].metric, ratios=ratios, ranks=ranks,
        predicted_loss=float(sum(c.loss[k] for c, k in zip(curves, idx, strict=True))),
        uniform_loss=uniform_loss,
        params=int(sum(c.params[k] for c, k in zip(curves, idx, strict=True))),
        uniform_params=uniform_params, budget=float(budget), fallback_uniform=bool(fallback),
        solver=used, curves=curves, a_shapes={k: v for k, v in a_shapes.items()},
        seconds=time.perf_counter() - t0, config=config)


def _uniform_index(c: LayerCurve, ratio: float) -> int:
    """The option compress picks at the uniform ratio: the most parameters within ``ratio m n``."""
    ok = np.nonzero(c.params <= ratio * c.shape[0] * c.shape[1] + 1e-9)[0]
    if len(ok) == 0:
        raise ValueError(f"layer {c.name} {c.shape}: ratio {ratio} affords none of its options "
                         f"(the smallest keeps {c.params[0]} parameters)")
    return int(ok[-1])


def _restrict(c: LayerCurve, ratio, lo, hi) -> LayerCurve:
    u = _uniform_index(c, ratio)
    keep = np.ones(len(c.params), dtype=bool)
    if lo is not None:
        keep &= c.ratios >= lo
    if hi is not None:
        keep &= c.ratios <= hi + 1e-12
    keep[u] = True
    return LayerCurve(name=c.name, shape=c.shape, metric=c.metric, ratios=c.ratios[keep],
                      ranks=c.ranks[keep], params=c.params[keep], macs=c.macs[keep],
                      loss=c.loss[keep], energy=c.energy, exact=c.exact, a_shape=c.a_shape)

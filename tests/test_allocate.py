"""Budget allocation: exact low-rank curves, the greedy's optimality, the budget, and
compress(ratios=...)."""

import itertools

import numpy as np
import pytest
import torch
from tiny_model import tiny_llama

from kronlab import low_rank, relative_error
from kronlab.allocate import allocate, greedy_allocation, knapsack_allocation, layer_curve
from kronlab.calibration import collect_statistics
from kronlab.compress import compress, compress_layer

F64 = torch.float64


def _convex_curve(rng, k):
    p = np.cumsum(rng.integers(1, 6, size=k))
    slopes = np.sort(rng.uniform(0.1, 5.0, size=k - 1))[::-1]   # decreasing gains per parameter
    loss = np.concatenate([[20.0], 20.0 - np.cumsum(slopes * np.diff(p))])
    return p, loss


@pytest.mark.parametrize("seed", range(20))
def test_greedy_is_optimal_for_convex_curves(seed):
    """Among all allocations using at most the greedy prefix's parameters, none predicts less."""
    rng = np.random.default_rng(seed)
    curves = [_convex_curve(rng, int(rng.integers(2, 5))) for _ in range(4)]
    P = [c[0] for c in curves]
    L = [c[1] for c in curves]
    lo, hi = sum(p[0] for p in P), sum(p[-1] for p in P)
    budget = float(rng.uniform(lo, hi))
    idx, info = greedy_allocation(P, L, budget)
    assert info["params"] <= budget
    assert info["params"] == sum(p[i] for p, i in zip(P, idx, strict=True))
    assert info["loss"] == pytest.approx(sum(x[i] for x, i in zip(L, idx, strict=True)))
    best = min(sum(x[i] for x, i in zip(L, combo, strict=True))
               for combo in itertools.product(*[range(len(p)) for p in P])
               if sum(p[i] for p, i in zip(P, combo, strict=True)) <= info["prefix_params"])
    assert info["loss"] <= info["prefix_loss"] <= best + 1e-9


def test_greedy_budget_and_macs_respected_on_nonconvex_curves():
    rng = np.random.default_rng(0)
    P = [np.arange(1, 9) * 3 for _ in range(5)]
    L = [np.sort(rng.uniform(0, 10, 8))[::-1] for _ in range(5)]
    M = [p * 2 for p in P]
    for budget in (20, 40, 70, 120):
        idx, info = greedy_allocation(P, L, budget, macs=M, macs_budget=1.6 * budget)
        assert info["params"] <= budget and info["macs"] <= 1.6 * budget
        assert all(0 <= i < 8 for i in idx)


def test_greedy_bad_input():
    with pytest.raises(ValueError, match="below the 2 parameters of the cheapest"):
        greedy_allocation([np.array([1, 2]), np.array([1, 2])], [np.ones(2), np.ones(2)], 1)
    with pytest.raises(ValueError, match="ascending"):
        greedy_allocation([np.array([2, 1])], [np.ones(2)], 5)


def _spd(n, seed):
    X = torch.randn(4 * n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    X = X * torch.logspace(0, 1, n, dtype=F64)     # unequal channel scales
    return X.T @ X / (4 * n)


@pytest.mark.parametrize("method, use_g", [("svd-aa", False), ("svd", False), ("svd-fisher", True),
                                            ("svd-aa", True)])
def test_low_rank_curve_is_exact(method, use_g):
    """Each rank's predicted loss is the measured error of compress's fit at that rank."""
    W = torch.randn(12, 10, dtype=F64, generator=torch.Generator().manual_seed(1))
    C, G = _spd(10, 2), (_spd(12, 3) if use_g else None)
    curve = layer_curve(W, method=method, cov=C, gcov=G)
    assert curve.metric == ("fisher" if use_g else "output") and curve.exact
    energy = float(torch.trace((W if G is None else G @ W) @ C @ W.T))
    assert curve.energy == pytest.approx(energy)
    for r, ratio, loss in zip(curve.ranks, curve.ratios, curve.loss, strict=True):
        _, rep = compress_layer(W, None, method=method, ratio=float(ratio), cov=C,
                                gcov=G if method.endswith("fisher") else None)
        assert rep.rank == r
        F = low_rank(W, int(r), cov=None if method == "svd" else C,
                     gcov=G if method.endswith("fisher") else None, method="exact")
        measured = relative_error(W, F, cov=C, gcov=G) ** 2 * energy
        assert loss == pytest.approx(measured, rel=1e-6, abs=1e-10 * energy)


def test_kronecker_curve_measures_true_errors():
    W = torch.randn(8, 12, dtype=F64, generator=torch.Generator().manual_seed(0))
    C = _spd(12, 1)
    curve = layer_curve(W, method="kron-aa", cov=C, a_shape=(2, 3), grid=(0.3, 0.6, 1.0))
    energy = float(torch.trace(W @ C @ W.T))
    for ratio, loss in zip(curve.ratios, curve.loss, strict=True):
        _, rep = compress_layer(W, None, method="kron-aa", ratio=float(ratio), cov=C,
                                a_shape=(2, 3))
        assert rep.output_error ** 2 * energy == pytest.approx(loss, rel=1e-6)
    spec = layer_curve(W, method="kron", a_shape=(2, 3), grid=(0.3, 0.6, 1.0), measure="spectrum")
    plain = layer_curve(W, method="kron", a_shape=(2, 3), grid=(0.3, 0.6, 1.0))
    np.testing.assert_allclose(spec.loss, plain.loss, rtol=1e-8, atol=1e-12)  # exact for plain


@pytest.fixture(scope="module")
def llama_stats():
    model, _ = tiny_llama(0)
    with torch.no_grad():   # one layer with no energy at all, one much louder than the rest
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.mul_(100)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, collect_statistics(model, ids, progress=False)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_allocation_respects_budget_and_beats_uniform(llama_stats, ratio):
    model, stats = llama_stats
    alloc = allocate(model, stats.cov, method="svd-aa", ratio=ratio, progress=False)
    assert alloc.metric == "output"
    assert alloc.params <= alloc.budget and alloc.uniform_params <= alloc.budget
    assert alloc.predicted_loss <= alloc.uniform_loss
    assert alloc.predicted_loss < 0.9 * alloc.uniform_loss   # the loud/silent layers pay off
    zero = "model.layers.0.mlp.down_proj"
    curve = next(c for c in alloc.curves if c.name == zero)
    assert alloc.ratios[zero] == curve.ratios[0] and alloc.ranks[zero] == 1
    loud = "model.layers.1.self_attn.o_proj"
    assert alloc.ratios[loud] > ratio
    # compress follows the allocation: same parameters, and the prediction is the measured loss
    out, rep = compress(model, method="svd-aa", ratio=ratio, covariances=stats.cov,
                        ratios=alloc.ratios, progress=False)
    assert rep.layer_params_after == alloc.params <= ratio * rep.layer_params_before
    energy = {c.name: c.energy for c in alloc.curves}
    measured = sum(r.output_error ** 2 * energy[r.name] for r in rep.layers)
    assert measured == pytest.approx(alloc.predicted_loss, rel=1e-5)
    assert rep.config["ratios"] == alloc.ratios
    table = alloc.table()
    assert len(table) == 14 and table["params"].sum() == alloc.params


def test_fisher_metric_and_bounds(llama_stats):
    model, stats = llama_stats
    alloc = allocate(model, stats, method="svd-aa", ratio=0.5, min_ratio=0.2, max_ratio=0.8,
                     progress=False)
    assert alloc.metric == "fisher"
    assert alloc.config["loss_scale"] == pytest.approx(stats.n_tokens / (2 * stats.n_predicted))
    assert alloc.predicted_loss <= alloc.uniform_loss and alloc.params <= alloc.budget
    assert all(0.2 <= r <= 0.8 for r in alloc.ratios.values())


def test_kronecker_allocation(llama_stats):
    model, stats = llama_stats
    alloc = allocate(model, stats.cov, method="kron-aa", ratio=0.5, grid=(0.25, 0.5, 0.75, 1.0),
                     layers="*layers.1.*", als_sweeps=1, progress=False)
    assert alloc.params <= alloc.budget and alloc.predicted_loss <= alloc.uniform_loss
    assert set(alloc.a_shapes) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                   "mlp.down_proj"}
    quick = allocate(model, stats.cov, method="kron-aa", ratio=0.5, measure="spectrum",
                     layers="*layers.1.*", a_shapes=alloc.a_shapes, progress=False)
    assert quick.params <= quick.budget and not quick.curves[0].exact


def test_compress_ratios_are_validated(llama_stats):
    model, _ = llama_stats
    name = "model.layers.0.self_attn.q_proj"
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"ratios\[.*must be in \(0, 1\]"):
            compress(model, method="svd", ratio=0.5, ratios={name: bad}, progress=False)
    with pytest.raises(ValueError, match="not compressed: \\['lm_head'\\]"):
        compress(model, method="svd", ratio=0.5, ratios={"lm_head": 0.5}, progress=False)
    _, rep = compress(model, method="svd", ratio=0.5, ratios={name: 0.25}, progress=False)
    ranks = {r.name: r.rank for r in rep.layers}
    assert ranks[name] == int(0.25 * 32 * 32 // 64) and ranks["model.layers.1.self_attn.q_proj"] == 8


def test_allocate_bad_input(llama_stats):
    model, stats = llama_stats
    with pytest.raises(ValueError, match="ratio must be in"):
        allocate(model, stats.cov, method="svd-aa", ratio=0)
    with pytest.raises(ValueError, match="needs stats"):
        allocate(model, None, method="svd-aa", ratio=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        allocate(model, None, method="nope", ratio=0.5)


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_is_exact_for_any_curves(seed):
    """On non-convex curves the DP finds the brute-force optimum (unit resolution) and is
    never worse than the greedy; with a MACs budget both budgets hold."""
    rng = np.random.default_rng(seed)
    P = [np.cumsum(rng.integers(1, 30, size=int(rng.integers(2, 6))))
         for _ in range(int(rng.integers(2, 5)))]
    L = [np.sort(rng.uniform(0, 10, len(p)))[::-1] for p in P]
    budget = float(rng.uniform(sum(p[0] for p in P), sum(p[-1] for p in P)))
    combos = [c for c in itertools.product(*[range(len(p)) for p in P])
              if sum(p[i] for p, i in zip(P, c, strict=True)) <= budget]
    best = min(sum(x[i] for x, i in zip(L, c, strict=True)) for c in combos)
    idx, info = knapsack_allocation(P, L, budget, resolution=1.0)
    assert info["params"] == sum(p[i] for p, i in zip(P, idx, strict=True)) <= budget
    assert info["loss"] == pytest.approx(best, abs=1e-12)
    assert info["loss"] <= greedy_allocation(P, L, budget)[1]["loss"] + 1e-12
    coarse = knapsack_allocation(P, L, budget, resolution=7.0)[1]   # rounded up: still fits
    assert coarse["params"] <= budget and coarse["loss"] >= best - 1e-12
    M = [p * rng.uniform(0.5, 2.0) for p in P]
    macs_budget = float(rng.uniform(sum(m[0] for m in M), sum(m[-1] for m in M)))
    idx, info = knapsack_allocation(P, L, budget, macs=M, macs_budget=macs_budget)
    assert info["params"] <= budget and info["macs"] <= macs_budget * (1 + 1e-12)
    feasible = [c for c in combos if sum(m[i] for m, i in zip(M, c, strict=True)) <= macs_budget]
    assert info["loss"] >= min(sum(x[i] for x, i in zip(L, c, strict=True))
                               for c in feasible) - 1e-12


def test_greedy_leaves_budget_the_knapsack_uses():
    """Two coarse options per layer: the greedy takes the steepest segment, then the next
    does not fit and the layer is blocked; the DP finds the combination that fits."""
    P = [np.array([1, 3]), np.array([1, 6])]
    L = [np.array([10.0, 0.0]), np.array([12.0, 0.0])]
    g_idx, g = greedy_allocation(P, L, 7)
    k_idx, k = knapsack_allocation(P, L, 7, resolution=1.0)
    assert g_idx == [1, 0] and g["loss"] == 12.0 and g["params"] == 4
    assert k_idx == [0, 1] and k["loss"] == 10.0 and k["params"] == 7


def test_knapsack_bad_input():
    with pytest.raises(ValueError, match="below the 2 parameters of the cheapest"):
        knapsack_allocation([np.array([1, 2]), np.array([1, 2])], [np.ones(2), np.ones(2)], 1)
    with pytest.raises(ValueError, match="ascending"):
        knapsack_allocation([np.array([2, 1])], [np.ones(2)], 5)
    with pytest.raises(ValueError, match="macs_budget"):
        knapsack_allocation([np.array([1, 2])], [np.ones(2)], 5, macs=[np.array([3, 4])],
                            macs_budget=1)


@pytest.mark.parametrize("method, a_shape, cap", [("kron", (4, 6), 1.5), ("kron", (8, 8), 1.5),
                                                  ("svd", None, 0.4)])
def test_curve_options_under_a_macs_cap_are_compress_fits(method, a_shape, cap):
    """With macs_ratio every option's rank is the one compress gives at the option's ratio
    and the same cap, and no option exceeds the cap (which binds: fewer ranks than without)."""
    W = torch.randn(32, 48, dtype=F64, generator=torch.Generator().manual_seed(3))
    grid = (0.2, 0.4, 0.6, 0.8, 1.0)
    curve = layer_curve(W, method=method, a_shape=a_shape, grid=grid, macs_ratio=cap)
    free = layer_curve(W, method=method, a_shape=a_shape, grid=grid)
    assert curve.ranks.max() < free.ranks.max()
    assert np.all(curve.macs <= cap * W.numel())
    for r, ratio in zip(curve.ranks, curve.ratios, strict=True):
        _, rep = compress_layer(W, None, method=method, ratio=float(ratio), macs_ratio=cap,
                                a_shape=a_shape)
        assert rep.rank == r and rep.macs <= cap * W.numel()


def test_kronecker_allocation_is_what_compress_fits(llama_stats):
    """allocate(macs_ratio) then compress(ratios, the allocation's shapes, macs_ratio): the
    parameters are the allocation's and the measured loss its prediction (measure="fit")."""
    model, stats = llama_stats
    alloc = allocate(model, stats.cov, method="kron-aa", ratio=0.5, macs_ratio=1.2,
                     grid=(0.25, 0.5, 0.75, 1.0), layers="*layers.1.*", als_sweeps=1,
                     progress=False)
    assert alloc.solver in ("greedy", "knapsack", "uniform")
    structures = {t: {"a_shape": a} for t, a in alloc.a_shapes.items()}
    _, rep = compress(model, method="kron-aa", ratio=0.5, covariances=stats.cov,
                      ratios=alloc.ratios, structures=structures, macs_ratio=1.2,
                      layers="*layers.1.*", als_sweeps=1, progress=False)
    assert rep.layer_params_after == alloc.params <= alloc.budget
    assert all(r.macs <= 1.2 * r.dense_macs for r in rep.layers)
    energy = {c.name: c.energy for c in alloc.curves}
    measured = sum(r.output_error ** 2 * energy[r.name] for r in rep.layers)
    assert measured == pytest.approx(alloc.predicted_loss, rel=1e-4)

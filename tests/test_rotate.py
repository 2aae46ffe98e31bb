"""Residual-stream rotations: folding and rotating are exact, bad architectures are refused,
statistics transform exactly, and the Procrustes steps are optimal."""

import copy
import inspect

import numpy as np
import pytest
import torch
from tiny_model import tiny_gpt2, tiny_llama

from kronlab import nearest_kronecker
from kronlab.calibration import collect_statistics
from kronlab.models import find_linear_layers
from kronlab.rotate import (
    ResidualMap,
    RotationUnsupported,
    fold_norms,
    hadamard,
    orthogonal_procrustes,
    procrustes_rotation,
    random_orthogonal,
    residual_layout,
    residual_map_parameters,
    rotate_residual,
    rotate_statistics,
    weighted_procrustes,
)

F64 = torch.float64


def _rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _randomize_norms(model, seed=0):
    """Random norm weights (a fresh model has all ones, which would make folding trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm") and not name.endswith(("q_norm", "k_norm")):
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=gen))
    return model


def _ids(vocab=256, seed=0, shape=(2, 12)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    model, _ = tiny_llama(0)
    return _randomize_norms(model)


def test_fold_is_exact_and_leaves_the_input_alone(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids = _ids()
    folded = fold_norms(llama)
    assert _rel(folded(ids).logits, llama(ids).logits) < 1e-5
    for name in residual_layout(folded).norms:
        assert bool((folded.get_submodule(name).weight == 1).all())
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert llama.lm_head.weight is llama.model.embed_tokens.weight


@pytest.mark.parametrize("tied_head, extra", [("untie", 256 * 32), ("mix", 32 * 32)])
def test_tied_head_costs_counted(llama, tied_head, extra):
    def count(m):
        return sum(p.numel() for p in m.parameters())

    folded = fold_norms(llama, tied_head=tied_head)
    assert folded.kronlab_rotation["extra_parameters"] == extra
    assert count(folded) - count(llama) == extra
    assert (folded.lm_head.weight is folded.model.embed_tokens.weight) == (tied_head == "mix")
    assert folded.config.tie_word_embeddings == (tied_head == "mix")


def test_tied_head_with_unit_final_norm_stays_tied():
    model, _ = tiny_llama(1)  # fresh: all norm weights 1
    folded = fold_norms(model)
    assert folded.lm_head.weight is folded.model.embed_tokens.weight
    assert folded.kronlab_rotation["extra_parameters"] == 0


@pytest.mark.parametrize("tied_head", ["untie", "mix"])
@pytest.mark.parametrize("kind", ["hadamard", "random", "hadamard-signs"])
def test_fold_and_rotate_is_exact(llama, tied_head, kind):
    Q = {"hadamard": hadamard(32), "random": random_orthogonal(32, seed=3),
         "hadamard-signs": hadamard(32, seed=1)}[kind]
    ids = _ids(seed=1)
    rotated = rotate_residual(fold_norms(llama, tied_head=tied_head), Q)
    assert _rel(rotated(ids).logits, llama(ids).logits) < 1e-4
    # twice: rotations compose (Q1 then Q2 is Q1 Q2)
    twice = rotate_residual(rotated, random_orthogonal(32, seed=4))
    assert _rel(twice(ids).logits, llama(ids).logits) < 1e-4


def test_rotation_moves_the_weights(llama):
    folded = fold_norms(llama)
    Q = random_orthogonal(32, seed=0)
    rotated = rotate_residual(folded, Q)
    name = "model.layers.1.self_attn.q_proj"
    W, Wr = (m.get_submodule(name).weight.detach().to(F64) for m in (folded, rotated))
    torch.testing.assert_close(Wr, W @ Q, rtol=0, atol=1e-6)
    name = "model.layers.1.mlp.down_proj"
    W, Wr = (m.get_submodule(name).weight.detach().to(F64) for m in (folded, rotated))
    torch.testing.assert_close(Wr, Q.T @ W, rtol=0, atol=1e-6)


def test_in_place(llama):
    model = fold_norms(llama)
    out = rotate_residual(model, hadamard(32), in_place=True)
    assert out is model and model.kronlab_rotation["rotations"] == [32]
    assert fold_norms(model, in_place=True) is model


def _tiny(arch, **extra):
    import transformers

    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("arch, extra", [
    ("Llama", {"attention_bias": True, "mlp_bias": True}),   # writers' biases rotate too
    ("Mistral", {}), ("Qwen2", {}),                          # Qwen2: q/k/v biases
    ("Qwen3", {}),                                           # per-head q_norm / k_norm
])
def test_other_architectures_are_exact(arch, extra):
    model = _randomize_norms(_tiny(arch, **extra))
    ids = _ids(vocab=128)
    rotated = rotate_residual(fold_norms(model), random_orthogonal(32, seed=2))
    assert _rel(rotated(ids).logits, model(ids).logits) < 1e-4


def test_gpt2_layernorm_is_refused():
    model, _ = tiny_gpt2(0)
    for fn in (fold_norms, lambda m: rotate_residual(m, np.eye(32))):
        with pytest.raises(RotationUnsupported, match="LayerNorm subtracts the mean.*not supported yet"):
            fn(model)


@pytest.mark.parametrize("arch", ["Olmo2", "Gemma2"])
def test_post_norms_are_refused(arch):
    with pytest.raises(RotationUnsupported, match="branch outputs"):
        fold_norms(_tiny(arch))


def test_unknown_blocks_and_modules_are_refused():
    with pytest.raises(RotationUnsupported, match="unrecognised decoder block GemmaDecoderLayer"):
        fold_norms(_tiny("Gemma"))  # its RMSNorm scales by (1 + weight), embeddings by sqrt(d)
    with pytest.raises(RotationUnsupported, match="unrecognised architecture Sequential"):
        fold_norms(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_norm_bias_and_compressed_layers_are_refused(llama):
    from kronlab.compress import compress

    model = fold_norms(llama)
    model.model.norm.bias = torch.nn.Parameter(torch.zeros(32))
    with pytest.raises(RotationUnsupported, match="model.norm has a bias"):
        rotate_residual(model, hadamard(32))
    small, _ = compress(llama, method="svd", ratio=0.5, layers="*q_proj", progress=False)
    with pytest.raises(RotationUnsupported, match="LowRankLinear.*before compressing"):
        fold_norms(small)


def test_rotate_needs_folded_norms_and_an_orthogonal_q(llama):
    with pytest.raises(RotationUnsupported, match="run fold_norms"):
        rotate_residual(llama, hadamard(32))
    folded = fold_norms(llama)
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual(folded, 2 * torch.eye(32))
    with pytest.raises(ValueError, match=r"must be \(32, 32\)"):
        rotate_residual(folded, torch.eye(16))


def _check_moved_statistics(folded, Q, seed):
    """Statistics moved by ``rotate_statistics`` equal those collected on the rotated model;
    returns (stats, moved, recollected)."""
    lay = residual_layout(folded)
    names = list(dict.fromkeys(lay.readers + lay.writers))
    ids = _ids(shape=(4, 16), seed=seed)
    stats = collect_statistics(folded, ids, names, progress=False)
    recollected = collect_statistics(rotate_residual(folded, Q), ids, names, progress=False)
    moved = rotate_statistics(stats, folded, Q)
    for n in names:
        assert _rel(moved.cov[n], recollected.cov[n]) < 1e-4, n
        assert _rel(moved.gcov[n], recollected.gcov[n]) < 1e-4, n
    return stats, moved, recollected


def test_rotate_statistics_equals_recollection(llama):
    folded = fold_norms(llama)
    Q = random_orthogonal(32, seed=5)
    stats, moved, recollected = _check_moved_statistics(folded, Q, seed=3)
    # something did change, and sharing is kept
    assert _rel(stats.cov["lm_head"], recollected.cov["lm_head"]) > 0.1
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert moved.cov[q] is moved.cov[k]
    plain = rotate_statistics(stats.cov, folded, Q)   # a Covariances works too
    assert plain.n_tokens == stats.cov.n_tokens and plain[q] is moved.cov[q] or \
        torch.equal(plain[q], moved.cov[q])


# ----------------------------------------------------------------------------- per block

@pytest.fixture(scope="module")
def llama3():
    model, _ = tiny_llama(0, n_layers=3)
    return _randomize_norms(model, seed=2)


def _block_qs(n, d=32, seed=10):
    return torch.stack([random_orthogonal(d, seed=seed + i) for i in range(n)])


@pytest.mark.parametrize("tied_head, head_extra", [("untie", 256 * 32), ("mix", 32 * 32)])
def test_per_block_rotation_is_exact_and_pays_for_its_maps(llama3, tied_head, head_extra):
    ids = _ids(seed=4)
    ref = llama3(ids).logits
    folded = fold_norms(llama3, tied_head=tied_head)
    Qs = _block_qs(3)
    rotated = rotate_residual(folded, Qs)
    assert _rel(rotated(ids).logits, ref) < 1e-4
    # two skip maps (blocks 1 and 2), S_i = Q_{i-1}^T Q_i, and their parameters counted
    lay = residual_layout(rotated)
    assert lay.residual_maps == ["model.layers.1", "model.layers.2"]
    for i in (1, 2):
        assert isinstance(rotated.get_submodule(f"model.layers.{i}.residual_map"), ResidualMap)
        S = rotated.get_submodule(f"model.layers.{i}.residual_map").weight.detach().to(F64)
        torch.testing.assert_close(S, Qs[i - 1].T @ Qs[i], rtol=0, atol=1e-6)
    assert residual_map_parameters(rotated) == 2 * 32 * 32
    assert rotated.kronlab_rotation["extra_parameters"] == head_extra + 2 * 32 * 32
    n_params = sum(p.numel() for p in rotated.parameters())
    assert n_params == sum(p.numel() for p in folded.parameters()) + 2 * 32 * 32
    # block i's layers moved by Q_i
    W = folded.get_submodule("model.layers.2.mlp.up_proj").weight.detach().to(F64)
    Wr = rotated.get_submodule("model.layers.2.mlp.up_proj").weight.detach().to(F64)
    torch.testing.assert_close(Wr, W @ Qs[2], rtol=0, atol=1e-6)
    W = folded.get_submodule("model.layers.1.self_attn.o_proj").weight.detach().to(F64)
    Wr = rotated.get_submodule("model.layers.1.self_attn.o_proj").weight.detach().to(F64)
    torch.testing.assert_close(Wr, Qs[1].T @ W, rtol=0, atol=1e-6)
    # a copy keeps its maps working; a global rotation on top composes with them (no new
    # maps), and so do further per-block rotations
    again = rotate_residual(copy.deepcopy(rotated), hadamard(32))
    assert _rel(again(ids).logits, ref) < 1e-4 and residual_map_parameters(again) == 2 * 32 * 32
    more = rotate_residual(again, _block_qs(3, seed=40))
    assert _rel(more(ids).logits, ref) < 1e-4 and residual_map_parameters(more) == 2 * 32 * 32
    # the maps are not linear layers: compression never picks them up
    assert not any("residual_map" in n for n in find_linear_layers(rotated))
    # equal neighbouring Qs need no map
    Q = random_orthogonal(32, seed=1)
    same = rotate_residual(folded, torch.stack([Q, Q, hadamard(32)]))
    assert residual_layout(same).residual_maps == ["model.layers.2"]
    assert _rel(same(ids).logits, ref) < 1e-4


def test_per_block_layer_ratio(llama3):
    from kronlab.rotate import per_block_layer_ratio

    names = find_linear_layers(llama3, include="model.layers.*")
    total = sum(m.weight.numel() for m in names.values())   # 3 blocks x 9216
    ratio, skip = per_block_layer_ratio(llama3, list(names), 0.5)
    assert skip == 2 * 32 * 32 and ratio == pytest.approx((0.5 * total - skip) / total)
    with pytest.raises(ValueError, match="needs a ratio above 0.074"):
        per_block_layer_ratio(llama3, list(names), 0.05)


def test_per_block_rotation_bad_input(llama3):
    plain, _ = tiny_llama(0, n_layers=3)   # unit final norm: folding keeps the head tied
    folded = fold_norms(plain)
    assert residual_layout(folded).tied and not residual_layout(folded).mixer
    with pytest.raises(RotationUnsupported, match="tied_head='mix'"):
        rotate_residual(folded, _block_qs(3))
    Q = _block_qs(3)
    Q[2] = Q[0]   # first and last equal: the tied head reads the right basis
    ids = _ids(seed=6)
    assert _rel(rotate_residual(folded, Q)(ids).logits, plain(ids).logits) < 1e-4
    folded = fold_norms(llama3, tied_head="mix")
    with pytest.raises(ValueError, match=r"need \(3, 32, 32\), one Q per decoder block"):
        rotate_residual(folded, _block_qs(2))
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual(folded, 2 * _block_qs(3))
    with pytest.raises(ValueError, match=r"\(32, 32\) \(one rotation\)"):
        rotate_residual(folded, torch.eye(32)[None, None])


def test_per_block_statistics_equal_recollection(llama3):
    folded = fold_norms(llama3, tied_head="mix")
    _, moved, _ = _check_moved_statistics(folded, _block_qs(3, seed=20), seed=8)
    q, v = "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"
    assert moved.cov[q] is moved.cov[v]


def test_closed_loop_sees_each_block_input_once(llama3):
    """The closed loop catches a block's inputs before its residual map runs: compressing
    only block 1 of a per-block rotated model, its covariances are the open-loop ones."""
    from kronlab.closed_loop import compress_closed_loop

    rotated = rotate_residual(fold_norms(llama3, tied_head="mix"), _block_qs(3, seed=30))
    ids = _ids(shape=(4, 16), seed=9)
    layers = "model.layers.1.*"
    _, rep = compress_closed_loop(rotated, ids, method="svd-aa", ratio=0.5, layers=layers,
                                  keep_covariances=True, progress=False)
    ref = collect_statistics(rotated, ids, find_linear_layers(rotated, include=layers),
                             gradients=False, progress=False).cov
    for n, C in rep.covariances.items():
        torch.testing.assert_close(C, ref[n], rtol=1e-8, atol=1e-10)


def test_per_block_rotated_compressed_model_saves_and_loads(llama3, tmp_path):
    from kronlab.compress import compress
    from kronlab.io import load_compressed, save_compressed

    rotated = rotate_residual(fold_norms(llama3, tied_head="untie"), _block_qs(3, seed=50))
    small, _ = compress(rotated, method="kron", ratio=0.5, progress=False)
    save_compressed(small, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    ids = _ids(seed=11)
    torch.testing.assert_close(loaded(ids).logits, small(ids).logits, rtol=0, atol=1e-6)
    assert residual_map_parameters(loaded) == 2 * 32 * 32


# ----------------------------------------------------------------------------- matrices

@pytest.mark.parametrize("d", [1, 2, 4, 8, 12, 20, 24, 28, 32, 36, 44, 64, 576, 768])
def test_hadamard_is_orthogonal_with_equal_magnitudes(d):
    H = hadamard(d)
    torch.testing.assert_close(H @ H.T, torch.eye(d, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(H.abs(), torch.full((d, d), d ** -0.5, dtype=F64), rtol=0,
                               atol=1e-15)


@pytest.mark.parametrize("d", [3, 6, 92])
def test_hadamard_missing_orders_are_clear_errors(d):
    with pytest.raises(ValueError, match="buildable orders near"):
        hadamard(d)


def test_random_orthogonal_is_seeded_and_orthogonal():
    A, B, C = random_orthogonal(10, 1), random_orthogonal(10, 1), random_orthogonal(10, 2)
    torch.testing.assert_close(A.T @ A, torch.eye(10, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(A, B) and not torch.equal(A, C)


def _skew(d, seed, eps):
    X = torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.matrix_exp(eps * (X - X.T))


@pytest.mark.parametrize("seed", range(3))
def test_orthogonal_procrustes_no_rotation_does_better(seed):
    M = torch.randn(7, 7, dtype=F64, generator=torch.Generator().manual_seed(seed))
    Q = orthogonal_procrustes(M)
    best = float((Q * M).sum())
    for s in range(10):
        assert float(((Q @ _skew(7, s, 1e-3)) * M).sum()) <= best + 1e-12
        assert float((random_orthogonal(7, s) * M).sum()) <= best + 1e-12


def _psd(d, gen, rank=None):
    A = torch.randn(d, rank or d, dtype=F64, generator=gen)
    return A @ A.T


@pytest.mark.parametrize("seed", range(3))
def test_weighted_procrustes_descends_to_a_stationary_point(seed):
    gen = torch.Generator().manual_seed(seed)
    d = 6
    terms = [(_psd(d, gen), _psd(d, gen, 3)) for _ in range(3)]
    K = 3 * torch.randn(d, d, dtype=F64, generator=gen)
    Q, info = weighted_procrustes(K, terms, max_iter=3000, tol=1e-15)
    h = info["history"]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(h, h[1:], strict=False))
    assert info["riemannian_grad_norm"] < 1e-4 * float(K.norm())

    def f(Q):
        return sum(float(((R @ Q) * (Q @ S)).sum()) for S, R in terms) - 2 * float((Q * K).sum())

    for s in range(8):  # a local minimum: no small rotation lowers f
        assert f(Q @ _skew(d, s, 1e-3)) >= f(Q) - 1e-9 * abs(f(Q))


def test_weighted_procrustes_with_isotropic_weights_is_procrustes():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(5, 5, dtype=F64, generator=gen)
    terms = [(_psd(5, gen), 2.0 * torch.eye(5, dtype=F64))]   # tr(S Q^T 2I Q) is constant
    Q, _ = weighted_procrustes(K, terms, random_orthogonal(5, 1), max_iter=2000, tol=1e-15)
    torch.testing.assert_close(Q, orthogonal_procrustes(K), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- Procrustes

#: balanced Kronecker shapes for every layer type of the tiny Llama (not rotation invariant)
SHAPES_44 = {t: (4, 4) for t in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                 "mlp.down_proj")}

@pytest.fixture(scope="module")
def folded_stats(llama):
    folded = fold_norms(llama)
    return folded, collect_statistics(folded, _ids(shape=(4, 32), seed=7), progress=False)


def test_procrustes_frobenius_rounds_never_increase(folded_stats):
    folded, _ = folded_stats
    res = procrustes_rotation(folded, method="kron", ratio=0.5, iters=6, progress=False,
                              shapes=SHAPES_44)
    torch.testing.assert_close(res.Q.T @ res.Q, torch.eye(32, dtype=F64), rtol=0, atol=1e-10)
    objs = [v for h in res.history for v in (h["objective_fit"], h["objective"])]
    assert all(b <= a * (1 + 1e-10) for a, b in zip(objs, objs[1:], strict=False))
    assert objs[-1] < objs[0]
    assert all(s["a_shape"] == (4, 4) and not s["rotation_invariant"]
               for s in res.structures.values())
    # the reported objective is the real one: refit every layer in the final basis
    rotated = rotate_residual(folded, res.Q)
    total = 0.0
    for name, role in res.layers.items():
        W = rotated.get_submodule(name).weight.detach().to(F64)
        F = nearest_kronecker(W, (4, 4), res.structures[name.split(".", 3)[-1]]["rank"])
        total += float(((W - F.to_dense()) ** 2).sum())
    assert total <= res.history[-1]["objective"] * (1 + 1e-8)


def test_low_rank_is_rotation_invariant(folded_stats):
    """Low rank's optimum depends only on singular values, which no rotation changes:
    the objective stays put (and Procrustes cannot help low rank)."""
    folded, stats = folded_stats
    for init in (None, "hadamard"):
        with pytest.warns(UserWarning, match="rotation invariant"):
            res = procrustes_rotation(folded, stats, method="svd-aa", ratio=0.5, iters=2,
                                      init=init, progress=False)
        objs = [h["objective_fit"] for h in res.history if h["kind"] == "frobenius"]
        assert max(objs) - min(objs) <= 1e-9 * max(objs)
        assert all(s["rotation_invariant"] for s in res.structures.values())
    # so are Kronecker terms with n1 = 1 on a reader and m1 = 1 on a writer
    shapes = {"self_attn.q_proj": (32, 1), "self_attn.o_proj": (1, 4)}
    with pytest.warns(UserWarning, match="rotation invariant"):
        res = procrustes_rotation(folded, method="kron", ratio=0.5, iters=3, shapes=shapes,
                                  layers=["*q_proj", "*o_proj"], init="random", progress=False)
    objs = [v for h in res.history for v in (h["objective_fit"], h["objective"])]
    assert max(objs) - min(objs) <= 1e-9 * max(objs)
    assert all(s["rotation_invariant"] for s in res.structures.values())


def test_weighted_round_objective_identity_and_descent(folded_stats):
    """With no Q-steps, the quadratic form's value equals the directly measured output
    error (the K, S, R algebra); with Q-steps, the weighted objective goes down."""
    folded, stats = folded_stats
    kw = {"method": "kron-aa", "ratio": 0.5, "iters": 1, "progress": False, "shapes": SHAPES_44}
    h = procrustes_rotation(folded, stats, q_iters=0, **kw).history[-1]
    assert h["kind"] == "weighted" and h["metric"] == "output"
    assert h["objective"] == pytest.approx(h["objective_fit"], rel=1e-9)
    h = procrustes_rotation(folded, stats, q_iters=20, **kw).history[-1]
    assert h["objective"] < h["objective_fit"]


@pytest.mark.skipif("gcov" not in inspect.signature(nearest_kronecker).parameters,
                    reason="Fisher-weighted Kronecker fits (nearest_kronecker(gcov=)) not there yet")
def test_fisher_round_objective_identity(folded_stats):
    folded, stats = folded_stats
    h = procrustes_rotation(folded, stats, method="kron-fisher", ratio=0.5, iters=0, q_iters=0,
                            shapes=SHAPES_44, progress=False).history[-1]
    assert h["metric"] == "fisher"
    assert h["objective"] == pytest.approx(h["objective_fit"], rel=1e-9)


def test_procrustes_per_block_does_at_least_as_well_and_reports_its_objective(folded_stats):
    """One round from the same start: the per-block Q-step minimises over a superset of
    the global one's (the same fits), so its objective is no larger; the reported
    objective is the refit in the rotated model, and the Qs are orthogonal."""
    folded, stats = folded_stats
    kw = {"method": "kron", "ratio": 0.5, "iters": 1, "progress": False, "shapes": SHAPES_44}
    one = procrustes_rotation(folded, **kw)
    per = procrustes_rotation(folded, per_block=True, **kw)
    assert per.Q.shape == (2, 32, 32) and per.config["per_block"]
    for Q in per.Q:
        torch.testing.assert_close(Q.T @ Q, torch.eye(32, dtype=F64), rtol=0, atol=1e-10)
    assert per.history[0]["objective_fit"] == pytest.approx(one.history[0]["objective_fit"],
                                                              rel=1e-12)
    assert per.history[0]["objective"] <= one.history[0]["objective"] * (1 + 1e-12)
    assert per.history[0]["objective"] < one.history[0]["objective"] * (1 - 1e-6)
    rotated = rotate_residual(folded, per.Q)
    total = 0.0
    for name in per.layers:
        W = rotated.get_submodule(name).weight.detach().to(F64)
        F = nearest_kronecker(W, (4, 4), per.structures[name.split(".", 3)[-1]]["rank"])
        total += float(((W - F.to_dense()) ** 2).sum())
    assert total <= per.history[-1]["objective"] * (1 + 1e-8)
    # weighted rounds per block: the identity of the quadratic form holds block by block
    h = procrustes_rotation(folded, stats, per_block=True, q_iters=0,
                            **{**kw, "method": "kron-aa"}).history[-1]
    assert h["kind"] == "weighted" and h["objective"] == pytest.approx(h["objective_fit"],
                                                                      rel=1e-9)


def test_per_block_random_start_on_some_blocks_needs_maps_only_next_to_them():
    from kronlab.rotate import per_block_layer_ratio

    model, _ = tiny_llama(0, n_layers=4)
    folded = fold_norms(_randomize_norms(model, seed=3), tied_head="mix")
    layers = "model.layers.1.*"
    res = procrustes_rotation(folded, method="kron", ratio=0.5, iters=0, weighted=False,
                              init="random", seed=7, per_block=True, layers=layers,
                              shapes=SHAPES_44, progress=False)
    torch.testing.assert_close(res.Q[1], random_orthogonal(32, seed=9), rtol=0, atol=0)
    for i in (0, 2, 3):
        torch.testing.assert_close(res.Q[i], random_orthogonal(32, seed=7), rtol=0, atol=0)
    rotated = rotate_residual(folded, res.Q)
    assert residual_layout(rotated).residual_maps == ["model.layers.1", "model.layers.2"]
    names = list(find_linear_layers(folded, include=layers))
    assert per_block_layer_ratio(folded, names, 0.5)[1] == residual_map_parameters(rotated)
    ids = _ids(seed=12)
    assert _rel(rotated(ids).logits, model(ids).logits) < 1e-4
    # block 0 alone: its own Q differs from the shared one, so one map is needed and paid
    res = procrustes_rotation(folded, method="kron", ratio=0.5, iters=0, weighted=False,
                              init="random", seed=7, per_block=True, layers="model.layers.0.*",
                              shapes=SHAPES_44, progress=False)
    rotated = rotate_residual(folded, res.Q)
    names = list(find_linear_layers(folded, include="model.layers.0.*"))
    assert residual_layout(rotated).residual_maps == ["model.layers.1"]
    assert per_block_layer_ratio(folded, names, 0.5)[1] == residual_map_parameters(rotated)


def test_procrustes_bad_input(llama, folded_stats):
    folded, stats = folded_stats
    with pytest.raises(RotationUnsupported, match="fold_norms"):
        procrustes_rotation(llama, method="kron", ratio=0.5)
    with pytest.raises(ValueError, match="needs stats"):
        procrustes_rotation(folded, method="kron", ratio=0.5, weighted="output")
    with pytest.raises(ValueError, match="ratio must be in"):
        procrustes_rotation(folded, method="kron", ratio=1.5)
    with pytest.raises(ValueError, match="needs output-gradient"):
        procrustes_rotation(folded, stats.cov, method="kron", ratio=0.5, weighted="fisher")


@pytest.mark.slow
def test_smollm2_fold_and_rotate_is_exact():
    from kronlab.models import load_model

    model, tok = load_model()
    ids = torch.tensor([tok.encode("The rotation of the residual stream leaves the "
                                   "logits of the model unchanged.")])
    with torch.no_grad():
        ref = model(ids).logits
        folded = fold_norms(model, in_place=False)
        assert folded.kronlab_rotation["extra_parameters"] == 49152 * 576
        assert _rel(folded(ids).logits, ref) < 1e-4
        rotate_residual(folded, hadamard(576), in_place=True)
        assert _rel(folded(ids).logits, ref) < 1e-4
        mixed = fold_norms(model, tied_head="mix")
        per_block = torch.stack([random_orthogonal(576, seed=i) for i in range(30)])
        rotate_residual(mixed, per_block, in_place=True)
        assert mixed.kronlab_rotation["extra_parameters"] == 576 ** 2 * 30   # 29 maps + mix
        assert _rel(mixed(ids).logits, ref) < 1e-4

"""Covariances from forward hooks equal X^T X / N computed from the captured inputs."""

import pytest
import torch
from tiny_model import tiny_gpt2, tiny_llama

from kronlab.calibration import collect_covariances
from kronlab.models import find_linear_layers


def _captured_inputs(model, batches):
    """Dense reference: keep every layer input, then X^T X / N."""
    layers = find_linear_layers(model)
    xs = {n: [] for n in layers}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].detach().clone()))
          for n, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hs:
        h.remove()
    ref = {}
    for n, chunks in xs.items():
        X = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        ref[n] = X.T @ X / X.shape[0]
    return ref


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("seed", [0, 1])
def test_covariance_equals_dense_reference(make, seed):
    model, _ = make(seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (5, 24), generator=g)
    covs = collect_covariances(model, tokens, batch_size=2, progress=False)
    ref = _captured_inputs(model, tokens.split(2))
    assert covs.n_tokens == 5 * 24 and covs.n_sequences == 5
    assert list(covs) == list(find_linear_layers(model))
    for name, C in covs.items():
        assert C.dtype == torch.float64
        torch.testing.assert_close(C, ref[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(C, C.T)
        assert torch.linalg.eigvalsh(C).min() > -1e-10


def test_shared_inputs_computed_once():
    model, _ = tiny_llama()
    covs = collect_covariances(model, torch.randint(0, 256, (2, 16)), progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        assert covs[p + "self_attn.k_proj"] is covs[p + "self_attn.q_proj"]
        assert covs[p + "self_attn.v_proj"] is covs[p + "self_attn.q_proj"]
        assert covs[p + "mlp.up_proj"] is covs[p + "mlp.gate_proj"]
        assert covs[p + "self_attn.o_proj"] is not covs[p + "self_attn.q_proj"]
        assert covs.shared[p + "mlp.up_proj"] == p + "mlp.gate_proj"


def test_layer_subset_iterable_batches_and_hooks_removed():
    model, _ = tiny_llama()
    names = ["model.layers.1.mlp.down_proj", "lm_head"]
    batches = [torch.randint(0, 256, (1, n)) for n in (7, 9)]
    covs = collect_covariances(model, batches, names, progress=False)
    assert list(covs) == names and covs.n_tokens == 16
    assert covs["lm_head"].shape == (32, 32) and covs[names[0]].shape == (64, 64)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_on_error():
    model, _ = tiny_llama()
    bad = torch.full((1, 4), 10_000)  # out of the vocabulary: embedding fails
    with pytest.raises((IndexError, RuntimeError)):
        collect_covariances(model, bad, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unknown_layer_name():
    model, _ = tiny_llama()
    with pytest.raises(KeyError, match="not linear layers"):
        collect_covariances(model, torch.zeros(1, 4, dtype=torch.long), ["model.nope"])


# ----------------------------------------------------------------------------- gradients

import types  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from kronlab.calibration import Statistics, collect_statistics  # noqa: E402
from kronlab.models import layer_type, linear_weight  # noqa: E402


def _summed_loss(model, ids):
    """Reference loss: next-token cross-entropy summed over the batch, in the model's dtype."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


def _mean_loss(model, ids) -> float:
    with torch.no_grad():
        return float(_summed_loss(model, ids)) / (ids.shape[0] * (ids.shape[1] - 1))


def _reference_gcov(model, batches, names=None):
    """Dense reference: keep every layer output, autograd of the summed loss w.r.t. each."""
    layers = find_linear_layers(model) if names is None else {
        n: model.get_submodule(n) for n in names}
    outs = {}
    hs = [m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
          for n, m in layers.items()]
    sums, n_tok = {}, 0
    try:
        for b in batches:
            loss = _summed_loss(model, b)
            grads = torch.autograd.grad(loss, [outs[n] for n in layers])
            for n, g in zip(layers, grads, strict=True):
                g2 = g.reshape(-1, g.shape[-1]).double()  # one row per token: g_t
                sums[n] = sums.get(n, 0) + g2.T @ g2
            n_tok += b.numel()
    finally:
        for h in hs:
            h.remove()
    return {n: s / n_tok for n, s in sums.items()}


def _snapshot(model):
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "flags": [p.requires_grad for p in model.parameters()],
            "modes": [m.training for m in model.modules()]}


def _assert_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), k
    assert [p.requires_grad for p in model.parameters()] == snap["flags"]
    assert [m.training for m in model.modules()] == snap["modes"]
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
                    or m._backward_pre_hooks), m


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_covariance_equals_dense_reference(make, seed):
    model, _ = make(seed=seed)
    model.double()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (5, 24), generator=g)
    snap = _snapshot(model)
    stats = collect_statistics(model, tokens, batch_size=2, progress=False)
    _assert_unchanged(model, snap)
    ref = _reference_gcov(model, tokens.split(2))
    model.zero_grad(set_to_none=True)
    assert isinstance(stats, Statistics)
    assert (stats.n_tokens, stats.n_sequences, stats.n_predicted) == (120, 5, 5 * 23)
    assert list(stats.gcov) == list(find_linear_layers(model))
    for name, G in stats.gcov.items():
        W, _ = linear_weight(model.get_submodule(name))
        assert G.dtype == torch.float64 and G.shape == (W.shape[0],) * 2
        torch.testing.assert_close(G, ref[name], rtol=1e-10, atol=1e-14 * float(ref[name].abs().max()))
        torch.testing.assert_close(G, G.T, rtol=0, atol=0)  # g^T g is symmetric by construction
        assert torch.linalg.eigvalsh(G).min() > -1e-12 * float(torch.linalg.eigvalsh(G).max())
    # C from the same pass is the gradient-free collection's
    covs = collect_covariances(model, tokens, batch_size=2, progress=False)
    assert stats.cov.shared == covs.shared and stats.cov.n_tokens == covs.n_tokens
    for name, C in covs.items():
        torch.testing.assert_close(stats.cov[name], C, rtol=1e-12, atol=0)
    # the loss is transformers' labels=input_ids loss (which it computes in float32)
    with torch.no_grad():
        hf = float(model(input_ids=tokens, labels=tokens).loss)
    assert stats.loss == pytest.approx(hf, rel=1e-6)
    n_acc = len({id(C) for C in stats.cov.values()})
    assert stats.accumulator_bytes == 8 * (
        sum(C.numel() for C in {id(C): C for C in stats.cov.values()}.values())
        + sum(G.numel() for G in stats.gcov.values()))
    assert n_acc < len(stats.cov) if make is tiny_llama else n_acc == len(stats.cov)
    assert stats.peak_bytes > stats.accumulator_bytes


def test_head_gradient_is_softmax_minus_onehot():
    """For lm_head (y = logits), g_t = softmax(y_t) - e_{next token}, and 0 at the last position."""
    model, _ = tiny_llama(seed=3)
    model.double()
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(3))
    stats = collect_statistics(model, tokens, ["lm_head", "model.layers.1.mlp.down_proj"],
                               progress=False)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1].reshape(-1, 256)
    g = torch.softmax(logits, -1) - F.one_hot(tokens[:, 1:].reshape(-1), 256).double()
    torch.testing.assert_close(stats.gcov["lm_head"], g.T @ g / tokens.numel(), rtol=1e-10, atol=1e-15)
    # a subset of layers (the backward pass starts at down_proj) gives the same G
    full = collect_statistics(model, tokens, progress=False)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(stats.gcov[name], full.gcov[name], rtol=1e-12, atol=0)


def test_float32_model_close_to_float64():
    model, _ = tiny_gpt2(seed=2)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    s32 = collect_statistics(model, tokens, progress=False)
    s64 = collect_statistics(model.double(), tokens, progress=False)
    for name, G in s64.gcov.items():
        assert s32.gcov[name].dtype == torch.float64
        torch.testing.assert_close(s32.gcov[name], G, rtol=1e-4, atol=1e-6 * float(G.abs().max()))


def test_model_left_as_it_was_train_mode_frozen_parameters():
    """Train mode with dropout, some parameters frozen: collected in eval mode, all restored."""
    model, _ = tiny_gpt2(seed=4)
    model.double()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5  # would randomise the statistics if they were taken in train mode
    model.transformer.wte.weight.requires_grad_(False)
    model.train()
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(4))
    snap = _snapshot(model)
    stats = collect_statistics(model, tokens, progress=False)
    _assert_unchanged(model, snap)
    assert model.training and not model.transformer.wte.weight.requires_grad
    model.eval()
    ref = _reference_gcov(model, [tokens])
    for name, G in stats.gcov.items():
        torch.testing.assert_close(G, ref[name], rtol=1e-10, atol=1e-14 * float(ref[name].abs().max()))


def test_model_restored_when_a_pass_fails():
    model, _ = tiny_llama()
    model.train()
    snap = _snapshot(model)
    bad = torch.full((1, 4), 10_000)  # out of the vocabulary: embedding fails
    with pytest.raises((IndexError, RuntimeError)):
        collect_statistics(model, bad, progress=False)
    _assert_unchanged(model, snap)


def test_gradients_false_and_errors():
    model, _ = tiny_llama()
    tokens = torch.randint(0, 256, (2, 8))
    stats = collect_statistics(model, tokens, gradients=False, progress=False)
    assert stats.gcov is None and stats.loss > 0
    with pytest.raises(ValueError, match="gradients=True"):
        stats.kfac_loss_increase("model.layers.0.mlp.up_proj", torch.zeros(64, 32))
    stats = collect_statistics(model, tokens, ["model.layers.0.mlp.up_proj"], progress=False)
    with pytest.raises(ValueError, match="64x32"):
        stats.kfac_loss_increase("model.layers.0.mlp.up_proj", torch.zeros(32, 64))
    with pytest.raises(KeyError, match="no statistics"):
        stats.kfac_loss_increase("model.layers.0.mlp.down_proj", torch.zeros(32, 64))


# ----------------------------------------------------------------------------- K-FAC

class _LinearLM(nn.Module):
    """logits = head(embedding(ids)): a causal LM whose only linear layer is its head."""

    def __init__(self, vocab: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim, dtype=torch.float64)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
            self.head.weight.zero_()  # uniform predictions

    def forward(self, input_ids, **_):
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))


@pytest.mark.parametrize("seed", [0, 1])
def test_kfac_exact_where_fisher_is_the_hessian(seed):
    """A case in which N/(2 N_pred) tr(G E C E^T) is the exact second-order term.

    Zero head weight (p uniform) and the V^2 sequences (a, b): every input is followed by
    every token once, so the observed g_t g_t^T average to the Gauss-Newton factor
    diag(p) - p p^T for each input, the empirical Fisher is the Hessian, the gradient is
    zero and K-FAC's Kronecker factorization is exact (inputs of the unpredicted
    positions have the same second moment as those of the predicted ones).
    """
    V, d = 8, 4
    model = _LinearLM(V, d, seed)
    a, b = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    tokens = torch.stack([a.reshape(-1), b.reshape(-1)], 1)  # (V^2, 2)
    stats = collect_statistics(model, tokens, ["head"], progress=False)
    assert (stats.n_tokens, stats.n_predicted) == (2 * V * V, V * V)
    W0 = model.head.weight.detach().clone()

    def loss_at(W):
        logits = model.embed(tokens[:, :1]) @ W.T
        return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1], reduction="mean")

    H = torch.autograd.functional.hessian(loss_at, W0).reshape(V * d, V * d)
    grad = torch.func.grad(loss_at)(W0)
    assert float(grad.detach().abs().max()) < 1e-14
    g = torch.Generator().manual_seed(seed + 10)
    for _ in range(3):
        E = torch.randn(V, d, generator=g, dtype=torch.float64)
        exact = 0.5 * float(E.reshape(-1) @ H @ E.reshape(-1))
        assert stats.kfac_loss_increase("head", E) == pytest.approx(exact, rel=1e-10)
        # and it predicts the measured loss increase to second order
        for eps in (1e-2, 1e-3):
            with torch.no_grad():
                measured = float(loss_at(W0 - eps * E) - loss_at(W0))
            pred = stats.kfac_loss_increase("head", eps * E)
            assert abs(measured - pred) <= 2 * eps * pred
    # not exact when the data are not balanced: a control that the test can fail
    skewed = tokens[tokens[:, 1] < V // 2]
    stats = collect_statistics(model, skewed, ["head"], progress=False)
    E = torch.randn(V, d, generator=g, dtype=torch.float64)
    H = torch.autograd.functional.hessian(
        lambda W: F.cross_entropy(model.embed(skewed[:, 0]) @ W.T, skewed[:, 1]), W0)
    exact = 0.5 * float(E.reshape(-1) @ H.reshape(V * d, V * d) @ E.reshape(-1))
    assert stats.kfac_loss_increase("head", E) != pytest.approx(exact, rel=0.05)


def _sample_from(model, n_seq, seq_len, gen):
    """Sequences drawn from the model itself: the observed tokens then follow its own
    predictions, so the empirical Fisher estimates the expected Hessian of the loss."""
    ids = torch.randint(0, 256, (n_seq, 1), generator=gen)
    with torch.no_grad():
        for _ in range(seq_len - 1):
            p = torch.softmax(model(input_ids=ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)], 1)
    return ids


def _spearman(a, b) -> float:
    ra, rb = (torch.tensor(v).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.fixture
def one_thread():
    """Many tiny forward passes: one thread is faster than several on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("make,types_", [
    (tiny_llama, ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj")),
    (tiny_gpt2, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
])
def test_kfac_predicts_loss_increase_of_small_perturbations(make, types_, one_thread, seed=0):
    """Measured curvature of the mean loss vs N/(2 N_pred) tr(G E C E^T) on a tiny LM.

    K-FAC is an approximation (empirical Fisher for the Hessian, positions independent,
    inputs independent of gradients), so only the order of magnitude and the ranking over
    random and structured perturbations E (|E| = 1% of |W|) are checked. The first-order
    term is removed by the symmetric difference (l(W+E) + l(W-E))/2 - l(W).
    (q_proj/k_proj are left out: at random init their curvature is ~1e-11, below the
    sampling noise of 2000 tokens.)
    """
    model, _ = make(seed=seed)
    model.double()
    gen = torch.Generator().manual_seed(seed)
    tokens = _sample_from(model, 64, 32, gen)
    stats = collect_statistics(model, tokens, progress=False)
    base = _mean_loss(model, tokens)
    preds, measured = [], []
    for name, mod in find_linear_layers(model).items():
        if layer_type(name) not in types_:
            continue
        W, _ = linear_weight(mod)
        vg = torch.linalg.eigh(stats.gcov[name])[1]
        vc = torch.linalg.eigh(stats.cov[name])[1]
        weight = mod.weight
        orig = weight.detach().clone()
        for k in range(4):  # two random E, two rank-one along eigenvectors of G and C
            E = (torch.randn(W.shape, generator=gen, dtype=torch.float64) if k < 2
                 else torch.outer(vg[:, -1 - 2 * (k - 2)], vc[:, -1 - 2 * (k - 2)]))
            E = E * (1e-2 * W.norm() / E.norm())
            out = []
            for s in (1, -1):
                with torch.no_grad():  # Conv1D stores W^T
                    weight.copy_(orig - s * (E if weight.shape == E.shape else E.T))
                out.append(_mean_loss(model, tokens))
            with torch.no_grad():
                weight.copy_(orig)
            measured.append((out[0] + out[1]) / 2 - base)
            preds.append(stats.kfac_loss_increase(name, E))
    ratio = torch.tensor(measured) / torch.tensor(preds)
    assert 1 / 3 < float(ratio.median()) < 3
    assert _spearman(preds, measured) > 0.6


@pytest.mark.cuda
def test_statistics_on_cuda_match_cpu():
    model, _ = tiny_llama(seed=5)
    model.double()
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    cpu = collect_statistics(model, tokens, progress=False)
    gpu = collect_statistics(model, tokens, device="cuda", progress=False)
    assert next(model.parameters()).is_cuda and all(p.grad is None for p in model.parameters())
    for name in cpu.gcov:
        assert gpu.gcov[name].is_cuda and gpu.cov[name].is_cuda
        torch.testing.assert_close(gpu.gcov[name].cpu(), cpu.gcov[name], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(gpu.cov[name].cpu(), cpu.cov[name], rtol=1e-9, atol=1e-14)
    E = torch.randn(32, 64, dtype=torch.float64)
    name = "model.layers.0.mlp.down_proj"
    assert gpu.kfac_loss_increase(name, E) == pytest.approx(cpu.kfac_loss_increase(name, E), rel=1e-9)

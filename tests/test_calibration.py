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

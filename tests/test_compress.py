"""compress() on tiny models made in the test: exactness on planted structure,
consistent accounting, the input model untouched, clear errors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import tiny_gpt2, tiny_llama

from kronlab.compress import METHODS, compress
from kronlab.layers import KronLinear, LowRankLinear
from kronlab.models import find_linear_layers, linear_weight


def _plant(model, kind, seed=0):
    """Overwrite every decoder linear weight with a planted rank-2 structure."""
    g = torch.Generator().manual_seed(seed)
    for _name, mod in find_linear_layers(model).items():
        W, _ = linear_weight(mod)
        m, n = W.shape
        if kind == "kron":
            Wn = sum(torch.kron(torch.randn(m // 8, n // 4, generator=g),
                                torch.randn(8, 4, generator=g)) for _ in range(2))
        else:
            Wn = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
        Wn = Wn / Wn.norm() * W.norm()
        with torch.no_grad():
            if mod.weight.shape == (m, n):
                mod.weight.copy_(Wn)
            else:  # Conv1D stores (in, out)
                mod.weight.copy_(Wn.T)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("maker", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", METHODS)
def test_planted_structure_is_recovered_exactly(maker, method):
    model, _ = maker(seed=1)
    _plant(model, "kron" if method.startswith("kron") else "lowrank")
    calib = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, x)
    # the planted structure lives in the natural channel order: no variance permutation
    cm, report = compress(model, method=method, ratio=0.5, calibration=calib, progress=False,
                          permute=None)
    out = _logits(cm, x)
    assert torch.allclose(out, ref, atol=2e-3, rtol=1e-3), (out - ref).abs().max()
    assert max(r.weight_error for r in report.layers) < 1e-4
    assert max(r.output_error for r in report.layers) < 1e-4
    cls = KronLinear if method.startswith("kron") else LowRankLinear
    assert all(isinstance(cm.get_submodule(r.name), cls) for r in report.layers)


@pytest.mark.parametrize("method", METHODS)
def test_accounting_is_consistent_and_input_untouched(method):
    model, _ = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    cm, report = compress(model, method=method, ratio=0.6, calibration=calib, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "input model was modified"
    assert not any(isinstance(m, (KronLinear, LowRankLinear)) for m in model.modules())
    for r in report.layers:
        mod = cm.get_submodule(r.name)
        assert mod.num_params - (0 if mod.bias is None else mod.bias.numel()) == r.params
        assert r.params <= 0.6 * r.dense_params + 1e-9
        assert r.dense_params == r.shape[0] * r.shape[1]
        assert tuple(mod.to_dense().shape) == r.shape
    dense_total = sum(p.numel() for p in model.parameters())
    saved = report.layer_params_before - report.layer_params_after
    assert report.model_params_before == dense_total
    assert report.model_params_after == sum(p.numel() for p in cm.parameters())
    assert report.model_params_after == dense_total - saved


def test_output_error_falls_as_ratio_grows():
    model, _ = tiny_llama(seed=0)
    calib = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    errs = []
    for ratio in (0.2, 0.5, 0.9):
        _, rep = compress(model, method="kron-aa", ratio=ratio, calibration=calib, progress=False)
        errs.append(rep.summary()["mean_output_error"])
    assert errs[0] > errs[1] > errs[2]


def test_macs_budget_is_respected():
    model, _ = tiny_llama(seed=0)
    _, rep = compress(model, method="kron", ratio=0.9, macs_ratio=0.6, progress=False)
    assert all(r.macs <= 0.6 * r.dense_macs for r in rep.layers)


def test_in_place_modifies_the_model():
    model, _ = tiny_llama(seed=0)
    cm, _ = compress(model, method="svd", ratio=0.5, in_place=True, progress=False)
    assert cm is model
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "tucker", "ratio": 0.5}, "valid methods: kron, kron-aa, kron-fisher, svd, svd-aa, svd-fisher"),
    ({"method": "kron", "ratio": 0.0}, r"ratio must be in \(0, 1\]"),
    ({"method": "kron", "ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ({"method": "kron-aa", "ratio": 0.5}, "needs calibration"),
    ({"method": "kron", "ratio": 0.5, "layers": ["nothing.*"]}, "no linear layers match"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=match):
        compress(model, progress=False, **kwargs)


def test_per_type_shape_policy_shares_shapes_across_blocks():
    model, _ = tiny_llama(seed=0)
    _, rep = compress(model, method="kron", ratio=0.5, shape_policy="per-type", progress=False)
    by_type = {}
    for r in rep.layers:
        by_type.setdefault(r.name.split(".")[-1], set()).add(r.a_shape)
    assert all(len(shapes) == 1 for shapes in by_type.values())
    with pytest.raises(ValueError, match="shape_policy must be"):
        compress(model, method="kron", ratio=0.5, shape_policy="global", progress=False)

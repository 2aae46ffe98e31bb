"""KronLinear and LowRankLinear against dense references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlab import KronFactors, LowRankFactors
from kronlab.layers import KronLinear, LowRankLinear

# (a_shape, b_shape): square, rectangular, and the edge cases m1 = 1, n2 = 1,
# n1 = 1, m2 = 1.
SHAPES = [((3, 4), (5, 2)), ((4, 4), (4, 4)), ((1, 3), (6, 4)), ((2, 6), (3, 1)),
          ((5, 1), (2, 7)), ((2, 3), (1, 4)), ((1, 1), (3, 5))]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (3e-2, 3e-2)}


def _factors(a_shape, b_shape, rank, *, perm, seed=0, numpy=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, *a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(rank, *b_shape, generator=g, dtype=torch.float64)
    n = a_shape[1] * b_shape[1]
    p = torch.randperm(n, generator=g) if perm else None
    if numpy:
        return KronFactors(A.numpy(), B.numpy(), None if p is None else p.numpy())
    return KronFactors(A, B, p)


def _kron_reference(f: KronFactors) -> torch.Tensor:
    """Independent dense reference: explicit torch.kron sum, then undo the gather."""
    A, B = torch.as_tensor(f.A), torch.as_tensor(f.B)
    K = sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))
    if f.perm is None:
        return K
    W = torch.empty_like(K)
    W[:, torch.as_tensor(f.perm)] = K  # W[:, perm] = K
    return W


def pairwise(**factors):
    """A small set of cases covering every pair of values of every two factors (greedy
    all-pairs): the full grid here has 336 cases, this set ~25; the hypothesis test below
    samples the rest of the space."""
    names = list(factors)
    values = [list(v) for v in factors.values()]
    todo = {(i, a, j, b) for i in range(len(names)) for j in range(i + 1, len(names))
            for a in range(len(values[i])) for b in range(len(values[j]))}
    cases = []
    while todo:
        i, a, j, b = min(todo)
        case = {i: a, j: b}
        for k in range(len(names)):
            if k in case:
                continue
            case[k] = max(range(len(values[k])), key=lambda v: sum(
                (min(k, q), v if k < q else case[q], max(k, q), case[q] if k < q else v) in todo
                for q in case))
        todo -= {(p, case[p], q, case[q]) for p in case for q in case if p < q}
        cases.append(tuple(values[k][case[k]] for k in range(len(names))))
    return cases


LAYER_FACTORS = {"shape": SHAPES, "rank": [1, 3], "order": ["a_first", "b_first"],
                 "perm": [False, True], "bias": [False, True],
                 "dtype": [torch.float32, torch.float64, torch.bfloat16]}
LAYER_CASES = pairwise(**LAYER_FACTORS)


def test_pairwise_covers_every_pair():
    vals = list(LAYER_FACTORS.values())
    assert len(LAYER_CASES) < 40
    for p in range(len(vals)):
        for q in range(p + 1, len(vals)):
            seen = {(c[p], c[q]) for c in LAYER_CASES}
            assert seen == {(a, b) for a in vals[p] for b in vals[q]}


@pytest.mark.parametrize("shape,rank,order,perm,bias,dtype", LAYER_CASES)
def test_kron_linear_matches_dense(shape, rank, order, perm, bias, dtype):
    a_shape, b_shape = shape
    f = _factors(a_shape, b_shape, rank, perm=perm)
    m, n = f.shape
    b = torch.randn(m, dtype=torch.float64) if bias else None
    layer = KronLinear.from_factors(f, b, dtype=dtype, order=order)
    assert layer.order == order and layer.A.dtype == dtype
    W = _kron_reference(f)
    torch.testing.assert_close(torch.as_tensor(f.to_dense()), W, rtol=1e-12, atol=1e-12)
    rtol, atol = TOL[dtype]
    W_rounded = _kron_reference(KronFactors(layer.A.detach().double(), layer.B.detach().double(),
                                            f.perm))
    torch.testing.assert_close(layer.to_dense().double(), W_rounded, rtol=rtol, atol=atol * 10)
    for batch in [(), (3,), (2, 5)]:
        x = torch.randn(*batch, n, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x.to(dtype))
        assert y.shape == (*batch, m) and y.dtype == dtype
        # reference in float64 from the layer's own (rounded) parameters
        ref = F.linear(x.to(dtype).double(), W_rounded,
                       None if b is None else layer.bias.double())
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(y.double() / scale, ref / scale, rtol=rtol, atol=atol)


@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("grad", [False, True])
def test_kron_linear_chunked_tokens(order, grad):
    """Many tokens go through the chunked path (out= writes, or cat with autograd)."""
    f = _factors((4, 6), (5, 3), 2, perm=True, seed=1)
    layer = KronLinear.from_factors(f, torch.randn(20), dtype=torch.float64, order=order,
                                    chunk_bytes=1)  # chunks of 16 tokens
    x = torch.randn(2, 37, 18, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    ref = F.linear(x, layer.to_dense(), layer.bias.detach())
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(m1=st.integers(1, 5), n1=st.integers(1, 5), m2=st.integers(1, 5), n2=st.integers(1, 5),
       rank=st.integers(1, 4), perm=st.booleans(), tokens=st.integers(0, 40),
       order=st.sampled_from(["a_first", "b_first"]))
def test_kron_linear_property(m1, n1, m2, n2, rank, perm, tokens, order):
    f = _factors((m1, n1), (m2, n2), rank, perm=perm, seed=tokens)
    layer = KronLinear.from_factors(f, order=order, chunk_bytes=64)
    x = torch.randn(tokens, n1 * n2, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, x @ _kron_reference(f).T, rtol=1e-10, atol=1e-10)


def test_kron_linear_numpy_factors_and_default_dtype():
    f = _factors((2, 3), (4, 2), 2, perm=True, numpy=True)
    layer = KronLinear.from_factors(f, np.arange(8.0))
    assert layer.A.dtype == torch.float64 and layer.perm.dtype == torch.long
    torch.testing.assert_close(layer.to_dense(), torch.as_tensor(f.to_dense()))
    layer32 = KronLinear.from_factors(f, dtype=torch.float32)
    assert layer32.A.dtype == torch.float32 and layer32.bias is None


def test_kron_linear_costs_and_auto_order():
    # a_first: r*m1*n2*(n1+m2) = 2*2*8*(3+4) = 224; b_first: r*m2*n1*(n2+m1) = 2*4*3*(8+2) = 240
    layer = KronLinear(2, (2, 3), (4, 8))
    assert layer.order == "a_first" and layer.forward_macs == 224
    assert layer.order_macs("b_first") == 240
    assert layer.num_params == 2 * (2 * 3 + 4 * 8) + 8
    assert KronLinear(2, (2, 3), (4, 8), bias=False).num_params == 2 * (6 + 32)
    f = _factors((2, 3), (4, 8), 2, perm=True)
    assert layer.forward_macs == f.forward_macs
    layer.order = "b_first"
    assert layer.forward_macs == 240
    layer2 = KronLinear(3, (8, 2), (3, 4))  # b_first is cheaper here
    assert layer2.order == "b_first"
    assert layer2.forward_macs == min(3 * 8 * 4 * (2 + 3), 3 * 3 * 2 * (4 + 8))
    assert "rank=3" in repr(layer2) and "order='b_first'" in repr(layer2)


def test_kron_linear_bad_input():
    with pytest.raises(ValueError, match="order"):
        KronLinear(1, (2, 2), (2, 2), order="c_first")
    with pytest.raises(ValueError, match="positive"):
        KronLinear(0, (2, 2), (2, 2))
    with pytest.raises(ValueError, match="expects 4"):
        KronLinear(1, (2, 2), (2, 2))(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="permutation"):
        KronLinear.from_factors(KronFactors(torch.ones(1, 2, 2), torch.ones(1, 2, 2),
                                            torch.tensor([0, 0, 1, 2])))
    with pytest.raises(ValueError, match="bias"):
        KronLinear.from_factors(KronFactors(torch.ones(1, 2, 2), torch.ones(1, 2, 2)),
                                torch.zeros(3))


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_kron_linear_gradients(order):
    f = _factors((3, 2), (2, 4), 2, perm=True)
    layer = KronLinear.from_factors(f, torch.randn(6), order=order)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    W = layer.to_dense().requires_grad_(True)
    loss_w = F.linear(x, W, layer.bias.detach()).square().sum()
    gx_ref, gW = torch.autograd.grad(loss_w, [x, W])
    layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, gx_ref)
    # dL/dA_i = sum over blocks of <G_block, B_i> (chain rule through the Kronecker product)
    G = gW[:, torch.as_tensor(f.perm)].reshape(3, 2, 2, 4).permute(0, 2, 1, 3)
    gA = torch.einsum("ajck,rck->raj", G, layer.B.detach())
    torch.testing.assert_close(layer.A.grad, gA)
    assert layer.B.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("numpy_in", [False, True])
def test_low_rank_linear_matches_dense(dtype, bias, numpy_in):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                            dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64) if bias else None
    f = LowRankFactors(U.numpy(), V.numpy()) if numpy_in else LowRankFactors(U, V)
    layer = LowRankLinear.from_factors(f, b, dtype=dtype)
    assert layer.U.dtype == dtype
    torch.testing.assert_close(layer.to_dense().double(), (U.to(dtype).double() @ V.to(dtype).double()),
                               rtol=TOL[dtype][0], atol=TOL[dtype][1] * 10)
    rtol, atol = TOL[dtype]
    for batch in [(), (3,), (2, 5)]:
        x = torch.randn(*batch, 5, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            y = layer(x)
        ref = F.linear(x.double(), (layer.U.double() @ layer.V.double()),
                       None if b is None else layer.bias.double())
        scale = ref.abs().max().clamp_min(1.0)
        assert y.shape == (*batch, 7)
        torch.testing.assert_close(y.double() / scale, ref / scale, rtol=rtol, atol=atol)
    assert layer.num_params == 3 * (7 + 5) + (7 if bias else 0)
    assert layer.forward_macs == 3 * 12 == f.forward_macs
    assert "rank=3" in repr(layer)


def test_low_rank_bad_input():
    with pytest.raises(ValueError, match="U must be"):
        LowRankLinear.from_factors(LowRankFactors(torch.ones(4, 2), torch.ones(3, 5)))


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_kron_linear_cuda(order):
    f = _factors((4, 6), (8, 3), 3, perm=True)
    layer = KronLinear.from_factors(f, torch.randn(32), order=order, dtype=torch.float32)
    x = torch.randn(2, 300, 18)
    with torch.no_grad():
        y_cpu = layer(x)
        y = layer.to("cuda")(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_low_rank_linear_cuda():
    layer = LowRankLinear(3, 10, 6)
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x),
                                   rtol=1e-4, atol=1e-4)

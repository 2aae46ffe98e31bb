r"""Orthogonal matrices: Procrustes problems, Hadamard and Haar-random rotations.

Pure functions on torch tensors (no ``torch.nn``): the model-level rotation code
(:mod:`kronlab.rotate`) calls them.

* :func:`orthogonal_procrustes`: ``argmax_Q tr(Q^T M)`` over orthogonal ``Q``, the
  polar factor ``U V^T`` of ``M = U S V^T`` (Schonemann, 1966).
* :func:`weighted_procrustes`: ``argmin_Q sum_j tr(S_j Q^T R_j Q) - 2 tr(Q^T K)`` over
  orthogonal ``Q`` (symmetric PSD ``S_j``, ``R_j``), the activation-weighted Procrustes
  problem, by projected gradient descent with a polar retraction and a step that never
  increases the objective.
* :func:`hadamard`: an orthogonal Hadamard matrix ``H / sqrt(d)`` (Sylvester and Paley
  constructions); :func:`random_orthogonal`: a Haar-distributed one.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard", "hadamard_orders", "orthogonal_procrustes", "random_orthogonal",
           "weighted_procrustes"]

_F64 = torch.float64


def orthogonal_procrustes(M: torch.Tensor) -> torch.Tensor:
    r"""The orthogonal ``Q`` (d x d) maximising ``tr(Q^T M)``: ``Q = U V^T`` for ``M = U S V^T``.

    Equivalently ``argmin_Q ||A Q - B||_F`` for ``M = A^T B``. Unique when ``M`` is
    non-singular. Cost: one d x d SVD. Computed in float64.

    >>> Q = orthogonal_procrustes(torch.diag(torch.tensor([2.0, -1.0])))
    >>> Q.tolist()
    [[1.0, 0.0], [0.0, -1.0]]
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be square (d, d), got shape {tuple(M.shape)}")
    U, _, Vh = torch.linalg.svd(M.to(_F64))
    return U @ Vh


def _quad(Q, K, terms):
    """``f(Q) = sum_j tr(S_j Q^T R_j Q) - 2 tr(Q^T K)`` and its Euclidean gradient."""
    f = -2.0 * float((Q * K).sum())
    grad = -2.0 * K
    for S, R in terms:
        RQ = R @ Q
        QS = Q @ S
        f += float((RQ * QS).sum())        # tr((Q S)^T R Q) = tr(S Q^T R Q), S symmetric
        grad = grad + 2.0 * (RQ @ S)
    return f, grad


def _value(Q, K, terms):
    f = -2.0 * float((Q * K).sum())
    for S, R in terms:
        f += float(((R @ Q) * (Q @ S)).sum())
    return f


def _polar(A):
    U, _, Vh = torch.linalg.svd(A)
    return U @ Vh


def weighted_procrustes(K: torch.Tensor, terms, Q0: torch.Tensor | None = None, *,
                        max_iter: int = 100, tol: float = 1e-9):
    r"""Minimise ``f(Q) = sum_j tr(S_j Q^T R_j Q) - 2 tr(Q^T K)`` over orthogonal ``Q``.

    ``terms`` is a list of pairs ``(S_j, R_j)`` of symmetric PSD d x d matrices. With no
    terms (or all ``R_j`` multiples of I) this is :func:`orthogonal_procrustes` of ``K``.
    It is the Q-step of an activation-weighted Procrustes problem: a layer that reads
    the rotated stream contributes ``tr(G (W - W_hat Q^T) C (W - W_hat Q^T)^T)``, i.e.
    ``S = W_hat^T G W_hat``, ``R = C`` and ``C W^T G W_hat`` to ``K`` (see
    :func:`kronlab.rotate.procrustes_rotation`).

    Algorithm: projected gradient with the polar retraction,
    ``Q <- polar(Q - t grad f(Q))``. ``f`` is a convex quadratic in the entries of Q
    whose gradient has Lipschitz constant at most ``L = 2 sum_j ||S_j|| ||R_j||``; on
    orthogonal matrices the step ``t = 1/L`` minimises a majorizer of ``f``, so it never
    increases ``f`` (majorization-minimization, as Kiers 1990 for weighted Procrustes).
    Longer steps are tried first (doubling after each success, halving down to ``1/L``)
    and kept only when ``f`` decreases. Stops when a step lowers ``f`` by less than
    ``tol * (|f| + ||K||_F)`` or after ``max_iter`` steps.

    Parameters
    ----------
    K : (d, d) tensor
    terms : list of (S, R) pairs of (d, d) tensors
    Q0 : a starting orthogonal matrix; the descent starts from the better of Q0 and the
        unweighted solution ``orthogonal_procrustes(K)`` (descent never leaves the sign of
        ``det Q`` it started with), so ``f(Q) <= f(Q0)``

    Returns ``(Q, info)`` with ``info["history"]`` the values of ``f`` (start and after
    every step), ``info["iterations"]`` and ``info["riemannian_grad_norm"]`` (the norm of
    the gradient projected on the tangent space at the returned Q: 0 at a stationary point).
    Cost per step: ``3 d^3`` multiply-adds per term, one d x d SVD per trial step.
    """
    K = K.to(_F64)
    d = K.shape[0]
    if K.shape != (d, d):
        raise ValueError(f"K must be square (d, d), got shape {tuple(K.shape)}")
    terms = [(S.to(device=K.device, dtype=_F64), R.to(device=K.device, dtype=_F64))
             for S, R in terms]
    for S, R in terms:
        if S.shape != (d, d) or R.shape != (d, d):
            raise ValueError(f"every term (S, R) must be ({d}, {d}), got {tuple(S.shape)}, "
                             f"{tuple(R.shape)}")
    # start from the better of Q0 and the unweighted solution: the descent stays in the
    # connected component (sign of det) of its start, and the two may differ
    Q = orthogonal_procrustes(K)
    if Q0 is not None and max_iter == 0:  # no steps: the start itself
        f0 = _value(Q0.to(device=K.device, dtype=_F64), K, terms)
        return Q0.to(device=K.device, dtype=_F64), {"history": [f0], "iterations": 0,
                                                      "riemannian_grad_norm": float("nan")}
    if Q0 is not None:
        Q0 = Q0.to(device=K.device, dtype=_F64)
        if _value(Q0, K, terms) <= _value(Q, K, terms):
            Q = Q0
    L = 2.0 * sum(float(torch.linalg.matrix_norm(S, ord=2)) * float(torch.linalg.matrix_norm(R, ord=2))
                  for S, R in terms)
    scale = float(torch.linalg.matrix_norm(K)) + 1e-300
    f, grad = _quad(Q, K, terms)
    history = [f]
    if L == 0.0:  # linear objective: one Procrustes step is exact
        Q = orthogonal_procrustes(K)
        history.append(_value(Q, K, terms))
        return Q, {"history": history, "iterations": 1, "riemannian_grad_norm": 0.0}
    t_min = 1.0 / L
    t = t_min
    it = 0
    for it in range(1, max_iter + 1):
        t = 2.0 * t
        while True:
            Qn = _polar(Q - t * grad)
            fn = _value(Qn, K, terms)
            if fn <= f or t <= t_min * (1 + 1e-12):
                break
            t = max(0.5 * t, t_min)
        if fn > f:  # rounding at the guaranteed step: stop where we are
            break
        decrease = f - fn
        Q = Qn
        f, grad = _quad(Q, K, terms)
        history.append(f)
        if decrease <= tol * (abs(f) + scale):
            break
    sym = Q.T @ grad
    rgrad = grad - Q @ (0.5 * (sym + sym.T))
    return Q, {"history": history, "iterations": it,
               "riemannian_grad_norm": float(torch.linalg.matrix_norm(rgrad))}


def random_orthogonal(d: int, seed: int = 0, *, dtype=_F64, device=None) -> torch.Tensor:
    """A Haar-distributed random orthogonal d x d matrix (QR of a Gaussian, signs fixed).

    Mezzadri (2007): ``Q R = Z`` with ``Z`` standard normal, then ``Q diag(sign(diag R))``.
    Deterministic for a given ``seed`` (a CPU generator, so the same on every device).

    >>> Q = random_orthogonal(4, seed=1)
    >>> bool(torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64)))
    True
    """
    d = _check_order(d)
    gen = torch.Generator().manual_seed(int(seed))
    Z = torch.randn(d, d, generator=gen, dtype=_F64)
    Q, R = torch.linalg.qr(Z)
    Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))
    return Q.to(device=device, dtype=dtype)


def _check_order(d) -> int:
    if isinstance(d, bool) or int(d) != d or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return int(d)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = chi(j - i)``, chi the quadratic character mod the prime q."""
    squares = torch.zeros(q, dtype=_F64)
    squares[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1.0
    chi = 2.0 * squares - 1.0
    chi[0] = 0.0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Paley I: order q + 1 for a prime q = 3 (mod 4)."""
    S = torch.zeros(q + 1, q + 1, dtype=_F64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(q + 1, dtype=_F64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II: order 2 (q + 1) for a prime q = 1 (mod 4)."""
    S = torch.zeros(q + 1, q + 1, dtype=_F64)
    S[0, 1:] = 1.0
    S[1:, 0] = 1.0
    S[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=_F64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=_F64)
    return torch.kron(S, A) + torch.kron(torch.eye(q + 1, dtype=_F64), B)


def _core(b: int):
    """A Hadamard matrix of order b from one Paley construction (or b = 1), else None."""
    if b == 1:
        return torch.ones(1, 1, dtype=_F64), "1"
    if b % 4 == 0 and _is_prime(b - 1) and (b - 1) % 4 == 3:
        return _paley1(b - 1), f"Paley I (q={b - 1})"
    if b % 4 == 0 and _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return _paley2(b // 2 - 1), f"Paley II (q={b // 2 - 1})"
    return None


def _construction(d: int):
    v2 = (d & -d).bit_length() - 1
    for a in range(v2, -1, -1):
        core = _core(d >> a)
        if core is not None:
            return a, core
    return None


def hadamard_orders(limit: int) -> list[int]:
    """The orders ``d <= limit`` that :func:`hadamard` can build.

    >>> hadamard_orders(40)
    [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    """
    return [d for d in range(1, int(limit) + 1) if _construction(d) is not None]


def hadamard(d: int, *, seed: int | None = None, dtype=_F64, device=None) -> torch.Tensor:
    r"""An orthogonal Hadamard matrix ``H / sqrt(d)`` (entries ``+-1/sqrt(d)``), d x d.

    ``H = H_{2^a} kron H_b`` with ``H_{2^a}`` Sylvester's and ``H_b`` a Paley matrix:
    Paley I for ``b = q + 1``, q a prime = 3 (mod 4), or Paley II for ``b = 2 (q + 1)``,
    q a prime = 1 (mod 4) (Paley, 1933); the largest power of two that leaves such a
    ``b`` is used. ``d = 576 = 2^4 * 36`` is Sylvester(16) kron Paley II(q=17).
    Hadamard matrices exist only for d = 1, 2 and multiples of 4; orders these
    constructions miss (e.g. 92) raise a ValueError naming the nearest buildable ones.

    ``seed``: multiply the columns by random signs (a randomized Hadamard transform, as
    in QuaRot), ``H D``; None keeps the plain matrix.

    >>> H = hadamard(12)
    >>> bool(torch.allclose(H @ H.T, torch.eye(12, dtype=torch.float64)))
    True
    """
    d = _check_order(d)
    found = _construction(d)
    if found is None:
        near = [k for k in hadamard_orders(2 * d + 8) if abs(k - d) <= max(8, d // 8)]
        raise ValueError(
            f"no Hadamard matrix of order {d} from the Sylvester and Paley constructions "
            f"(they exist only for 1, 2 and multiples of 4, and these constructions cover "
            f"d = 2^a (q + 1) and 2^a 2 (q + 1) for suitable primes q); buildable orders "
            f"near {d}: {near}. Use random_orthogonal(d) instead.")
    a, (H, _name) = found
    for _ in range(a):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    H = H / math.sqrt(d)
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (d,), generator=gen).to(_F64) * 2 - 1
        H = H * signs
    return H.to(device=device, dtype=dtype)

"""Shared numerical helpers: array-kind conversion, truncated SVDs, damped PSD roots.

All algorithms in kronlab compute on float64 torch tensors (CPU or CUDA) and hand
results back in the kind (numpy array or torch tensor), device and dtype of the
input. These helpers do that conversion and hold the few dense linear-algebra
kernels the solvers share.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "GCOV_MAX_DAMPING",
    "check_cov",
    "check_finite",
    "damped_cholesky",
    "from_work",
    "gcov_valid",
    "is_pair",
    "parse_gcov",
    "psd_sqrt_pair",
    "randomized_svd",
    "to_work",
    "truncated_svd",
]

WORK_DTYPE = torch.float64


def to_work(x, device=None, name: str = "W") -> torch.Tensor:
    """``x`` (numpy array, torch tensor or nested list) as a float64 torch tensor on ``device``.

    ``device=None`` keeps a tensor's device and puts numpy input on the CPU.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        dev = t.device if device is None else torch.device(device)
        return t.to(device=dev, dtype=WORK_DTYPE)
    try:
        a = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if np.iscomplexobj(a):
        raise ValueError(f"{name} must be real, got dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(
        device="cpu" if device is None else device)


def out_dtype_of(x):
    """The dtype results take for input ``x``: its own if floating, else float64."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.is_floating_point() else torch.float64
    a = np.asarray(x)
    return a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)


def from_work(t: torch.Tensor, like):
    """``t`` converted to the kind, device and (floating) dtype of ``like``."""
    dtype = out_dtype_of(like)
    if isinstance(like, torch.Tensor):
        return t.to(device=like.device, dtype=dtype)
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} NaN or Inf entries; all entries must be finite")


def check_cov(C: torch.Tensor, n: int, name: str = "cov", rtol: float = 1e-6, *,
              valid: str | None = None) -> torch.Tensor:
    """Validate a covariance: shape (n, n), finite, symmetric; return its exact symmetric part.

    ``valid`` describes the valid input in the error messages (default: the input
    covariance ``X^T X / N`` of a layer with n inputs).
    """
    what = valid or f"the input covariance X^T X / N of a layer with n={n} inputs"
    if C.ndim != 2 or tuple(C.shape) != (n, n):
        raise ValueError(f"{name} has shape {tuple(C.shape)}; expected {(n, n)} ({what})")
    check_finite(C, name)
    scale = float(C.abs().max()) if C.numel() else 0.0
    asym = float((C - C.T).abs().max()) if C.numel() else 0.0
    if asym > rtol * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |C - C^T| = {asym:.3g}, max |C| = {scale:.3g}); "
                         + (f"{name} must be {valid}" if valid else
                            "a covariance X^T X / N must be symmetric"))
    return 0.5 * (C + C.T)


#: the largest relative ridge ``lam`` (times mean(diag G)) that damping may add to a dense
#: gcov; a G that needs more is indefinite beyond rounding and is refused
GCOV_MAX_DAMPING = 1e-2


def gcov_valid(m, m1=None, m2=None) -> str:
    pair = (f" or a pair (G1 ({m1}, {m1}), G2 ({m2}, {m2})) of symmetric PSD Kronecker factors"
            if m1 is not None else " or a pair (G1, G2) of symmetric PSD Kronecker factors with "
            f"G1.shape[0] * G2.shape[0] = {m}")
    return (f"the ({m}, {m}) output-gradient covariance E[g g^T] (g = dLoss/d(layer output); "
            f"symmetric PSD){pair}")


def is_pair(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and \
        len(getattr(x[0], "shape", np.shape(x[0]))) == 2


def parse_gcov(gcov, m1, m2, device, m=None):
    """``gcov``: a pair ``(G1 (m1, m1), G2 (m2, m2))`` or a dense G (m, m); -> (kind, G).

    With ``m1 = None`` (no a_shape known) a pair of any factor sizes with
    ``G1.shape[0] * G2.shape[0] = m`` is accepted. Checks shape, finiteness and symmetry.
    """
    m = m1 * m2 if m is None else m
    valid = gcov_valid(m, m1, m2)
    if gcov is None:
        return None, None
    if is_pair(gcov):
        G1 = to_work(gcov[0], device, name="gcov[0]")
        G2 = to_work(gcov[1], device, name="gcov[1]")
        ok = G1.ndim == 2 and G2.ndim == 2 and (
            (tuple(G1.shape), tuple(G2.shape)) == ((m1, m1), (m2, m2)) if m1 is not None
            else G1.shape[0] == G1.shape[1] and G2.shape[0] == G2.shape[1]
            and G1.shape[0] * G2.shape[0] == m)
        if not ok:
            raise ValueError(f"gcov=(G1, G2) has shapes {tuple(G1.shape)}, {tuple(G2.shape)}; "
                             f"gcov must be {valid}")
        return "kron", (check_cov(G1, G1.shape[0], "gcov[0]", valid=valid),
                        check_cov(G2, G2.shape[0], "gcov[1]", valid=valid))
    G = to_work(gcov, device, name="gcov")
    if G.ndim != 2 or tuple(G.shape) != (m, m):
        raise ValueError(f"gcov has shape {tuple(G.shape)}; gcov must be {valid}")
    return "dense", check_cov(G, m, "gcov", valid=valid)


def randomized_svd(M: torch.Tensor, k: int, *, n_oversamples: int = 10, n_power_iter: int = 4,
                   seed: int = 0):
    """Top-``k`` SVD of ``M`` (p x q) by the randomized range finder with power iterations.

    Halko, Martinsson and Tropp (2011), Algorithms 4.4 and 5.1: ``Q = orth((M M^T)^q M Omega)``
    with ``Omega`` Gaussian (q x (k + n_oversamples)), re-orthonormalised after every
    product, then the SVD of the small ``Q^T M``. Cost ``O((2 q + 2) p q_cols (k + s))``.

    Returns ``U`` (p, k), ``S`` (k,), ``Vh`` (k, q) and all ``k + n_oversamples`` computed
    singular values (estimates of the leading ones).
    """
    p, q = M.shape
    ell = min(k + n_oversamples, p, q)
    gen = torch.Generator(device=M.device).manual_seed(int(seed))
    Omega = torch.randn(q, ell, generator=gen, device=M.device, dtype=M.dtype)
    Q, _ = torch.linalg.qr(M @ Omega)
    for _ in range(n_power_iter):
        # (Q^T M)^T rather than M^T Q: MKL's transposed GEMM with few columns was measured
        # 10-40x slower (3 s vs 0.08 s for 4096 x 4096 times 11 columns)
        Z, _ = torch.linalg.qr((Q.T @ M).T)
        Q, _ = torch.linalg.qr(M @ Z)
    Bsmall = Q.T @ M
    Ub, S, Vh = torch.linalg.svd(Bsmall, full_matrices=False)
    U = Q @ Ub
    return U[:, :k], S[:k], Vh[:k], S


def truncated_svd(M: torch.Tensor, k: int, method: str = "auto", **kw):
    """Top-``k`` singular triplets of ``M`` by ``method`` in {"auto", "exact", "randomized"}.

    ``"auto"`` picks the randomized solver when ``M`` is large (smaller side >= 512) and
    ``k + oversampling`` is at most a quarter of its smaller side, else the exact SVD.
    Returns ``U, S, Vh, all_S, method_used`` where ``all_S`` holds every singular value the
    solver computed (all of them for the exact SVD).
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    small = min(M.shape)
    if method == "auto":
        ell = k + kw.get("n_oversamples", 10)
        method = "randomized" if (small >= 512 and 4 * ell <= small) else "exact"
    if method == "randomized":
        U, S, Vh, allS = randomized_svd(M, k, **kw)
        return U, S, Vh, allS, "randomized"
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k], S, "exact"


def damped_cholesky(C: torch.Tensor, damping: float = 1e-6, max_tries: int = 12, *,
                    max_damping: float | None = None, name: str = "cov",
                    valid: str = "a covariance X^T X / N"):
    """Lower Cholesky factor of ``C + lam * mean(diag C) * I``.

    Starts at ``lam = damping`` and multiplies it by 10 until the factorisation succeeds.
    Returns ``(L, lam)``; ``lam`` is the relative damping actually used. With
    ``max_damping`` the ladder stops there: a matrix that needs more is indefinite beyond
    rounding, and gets a ValueError (naming ``name`` and what would be ``valid``) rather
    than a large silent ridge. A negative mean diagonal is never a covariance.
    """
    n = C.shape[0]
    scale = float(torch.diagonal(C).mean()) if n else 1.0
    if max_damping is not None and n and scale < 0:
        raise ValueError(f"{name} is not positive semidefinite (mean diagonal {scale:.3g} < 0); "
                         f"pass {valid}")
    if not scale > 0:
        scale = 1.0
    lam = float(damping)
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    for _ in range(max_tries):
        if max_damping is not None and lam > max_damping * (1 + 1e-12):
            break
        L, info = torch.linalg.cholesky_ex(C + (lam * scale) * eye)
        if int(info) == 0:
            return L, lam
        lam = max(lam * 10.0, 1e-12)
    raise ValueError(f"{name} is not positive semidefinite (Cholesky failed even with damping "
                     f"{min(lam, max_damping or lam):.1e} times mean(diag {name})); pass {valid}")


def psd_sqrt_pair(C: torch.Tensor, damping: float = 1e-6, *, name: str = "cov factor",
                  valid: str = "a covariance"):
    """Symmetric ``S = Cd^{1/2}`` and ``S^{-1}`` of ``Cd = C + lam * mean(diag C) * I``.

    Eigenvalues of ``C`` below ``lam * mean(diag C)`` in magnitude (or negative from
    rounding) are raised to that floor. Returns ``(S, S_inv, lam)``. Cost: one eigh, n^3.
    """
    evals, V = torch.linalg.eigh(C)
    scale = float(torch.diagonal(C).mean()) if C.shape[0] else 1.0
    if not scale > 0:
        scale = float(evals.abs().max()) or 1.0
    if float(evals.min()) < -1e-6 * max(float(evals.max()), 1e-300):
        raise ValueError(f"{name} is not positive semidefinite "
                         f"(smallest eigenvalue {float(evals.min()):.3g}); pass {valid}")
    floor = damping * scale
    d = torch.clamp(evals, min=0.0) + floor
    S = (V * d.sqrt()) @ V.T
    S_inv = (V * d.rsqrt()) @ V.T
    return 0.5 * (S + S.T), 0.5 * (S_inv + S_inv.T), float(damping)


def sq_singular_values(M: torch.Tensor) -> torch.Tensor:
    """Squared singular values of ``M``, descending, from the Gram of its smaller side.

    ``eigvalsh(M M^T)`` or ``eigvalsh(M^T M)`` (clamped at 0): cost ``p q min(p, q)`` plus one
    ``min(p, q)``-sized eigendecomposition, enough when only the spectrum is wanted.
    """
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(G).flip(0).clamp(min=0)

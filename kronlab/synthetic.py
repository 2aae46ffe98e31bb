"""Synthetic weights and input covariances for controlled experiments, and a power-law fit.

Timing lives in :mod:`kronlab.runtime` (:func:`~kronlab.runtime.time_rounds`).

Every generator takes a ``seed`` and returns float64 numpy arrays, so that a
notebook that calls it with the same arguments gets the same numbers. The
vocabulary is the book's: ``W`` (m x n) with ``m = m1 m2``, ``n = n1 n2``,
covariance ``C = X^T X / N`` (n x n) of activations ``X`` (N x n).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "fit_power_law",
    "isotropic_cov",
    "kronecker_cov",
    "planted_kronecker_sum",
    "power_law_matrix",
    "random_spd",
    "realistic_cov",
    "sample_activations",
]


def planted_kronecker_sum(a_shape, b_shape, rank: int, *, noise: float = 0.0, decay: float = 1.0,
                          seed: int = 0):
    r"""A planted sum of Kronecker products plus Gaussian noise.

    ``W0 = sum_{i<rank} w_i A_i kron B_i`` with ``A_i`` (m1, n1), ``B_i`` (m2, n2) of
    i.i.d. N(0, 1) entries and weights ``w_i = (i + 1)^{-decay}``; then
    ``W = W0 + noise * ||W0||_F / sqrt(m n) * G`` with G of N(0, 1) entries, so that
    ``noise`` is the expected ratio ``||W - W0||_F / ||W0||_F`` (the inverse
    amplitude signal-to-noise ratio).

    Returns ``(W, W0)``, both (m1 m2, n1 n2).

    >>> W, W0 = planted_kronecker_sum((2, 3), (4, 5), 2, noise=0.1)
    >>> W.shape, W0.shape
    ((8, 15), (8, 15))
    """
    (m1, n1), (m2, n2) = (tuple(int(v) for v in a_shape), tuple(int(v) for v in b_shape))
    if int(rank) < 1 or int(rank) > min(m1 * n1, m2 * n2):
        raise ValueError(f"rank must be in [1, {min(m1 * n1, m2 * n2)}] for a_shape={(m1, n1)}, "
                         f"b_shape={(m2, n2)}; got {rank!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    W0 = np.zeros((m1 * m2, n1 * n2))
    for i in range(int(rank)):
        W0 += (i + 1.0) ** (-decay) * np.kron(rng.standard_normal((m1, n1)),
                                               rng.standard_normal((m2, n2)))
    G = rng.standard_normal(W0.shape)
    W = W0 + noise * np.linalg.norm(W0) / np.sqrt(W0.size) * G
    return W, W0


def power_law_matrix(m: int, n: int, *, exponent: float = 0.5, seed: int = 0):
    r"""A random ``m x n`` matrix with singular values ``sigma_k = k^{-exponent}``.

    ``W = U diag(sigma) V^T`` with Haar-random orthonormal U, V: a stand-in for a trained
    weight, whose spectrum decays slowly and which has no planted Kronecker structure.
    Normalised to ``||W||_F = 1``.
    """
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.arange(1, k + 1, dtype=float) ** (-float(exponent))
    W = (U * s) @ V.T
    return W / np.linalg.norm(W)


def random_spd(n: int, *, condition: float = 100.0, seed: int = 0):
    """A random symmetric positive definite ``n x n`` matrix with eigenvalues spread
    geometrically over ``[1 / condition, 1]`` and Haar-random eigenvectors."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.geomspace(1.0, 1.0 / float(condition), n)
    return (Q * ev) @ Q.T


def isotropic_cov(n: int):
    """The identity: inputs with uncorrelated channels of equal variance."""
    return np.eye(int(n))


def kronecker_cov(n1: int, n2: int, *, condition: float = 100.0, seed: int = 0):
    """A Kronecker-structured covariance: returns ``(C1, C2)``; the dense C is ``kron(C1, C2)``.

    Each factor is :func:`random_spd` with the given condition number (the dense C has
    condition ``condition**2``).
    """
    C1 = random_spd(n1, condition=condition, seed=seed)
    C2 = random_spd(n2, condition=condition, seed=seed + 1)
    return C1, C2


def realistic_cov(n: int, *, scale_sigma: float = 1.0, n_outliers: int = 4,
                  outlier_scale: float = 30.0, n_factors: int = 8, correlation: float = 0.5,
                  seed: int = 0):
    r"""An input covariance that looks like a transformer layer's: ``C = D K D``.

    * ``D = diag(s)``: per-channel scales, log-normal (``log s ~ N(0, scale_sigma^2)``,
      heavy-tailed) with ``n_outliers`` randomly placed channels multiplied by
      ``outlier_scale`` (the "massive activation" channels of LLMs);
    * ``K``: a correlation matrix ``(1 - correlation) I + correlation F F^T`` with
      ``F`` (n, n_factors) Gaussian, rescaled to unit diagonal, so channels are correlated
      through a few shared directions.

    Returns the dense (n, n) C and the indices of the outlier channels.
    """
    rng = np.random.default_rng(seed)
    s = np.exp(scale_sigma * rng.standard_normal(n))
    outliers = rng.choice(n, size=int(n_outliers), replace=False) if n_outliers else np.array([], int)
    s[outliers] *= outlier_scale
    F = rng.standard_normal((n, int(n_factors))) / np.sqrt(max(int(n_factors), 1))
    K = (1.0 - correlation) * np.eye(n) + correlation * (F @ F.T)
    d = np.sqrt(np.diag(K))
    K = K / d[:, None] / d[None, :]
    C = s[:, None] * K * s[None, :]
    return 0.5 * (C + C.T), np.sort(outliers)


def sample_activations(C, N: int, *, seed: int = 0):
    """``N`` Gaussian activations with second moment ``C``: X (N, n) with ``E[X^T X / N] = C``.

    ``C`` may be dense (n, n) or a pair ``(C1, C2)`` for ``kron(C1, C2)``.
    """
    if isinstance(C, (tuple, list)):
        C = np.kron(C[0], C[1])
    C = np.asarray(C, dtype=float)
    ev, V = np.linalg.eigh(0.5 * (C + C.T))
    root = V * np.sqrt(np.clip(ev, 0.0, None))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((int(N), C.shape[0])) @ root.T


def fit_power_law(sizes, times):
    r"""Least-squares fit of ``t = c * size^p`` on log-log axes: returns ``(p, c)``.

    ``np.polyfit(log size, log t, 1)``; needs at least two distinct sizes.

    >>> p, c = fit_power_law([10, 20, 40], [1.0, 8.0, 64.0])
    >>> round(p, 6), round(c, 6)
    (3.0, 0.001)
    """
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.asarray(times, dtype=float))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("fit_power_law needs at least two distinct sizes")
    p, logc = np.polyfit(x, y, 1)
    return float(p), float(np.exp(logc))

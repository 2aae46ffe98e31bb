"""kronlab: compress neural-network layers with sums of Kronecker products.

The algorithms are plain functions on numpy arrays or torch tensors; the layers,
calibration, compression and evaluation code build on them.
"""

from ._choose import KronChoice, choose_kron, kron_cost
from ._compare import COMPARE_METHODS, fit_methods, method_errors
from ._factors import KronFactors, LowRankFactors
from ._lowrank import low_rank, low_rank_rank_for_budget
from ._nkp import kronecker_factor_cov, nearest_kronecker, relative_error
from ._rearrange import factor_shapes, inverse_rearrange, rearrange

__version__ = "0.1.0"

__all__ = [
    "COMPARE_METHODS",
    "KronChoice",
    "KronFactors",
    "LowRankFactors",
    "__version__",
    "choose_kron",
    "factor_shapes",
    "fit_methods",
    "inverse_rearrange",
    "kron_cost",
    "kronecker_factor_cov",
    "low_rank",
    "low_rank_rank_for_budget",
    "method_errors",
    "nearest_kronecker",
    "rearrange",
    "relative_error",
]

"""kronlab: compress neural-network layers with sums of Kronecker products.

The algorithms are plain functions on numpy arrays or torch tensors; the layers,
calibration, compression and evaluation code build on them.
"""

from ._factors import KronFactors, LowRankFactors
from ._rearrange import factor_shapes, inverse_rearrange, rearrange

__version__ = "0.1.0"

__all__ = [
    "KronFactors",
    "LowRankFactors",
    "factor_shapes",
    "inverse_rearrange",
    "rearrange",
    "__version__",
]

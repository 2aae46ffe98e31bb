"""kronlab: compress neural-network layers with sums of Kronecker products.

The algorithms are plain functions on numpy arrays or torch tensors; the layers,
calibration, compression and evaluation code build on them.

The names below load on first use (PEP 562), so ``import kronlab`` (and
``kronlab.defaults``, ``kronlab.runtime``) do not import torch: a script can set the
OpenMP wait policy with :func:`kronlab.runtime.configure_threads` first.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> private module that defines it
_LAZY = {
    "KronChoice": "._choose",
    "choose_kron": "._choose",
    "is_low_rank_shape": "._choose",
    "shape_class": "._choose",
    "COMPARE_METHODS": "._compare",
    "fit_methods": "._compare",
    "method_errors": "._compare",
    "KronFactors": "._factors",
    "LowRankFactors": "._factors",
    "kron_cost": "._factors",
    "low_rank_cost": "._factors",
    "low_rank": "._lowrank",
    "low_rank_rank_for_budget": "._lowrank",
    "ALS_STARTS": "._nkp",
    "FisherObjective": "._nkp",
    "HalfStep": "._nkp",
    "TwoSidedHalfStep": "._nkp",
    "als_refine": "._nkp",
    "damped_cov": "._nkp",
    "kronecker_factor_cov": "._nkp",
    "nearest_kronecker": "._nkp",
    "nearest_kronecker_kron_cov": "._nkp",
    "nearest_kronecker_plain": "._nkp",
    "parse_permutation": "._nkp",
    "relative_error": "._nkp",
    "whiten_kron": "._nkp",
    "whiten_kron_left": "._nkp",
    "divisors": "._rearrange",
    "factor_shapes": "._rearrange",
    "inverse_rearrange": "._rearrange",
    "rearrange": "._rearrange",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kronlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

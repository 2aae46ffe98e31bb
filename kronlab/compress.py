"""Replace a model's linear layers by Kronecker sums or low-rank products.

``compress(model, method=..., ratio=..., calibration=...)`` is the one call a
researcher makes: it picks each layer's factor shape and rank within the
budget, fits the factors with the chosen method, swaps the layer for a
:class:`~kronlab.layers.KronLinear` (or :class:`~kronlab.layers.LowRankLinear`),
and returns the new model with a per-layer report.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import asdict, dataclass, field

import torch

from ._choose import SHAPE_CLASSES, choose_kron, is_low_rank_shape, shape_class
from ._factors import KronFactors, LowRankFactors
from ._lowrank import low_rank
from ._nkp import relative_error
from .defaults import ALS_SWEEPS, CHOOSER_SCREEN, CHOOSER_TOP_K, PERMUTE, SHAPE_POLICY
from .layers import KronLinear, LowRankLinear
from .models import find_linear_layers, layer_type, linear_weight, set_submodule

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "SHAPE_POLICIES", "CompressionReport", "LayerReport", "compress", "compress_layer", "objective_of"]

#: kron / svd: weight error; -aa: output error on calibration activations (needs C);
#: -fisher: K-FAC loss error (needs C and the output-gradient covariance G)
METHODS = ("kron", "kron-aa", "kron-fisher", "svd", "svd-aa", "svd-fisher")
_AA = {"kron-aa", "svd-aa"}
_FISHER = {"kron-fisher", "svd-fisher"}
#: one line per method, for help texts
METHOD_DESCRIPTIONS = {
    "kron": "Kronecker sum, weight error (Van Loan-Pitsianis)",
    "kron-aa": "Kronecker sum, output error on calibration activations (kronlab's)",
    "kron-fisher": "Kronecker sum, K-FAC Fisher (loss-aware) error",
    "svd": "low rank, weight error (truncated SVD)",
    "svd-aa": "low rank, output error (whitened, as SVD-LLM)",
    "svd-fisher": "low rank, K-FAC Fisher error (two-sided whitening, as KFAC-SVD/GFWSVD)",
}
#: ``compress(shape_policy=...)``: choose shapes per layer, or once per layer type
SHAPE_POLICIES = ("per-type", "per-layer")


@dataclass
class LayerReport:
    """What happened to one layer (errors are relative; output error needs a covariance)."""

    name: str
    shape: tuple[int, int]
    method: str
    rank: int
    a_shape: tuple[int, int] | None
    b_shape: tuple[int, int] | None
    params: int
    dense_params: int
    macs: int
    dense_macs: int
    weight_error: float
    output_error: float | None
    seconds: float
    fisher_error: float | None = None
    info: dict = field(default_factory=dict)


@dataclass
class CompressionReport:
    """Per-layer reports and totals for a compressed model."""

    method: str
    ratio: float
    macs_ratio: float | None
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    config: dict = field(default_factory=dict)

    @property
    def layer_params_before(self) -> int:
        return sum(r.dense_params for r in self.layers)

    @property
    def layer_params_after(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(r.dense_macs for r in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def summary(self) -> dict:
        oe = [r.output_error for r in self.layers if r.output_error is not None]
        fe = [r.fisher_error for r in self.layers if r.fisher_error is not None]
        classes = [shape_class(r.shape, r.a_shape) for r in self.layers if r.a_shape is not None]
        return {
            "method": self.method,
            "ratio": self.ratio,
            "macs_ratio": self.macs_ratio,
            "layers": len(self.layers),
            "layer_params_before": self.layer_params_before,
            "layer_params_after": self.layer_params_after,
            "layer_params_kept": self.layer_params_after / max(self.layer_params_before, 1),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_params_kept": self.model_params_after / max(self.model_params_before, 1),
            "macs_kept": self.macs_after / max(self.macs_before, 1),
            "mean_weight_error": sum(r.weight_error for r in self.layers) / max(len(self.layers), 1),
            "mean_output_error": (sum(oe) / len(oe)) if oe else None,
            "mean_fisher_error": (sum(fe) / len(fe)) if fe else None,
            "shape_classes": {c: classes.count(c) for c in SHAPE_CLASSES if c in classes},
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "config": self.config,
                "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """A plain-text per-layer table for the CLI."""
        head = (f"{'layer':44s} {'shape':>10s} {'A shape':>9s} {'rank':>5s} {'params':>7s} "
                f"{'macs':>7s} {'e_W':>6s} {'e_Y':>6s} {'s':>5s}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            a = "x".join(map(str, r.a_shape)) if r.a_shape else "-"
            oe = f"{r.output_error:.3f}" if r.output_error is not None else "-"
            lines.append(
                f"{r.name[-44:]:44s} {r.shape[0]:>4d}x{r.shape[1]:<5d} {a:>9s} {r.rank:>5d} "
                f"{r.params / r.dense_params:>7.3f} {r.macs / r.dense_macs:>7.3f} "
                f"{r.weight_error:>6.3f} {oe:>6s} {r.seconds:>5.1f}")
        s = self.summary()
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.layers)} layers, {self.method}: layer params kept "
            f"{s['layer_params_kept']:.3f}, model params {s['model_params_before']:,} -> "
            f"{s['model_params_after']:,} ({s['model_params_kept']:.3f}), forward MACs kept "
            f"{s['macs_kept']:.3f}, {s['seconds']:.1f} s")
        return "\n".join(lines)


def _check_args(method: str, ratio: float, macs_ratio: float | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
            or not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    if macs_ratio is not None and (isinstance(macs_ratio, bool) or math.isnan(macs_ratio)
                                   or not (0 < macs_ratio)):
        raise ValueError(f"macs_ratio must be positive (forward MACs kept / dense), got {macs_ratio!r}")


#: keys of a ``compress(structures=...)`` entry; ``rotation_invariant`` (from
#: :func:`kronlab.rotate.procrustes_rotation`) is accepted and ignored
_STRUCTURE_KEYS = {"a_shape", "rank", "rotation_invariant"}


def _check_structure(name: str, shape, method: str, struct) -> None:
    """Raise a ValueError unless ``struct`` is a valid fixed structure of an (m, n) layer."""
    m, n = shape
    if not isinstance(struct, dict) or not struct.keys() <= _STRUCTURE_KEYS \
            or not {"a_shape", "rank"} & struct.keys():
        raise ValueError(f"structure for {name} must be a dict {{'a_shape': (m1, n1), "
                         f"'rank': r}} (Kronecker), {{'a_shape': (m1, n1)}} or {{'rank': r}} "
                         f"(low rank), got {struct!r}")
    kron = method.startswith("kron")
    if kron and "a_shape" not in struct:
        raise ValueError(f"structure for {name} is low rank ({struct!r}) but method {method!r} "
                         "is a Kronecker method: give 'a_shape' (a low-rank shape is (m, 1) or "
                         "(1, n)), or use an svd method")
    if not kron and "a_shape" in struct:
        raise ValueError(f"structure for {name} has a Kronecker a_shape but method {method!r} "
                         "is low rank: give only {'rank': r}, or use a kron method")
    r_max = min(m, n)
    if "a_shape" in struct:
        a = struct["a_shape"]
        if not (isinstance(a, (tuple, list)) and len(a) == 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                        for v in a)):
            raise ValueError(f"structure for {name}: a_shape must be two positive ints "
                             f"(m1, n1), got {a!r}")
        m1, n1 = int(a[0]), int(a[1])
        if m % m1 or n % n1:
            raise ValueError(f"structure for {name}: a_shape {tuple(a)} does not divide the "
                             f"{m}x{n} layer (m1 must divide {m}, n1 must divide {n})")
        r_max = min(m1 * n1, (m // m1) * (n // n1))
    if "rank" in struct:
        r = struct["rank"]
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= r_max:
            raise ValueError(f"structure for {name}: rank must be an int in [1, {r_max}] for "
                             f"this {m}x{n} layer and structure, got {r!r}")


def _check_structures(structures, method: str, targets, ratios: dict) -> dict:
    """Validate ``compress(structures=...)`` against the selected layers; return a copy."""
    if structures is None:
        return {}
    if not isinstance(structures, dict):
        raise ValueError(f"structures must be a dict layer type -> structure, got "
                         f"{type(structures).__name__}")
    types = {layer_type(n) for n in targets}
    unknown = sorted(set(structures) - types)
    if unknown:
        raise ValueError(f"structures names layer types that are not compressed: {unknown}; "
                         f"valid types: {sorted(types)}")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in structures.items()}
    for name, mod in targets.items():
        struct = out.get(layer_type(name))
        if struct is None:
            continue
        W, _ = linear_weight(mod)
        _check_structure(name, tuple(W.shape), method, struct)
        if "rank" in struct and name in ratios:
            raise ValueError(f"layer {name} has both a fixed rank (structures) and a ratio "
                             "(ratios); drop the rank to fit the ratio at the fixed a_shape")
    return out


def objective_of(method: str) -> str:
    """What a method minimises: ``"weight"`` (kron, svd), ``"output"`` (-aa) or ``"fisher"``.

    >>> objective_of("kron-fisher"), objective_of("svd")
    ('fisher', 'weight')
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return "fisher" if method in _FISHER else "output" if method in _AA else "weight"


def compress_layer(W: torch.Tensor, bias, *, method: str, ratio: float,
                   macs_ratio: float | None = None, cov: torch.Tensor | None = None,
                   gcov: torch.Tensor | None = None, a_shape=None, permute=PERMUTE,
                   als_sweeps: int = ALS_SWEEPS, screen: int | None = CHOOSER_SCREEN,
                   top_k: int = CHOOSER_TOP_K, device=None, name: str = "layer",
                   rank: int | None = None):
    """Fit one (out x in) weight within the budget; return (new_module, LayerReport).

    The parameter budget is ``ratio * m * n`` numbers and the optional compute
    budget ``macs_ratio * m * n`` multiply-adds per token. Kronecker methods
    choose the factor shape and rank, and fit, with :func:`kronlab.choose_kron` (only
    ``a_shape`` when it is given); low-rank methods use the largest rank that fits.
    Objectives: ``kron``/``svd`` the weight error, ``-aa`` the output error
    ``tr(E C E^T)`` (needs ``cov``), ``-fisher`` the K-FAC loss error ``tr(G E C E^T)``
    (needs ``cov`` and ``gcov``). A Kronecker fit at a low-rank shape (``(m, 1)`` or
    ``(1, n)``) becomes a :class:`LowRankLinear` (the same matrix, cheaper to run).

    ``rank`` fixes the structure instead of the budget: a low-rank method fits exactly
    that rank, a Kronecker method (which then needs ``a_shape``) fits ``rank`` terms of
    shape ``a_shape`` with its objective; ``ratio`` and ``macs_ratio`` are then ignored.

    The report gives all three errors that the statistics allow (weight; output with
    ``cov``; Fisher with ``cov`` and ``gcov``) and, for Kronecker methods, the cost of
    choosing in ``info["choose_seconds"]`` and the candidates in ``info["candidates"]``.
    """
    _check_args(method, ratio, macs_ratio)
    objective = objective_of(method)
    if objective != "weight" and cov is None:
        raise ValueError(f"method {method!r} needs a calibration covariance (cov)")
    if objective == "fisher" and gcov is None:
        raise ValueError(f"method {method!r} needs the output-gradient covariance (gcov)")
    m, n = W.shape
    t0 = time.perf_counter()
    params_budget = ratio * m * n
    macs_budget = None if macs_ratio is None else macs_ratio * m * n
    if rank is not None:
        _check_structure(name, (m, n), method, {"rank": rank} if a_shape is None
                         else {"a_shape": tuple(a_shape), "rank": rank})
        if method.startswith("kron"):
            m1, n1 = (int(v) for v in a_shape)
            # the largest rank within this budget at the one shape is exactly ``rank``
            params_budget = rank * (m1 * n1 + (m // m1) * (n // n1)) + 0.5
        else:
            params_budget = rank * (m + n) + 0.5
        macs_budget = None
    Wd = W.detach().to(device) if device is not None else W.detach()
    C = None if cov is None else (cov.to(device) if device is not None else cov)
    G = None if gcov is None else (gcov.to(device) if device is not None else gcov)
    fit_cov = C if objective != "weight" else None
    fit_g = {"gcov": G} if objective == "fisher" else {}
    info: dict = {"objective": objective}
    if method.startswith("kron"):
        choice = choose_kron(Wd, param_budget=params_budget, macs_budget=macs_budget,
                             cov=fit_cov, shapes=None if a_shape is None else [tuple(a_shape)],
                             permute=permute if fit_cov is not None else None,
                             als_sweeps=als_sweeps, screen=screen, top_k=top_k, **fit_g)
        factors = choice.factors
        if rank is not None and factors.rank != rank:  # pragma: no cover - a chooser bug
            raise RuntimeError(f"layer {name}: fixed rank {rank} at {a_shape}, fitted "
                               f"{factors.rank}")
        a_sh, b_sh, rank = factors.a_shape, factors.b_shape, factors.rank
        info.update({k: v for k, v in factors.info.items() if isinstance(v, (int, float, str))})
        info.update(choose_seconds=choice.seconds, candidates=len(choice.table),
                    candidates_measured=sum(r["start_error"] is not None for r in choice.table),
                    low_rank_shape=is_low_rank_shape((m, n), a_sh))
        if info["low_rank_shape"]:
            lr = _kron_to_low_rank(factors)
            module = LowRankLinear.from_factors(lr, bias, dtype=W.dtype, device=W.device)
        else:
            module = KronLinear.from_factors(factors, bias, dtype=W.dtype, device=W.device)
    else:
        budget = params_budget if macs_budget is None else min(params_budget, macs_budget)
        rank = int(budget // (m + n)) if rank is None else int(rank)
        if rank < 1:
            raise ValueError(
                f"layer {name} ({m}x{n}): ratio {ratio} leaves less than one rank-1 term "
                f"({m + n} parameters); use ratio >= {(m + n) / (m * n):.4f}")
        rank = min(rank, min(m, n))
        factors = low_rank(Wd, rank, cov=fit_cov, **fit_g)
        module = LowRankLinear.from_factors(factors, bias, dtype=W.dtype, device=W.device)
        a_sh = b_sh = None
        info.update({k: v for k, v in factors.info.items() if isinstance(v, (int, float, str))})
    seconds = time.perf_counter() - t0
    w_err = float(relative_error(Wd, factors))
    o_err = None if C is None else float(relative_error(Wd, factors, cov=C))
    f_err = None if C is None or G is None else float(relative_error(Wd, factors, cov=C, gcov=G))
    report = LayerReport(name=name, shape=(int(m), int(n)), method=method, rank=int(rank),
                         a_shape=a_sh, b_shape=b_sh, params=int(factors.num_params),
                         dense_params=int(m * n), macs=int(module.forward_macs),
                         dense_macs=int(m * n), weight_error=w_err, output_error=o_err,
                         fisher_error=f_err, seconds=seconds, info=info)
    return module, report


def _kron_to_low_rank(F: KronFactors) -> LowRankFactors:
    """A Kronecker sum at a low-rank shape as ``U V``: (m, 1) kron (1, n) terms are
    ``a_i b_i^T``, (1, n) kron (m, 1) terms ``b_i a_i^T``; the permutation moves into V."""
    A = torch.as_tensor(F.A)
    B = torch.as_tensor(F.B)
    r = F.rank
    if F.a_shape[1] == 1:            # A_i (m, 1), B_i (1, n)
        U, V = A.reshape(r, -1).T, B.reshape(r, -1)
    else:                            # A_i (1, n), B_i (m, 1)
        U, V = B.reshape(r, -1).T, A.reshape(r, -1)
    if F.perm is not None:           # W[:, perm] ~ U V  =>  W ~ U V[:, argsort(perm)]
        V = V[:, torch.argsort(torch.as_tensor(F.perm))]
    return LowRankFactors(U=U.contiguous(), V=V.contiguous(), info=dict(F.info))


def compress(model, *, method: str, ratio: float, calibration=None, covariances=None,
             gcovariances=None, layers=None, exclude=None, macs_ratio: float | None = None,
             permute=PERMUTE, als_sweeps: int = ALS_SWEEPS, shape_policy: str = SHAPE_POLICY,
             screen: int | None = CHOOSER_SCREEN, top_k: int = CHOOSER_TOP_K,
             in_place: bool = False, device=None, progress: bool = True,
             ratios: dict | None = None, structures: dict | None = None):
    """Compress the linear layers of ``model``; return ``(compressed_model, report)``.

    Parameters
    ----------
    model : a transformers causal LM (or any ``nn.Module`` with Linear/Conv1D layers)
    method : one of :data:`METHODS`: "kron" (Van Loan-Pitsianis), "kron-aa"
        (activation-aware, kronlab's), "kron-fisher" (loss-aware, K-FAC Fisher error),
        "svd" (truncated SVD), "svd-aa" (whitened low rank, as SVD-LLM) or "svd-fisher"
        (two-sided whitened low rank, as KFAC-SVD / GFWSVD).
    ratio : fraction of each compressed layer's parameters kept, in (0, 1].
    calibration : LongTensor (n_seq, seq_len) of token ids, used to measure
        each layer's input covariance ``C = X^T X / N``. Needed by the ``-aa``
        methods; with it, every method's report also gives the output error.
    covariances : dict name -> C, instead of ``calibration`` (reuse across runs).
    gcovariances : dict name -> G (output-gradient covariances, m x m), with
        ``covariances``, for the ``-fisher`` methods; with ``calibration`` they are
        collected by :func:`kronlab.calibration.collect_statistics` from the same tokens.
    layers, exclude : name patterns (fnmatch) of the layers to compress; the
        default is every Linear/Conv1D inside the decoder blocks.
    macs_ratio : optional budget of forward multiply-adds per token, as a
        fraction of the dense layer's; a compute-bound user sets it (e.g. 1.0
        forbids Kronecker sums slower than the dense layer in FLOPs).
    permute : input-channel permutation for ``kron-aa`` (``"variance"`` sorts the
        channels by their variance, which makes C closer to Kronecker).
    als_sweeps : ALS sweeps of the Kronecker fits (default :data:`kronlab.defaults.ALS_SWEEPS`).
    screen, top_k : the shape chooser's screen size and ALS-refined finalists
        (:func:`kronlab.choose_kron`).
    shape_policy : ``"per-layer"`` chooses the factor shape and rank of every layer
        from its own spectrum; ``"per-type"`` chooses them once per layer type (the
        name with the block index removed, e.g. ``mlp.down_proj``) on the first
        layer of that type and reuses them, which is ~30x cheaper on a 30-block
        model and gives every block the same structure.
    in_place : modify ``model`` itself; by default a copy is compressed and the
        input model is left untouched.
    ratios : optional dict layer name -> its own kept fraction in (0, 1], overriding
        ``ratio`` for those layers (e.g. :func:`kronlab.allocate.allocate`'s ``ratios``);
        every name must be a compressed layer.
    structures : optional dict layer type (:func:`kronlab.models.layer_type`, e.g.
        ``"mlp.down_proj"``) -> a fixed structure for every layer of that type, instead of
        the chooser's: ``{"a_shape": (m1, n1), "rank": r}`` (Kronecker methods: ``r``
        terms of that shape, fitted with the method's objective, no shape screen),
        ``{"a_shape": (m1, n1)}`` (the shape fixed, the rank the largest within the
        layer's ratio and ``macs_ratio``) or ``{"rank": r}`` (low-rank methods). A fixed
        rank overrides ``ratio`` and ``macs_ratio`` for those layers. The shape must divide
        the layer and the family must match the method. This is how a rotated model is
        compressed with :func:`kronlab.rotate.procrustes_rotation`'s ``structures`` (the
        chooser's favourite shapes, ``n1 in {1, n}``, are rotation invariant).
    """
    _check_args(method, ratio, macs_ratio)
    if shape_policy not in SHAPE_POLICIES:
        raise ValueError(f"shape_policy must be one of {SHAPE_POLICIES}, got {shape_policy!r}")
    targets = find_linear_layers(model, include=layers, exclude=exclude)
    if not targets:
        raise ValueError(f"no linear layers match {layers!r}")
    ratios = {} if ratios is None else dict(ratios)
    unknown = [n for n in ratios if n not in targets]
    if unknown:
        raise ValueError(f"ratios names layers that are not compressed: {unknown[:5]}; valid "
                         f"names look like {list(targets)[:2]}")
    for n, r in ratios.items():
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) \
                or not 0 < r <= 1:
            raise ValueError(f"ratios[{n!r}] must be in (0, 1] (the fraction of the layer's "
                             f"parameters kept), got {r!r}")
    structures = _check_structures(structures, method, targets, ratios)
    objective = objective_of(method)
    stats_seconds = 0.0
    if covariances is None and calibration is not None:
        t_stats = time.perf_counter()
        if objective == "fisher":
            from .calibration import collect_statistics

            stats = collect_statistics(model, calibration, list(targets), gradients=True,
                                       progress=progress)
            covariances, gcovariances = stats.cov, stats.gcov
        else:
            from .calibration import collect_covariances

            covariances = collect_covariances(model, calibration, list(targets), progress=progress)
        stats_seconds = time.perf_counter() - t_stats
    if objective != "weight" and covariances is None:
        raise ValueError(f"method {method!r} needs calibration tokens or covariances")
    if objective == "fisher" and gcovariances is None:
        raise ValueError(f"method {method!r} needs calibration tokens, or covariances and "
                         "gcovariances (output-gradient covariances)")
    for stat, what in ((covariances, "covariance"), (gcovariances, "gradient covariance")):
        missing = [n for n in targets if stat is not None and n not in stat]
        if stat is not None and missing and (objective == "fisher" or what == "covariance"
                                             and objective == "output"):
            raise ValueError(f"no {what} for layers {missing[:5]}; pass statistics for every "
                             "layer that is compressed")

    def _count(mod):
        return sum(p.numel() for p in mod.parameters())

    params_before = _count(model)
    out = model if in_place else copy.deepcopy(model)
    reports = []
    names = list(targets)
    try:
        from tqdm.auto import tqdm

        it = tqdm(names, desc=f"compress {method} {ratio:g}", disable=not progress)
    except ImportError:  # pragma: no cover
        it = names
    chosen: dict = {}
    for name in it:
        W, bias = linear_weight(out.get_submodule(name))
        cov = None if covariances is None else covariances.get(name)
        gcov = None if gcovariances is None else gcovariances.get(name)
        key = (layer_type(name), tuple(W.shape))
        a_shape = chosen.get(key) if shape_policy == "per-type" else None
        struct = structures.get(layer_type(name), {})
        a_shape = tuple(int(v) for v in struct["a_shape"]) if "a_shape" in struct else a_shape
        module, rep = compress_layer(W, bias, method=method, ratio=ratios.get(name, ratio),
                                     macs_ratio=macs_ratio,
                                     cov=cov, gcov=gcov, permute=permute, als_sweeps=als_sweeps,
                                     a_shape=a_shape, screen=screen, top_k=top_k, device=device,
                                     name=name,
                                     rank=None if "rank" not in struct else int(struct["rank"]))
        if rep.a_shape is not None:
            chosen.setdefault(key, rep.a_shape)
        set_submodule(out, name, module)
        reports.append(rep)
    config = {"method": method, "ratio": ratio, "macs_ratio": macs_ratio, "permute": permute,
              "als_sweeps": als_sweeps, "shape_policy": shape_policy, "screen": screen,
              "top_k": top_k, "layers": layers, "exclude": exclude, "n_layers": len(names),
              "statistics_seconds": stats_seconds, "ratios": ratios or None,
              "structures": {k: {kk: ([int(x) for x in vv] if kk == "a_shape" else vv)
                                 for kk, vv in v.items()} for k, v in structures.items()}
              or None}
    report = CompressionReport(method=method, ratio=float(ratio), macs_ratio=macs_ratio,
                               layers=reports, model_params_before=params_before,
                               model_params_after=_count(out), config=config)
    return out, report

r"""Closed-loop calibration: each block's statistics measured on the partly compressed model.

Open-loop compression (:func:`kronlab.compress.compress`) fits every layer to the input
covariance ``C = X^T X / N`` of the *dense* model. After the first blocks are compressed,
the inputs a later layer really receives differ from those ``X``. Closed-loop
calibration (as GPTQ and SVD-LLM's sequential update do) walks the decoder blocks in
order: the inputs of block ``b`` are the hidden states produced by the already
compressed blocks ``0..b-1``; the covariances of block ``b``'s layers are collected from
them (block ``b`` itself still dense), its layers are fitted and swapped, and the hidden
states are carried on through the compressed block. So a fit sees, and can correct, the
error upstream of it.

Cost: one forward of the model up to the first block (the cached block inputs), then two
forwards of each block over the calibration tokens (dense, to collect ``C``; compressed,
to propagate), i.e. about twice an open-loop collection, never a whole-model forward per
block. Memory: the block inputs of all calibration tokens, ``N d`` numbers (SmolLM2,
131072 tokens x 576 in float32: 0.3 GB).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from .calibration import Covariances
from .compress import CompressionReport, compress, objective_of
from .models import find_linear_layers, layer_type, linear_weight

__all__ = ["CLOSED_LOOP_TARGETS", "asymmetric_target", "compress_closed_loop"]

#: what a closed-loop fit reproduces: the dense layer on the compressed inputs
#: (symmetric) or the dense model's outputs (asymmetric)
CLOSED_LOOP_TARGETS = ("compressed", "dense")


class _Stop(Exception):
    """Raised by the hook that catches the first block's inputs (nothing after it runs)."""


def _block_lists(model: nn.Module) -> list[str]:
    """Prefixes (``"model.layers."``) of the ModuleLists that hold decoder blocks."""
    return [name + "." for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name]


def _batches(token_batches, batch_size: int) -> list[torch.Tensor]:
    """As :func:`kronlab.calibration.collect_statistics` splits its tokens."""
    if isinstance(token_batches, torch.Tensor):
        if token_batches.ndim != 2:
            raise ValueError(f"token_batches must be (n_seq, seq_len), got "
                             f"{tuple(token_batches.shape)}")
        return list(token_batches.split(batch_size))
    return list(token_batches)


def _blocks_of(model: nn.Module, names) -> tuple[str, nn.ModuleList, dict[int, list[str]]]:
    """The ModuleList of decoder blocks holding every layer in ``names``, and the layers by block."""
    for prefix in sorted(_block_lists(model), key=len, reverse=True):
        if all(n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit() for n in names):
            blocks = model.get_submodule(prefix[:-1])
            by_block: dict[int, list[str]] = {}
            for n in names:
                by_block.setdefault(int(n[len(prefix):].split(".")[0]), []).append(n)
            return prefix, blocks, by_block
    outside = [n for n in names if not any(n.startswith(p) for p in _block_lists(model))]
    raise ValueError("closed-loop calibration compresses layers inside the decoder blocks of "
                     f"one ModuleList; these are not: {outside[:5] or names[:5]}")


def _block_inputs(model, batches, first_block, device):
    """``(hidden_states, kwargs)`` of ``first_block``'s call, per batch (the model stops there)."""
    caught = []

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        caught.append((hidden.detach(), args[1:], kw))
        raise _Stop

    # first: the block's own pre-hooks (a kronlab.rotate.ResidualMap) run when it is called
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
                else:  # pragma: no cover - a model that skips its first block
                    raise RuntimeError("the model never called its first decoder block")
    finally:
        handle.remove()
    return caught


def _run_block(block, cached):
    """The block's output hidden states for every cached batch (no grad)."""
    out = []
    with torch.no_grad():
        for hidden, args, kw in cached:
            y = block(hidden, *args, **kw)
            out.append((y[0] if isinstance(y, (tuple, list)) else y).detach())
    return out


def _block_covariances(block, cached, layers: dict[str, nn.Module]) -> Covariances:
    """``C = X^T X / N`` of ``layers`` (inside ``block``) over the cached block inputs.

    The same accumulation as :func:`kronlab.calibration.collect_covariances`: float64
    ``sum_b X_b^T X_b``, layers that receive the same tensor (q/k/v; gate/up) share one C.
    """
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            first = next((f for t, f in seen if t is x), None)
            if first is None:
                seen.append((x, name))
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64,
                                             device=x.device)
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                sums[name].addmm_(x2.T, x2)
            elif name not in sums:
                shared[name] = first
                sums[name] = sums[first]
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(n)) for n, mod in layers.items()]
    n_tokens = n_seq = 0
    try:
        with torch.no_grad():
            for hidden, args, kw in cached:
                block(hidden, *args, **kw)
                seen.clear()
                n_tokens += hidden.shape[0] * hidden.shape[1]
                n_seq += hidden.shape[0]
    finally:
        for h in handles:
            h.remove()
    cov = Covariances()
    scaled: dict[int, torch.Tensor] = {}
    for name in layers:
        if name not in sums:
            raise RuntimeError(f"layer {name} received no input in its block's forward")
        s = sums[name]
        if id(s) not in scaled:
            scaled[id(s)] = (s + s.T).mul_(0.5 / n_tokens)  # symmetric up to rounding
        cov[name] = scaled[id(s)]
    cov.n_tokens, cov.n_sequences, cov.shared = n_tokens, n_seq, shared
    return cov


def asymmetric_target(W: torch.Tensor, C_c: torch.Tensor, C_dc: torch.Tensor,
                      damping: float = 0.0) -> torch.Tensor:
    r"""The weight ``W' = W C_dc C_c^{-1}`` whose fits match the dense model's outputs.

    A layer ``W`` (m x n) receives ``X_c`` (N x n) in the partly compressed model where the
    dense model gives it ``X_d``. Asymmetric calibration (GPTAQ, Li et al., 2025) fits
    ``W_hat`` to the *dense* outputs, ``min ||W X_d^T - W_hat X_c^T||_F^2``. With
    ``C_c = X_c^T X_c / N`` and ``C_dc = X_d^T X_c / N`` the residual of ``W'`` is orthogonal
    to the rows of ``X_c^T``, so

        ||W X_d^T - W_hat X_c^T||^2 = ||W X_d^T - W' X_c^T||^2 + N tr((W' - W_hat) C_c (W' - W_hat)^T):

    fitting ``W'`` in the metric ``C_c`` (what every ``-aa`` / ``-fisher`` method does with
    ``cov=C_c``) minimises the error against the dense outputs. ``damping`` > 0 makes it a
    ridge toward ``W``: with ``lam = damping * mean(diag C_c)``,
    ``W' = W (C_dc + lam I)(C_c + lam I)^{-1}`` minimises
    ``||W X_d^T - W' X_c^T||^2 + lam N ||W' - W||^2`` (``C_c`` may be near singular; a ridge
    toward 0, as GPTQ's dampening, would shrink every weight). With 0 the identity above
    is exact. Where ``X_c = X_d`` (the first block) ``W' = W`` for any damping.

    >>> X = torch.randn(50, 4, dtype=torch.float64)
    >>> W = torch.randn(3, 4, dtype=torch.float64)
    >>> torch.allclose(asymmetric_target(W, X.T @ X / 50, X.T @ X / 50), W)
    True
    """
    Wd = W.to(torch.float64)
    C = C_c.to(device=Wd.device, dtype=torch.float64)
    lam = float(damping) * float(torch.diagonal(C).mean())
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    C = C + lam * eye
    rhs = (Wd @ (C_dc.to(device=Wd.device, dtype=torch.float64) + lam * eye)).T   # (n, m)
    try:
        L = torch.linalg.cholesky(C)
        sol = torch.cholesky_solve(rhs, L)
    except RuntimeError:  # singular without damping: least squares
        sol = torch.linalg.lstsq(C, rhs).solution
    return sol.T.contiguous()


def _block_cross(block, cached, cached_dense, layers: dict[str, nn.Module]):
    """``(C_c, C_dc)`` of ``layers``: ``X_c^T X_c / N`` on ``cached`` and ``X_d^T X_c / N``
    with ``X_d`` the same layers' inputs on ``cached_dense`` (same tokens, dense upstream);
    also returns the block's outputs on ``cached_dense`` (the next dense hidden states)."""
    grab: dict[str, torch.Tensor] = {}
    mode = {"dense": True}
    sums: dict[str, list] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if mode["dense"]:
                grab[name] = x
                return
            xd = grab[name]
            if name not in sums:
                n = x.shape[-1]
                sums[name] = [torch.zeros(n, n, dtype=torch.float64, device=x.device),
                              torch.zeros(n, n, dtype=torch.float64, device=x.device)]
            sums[name][0].addmm_(x.T, x)
            sums[name][1].addmm_(xd.T, x)
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(n)) for n, mod in layers.items()]
    n_tokens = 0
    dense_out = []
    try:
        with torch.no_grad():
            for (hd, args_d, kw_d), (hc, args, kw) in zip(cached_dense, cached, strict=True):
                mode["dense"] = True
                y = block(hd, *args_d, **kw_d)
                dense_out.append((y[0] if isinstance(y, (tuple, list)) else y).detach())
                mode["dense"] = False
                block(hc, *args, **kw)
                grab.clear()
                n_tokens += hc.shape[0] * hc.shape[1]
    finally:
        for h in handles:
            h.remove()
    cov, cross = Covariances(), {}
    for name in layers:
        if name not in sums:
            raise RuntimeError(f"layer {name} received no input in its block's forward")
        cc, cdc = sums[name]
        cov[name] = (cc + cc.T).mul_(0.5 / n_tokens)
        cross[name] = cdc / n_tokens
    cov.n_tokens, cov.n_sequences, cov.shared = n_tokens, sum(h.shape[0] for h, _, _ in cached), {}
    return cov, cross, dense_out


class ClosedLoopReport(CompressionReport):
    """A :class:`~kronlab.compress.CompressionReport` whose ``covariances`` (with
    ``keep_covariances=True``) are the closed-loop ``C`` each layer was fitted to."""

    covariances: dict | None = None


def compress_closed_loop(model, token_batches, *, method: str, ratio: float,
                         ratios: dict | None = None, structures: dict | None = None,
                         gcovariances: dict | None = None, macs_ratio: float | None = None,
                         layers=None, exclude=None, batch_size: int = 8,
                         target: str = "compressed", damping: float = 0.01,
                         keep_covariances: bool = False, in_place: bool = False, device=None,
                         progress: bool = True, **compress_options):
    r"""Compress ``model`` block by block, each block fitted to the inputs the compressed
    blocks before it produce; return ``(compressed_model, report)``.

    For blocks ``b = 0, 1, ...``: with ``H_b`` the hidden states entering block ``b``
    (``H_0`` from the embeddings; ``H_{b+1} = block_b'(H_b)`` through the *compressed*
    block), collect ``C_l = X_l^T X_l / N`` of block ``b``'s layers from ``H_b`` with the
    block still dense, then fit each layer by :func:`kronlab.compress.compress` with its
    objective under that ``C_l`` (e.g. svd-aa minimises ``tr(E C_l E^T)``, the output
    error on the inputs the layer will actually receive). Block 0's ``C`` equal the
    open-loop ones; with exact structures (full rank) the result equals open-loop
    compression.

    ``target`` says what a layer's fit should reproduce on those inputs:

    * ``"compressed"`` (symmetric, as GPTQ): the dense layer's own outputs on them,
      ``min ||(W - W_hat) X_c^T||``. An upstream error is then *not* corrected: the fit
      only learns to pass it on faithfully;
    * ``"dense"`` (asymmetric, as GPTAQ): the dense *model's* outputs,
      ``min ||W X_d^T - W_hat X_c^T||``, with ``X_d`` the layer's inputs in the dense
      model (carried alongside, one more block forward per block). This is a fit of
      ``W' = W C_dc C_c^{-1}`` in the metric ``C_c`` (:func:`asymmetric_target`;
      ``damping`` is its ridge), so each layer can undo part of the error upstream.
      The report's errors are then relative to ``W'``.

    The Fisher factors ``G`` of the ``-fisher`` methods are *not* closed-loop: they must
    be passed in as ``gcovariances`` from an open-loop collection
    (:func:`kronlab.calibration.collect_statistics` on the dense model). A closed-loop ``G``
    would need a backward pass through all later blocks for every block, i.e. a
    whole-model forward and backward per block.

    Parameters
    ----------
    model : a causal LM whose decoder blocks are one ``nn.ModuleList`` (Llama, GPT-2, ...)
    token_batches : LongTensor (n_seq, seq_len) of calibration tokens, split into batches
        of ``batch_size`` sequences (or an iterable of (b, seq_len) LongTensors)
    method, ratio, ratios, structures, macs_ratio, layers, exclude : as in
        :func:`kronlab.compress.compress` (only layers inside the decoder blocks)
    gcovariances : layer -> G (m x m), open loop; needed by the ``-fisher`` methods
    keep_covariances : keep the closed-loop ``C`` in ``report.covariances``
    in_place : modify ``model`` itself; by default a deep copy is compressed
    device : where to run (the model is moved there); default the model's device
    compress_options : passed to ``compress`` (``permute``, ``als_sweeps``, ``screen``,
        ``top_k``, ``shape_policy``)

    With ``shape_policy="per-type"`` (the default) a layer type's factor shape is chosen
    on its first block, as open-loop ``compress`` does, and fixed for the later blocks.

    Returns the model and a :class:`ClosedLoopReport`: ``compress``'s report over all
    layers, with ``config["closed_loop"] = True``, ``config["statistics_seconds"]`` (the
    block forwards that collect ``C``, plus catching the first block's inputs) and
    ``config["propagation_seconds"]`` (the forwards through the compressed blocks).

    Examples
    --------
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> tokens = torch.randint(0, 64, (4, 12))                      # (n_seq, seq_len)
    >>> small, report = compress_closed_loop(model, tokens, method="svd-aa", ratio=0.5,
    ...                                      keep_covariances=True, progress=False)
    >>> len(report.layers), report.config["closed_loop"]          # 7 layers x 2 blocks
    (14, True)
    >>> report.covariances["model.layers.1.mlp.down_proj"].shape  # its input: 32 channels
    torch.Size([32, 32])
    """
    objective = objective_of(method)  # also rejects an unknown method
    if target not in CLOSED_LOOP_TARGETS:
        raise ValueError(f"target must be one of {CLOSED_LOOP_TARGETS}, got {target!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or math.isnan(damping) \
            or damping < 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if target == "dense" and objective == "weight":
        raise ValueError(f"target='dense' needs an activation-aware method (the fit must be "
                         f"in the metric C_c); {method!r} ignores activations")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
            or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    if macs_ratio is not None and (isinstance(macs_ratio, bool) or math.isnan(macs_ratio)
                                   or not macs_ratio > 0):
        raise ValueError(f"macs_ratio must be positive (forward MACs kept / dense), got "
                         f"{macs_ratio!r}")
    if objective == "fisher" and gcovariances is None:
        raise ValueError(f"method {method!r} needs gcovariances (open-loop output-gradient "
                         "covariances, collect_statistics(dense_model, ..., gradients=True).gcov)")
    for key in ("calibration", "covariances", "in_place", "ratio", "method"):
        if key in compress_options:
            raise TypeError(f"compress_closed_loop does not take {key!r} in compress_options")
    shape_policy = compress_options.get("shape_policy", "per-type")
    out = model if in_place else copy.deepcopy(model)
    if device is not None:
        out.to(device)
    dev = next(out.parameters()).device
    targets = find_linear_layers(out, include=layers, exclude=exclude)
    if not targets:
        raise ValueError(f"no linear layers match {layers!r}")
    ratios = dict(ratios or {})
    unknown = [n for n in ratios if n not in targets]
    if unknown:
        raise ValueError(f"ratios names layers that are not compressed: {unknown[:5]}")
    structures = dict(structures or {})
    types = {layer_type(n) for n in targets}
    if set(structures) - types:
        raise ValueError(f"structures names layer types that are not compressed: "
                         f"{sorted(set(structures) - types)}; valid types: {sorted(types)}")
    if gcovariances is not None and objective == "fisher":
        missing = [n for n in targets if n not in gcovariances]
        if missing:
            raise ValueError(f"no gcovariance for layers {missing[:5]}")
    _, blocks, by_block = _blocks_of(out, list(targets))
    params_before = sum(p.numel() for p in out.parameters())
    batches = _batches(token_batches, batch_size)
    if not batches:
        raise ValueError("token_batches is empty")
    was_training = out.training
    out.eval()
    t0 = time.perf_counter()
    cached = _block_inputs(out, batches, blocks[0], dev)
    cached_dense = list(cached) if target == "dense" else None
    stats_seconds = time.perf_counter() - t0
    prop_seconds = 0.0
    reports, kept_cov = [], {}
    fixed = dict(structures)  # grows with the shapes chosen on each type's first block
    last = max(by_block)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for b in tqdm(range(last + 1), desc=f"closed-loop {method} {ratio:g}", disable=not progress):
        block = blocks[b]
        names = by_block.get(b, [])
        if names:
            t0 = time.perf_counter()
            if target == "dense":
                cov, cross, dense_next = _block_cross(block, cached, cached_dense,
                                                      {n: targets[n] for n in names})
                with torch.no_grad():   # the layers now hold W' (replaced by the fit below)
                    for n in names:
                        Wv, _ = linear_weight(targets[n])   # a view: written in place
                        Wv.copy_(asymmetric_target(Wv, cov[n], cross[n], damping).to(Wv.dtype))
            else:
                cov = _block_covariances(block, cached, {n: targets[n] for n in names})
            stats_seconds += time.perf_counter() - t0
            if keep_covariances:
                kept_cov.update(cov)
            block_types = {layer_type(n) for n in names}
            _, rep = compress(
                out, method=method, ratio=ratio, covariances=cov,
                gcovariances=None if gcovariances is None
                else {n: gcovariances[n] for n in names if n in gcovariances},
                layers=names, macs_ratio=macs_ratio, in_place=True, progress=False,
                ratios={n: ratios[n] for n in names if n in ratios} or None,
                structures={t: s for t, s in fixed.items() if t in block_types} or None,
                device=device, **compress_options)
            reports.extend(rep.layers)
            if shape_policy == "per-type":
                for r in rep.layers:
                    t = layer_type(r.name)
                    if r.a_shape is not None and t not in fixed:
                        fixed[t] = {"a_shape": tuple(r.a_shape)}
            targets.update({n: out.get_submodule(n) for n in names})
        if b < last:
            t0 = time.perf_counter()
            if target == "dense":
                if not names:   # an uncompressed block: the same forward on both streams
                    dense_next = _run_block(block, cached_dense)
                cached_dense = [(h, args, kw) for h, (_, args, kw)
                                in zip(dense_next, cached_dense, strict=True)]
            hidden = _run_block(block, cached)
            cached = [(h, args, kw) for h, (_, args, kw) in zip(hidden, cached, strict=True)]
            prop_seconds += time.perf_counter() - t0
    del cached, cached_dense
    out.train(was_training)
    names_all = [r.name for r in reports]
    config = dict(rep.config)
    config.update(layers=layers, exclude=exclude, n_layers=len(names_all), closed_loop=True,
                  statistics_seconds=stats_seconds, propagation_seconds=prop_seconds,
                  ratios=ratios or None, batch_size=batch_size, target=target,
                  damping=damping if target == "dense" else None,
                  structures={k: {kk: ([int(x) for x in vv] if kk == "a_shape" else vv)
                                  for kk, vv in v.items()} for k, v in structures.items()}
                  or None)
    report = ClosedLoopReport(method=method, ratio=float(ratio), macs_ratio=macs_ratio,
                              layers=reports, model_params_before=params_before,
                              model_params_after=sum(p.numel() for p in out.parameters()),
                              config=config)
    report.covariances = kept_cov if keep_covariances else None
    return out, report

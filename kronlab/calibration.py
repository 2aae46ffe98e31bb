r"""Calibration statistics of linear layers: input and output-gradient covariances.

For a linear layer ``y = x W^T (+ b)`` (``W`` m x n) and ``N`` calibration token
positions, two second moments describe what a change of ``W`` does:

* the input covariance ``C = X^T X / N`` (n x n; ``X`` stacks the inputs ``x_t``), with
  which the output error of a replacement ``W_hat``, ``E = W - W_hat``, is

      ||X E^T||_F^2 = N tr(E C E^T);

* the output-gradient covariance ``G = (1/N) sum_t g_t g_t^T`` (m x m), where
  ``g_t = dL/dy_t`` and ``L`` is the model's own next-token loss, **summed** (not
  averaged) over the predicted tokens of each sequence (labels = the input ids shifted
  by one, as ``transformers`` does with ``labels=input_ids``). Each ``g_t`` is the
  gradient of the whole sequence's loss, through every later position.

K-FAC scale convention. Let the calibration set have ``S`` sequences of ``T`` tokens,
``N = S T`` positions and ``N_pred = S (T - 1)`` predicted tokens, ``L = sum`` of their
negative log-likelihoods and ``ell = L / N_pred`` the mean per-token loss (transformers'
``loss``). Changing the weight by ``Delta`` (compression: ``Delta = -E``),

    L(W + Delta) - L(W) = <dL/dW, Delta> + 1/2 vec(Delta)^T H vec(Delta) + O(|Delta|^3),
    dL/dW = sum_t g_t x_t^T.

K-FAC (Martens & Grosse, 2015; the "expand" form for weight sharing over positions of
Eschenhagen et al., 2023) replaces the Hessian ``H`` by the empirical Fisher built from
the observed tokens (an unbiased estimate of the Gauss-Newton matrix, and of the
expected Hessian, when the tokens are drawn from the model's own predictions), treats
every position as its own example (dropping the products of different positions'
gradients) and the inputs as independent of the output gradients:

    H ~ sum_t (x_t x_t^T) kron (g_t g_t^T) ~ (1/N) (sum_t x_t x_t^T) kron (sum_t g_t g_t^T)
      = N (C kron G),

and ``vec(Delta)^T (C kron G) vec(Delta) = tr(G Delta C Delta^T)`` (column-major
``vec``). Hence the second-order estimate of the increase of the **mean per-token** loss:

    ell(W - E) - ell(W) ~ -<d ell/dW, E> + N / (2 N_pred) * tr(G E C E^T),

where ``N / N_pred = T / (T - 1)`` (1.002 at ``T = 512``; the last position of a
sequence predicts nothing, so its ``g_t = 0``, but it counts in ``N`` like in ``C``). The quadratic term is
:meth:`Statistics.kfac_loss_increase`; the first-order term, zero at a minimum of the
calibration loss, is left out (it has either sign and cancels in
``(ell(W + E) + ell(W - E)) / 2 - ell(W)``). The relative Fisher error
``e_F = sqrt(tr(G E C E^T) / tr(G W C W^T))`` is this term relative to the one of
``E = W``. The estimate is exact (up to ``O(|E|^3)``) where the empirical Fisher is the
Hessian and factorizes, e.g. for a last linear layer with zero weight (uniform
predictions) on data in which each input is followed by every token equally often
(``tests/test_calibration.py`` builds one).

:func:`collect_statistics` streams both from forward pre-hooks (``X``), forward hooks
and tensor hooks on the layer outputs (``g``); :func:`collect_covariances` is its
gradient-free form.

References: J. Martens and R. Grosse, "Optimizing neural networks with
Kronecker-factored approximate curvature", ICML 2015; R. Eschenhagen et al.,
"Kronecker-factored approximate curvature for modern neural network architectures",
NeurIPS 2023.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import find_linear_layers

__all__ = ["Covariances", "Statistics", "collect_covariances", "collect_statistics"]


class Covariances(dict):
    """``dict`` layer name -> ``C = X^T X / N`` (float64, n x n), with the token count.

    Attributes
    ----------
    n_tokens : int
        ``N``, the token positions fed through the model (every layer saw all of them),
        so ``X^T X = C * n_tokens``.
    n_sequences : int
        Number of calibration sequences.
    shared : dict[str, str]
        Layer -> first layer with the same input (e.g. ``k_proj``, ``v_proj`` ->
        ``q_proj``); such layers hold the *same* tensor object, so do not modify a ``C``
        in place.
    """

    n_tokens: int = 0
    n_sequences: int = 0
    shared: dict[str, str]


@dataclass
class Statistics:
    """What :func:`collect_statistics` measured on the calibration tokens.

    Attributes
    ----------
    cov : Covariances
        Layer -> ``C = X^T X / N`` (n x n, float64), exactly :func:`collect_covariances`'s.
    gcov : dict[str, Tensor] or None
        Layer -> ``G = (1/N) sum_t g_t g_t^T`` (m x m, float64), ``g_t = dL/dy_t`` of the
        summed next-token loss (see the module docstring); None without gradients. Never
        shared between layers.
    n_tokens : int
        ``N``, token positions (the denominator of both ``C`` and ``G``).
    n_sequences : int
    n_predicted : int
        ``N_pred = sum over sequences of (length - 1)``, tokens with a loss.
    loss : float or None
        Mean next-token negative log-likelihood per predicted token (nats) of the model
        on the calibration tokens (None if the model returns no logits).
    seconds : float
        Wall time of the collection.
    accumulator_bytes : int
        Bytes of the float64 accumulators kept (distinct ``C`` plus all ``G``), i.e. of
        the result.
    peak_bytes : int
        ``accumulator_bytes`` plus the largest float64 copy of one batch's layer inputs
        or output gradients (the one transient buffer alive at a time); the model's own
        activations and autograd graph of one batch come on top.
    """

    cov: Covariances
    gcov: dict[str, torch.Tensor] | None
    n_tokens: int
    n_sequences: int
    n_predicted: int
    loss: float | None
    seconds: float
    accumulator_bytes: int
    peak_bytes: int

    def kfac_loss_increase(self, name: str, E: torch.Tensor) -> float:
        """K-FAC estimate of the mean per-token loss increase when ``W`` becomes ``W - E``.

        ``N / (2 N_pred) * tr(G E C E^T)`` (the quadratic term of the module
        docstring's derivation), with ``E`` (m x n) in the layer's ``(out, in)``
        orientation. Cost ``m n (m + n)``; computed in float64.

        >>> import torch
        >>> C, G = torch.eye(3, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
        >>> cov = Covariances({"l": C})
        >>> s = Statistics(cov, {"l": G}, 10, 2, 8, None, 0.0, 0, 0)
        >>> s.kfac_loss_increase("l", torch.ones(2, 3))  # 10 / 16 * 2 * 6
        7.5
        """
        if self.gcov is None:
            raise ValueError("no output-gradient covariances: collect with gradients=True")
        if name not in self.gcov:
            raise KeyError(f"no statistics for layer {name!r}; have {list(self.gcov)[:3]}...")
        C, G = self.cov[name], self.gcov[name]
        if tuple(E.shape) != (G.shape[0], C.shape[0]):
            raise ValueError(f"E has shape {tuple(E.shape)}, layer {name} is "
                             f"{G.shape[0]}x{C.shape[0]} (out x in)")
        E = E.detach().to(device=C.device, dtype=torch.float64)
        # tr(G E C E^T) = sum((G E) * (E C)) for symmetric C
        quad = float(torch.sum((G @ E) * (E @ C)))
        return self.n_tokens / (2 * self.n_predicted) * quad


def _select_layers(model: nn.Module, layer_names) -> dict[str, nn.Module]:
    if layer_names is None:
        layers = dict(find_linear_layers(model))
    else:
        all_layers = find_linear_layers(model, include="*")
        names = list(layer_names)
        unknown = [n for n in names if n not in all_layers]
        if unknown:
            raise KeyError(f"not linear layers of the model: {unknown[:5]}; valid names "
                           f"look like {list(all_layers)[:3]}")
        layers = {n: all_layers[n] for n in names}
    if not layers:
        raise ValueError("no layers to collect statistics for")
    return layers


def _split_batches(token_batches, batch_size: int) -> list[torch.Tensor]:
    if isinstance(token_batches, torch.Tensor):
        if token_batches.ndim != 2:
            raise ValueError(f"token_batches must be (n_seq, seq_len), got {tuple(token_batches.shape)}")
        return list(token_batches.split(batch_size))
    return list(token_batches)


def _logits(out) -> torch.Tensor | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        logits = out[0]
    if logits is None and torch.is_tensor(out):
        logits = out
    return logits


def _summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ``-log p(ids[:, t+1] | ids[:, :t+1])`` (half types upcast)."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    return F.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="sum")


def _symmetric_mean(s: torch.Tensor, n: int) -> torch.Tensor:
    """``(S + S^T) / (2 n)``: a sum of ``X^T X`` products is symmetric up to rounding."""
    return (s + s.T).mul_(0.5 / n)


def collect_statistics(model: nn.Module, token_batches: torch.Tensor | Iterable[torch.Tensor],
                       layer_names: Iterable[str] | None = None, *, gradients: bool = True,
                       device: str | torch.device | None = None, batch_size: int = 8,
                       progress: bool = True) -> Statistics:
    r"""Input covariances ``C`` and output-gradient covariances ``G`` of linear layers.

    Over the ``N`` token positions of ``token_batches``, for each layer ``y = x W^T``:

        C = (1/N) sum_t x_t x_t^T  (n x n),    G = (1/N) sum_t g_t g_t^T  (m x m),

    with ``g_t = dL/dy_t`` and ``L`` the next-token cross-entropy **summed** over the
    predicted tokens of the batch (labels = the input ids shifted by one, the loss of
    ``model(input_ids, labels=input_ids)`` times the number of predicted tokens). With
    this scale, ``N / (2 N_pred) * tr(G E C E^T)`` is the K-FAC estimate of the increase
    of the *mean* per-token loss when ``W`` becomes ``W - E``
    (:meth:`Statistics.kfac_loss_increase`; derivation in the module docstring).

    One forward and one backward pass per batch, in eval mode. Inputs are caught by
    forward pre-hooks, outputs by forward hooks, and their gradients by tensor hooks
    during ``torch.autograd.grad``; every ``x_t`` and ``g_t`` is cast to float64 and
    added into its accumulator (``sum X_b^T X_b``, ``sum Gamma_b^T Gamma_b``) at once,
    so nothing of a batch is kept. While collecting, all parameters have
    ``requires_grad=False``, and the output of a hooked layer that does not depend on
    an earlier hooked one becomes a leaf that requires grad: the backward pass starts at
    the first hooked layer and computes no weight gradients. Afterwards the model is
    as it was: ``requires_grad`` flags and train/eval modes restored, no hooks, no
    ``.grad`` (also if a pass fails).

    Layers that receive the same input tensor (q/k/v; gate/up) share one ``C``
    (``cov.shared``); ``G`` is per layer (layers never share outputs). Memory: the
    accumulators, one n x n float64 per distinct input and one m x m per layer. For
    SmolLM2-135M, all 210 block layers: ``C`` 4 matrices a block (3 of 576^2, one of
    1536^2) = 26.8 MB, ``G`` q/o/down 576^2, k/v 192^2, gate/up 1536^2 = 46.3 MB a block;
    in all 0.80 + 1.39 = 2.19 GB (``accumulator_bytes``), plus one float64 batch buffer
    (batch_size 8 x 512 tokens x 1536: 50 MB). Cost per batch: one forward, one backward
    (activation gradients only), ``b T (n^2 + m^2)`` multiply-adds per layer.

    Parameters
    ----------
    model : a causal LM taking ``input_ids`` and returning ``logits`` (b, T, vocab).
    token_batches : LongTensor (n_seq, seq_len) (e.g. from
        :func:`kronlab.data.calibration_token_batches`), split into chunks of
        ``batch_size`` sequences; or an iterable of LongTensors (b, seq_len).
    layer_names : the layers (default: all of :func:`kronlab.models.find_linear_layers`).
    gradients : also collect ``G`` (needs a backward pass per batch); False runs under
        ``torch.no_grad`` and gives ``gcov=None``.
    device : where to run: the model is moved there if it is not; default the model's
        device. The statistics live on that device.
    progress : show a tqdm bar over batches.

    Returns a :class:`Statistics`.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> stats = collect_statistics(model, torch.randint(0, 64, (3, 10)), progress=False)
    >>> name = "model.layers.0.mlp.down_proj"                        # 16 x 32
    >>> stats.cov[name].shape, stats.gcov[name].shape, stats.n_tokens, stats.n_predicted
    (torch.Size([32, 32]), torch.Size([16, 16]), 30, 27)
    """
    t_start = time.perf_counter()
    layers = _select_layers(model, layer_names)
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    batches = _split_batches(token_batches, batch_size)

    csums: dict[str, torch.Tensor] = {}
    gsums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    # inputs seen in the current forward pass: (weak reference, first layer to take it);
    # weak, so that no activation outlives the model's own use of it
    seen: list[tuple[weakref.ref, str]] = []
    roots: list[torch.Tensor] = []  # hooked outputs made leaves in this pass
    transient = [0]

    def input_hook(name: str):
        def hook(module, args):
            x = args[0]
            first = next((f for ref, f in seen if ref() is x), None)
            if first is None:
                first = name
                seen.append((weakref.ref(x), name))
            if name not in csums:  # first batch: decide whether to share an accumulator
                if first != name:
                    shared[name] = first
                    csums[name] = csums[first]
                else:
                    csums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64,
                                              device=x.device)
            elif shared.get(name, name) != first:
                raise RuntimeError(f"layer {name}: its input is shared with a different "
                                   "layer than in the first batch")
            if first == name:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                transient[0] = max(transient[0], x2.numel() * 8)
                csums[name].addmm_(x2.T, x2)
        return hook

    def grad_hook(name: str):
        def hook(g):
            g2 = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
            transient[0] = max(transient[0], g2.numel() * 8)
            gsums[name].addmm_(g2.T, g2)
        return hook

    def output_hook(name: str):
        def hook(module, args, out):
            if not torch.is_tensor(out):
                raise TypeError(f"layer {name} returned {type(out).__name__}, not a tensor")
            if name not in gsums:
                gsums[name] = torch.zeros(out.shape[-1], out.shape[-1], dtype=torch.float64,
                                          device=out.device)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
                roots.append(out)
            out.register_hook(grad_hook(name))
            return out
        return hook

    params = list({id(p): p for p in model.parameters()}.values())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    handles = [mod.register_forward_pre_hook(input_hook(name)) for name, mod in layers.items()]
    n_tokens = n_seq = n_pred = 0
    loss_sum: float | None = 0.0
    try:
        from tqdm.auto import tqdm

        model.eval()
        if gradients:
            for p in params:
                p.requires_grad_(False)
            handles += [mod.register_forward_hook(output_hook(name))
                        for name, mod in layers.items()]
        desc = "statistics" if gradients else "covariances"
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            with torch.set_grad_enabled(gradients):
                logits = _logits(model(input_ids=batch, use_cache=False))
                if gradients and logits is None:
                    raise TypeError("gradients=True needs a model that returns logits")
                if logits is not None and (logits.ndim != 3 or logits.shape[:2] != batch.shape):
                    if gradients:
                        raise TypeError(f"expected logits of shape (b, T, vocab) for input "
                                        f"{tuple(batch.shape)}, got {tuple(logits.shape)}")
                    logits = None  # not a language model's output: no loss to report
                loss = None if logits is None else _summed_nll(logits, batch)
            seen.clear()
            if gradients and batch.shape[1] > 1:
                if not loss.requires_grad or not roots:
                    raise RuntimeError("the loss does not depend on the outputs of the layers "
                                       "(or something other than their outputs requires grad)")
                torch.autograd.grad(loss, roots, allow_unused=True)
            roots.clear()
            if loss is None or loss_sum is None:
                loss_sum = None
            else:
                loss_sum += float(loss.detach())
            del logits, loss
            n_tokens += batch.numel()
            n_seq += batch.shape[0]
            n_pred += batch.shape[0] * max(batch.shape[1] - 1, 0)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
        roots.clear()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    if n_tokens == 0:
        raise ValueError("token_batches is empty")

    cov = Covariances()
    scaled: dict[int, torch.Tensor] = {}
    for name in layers:
        if name not in csums:
            raise RuntimeError(f"layer {name} received no input during the forward passes")
        s = csums[name]
        if id(s) not in scaled:  # shared accumulators are scaled once
            scaled[id(s)] = _symmetric_mean(s, n_tokens)
        cov[name] = scaled[id(s)]
    cov.n_tokens, cov.n_sequences, cov.shared = n_tokens, n_seq, shared
    gcov = {name: _symmetric_mean(gsums[name], n_tokens) for name in layers} if gradients else None
    acc = sum(t.numel() * 8 for t in scaled.values())
    acc += sum(t.numel() * 8 for t in gcov.values()) if gcov else 0
    return Statistics(cov=cov, gcov=gcov, n_tokens=n_tokens, n_sequences=n_seq,
                      n_predicted=n_pred,
                      loss=None if loss_sum is None or n_pred == 0 else loss_sum / n_pred,
                      seconds=time.perf_counter() - t_start, accumulator_bytes=acc,
                      peak_bytes=acc + transient[0])


def collect_covariances(model: nn.Module, token_batches: torch.Tensor | Iterable[torch.Tensor],
                        layer_names: Iterable[str] | None = None, *,
                        device: str | torch.device | None = None, batch_size: int = 8,
                        progress: bool = True) -> Covariances:
    """Input covariance ``C = X^T X / N`` of each layer over all calibration tokens.

    ``X`` (N x n) stacks the inputs of the layer at every token position of
    ``token_batches``; ``C`` is accumulated as ``sum_batches X_b^T X_b`` in float64 (the
    inputs are cast to float64 before the product), divided by ``N`` at the end. No
    activations are kept: memory is one n x n float64 matrix per distinct layer input
    (SmolLM2-135M, all 210 layers: q/k/v and gate/up share inputs, so 4 matrices a block,
    3 of 576^2 and one of 1536^2, ~27 MB a block, ~0.8 GB in all). Layers that receive
    the same input tensor in a forward pass (q/k/v; gate/up) are computed once and share
    the result. Cost: ``N n^2`` multiply-adds per distinct input, plus the forward passes.

    This is ``collect_statistics(..., gradients=False).cov`` (same parameters); the
    hooks are removed even if a forward pass fails; runs under ``torch.no_grad``.
    """
    return collect_statistics(model, token_batches, layer_names, gradients=False,
                              device=device, batch_size=batch_size, progress=progress).cov

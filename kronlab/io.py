"""Save and load compressed causal language models.

A compressed model is a ``transformers`` causal LM in which some ``nn.Linear``
(or GPT-2 ``Conv1D``) layers were replaced by :class:`~kronlab.layers.KronLinear`
or :class:`~kronlab.layers.LowRankLinear`. A save directory holds

- ``config.json`` (and ``generation_config.json`` when the model has one),
- the tokenizer files, when a tokenizer is given,
- ``kronlab.json``: every replaced module (dotted name, class, shapes, dtype,
  whether it has a permutation and a bias) plus ``config_extra``,
- ``model.safetensors``: all weights (tied weights stored once).

Saving is atomic: everything is written to a temporary sibling directory that
is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .layers import KronLinear, LowRankLinear

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "load_compressed",
    "read_manifest",
    "replace_linear",
    "save_compressed",
]

MANIFEST = "kronlab.json"
WEIGHTS = "model.safetensors"
_FORMAT = "kronlab-compressed-model"
_VERSION = 1
_CLASSES = {"KronLinear": KronLinear, "LowRankLinear": LowRankLinear}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"unknown dtype {name!r} in {MANIFEST}")
    return dt


def replace_linear(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at dotted path ``name`` in ``model``; return the old module."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
    except AttributeError:
        raise KeyError(f"model has no submodule {name!r}") from None
    setattr(parent, child, new_module)
    return old


def _module_record(name: str, mod: nn.Module) -> dict:
    rec = {"name": name, "class": type(mod).__name__, "rank": mod.rank,
           "in_features": mod.in_features, "out_features": mod.out_features,
           "bias": mod.bias is not None}
    if isinstance(mod, KronLinear):
        rec.update(a_shape=list(mod.a_shape), b_shape=list(mod.b_shape),
                   perm=mod.perm is not None, order=mod.order, dtype=_dtype_name(mod.A.dtype))
    else:
        rec.update(dtype=_dtype_name(mod.U.dtype))
    return rec


def _manifest(model: nn.Module, config_extra) -> dict:
    modules = [_module_record(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, (KronLinear, LowRankLinear))]
    try:
        dtype = next(p.dtype for n, p in model.named_parameters()
                     if not any(n.startswith(r["name"] + ".") for r in modules))
    except StopIteration:
        dtype = torch.get_default_dtype()
    return {"format": _FORMAT, "version": _VERSION, "model_class": type(model).__name__,
            "model_dtype": _dtype_name(dtype), "modules": modules,
            "config_extra": config_extra if config_extra is not None else {}}


def save_compressed(model: nn.Module, directory, *, tokenizer=None, config_extra=None) -> Path:
    """Save a (partly) compressed causal LM to ``directory``, atomically.

    Parameters
    ----------
    model : transformers ``PreTrainedModel``
        With some layers replaced by ``KronLinear``/``LowRankLinear``. Not modified.
    directory : path
        Target directory. An existing kronlab save there is replaced once the new
        one is complete; any other existing file or directory is an error.
    tokenizer : optional
        Saved with ``save_pretrained`` next to the model.
    config_extra : JSON-serialisable, optional
        Stored under ``"config_extra"`` in ``kronlab.json`` (e.g. the
        compression configuration and report).

    Returns
    -------
    Path of the saved directory.
    """
    from safetensors.torch import save_model

    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(f"{target} exists and is not a kronlab save (no {MANIFEST}); "
                              f"refusing to replace it — choose a new or empty directory")
    try:
        manifest_text = json.dumps(_manifest(model, config_extra), indent=2)
    except TypeError as e:
        raise TypeError(f"config_extra must be JSON-serialisable: {e}") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(manifest_text + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "save")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "save").exists() and not target.exists():
            os.replace(old / "save", target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_manifest(directory) -> dict:
    """The parsed ``kronlab.json`` of a save directory (clear errors if there is none)."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is a file, not a kronlab save directory")
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{d} is not a kronlab save: it has no {MANIFEST} "
                                f"(write one with kronlab.io.save_compressed)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a kronlab manifest (format={manifest.get('format')!r})")
    if manifest.get("version", 0) > _VERSION:
        raise ValueError(f"{path} has format version {manifest['version']}; this kronlab "
                         f"reads up to {_VERSION}")
    return manifest


def _empty_module(rec: dict, device) -> nn.Module:
    cls = _CLASSES.get(rec["class"])
    if cls is None:
        raise ValueError(f"unknown module class {rec['class']!r} for {rec['name']!r} in "
                         f"{MANIFEST}; expected one of {sorted(_CLASSES)}")
    kw = {"bias": rec["bias"], "dtype": _dtype(rec["dtype"]), "device": device}
    if cls is KronLinear:
        return KronLinear(rec["rank"], rec["a_shape"], rec["b_shape"], permuted=rec["perm"],
                          order=rec.get("order", "auto"), **kw)
    return LowRankLinear(rec["rank"], rec["in_features"], rec["out_features"], **kw)


def load_compressed(directory, *, device="cpu"):
    """Load a model written by :func:`save_compressed`.

    Builds the architecture from the saved config, puts empty ``KronLinear`` /
    ``LowRankLinear`` modules of the recorded shapes in place, loads every
    weight strictly, re-ties tied weights and sets eval mode.

    Returns
    -------
    (model, tokenizer) ; tokenizer is None when none was saved.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(directory)
    d = Path(directory)
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} has {MANIFEST} but no {WEIGHTS}; the save is incomplete")
    config = AutoConfig.from_pretrained(d)
    dtype = _dtype(manifest["model_dtype"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.to(device=device, dtype=dtype)
    for rec in manifest["modules"]:
        replace_linear(model, rec["name"], _empty_module(rec, device))
    load_model(model, str(d / WEIGHTS), strict=True, device=str(device))
    model.tie_weights()
    model.eval()

    tokenizer = None
    if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                       "vocab.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(d)
    return model, tokenizer

"""Save and load compressed causal language models.

A compressed model is a ``transformers`` causal LM in which some ``nn.Linear``
(or GPT-2 ``Conv1D``) layers were replaced by :class:`~kronlab.layers.KronLinear`
or :class:`~kronlab.layers.LowRankLinear`. A save directory holds

- ``config.json`` (and ``generation_config.json`` when the model has one),
- the tokenizer files, when a tokenizer is given,
- ``kronlab.json``: every replaced module (dotted name, class, shapes, dtype,
  whether it has a permutation and a bias) plus ``config_extra``,
- ``model.safetensors``: all weights (tied weights stored once), in the model's
  dtype or the one asked for (``dtype=torch.bfloat16`` halves a float32 file).

Saving is atomic: everything is written to a temporary sibling directory that
is renamed into place only when complete. The files get the ordinary modes of the
user's umask (``0644`` files and a ``0755`` folder under umask ``022``), not the
``0600``/``0700`` of temporary files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .layers import KronLinear, LowRankLinear
from .models import set_submodule
from .paths import write_atomic

__all__ = [
    "MANIFEST",
    "SAVE_DTYPES",
    "WEIGHTS",
    "load_compressed",
    "read_manifest",
    "save_compressed",
    "update_config_extra",
]

MANIFEST = "kronlab.json"
WEIGHTS = "model.safetensors"
_FORMAT = "kronlab-compressed-model"
_VERSION = 1
_CLASSES = {"KronLinear": KronLinear, "LowRankLinear": LowRankLinear}
#: Floating dtypes a save can be written in.
SAVE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"unknown dtype {name!r} in {MANIFEST}")
    return dt


def _float_dtype(dtype) -> torch.dtype | None:
    """``None``, or a floating torch dtype from a dtype or its name (``"bfloat16"``)."""
    if dtype is None:
        return None
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, one of {', '.join(SAVE_DTYPES)}; "
                         f"got {dtype!r}")
    return dt


def _ordinary_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes of a plain ``mkdir``/``open`` under the umask.

    ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files; a saved
    model is meant to be read by others as any other file is.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


def _manifest(model: nn.Module, config_extra, dtype: torch.dtype | None) -> dict:
    modules = [_module_record(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, (KronLinear, LowRankLinear))]
    try:
        memory_dtype = next(p.dtype for n, p in model.named_parameters()
                            if not any(n.startswith(r["name"] + ".") for r in modules))
    except StopIteration:
        memory_dtype = torch.get_default_dtype()
    if dtype is not None:
        for rec in modules:
            rec["dtype"] = _dtype_name(dtype)
    from .rotate import ResidualMap

    maps = [name.rsplit(".", 1)[0] for name, mod in model.named_modules()
            if isinstance(mod, ResidualMap)]
    return {"format": _FORMAT, "version": _VERSION, "model_class": type(model).__name__,
            "model_dtype": _dtype_name(dtype or memory_dtype),
            "memory_dtype": _dtype_name(memory_dtype), "modules": modules,
            "residual_maps": maps,
            "config_extra": config_extra if config_extra is not None else {}}


def _weights(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict to write: tied tensors once, floating tensors cast to ``dtype``, on the CPU.

    Casting makes new tensors, so the model itself is never changed.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                   tuple(t.shape), t.stride())
            if key in seen:  # a tied weight (lm_head = embedding): stored once
                continue
            seen.add(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu").contiguous()
    return out


def save_compressed(model: nn.Module, directory, *, tokenizer=None, config_extra=None,
                    dtype=None) -> Path:
    """Save a (partly) compressed causal LM to ``directory``, atomically.

    Parameters
    ----------
    model : transformers ``PreTrainedModel``
        With some layers replaced by ``KronLinear``/``LowRankLinear``. Not modified
        (a ``dtype`` cast happens on copies, on the way out).
    directory : path
        Target directory. An existing kronlab save there is replaced once the new
        one is complete; any other existing file or directory is an error.
    tokenizer : optional
        Saved with ``save_pretrained`` next to the model.
    config_extra : JSON-serialisable, optional
        Stored under ``"config_extra"`` in ``kronlab.json`` (e.g. the
        compression configuration and report).
    dtype : torch dtype or its name, optional
        Write every floating tensor in this dtype (``"bfloat16"``: half the bytes of
        float32); integer tensors (permutations) stay as they are. ``None`` keeps each
        tensor's dtype. The saved ``config.json`` and ``kronlab.json`` record it, and
        :func:`load_compressed` builds the model in it.

    Returns
    -------
    Path of the saved directory.
    """
    from safetensors.torch import save_file

    dtype = _float_dtype(dtype)
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(f"{target} exists and is not a kronlab save (no {MANIFEST}); "
                              f"refusing to replace it — choose a new or empty directory")
    try:
        manifest_text = json.dumps(_manifest(model, config_extra, dtype), indent=2)
    except TypeError as e:
        raise TypeError(f"config_extra must be JSON-serialisable: {e}") from None

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        config = model.config
        if dtype is not None:  # a copy: the user's model keeps its config
            config = copy.deepcopy(config)
            config.dtype = dtype
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_weights(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(manifest_text + "\n")
        _ordinary_modes(tmp)
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


def update_config_extra(directory, updates: dict) -> dict:
    """Merge ``updates`` into the ``config_extra`` of a save's ``kronlab.json``, atomically.

    For facts known only once the save is written (its size, the time the save took).
    Returns the new ``config_extra``.
    """
    manifest = read_manifest(directory)
    extra = manifest.get("config_extra")
    if not isinstance(extra, dict):
        raise TypeError(f"config_extra of {directory} is not a mapping; cannot update it")
    extra.update(updates)
    try:
        text = json.dumps(manifest, indent=2)
    except TypeError as e:
        raise TypeError(f"updates must be JSON-serialisable: {e}") from None
    path = Path(directory) / MANIFEST
    mode = path.stat().st_mode & 0o777
    write_atomic(path, text + "\n")
    os.chmod(path, mode)  # keep the save's modes (write_atomic makes 0644)
    return extra


def _empty_module(rec: dict, device, dtype: torch.dtype | None) -> nn.Module:
    cls = _CLASSES.get(rec["class"])
    if cls is None:
        raise ValueError(f"unknown module class {rec['class']!r} for {rec['name']!r} in "
                         f"{MANIFEST}; expected one of {sorted(_CLASSES)}")
    kw = {"bias": rec["bias"], "dtype": dtype or _dtype(rec["dtype"]), "device": device}
    if cls is KronLinear:
        return KronLinear(rec["rank"], rec["a_shape"], rec["b_shape"], permuted=rec["perm"],
                          order=rec.get("order", "auto"), **kw)
    return LowRankLinear(rec["rank"], rec["in_features"], rec["out_features"], **kw)


def load_compressed(directory, *, device="cpu", dtype=None):
    """Load a model written by :func:`save_compressed`.

    Builds the architecture from the saved config, puts empty ``KronLinear`` /
    ``LowRankLinear`` modules of the recorded shapes in place, loads every
    weight strictly, re-ties tied weights and sets eval mode.

    ``dtype=None`` builds the model in the dtype it was saved in (a bfloat16 save
    loads as bfloat16); a floating dtype (``torch.float32`` or ``"float32"``) converts
    every floating weight to it on load, e.g. to evaluate a bfloat16 save at
    float32 speed on a CPU. Buffers the model computes itself (rotary frequencies)
    keep the precision transformers gives them.

    Returns
    -------
    (model, tokenizer) ; tokenizer is None when none was saved.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    manifest = read_manifest(directory)
    d = Path(directory)
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} has {MANIFEST} but no {WEIGHTS}; the save is incomplete")
    override = _float_dtype(dtype)
    config = AutoConfig.from_pretrained(d)
    dtype = override or _dtype(manifest["model_dtype"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # transformers < 4.56 names it torch_dtype
        model.to(dtype=dtype)
    model.to(device=device)
    for rec in manifest["modules"]:
        set_submodule(model, rec["name"], _empty_module(rec, device, override))
    if manifest.get("residual_maps"):  # per-block rotations' skip maps (kronlab.rotate)
        from .rotate import attach_residual_map

        hidden = int(config.get_text_config().hidden_size) \
            if hasattr(config, "get_text_config") else int(config.hidden_size)
        for name in manifest["residual_maps"]:
            attach_residual_map(model.get_submodule(name), torch.eye(hidden))
    load_model(model, str(d / WEIGHTS), strict=True, device=str(device))
    model.tie_weights()
    model.eval()
    model.kronlab_info = {"spec": str(directory), "kind": "kronlab", "source": str(d / WEIGHTS),
                          "saved_dtype": manifest["model_dtype"],
                          "load_seconds": time.perf_counter() - t0}

    tokenizer = None
    if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                       "vocab.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(d)
    return model, tokenizer

r"""Healing: knowledge distillation of a compressed model from its dense teacher.

After :func:`kronlab.compress.compress` each replaced layer is the best fit of its own
weight (or output) in isolation; the errors of all layers add up through the network.
Healing trains the compressed factors (``KronLinear`` ``A``, ``B``; ``LowRankLinear``
``U``, ``V``), and optionally the norms and biases, so that the student's next-token
distribution matches the teacher's on training text. With teacher logits ``t``, student
logits ``s`` at a position, temperature ``T``, ``p = softmax(t / T)``,
``q = softmax(s / T)`` and the next token ``y``, the loss per predicted token is

.. math::

    \ell = w_{KL} \, T^2 \, \mathrm{KL}(p \,\|\, q) + w_{NLL} \, (-\log \mathrm{softmax}(s)_y),

averaged over the predicted positions (the ``T^2`` keeps the gradient scale independent
of ``T``; Hinton et al., 2015). Everything else is frozen. AdamW, linear warm-up then
cosine decay, gradient accumulation; float32 on the CPU, bfloat16 autocast on CUDA.

Teacher logits are computed on the fly (exact KL), or cached on disk. A full cache
would hold ``vocab x tokens`` numbers: for SmolLM2 (vocabulary 49152) 98 kB per token in
bfloat16, 4.8 GB for the default 49152 tokens. The cache therefore keeps, per position,
the teacher's ``k`` most likely tokens (:data:`kronlab.defaults.HEAL_CACHE_TOP_K`) and
the log-mass of the rest, ``8k + 4`` bytes (516 bytes at ``k = 64``: 25 MB for 49152
tokens), and the loss becomes the KL between the two distributions *coarsened* to those
``k`` tokens plus one "other" outcome (:func:`topk_kl_divergence`). By the data processing
inequality it is a lower bound of the full KL, equal to it when ``k`` is the vocabulary.
A cache pays off when several students are healed from one teacher on the same tokens.

Memory: a ``KronLinear`` keeps an intermediate product per token for the backward pass,
often far larger than its output (:func:`kron_activation_bytes`); beyond
:data:`kronlab.defaults.HEAL_ACTIVATION_LIMIT` the decoder blocks are recomputed in the
backward pass (:func:`checkpointed_blocks`). Checkpoints (trainable parameters, AdamW,
schedule, RNG states, data position, curves) are written atomically, and a resumed run
ends where an uninterrupted one ends.

Training and evaluation text are kept apart: the default training text is the
*calibration* parts of the stored corpora (:data:`kronlab.defaults.HEAL_TEXTS`), never
their held-out parts, and :func:`heal` refuses training tokens that share a run of
:data:`kronlab.defaults.HEAL_OVERLAP_NGRAM` tokens with the evaluated tokens
(:func:`token_overlap`) or a training text that contains passages of an evaluation text
or of a stored corpus's held-out part (:func:`text_overlap`).

Example (shapes; a tiny model, see ``tests/test_heal.py``)::

    healed, report = heal(student, teacher, text, tokenizer=tok, tokens=4096,
                          seq_len=64, batch_size=4, eval_text=held_out)
    report.curve   # [{"step": 0, "tokens": 0, "perplexity": {"eval": 31.2}}, ...,
                   #  {"step": 16, "tokens": 4096, "perplexity": {"eval": 24.7}}]

Reference: G. Hinton, O. Vinyals and J. Dean, "Distilling the knowledge in a neural
network", 2015.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .defaults import (
    EVAL_TOKENS,
    HEAL_BATCH_SIZE,
    HEAL_CACHE_TOP_K,
    HEAL_EVAL_EVERY,
    HEAL_ACTIVATION_LIMIT,
    HEAL_GRAD_ACCUM,
    HEAL_KL_WEIGHT,
    HEAL_LR,
    HEAL_MAX_GRAD_NORM,
    HEAL_NLL_WEIGHT,
    HEAL_OVERLAP_NGRAM,
    HEAL_SEQ_LEN,
    HEAL_TEMPERATURE,
    HEAL_TEXTS,
    HEAL_TOKENS,
    HEAL_TRAIN,
    HEAL_WARMUP,
    HEAL_WEIGHT_DECAY,
    SEED,
    WINDOW,
)
from .layers import KronLinear, LowRankLinear

__all__ = [
    "CHECKPOINT",
    "TRAIN_MODES",
    "HealReport",
    "check_same_vocabulary",
    "checkpointed_blocks",
    "decoder_blocks",
    "default_training_text",
    "heal",
    "held_out_in",
    "kl_divergence",
    "kron_activation_bytes",
    "logits_of",
    "teacher_topk",
    "text_overlap",
    "token_overlap",
    "topk_kl_divergence",
    "trainable_parameters",
]

#: ``heal(train=...)``: the compressed factors only, or also every norm and bias.
TRAIN_MODES = ("factors", "factors+norms+biases")
#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT = "heal-checkpoint.pt"
_CKPT_VERSION = 1
_CACHE_META = "meta.json"
# settings that define the result: a checkpoint or cache resumes only under the same values
_RUN_KEYS = ("tokens", "seq_len", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
             "max_grad_norm", "kl_weight", "nll_weight", "temperature", "train", "eval_every",
             "eval_tokens", "window", "cache_top_k", "seed", "steps")


# ----------------------------------------------------------------------------- losses

def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                  temperature: float = 1.0) -> torch.Tensor:
    r"""Mean over positions of ``T^2 KL(softmax(t/T) || softmax(s/T))``.

    ``student_logits`` and ``teacher_logits`` are ``(..., V)``; every leading index is a
    position. Computed in float32 (half types are upcast); a scalar with gradient to the
    student.

    >>> s = torch.zeros(2, 3, 5); float(kl_divergence(s, s))
    0.0
    """
    T = float(temperature)
    logq = F.log_softmax(student_logits.float() / T, dim=-1)
    logp = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl.mean() * T * T


def teacher_topk(teacher_logits: torch.Tensor, k: int, *,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The teacher's ``k`` most likely tokens per position and the log-mass of the rest.

    Returns ``(index, logp, logp_rest)``: ``index`` ``(..., k)`` int64, ``logp`` ``(..., k)``
    the log-probabilities ``log softmax(t/T)`` of those tokens, ``logp_rest`` ``(...)`` the
    log of the probability of all other tokens (``-inf`` when ``k`` is the vocabulary), all
    float32. What :func:`topk_kl_divergence` needs, ``8k + 4`` bytes a position on disk.
    """
    V = teacher_logits.shape[-1]
    k = min(int(k), V)
    z = teacher_logits.float() / float(temperature)
    logp_all = F.log_softmax(z, dim=-1)
    logp, index = logp_all.topk(k, dim=-1)
    rest = logp_all.scatter(-1, index, float("-inf")).logsumexp(-1)
    return index, logp, rest


def topk_kl_divergence(student_logits: torch.Tensor, index: torch.Tensor, logp: torch.Tensor,
                       logp_rest: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    r"""``T^2 KL`` between teacher and student coarsened to the teacher's top-k tokens.

    With ``I`` the teacher's ``k`` tokens (:func:`teacher_topk`), ``p_rest = 1 - sum_I p_i``
    and ``q_rest = 1 - sum_I q_i`` (computed as a log-sum-exp over the other tokens, so it
    stays accurate when ``q_rest`` is tiny),

    .. math::

        \mathrm{KL}_k = \sum_{i \in I} p_i \log\frac{p_i}{q_i}
                        + p_{rest} \log\frac{p_{rest}}{q_{rest}}
                        \;\le\; \mathrm{KL}(p \,\|\, q),

    the KL of the two distributions over ``k + 1`` outcomes (data processing inequality;
    equality when ``k`` is the vocabulary). Mean over positions, times ``T^2``.
    """
    T = float(temperature)
    z = student_logits.float() / T
    logz = z.logsumexp(-1, keepdim=True)
    logq = z.gather(-1, index) - logz
    logq_rest = z.scatter(-1, index, float("-inf")).logsumexp(-1) - logz.squeeze(-1)
    p = logp.exp()
    p_rest = logp_rest.exp()
    kl = (p * (logp - logq)).sum(-1)
    # p_rest * (log p_rest - log q_rest), zero where p_rest = 0 (k = V)
    rest = torch.where(p_rest > 0, p_rest * (logp_rest - logq_rest), torch.zeros_like(p_rest))
    return (kl + rest).mean() * T * T


def _nll(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` (B, L-1) under ``pred_logits`` (B, L-1, V)."""
    pred = pred_logits.float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------------------- disjointness

def token_overlap(train_ids: torch.Tensor, eval_ids, n: int = HEAL_OVERLAP_NGRAM) -> float:
    """Fraction of the ``n``-token windows of ``eval_ids`` that also occur in ``train_ids``.

    ``train_ids`` is ``(n_seq, L)`` (windows inside each row) or 1-D; ``eval_ids`` a 1-D
    sequence. Exact (windows compared as bytes), linear in the number of tokens (~1 s for
    10^6 training tokens), memory for the evaluation windows only. 0.0 when either side is
    shorter than ``n``.

    >>> token_overlap(torch.arange(100)[None], torch.arange(50, 80), n=8)
    1.0
    """
    train = torch.as_tensor(train_ids).to("cpu", torch.int32)
    if train.ndim == 1:
        train = train[None]
    ev = torch.as_tensor(eval_ids).to("cpu", torch.int32).reshape(-1)
    if train.shape[1] < n or ev.numel() < n:
        return 0.0
    windows = [bytes(w) for w in ev.unfold(0, n, 1).numpy()]
    wanted = set(windows)
    found: set[bytes] = set()
    for row in train:
        found.update(w for w in map(bytes, row.unfold(0, n, 1).numpy()) if w in wanted)
    return sum(w in found for w in windows) / len(windows)


def _probes(text: str, count: int, length: int) -> list[str]:
    step = max(1, (len(text) - length) // max(count, 1))
    out = []
    for i in range(count):
        start = text.find(" ", i * step) + 1
        piece = text[start:start + length]
        if len(piece) == length and piece.strip():
            out.append(piece)
    return out


def text_overlap(train_text: str, eval_text: str, *, probes: int = 64,
                 length: int = 200) -> float:
    """Fraction of ``probes`` passages of ``eval_text`` found verbatim in ``train_text``.

    The passages are ``length`` characters long, start at word boundaries evenly spread
    over ``eval_text``. A cheap check that needs no tokenizer (``str.find``: ~0.5 s for 200
    probes in 18 MB); held-out and calibration parts of the stored corpora share none.

    >>> text_overlap("a b c " * 100, "b c a " * 50, length=20)
    1.0
    """
    found = _probes(eval_text, probes, length)
    if not found:
        return 0.0
    return sum(p in train_text for p in found) / len(found)


def default_training_text(names=HEAL_TEXTS) -> str:
    """The calibration parts (``split_corpus(name)[0]``) of the stored corpora ``names``,
    joined by blank lines: the default training text of :func:`heal`. Never a held-out part."""
    from .data import DOCUMENT_SEPARATOR, split_corpus

    return DOCUMENT_SEPARATOR.join(split_corpus(name)[0] for name in names)


def held_out_in(text: str) -> list[str]:
    """The stored corpora whose held-out part has passages in ``text`` (:func:`text_overlap`
    with 16 probes each): held-out text that must not be trained on."""
    from .data import list_corpora, split_corpus

    try:
        names = list_corpora()
    except FileNotFoundError:
        return []
    return [n for n in names if text_overlap(text, split_corpus(n)[1], probes=16) > 0]


# ----------------------------------------------------------------------------- parameters

def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def trainable_parameters(model: nn.Module, train: str = HEAL_TRAIN) -> dict[str, nn.Parameter]:
    """The parameters :func:`heal` trains, name -> parameter, in ``named_parameters`` order.

    ``"factors"``: ``A``, ``B`` of every :class:`~kronlab.layers.KronLinear` and ``U``, ``V``
    of every :class:`~kronlab.layers.LowRankLinear`. ``"factors+norms+biases"``: also the
    parameters of every normalisation module (class name containing ``Norm``) and every
    parameter named ``bias``. Embeddings, the head and the dense layers' weights never.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    names: set[str] = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, KronLinear):
            names |= {prefix + "A", prefix + "B"}
        elif isinstance(mod, LowRankLinear):
            names |= {prefix + "U", prefix + "V"}
        if train == "factors+norms+biases" and _is_norm(mod):
            names |= {prefix + n for n, _ in mod.named_parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        if name in names or (train == "factors+norms+biases" and name.rsplit(".", 1)[-1] == "bias"):
            out[name] = p
    return out


def _vocab(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, student_tokenizer=None,
                          teacher_tokenizer=None,
                          probe: str = "Kronecker heals the 1817 novel: Persuasion!") -> None:
    """Raise ``ValueError`` unless student and teacher predict over the same vocabulary.

    Compares the output sizes (the heads' rows, else ``config.vocab_size``) and, given both
    tokenizers, their lengths and the token ids of ``probe``.
    """
    vs, vt = _vocab(student), _vocab(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise ValueError(f"student and teacher have different vocabularies ({vs} and {vt} "
                         "output tokens): distillation needs the teacher the student was "
                         "compressed from")
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    from .data import encode

    ls, lt = (len(t) if hasattr(t, "__len__") else getattr(t, "vocab_size", None)
              for t in (student_tokenizer, teacher_tokenizer))
    if ls != lt:
        raise ValueError(f"student and teacher tokenizers differ: {ls} and {lt} tokens")
    a, b = encode(student_tokenizer, probe), encode(teacher_tokenizer, probe)
    if a != b:
        raise ValueError(f"student and teacher tokenizers differ: {probe!r} is {a[:8]}... "
                         f"and {b[:8]}...")


# ----------------------------------------------------------------------------- report

@dataclass
class HealReport:
    """What a :func:`heal` run did.

    ``curve``: held-out perplexity, ``[{"step", "tokens", "perplexity": {name: ppl}}]``,
    from before training (tokens 0) to the end. ``losses``: one row per optimizer step,
    ``{"step", "tokens", "loss", "kl", "nll", "lr", "grad_norm"}``. ``seconds``: wall time
    per phase (``train``, ``eval``, ``teacher_cache``, ``checkpoint``) over all sessions
    of a resumed run; ``tokens_per_second`` is training tokens over ``seconds["train"]``.
    """

    config: dict
    steps: int
    total_steps: int
    tokens: int
    trainable: dict
    curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    overlap: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    resumed_from_step: int | None = None
    finished: bool = False

    @property
    def tokens_per_second(self) -> float:
        t = self.seconds.get("train", 0.0)
        return self.tokens / t if t > 0 else float("nan")

    @property
    def ppl_before(self) -> dict | None:
        return self.curve[0]["perplexity"] if self.curve else None

    @property
    def ppl_after(self) -> dict | None:
        return self.curve[-1]["perplexity"] if self.curve else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d

    def summary(self) -> str:
        """Lines for the CLI: perplexity before -> after per text, loss, speed, time."""
        lines = []
        if self.curve:
            for name, before in self.ppl_before.items():
                after = self.ppl_after[name]
                lines.append(f"{name:>12s}: perplexity {before:.3f} -> {after:.3f} "
                             f"({after / before - 1:+.1%})")
        if self.losses:
            lines.append(f"loss {self.losses[0]['loss']:.4f} -> {self.losses[-1]['loss']:.4f} "
                         f"over {self.steps} steps")
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        lines.append(f"{self.tokens:,} tokens at {self.tokens_per_second:.1f} tokens/s; {secs}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers

def _device_type(device) -> str:
    return torch.device(device).type


def _autocast(device):
    if _device_type(device) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def logits_of(model, x, device):
    """``model(x).logits``, under bfloat16 autocast on CUDA (float32 on the CPU)."""
    with _autocast(device):
        return model(input_ids=x, use_cache=False).logits


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def _fingerprint(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, p in params.items():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _lr_factor(step: int, steps: int, warm: int) -> float:
    """Linear warm-up over ``warm`` steps, then cosine decay to 0 at ``steps``."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(a.astype(np.int64)) if isinstance(a, np.ndarray) else a
                       for a in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    np.random.set_state(tuple(a.numpy().astype(np.uint32) if torch.is_tensor(a) else a
                              for a in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: all or nothing.

    (Not :func:`kronlab.paths.write_atomic`: a checkpoint of SmolLM2's factors and their
    AdamW moments is ~1 GB, which should not be held in memory twice.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mismatch(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if a.get(k) != b.get(k)]


def kron_activation_bytes(model: nn.Module, tokens: int, element_size: int = 4) -> int:
    """Bytes of the ``KronLinear`` intermediates that a backward pass over ``tokens`` keeps.

    A ``KronLinear`` stores, per token, its intermediate product ``r*m1*n2`` ("a_first") or
    ``r*n1*m2`` ("b_first") numbers for the backward pass, often far more than the layer's
    output: ~8.3 M floats a token for SmolLM2 at the shapes of the recorded kron-aa 0.8
    sweep, 34 GB for 1024 tokens (which ran out of memory on the 23 GB CPU machine). Beyond
    ``HEAL_ACTIVATION_LIMIT`` :func:`heal` recomputes each decoder block in the backward
    pass instead (gradient checkpointing).
    """
    total = 0
    for m in model.modules():
        if isinstance(m, KronLinear):
            (m1, n1), (m2, n2) = m.a_shape, m.b_shape
            total += m.rank * (m1 * n2 if m.order == "a_first" else n1 * m2)
    return total * int(tokens) * int(element_size)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``ModuleList``s (the decoder blocks)."""
    prefixes: list[str] = []
    blocks: list[nn.Module] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name and \
                not any(name.startswith(p) for p in prefixes):
            prefixes.append(name + ".")
            blocks += list(mod)
    return blocks


@contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool):
    """Run every decoder block under ``torch.utils.checkpoint`` (its activations are
    recomputed in the backward pass, not stored), in eval mode too; undone on exit."""
    if not enabled:
        yield 0
        return
    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model)
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------- teacher cache

class _TeacherCache:
    """Top-k teacher log-probabilities of every training sequence, memory-mapped .npy files.

    A folder: ``meta.json`` (settings, data hash, sizes), ``index.npy`` (n_seq, L-1, k)
    int32, ``logp.npy`` (n_seq, L-1, k) float32, ``rest.npy`` (n_seq, L-1) float32. Built
    in a temporary sibling folder and renamed into place when complete.
    """

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        self.meta = json.loads((path / _CACHE_META).read_text())
        self.index = np.load(path / "index.npy", mmap_mode="r")
        self.logp = np.load(path / "logp.npy", mmap_mode="r")
        self.rest = np.load(path / "rest.npy", mmap_mode="r")

    def get(self, i0: int, i1: int, device):
        import numpy as np

        # np.array copies the memory-mapped rows (read-only) into writable memory
        return (torch.from_numpy(np.array(self.index[i0:i1])).to(device, torch.int64),
                torch.from_numpy(np.array(self.logp[i0:i1])).to(device),
                torch.from_numpy(np.array(self.rest[i0:i1])).to(device))

    @staticmethod
    def nbytes(n_seq: int, seq_len: int, k: int) -> int:
        return n_seq * (seq_len - 1) * (8 * k + 4)

    @classmethod
    def open_or_build(cls, path: Path, teacher, seqs: torch.Tensor, meta: dict, *, batch_size,
                      device, progress) -> _TeacherCache:
        import numpy as np

        k, T = meta["top_k"], meta["temperature"]
        if path.exists():
            if not (path / _CACHE_META).is_file():
                raise ValueError(f"cache_teacher {path} exists and is not a teacher cache "
                                 f"(no {_CACHE_META}); choose another path")
            cache = cls(path)
            bad = _mismatch(cache.meta, meta, ("data_sha256", "top_k", "temperature", "seq_len",
                                               "n_seq", "vocab"))
            if bad:
                raise ValueError(f"the teacher cache {path} was made with other settings "
                                 f"({', '.join(bad)} differ); remove it or choose another path")
            # a cache of another teacher is refused: recompute the first sequence
            with torch.no_grad():
                t = logits_of(teacher, seqs[:1].to(device), device)[:, :-1]
                _, logp, _ = teacher_topk(t, k, temperature=T)
            if not torch.allclose(logp.cpu(), torch.from_numpy(np.array(cache.logp[:1])),
                                  atol=1e-3, rtol=0):
                raise ValueError(f"the teacher cache {path} was made with another teacher "
                                 "(its first sequence differs); remove it or choose another path")
            return cache
        n, L = seqs.shape
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            kk = min(k, meta["vocab"])
            index = np.lib.format.open_memmap(tmp / "index.npy", "w+", np.int32, (n, L - 1, kk))
            logp = np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float32, (n, L - 1, kk))
            rest = np.lib.format.open_memmap(tmp / "rest.npy", "w+", np.float32, (n, L - 1))
            from tqdm.auto import tqdm

            with torch.no_grad():
                for i0 in tqdm(range(0, n, batch_size), desc="teacher top-k cache",
                               unit="batch", disable=not progress):
                    x = seqs[i0:i0 + batch_size].to(device)
                    t = logits_of(teacher, x, device)[:, :-1]
                    idx, lp, r = teacher_topk(t, k, temperature=T)
                    index[i0:i0 + len(x)] = idx.cpu().numpy().astype(np.int32)
                    logp[i0:i0 + len(x)] = lp.cpu().numpy()
                    rest[i0:i0 + len(x)] = r.cpu().numpy()
            for a in (index, logp, rest):
                a.flush()
            del index, logp, rest
            (tmp / _CACHE_META).write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)


# ----------------------------------------------------------------------------- heal

def _training_sequences(data, tokenizer, n_seq: int, seq_len: int | None, seed: int):
    """(sequences (n_seq, L) long, description) from token batches or a text."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token batches must be an integer tensor (n_seq, seq_len), got "
                             f"{data.dtype} {tuple(data.shape)}")
        if seq_len is not None and data.shape[1] != seq_len:
            raise ValueError(f"seq_len={seq_len} but the token batches have {data.shape[1]} "
                             "tokens a row; pass seq_len=None to use theirs")
        if data.shape[0] < n_seq:
            raise ValueError(f"the token batches hold {data.shape[0]} sequences, the budget "
                             f"needs {n_seq}: lower `tokens` or pass more batches")
        return data[:n_seq].long(), "token batches"
    from .data import calibration_token_batches

    if tokenizer is None:
        raise ValueError("a training text needs `tokenizer`")
    seqs = calibration_token_batches(tokenizer, data, n_tokens=n_seq * seq_len, seq_len=seq_len,
                                     seed=seed)
    return seqs, "text"


def heal(student: nn.Module, teacher: nn.Module, data=None, *, tokenizer=None,
         tokens: int = HEAL_TOKENS, seq_len: int | None = HEAL_SEQ_LEN,
         batch_size: int = HEAL_BATCH_SIZE, grad_accum: int = HEAL_GRAD_ACCUM,
         lr: float = HEAL_LR, warmup: float = HEAL_WARMUP,
         weight_decay: float = HEAL_WEIGHT_DECAY, max_grad_norm: float | None = HEAL_MAX_GRAD_NORM,
         kl_weight: float = HEAL_KL_WEIGHT, nll_weight: float = HEAL_NLL_WEIGHT,
         temperature: float = HEAL_TEMPERATURE, train: str = HEAL_TRAIN,
         eval_text: str | dict[str, str] | None = None, eval_every: int = HEAL_EVAL_EVERY,
         eval_tokens: int = EVAL_TOKENS, window: int = WINDOW,
         cache_teacher: bool | str | os.PathLike = False, cache_top_k: int = HEAL_CACHE_TOP_K,
         checkpoint_dir=None, checkpoint_every: int | None = None, resume: bool = False,
         stop_after: int | None = None, grad_checkpointing: bool | str = "auto",
         allow_overlap: bool = False, seed: int = SEED,
         device=None, in_place: bool = False, progress: bool = True):
    r"""Distil ``teacher`` into the compressed ``student``; return ``(student, HealReport)``.

    Minimises, over the trainable parameters (:func:`trainable_parameters`), the mean over
    predicted positions of ``kl_weight * T^2 KL(softmax(t/T) || softmax(s/T)) + nll_weight *
    NLL(next token)``, teacher logits ``t``, student logits ``s`` (see the module doc).

    Parameters
    ----------
    student : a causal LM with ``KronLinear``/``LowRankLinear`` layers (from ``compress`` or
        ``load_compressed``), float32. **Not modified** unless ``in_place=True``: by default a
        copy is trained and returned. With ``in_place`` the student is moved to ``device``
        and trained; the ``requires_grad`` flags of its parameters are restored afterwards
        either way, and the returned model is in eval mode.
    teacher : the dense model the student was compressed from (same vocabulary). Used
        under ``torch.no_grad`` and never changed (if it lives on another device than
        ``device``, a copy is moved there).
    data : ``None``, a text, or token batches ``(n_seq, seq_len)``. ``None`` is the
        **calibration parts** of the stored corpora :data:`kronlab.defaults.HEAL_TEXTS`
        (:func:`default_training_text`); their held-out parts, on which
        ``kronlab evaluate`` and the book measure perplexity, are never trained on. From a
        text, ``tokens / seq_len`` sequences are drawn at random word boundaries
        (:func:`kronlab.data.calibration_token_batches`, ``seed``); token batches are used
        in order, the first ``tokens / seq_len`` rows.
    tokenizer : needed for a text (``data``) and for ``eval_text``.
    tokens : training tokens; ``tokens // (batch_size * seq_len * grad_accum)`` optimizer
        steps, at least one.
    seq_len, batch_size, grad_accum : tokens a sequence (``None`` with token batches: their
        width), sequences a forward pass, forward passes an optimizer step.
    lr, warmup, weight_decay, max_grad_norm : AdamW's peak learning rate; the fraction of the
        steps in linear warm-up, then cosine decay to zero; decoupled weight decay of the
        factors (norms and biases get none); the gradient-norm clip (``None``: none).
    kl_weight, nll_weight, temperature : the loss above.
    train : ``"factors"`` or ``"factors+norms+biases"`` (:data:`TRAIN_MODES`).
    eval_text : a held-out text or ``{name: text}``: perplexity
        (:func:`kronlab.evaluate.perplexity`, first ``eval_tokens`` tokens, ``window``)
        before training, every ``eval_every`` training tokens (0: never in between) and at
        the end: ``report.curve``. Training tokens that share a run of
        :data:`~kronlab.defaults.HEAL_OVERLAP_NGRAM` tokens (``seq_len`` if shorter) with
        the evaluated tokens, or a
        training text containing passages of an evaluation text or of a stored corpus's
        held-out part, raise ``ValueError`` (a warning with ``allow_overlap=True``).
    cache_teacher : ``False``: teacher logits on the fly (exact KL). A path: a folder of
        the teacher's top-``cache_top_k`` log-probabilities for every training sequence,
        built before training (or reused when it matches: same tokens, ``top_k``,
        temperature, and the same teacher on the first sequence); the loss is then
        :func:`topk_kl_divergence`, a lower bound of the KL. Size ``(8k + 4)`` bytes a
        token: 25 MB for 49152 tokens at ``k = 64``, where full bfloat16 logits would take
        4.8 GB (vocabulary 49152).
    checkpoint_dir, checkpoint_every, resume : with a folder, a checkpoint (trainable
        parameters, AdamW, scheduler, RNG states, data position, curves, timings) is
        written atomically to ``checkpoint_dir/heal-checkpoint.pt`` every
        ``checkpoint_every`` tokens (default: ``eval_every``), when ``stop_after`` stops
        the run, and at the end. ``resume=True`` continues from it exactly (same results
        as an uninterrupted run); it needs the same student (its factors before healing
        are fingerprinted), data and settings. An existing checkpoint without ``resume``
        is an error; ``resume`` without one starts from the beginning.
    stop_after : stop after this many optimizer steps in all (counted from the start of
        the run, not of the session); ``report.finished`` is then False.
    grad_checkpointing : recompute each decoder block in the backward pass instead of
        storing its activations (about one more forward pass of time). ``"auto"``: when
        the ``KronLinear`` intermediates of a micro-batch would exceed
        :data:`~kronlab.defaults.HEAL_ACTIVATION_LIMIT` bytes
        (:func:`kron_activation_bytes`). Same results either way, up to float rounding.
    seed : draws the training sequences from a text and seeds torch.
    device : where to train (default: the student's device). CUDA trains under bfloat16
        autocast with float32 weights and AdamW state.
    in_place, progress : see ``student``; a tqdm bar with the loss and tokens/s.

    Cost: per training token one teacher forward (none with a cache built) plus one
    student forward and backward, about 4x a forward pass; memory: the logits of a
    micro-batch, ``batch_size * seq_len * vocab`` floats, several times over.
    """
    # ---- check arguments (cheap, before any work)
    for name, v, low in (("tokens", tokens, 1), ("batch_size", batch_size, 1),
                         ("grad_accum", grad_accum, 1), ("eval_tokens", eval_tokens, 2),
                         ("window", window, 2), ("eval_every", eval_every, 0),
                         ("cache_top_k", cache_top_k, 1)):
        if isinstance(v, bool) or int(v) != v or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if seq_len is not None and (int(seq_len) != seq_len or seq_len < 2):
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    for name, v in (("lr", lr), ("temperature", temperature)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    for name, v in (("kl_weight", kl_weight), ("nll_weight", nll_weight),
                    ("weight_decay", weight_decay)):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    if kl_weight == 0 and nll_weight == 0:
        raise ValueError("kl_weight and nll_weight are both 0: nothing to train")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is the fraction of steps in warm-up, in [0, 1), got {warmup!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    if grad_checkpointing not in ("auto", True, False):
        raise ValueError(f"grad_checkpointing must be 'auto', True or False, got "
                         f"{grad_checkpointing!r}")
    if isinstance(data, torch.Tensor):
        seq_len = data.shape[1] if seq_len is None else seq_len
    elif seq_len is None:
        raise ValueError("seq_len=None needs token batches; give seq_len for a text")
    per_step = batch_size * seq_len * grad_accum
    steps = tokens // per_step
    if steps < 1:
        raise ValueError(f"tokens={tokens} is less than one optimizer step: batch_size * "
                         f"seq_len * grad_accum = {batch_size} * {seq_len} * {grad_accum} = "
                         f"{per_step}; the minimum is {per_step}")
    if stop_after is not None and (int(stop_after) != stop_after or stop_after < 1):
        raise ValueError(f"stop_after must be a positive number of steps, got {stop_after!r}")
    if isinstance(eval_text, str):
        eval_texts = {"eval": eval_text}
    else:
        eval_texts = dict(eval_text or {})
    if eval_texts and tokenizer is None:
        raise ValueError("eval_text needs `tokenizer`")
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT
    if ckpt_path is not None and ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} holds the checkpoint of an earlier run: pass "
                              "resume=True to continue it, or remove it")
    if checkpoint_every is None:
        checkpoint_every = eval_every
    check_same_vocabulary(student, teacher)
    device = torch.device(device) if device is not None else next(student.parameters()).device
    if in_place:
        bad = {n: p.dtype for n, p in trainable_parameters(student, train).items()
               if p.dtype != torch.float32}
        if bad:
            name, dt = next(iter(bad.items()))
            raise ValueError(f"heal trains float32 weights; {name} is {dt}: load the student "
                             "with dtype=torch.float32, or pass in_place=False (a float32 copy "
                             "is trained)")
    if not any(isinstance(m, (KronLinear, LowRankLinear)) for m in student.modules()):
        raise ValueError("the student has no KronLinear or LowRankLinear layers: compress it "
                         "first (kronlab.compress.compress or `kronlab compress`)")

    # ---- data and disjointness (before any model is copied or moved)
    text = default_training_text() if data is None else data
    n_seq = steps * batch_size * grad_accum
    seqs, data_kind = _training_sequences(text, tokenizer, n_seq, seq_len, seed)
    overlap = _check_disjoint(text, data is None, seqs, eval_texts, tokenizer, eval_tokens,
                              allow_overlap)

    config = {"tokens": steps * per_step, "tokens_asked": tokens, "steps": steps,
              "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
              "tokens_per_step": per_step, "lr": lr, "warmup": warmup,
              "warmup_steps": math.ceil(warmup * steps), "weight_decay": weight_decay,
              "max_grad_norm": max_grad_norm, "kl_weight": kl_weight, "nll_weight": nll_weight,
              "temperature": temperature, "train": train, "eval_texts": list(eval_texts),
              "eval_every": eval_every, "eval_tokens": eval_tokens, "window": window,
              "cache_teacher": str(cache_teacher) if cache_teacher else None,
              "cache_top_k": cache_top_k if cache_teacher else None, "seed": seed,
              "device": str(device),
              "data": f"calibration parts of {', '.join(HEAL_TEXTS)}" if data is None
              else data_kind,
              "data_sha256": _sha256_tensor(seqs), "in_place": in_place,
              "autocast": "bfloat16" if device.type == "cuda" else None}
    act = kron_activation_bytes(student, batch_size * seq_len, 2 if device.type == "cuda" else 4)
    config["kron_activation_bytes"] = act
    config["grad_checkpointing"] = bool(act > HEAL_ACTIVATION_LIMIT) \
        if grad_checkpointing == "auto" else grad_checkpointing

    # ---- the student (a copy unless in_place) and the teacher on the device
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    model = student.to(device) if in_place else \
        copy.deepcopy(student).to(device=device, dtype=torch.float32)
    teacher_mode = teacher.training
    if next(teacher.parameters()).device != device:
        teacher = copy.deepcopy(teacher).to(device)
    try:
        teacher.eval()
        report = _train(model, teacher, seqs, config, tokenizer=tokenizer,
                        eval_texts=eval_texts, ckpt_path=ckpt_path, resume=resume,
                        checkpoint_every=checkpoint_every, stop_after=stop_after,
                        device=device, progress=progress)
    finally:
        teacher.train(teacher_mode)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()
    report.overlap = overlap
    return model, report


def _check_disjoint(text, default: bool, seqs, eval_texts: dict, tokenizer, eval_tokens: int,
                    allow_overlap: bool) -> dict:
    """The overlap checks of :func:`heal`: a dict of what was measured; raise on overlap."""
    n = min(HEAL_OVERLAP_NGRAM, seqs.shape[1])  # windows must fit in a training sequence
    overlap = {"ngram": n, "token_overlap": {}, "text_overlap": {},
               "held_out_in_training_text": []}
    problems = []
    if isinstance(text, str):
        if not default:
            overlap["held_out_in_training_text"] = held_out_in(text)
            problems += [f"the training text contains passages of the held-out part of the "
                         f"stored corpus {c!r}" for c in overlap["held_out_in_training_text"]]
        for name, ev in eval_texts.items():
            f = overlap["text_overlap"][name] = text_overlap(text, ev)
            if f > 0:
                problems.append(f"{f:.0%} of the probe passages of eval text {name!r} are in "
                                "the training text")
    if eval_texts:
        from .data import encode

        for name, ev in eval_texts.items():
            ids = encode(tokenizer, ev)[:eval_tokens]
            f = overlap["token_overlap"][name] = token_overlap(seqs, ids, n)
            if f > 0:
                problems.append(f"{f:.1%} of the {n}-token windows of eval "
                                f"text {name!r} occur in the training tokens")
    if problems:
        msg = ("training and evaluation text overlap: " + "; ".join(problems)
               + ". Train on other text (the default: the calibration parts of the stored "
               "corpora) or pass allow_overlap=True")
        if not allow_overlap:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return overlap


def _train(model, teacher, seqs, config: dict, *, tokenizer, eval_texts: dict, ckpt_path,
           resume: bool, checkpoint_every: int, stop_after, device, progress: bool) -> HealReport:
    """The training loop of :func:`heal` on prepared models and data; the report."""
    c = config
    steps, per_step, bs, accum = c["steps"], c["tokens_per_step"], c["batch_size"], c["grad_accum"]
    T, kl_w, nll_w = c["temperature"], c["kl_weight"], c["nll_weight"]
    torch.manual_seed(c["seed"])
    params = trainable_parameters(model, c["train"])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    factors = ("A", "B", "U", "V")
    decay = [p for n, p in params.items() if n.rsplit(".", 1)[-1] in factors]
    no_decay = [p for n, p in params.items() if n.rsplit(".", 1)[-1] not in factors]
    groups = [g for g in ({"params": decay, "weight_decay": c["weight_decay"]},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=c["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, steps, c["warmup_steps"]))
    fingerprint = _fingerprint(params)
    unique = {id(p): p for p in model.parameters()}.values()
    report = HealReport(config=c, steps=0, total_steps=steps, tokens=0,
                        trainable={"mode": c["train"], "tensors": len(params),
                                   "parameters": sum(p.numel() for p in params.values()),
                                   "model_parameters": sum(p.numel() for p in unique)},
                        seconds={"train": 0.0, "eval": 0.0, "teacher_cache": 0.0,
                                 "checkpoint": 0.0})

    start = 0
    if ckpt_path is not None and resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("version") != _CKPT_VERSION:
            raise ValueError(f"{ckpt_path} has checkpoint version {ck.get('version')}; this "
                             f"kronlab writes version {_CKPT_VERSION}")
        bad = _mismatch(ck["config"], c, _RUN_KEYS + ("data_sha256",))
        if bad:
            raise ValueError(f"{ckpt_path} was written with other settings ({', '.join(bad)} "
                             "differ); resume with the same ones, or remove the checkpoint")
        if ck["fingerprint"] != fingerprint or list(ck["trainable"]) != list(params):
            raise ValueError(f"{ckpt_path} was written while healing another student (its "
                             "factors before healing differ); pass the same student")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ck["trainable"][n].to(p.device))
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        start = report.steps = ck["step"]
        report.tokens = start * per_step
        report.curve, report.losses = ck["curve"], ck["losses"]
        report.seconds.update(ck["seconds"])
        report.resumed_from_step = start
    model.eval()  # healing fits the teacher's function: no dropout

    cache = None
    if c["cache_teacher"]:
        k = min(c["cache_top_k"], _vocab(teacher))
        meta = {"top_k": k, "temperature": float(T), "seq_len": c["seq_len"],
                "n_seq": len(seqs), "vocab": _vocab(teacher), "data_sha256": c["data_sha256"],
                "teacher_class": type(teacher).__name__,
                "bytes": _TeacherCache.nbytes(len(seqs), c["seq_len"], k)}
        t0 = time.perf_counter()
        cache = _TeacherCache.open_or_build(Path(c["cache_teacher"]), teacher, seqs, meta,
                                            batch_size=bs, device=device, progress=progress)
        report.seconds["teacher_cache"] += time.perf_counter() - t0
        report.teacher = {"mode": "top-k cache", "path": c["cache_teacher"], "top_k": k,
                          "bytes": meta["bytes"]}
    else:
        report.teacher = {"mode": "on the fly (full KL)"}

    def evaluate(step: int) -> None:
        if not eval_texts:
            return
        from .evaluate import perplexity

        t0 = time.perf_counter()
        ppl = {name: perplexity(model, tokenizer, ev, window=c["window"],
                                max_tokens=c["eval_tokens"], progress=False)["perplexity"]
               for name, ev in eval_texts.items()}
        report.curve.append({"step": step, "tokens": step * per_step, "perplexity": ppl})
        report.seconds["eval"] += time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        t0 = time.perf_counter()
        _save_atomic({"version": _CKPT_VERSION, "config": c, "fingerprint": fingerprint,
                      "step": step, "position": step * accum * bs,  # sequences consumed
                      "trainable": {n: p.detach().cpu() for n, p in params.items()},
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": _rng_state(), "curve": report.curve, "losses": report.losses,
                      "seconds": dict(report.seconds)}, ckpt_path)
        report.seconds["checkpoint"] += time.perf_counter() - t0

    def crossed(every: int, step: int) -> bool:  # did step -> step + 1 pass a multiple?
        return bool(every) and ((step + 1) * per_step) // every != (step * per_step) // every

    def train_step(step: int) -> tuple[dict, float | None, float]:
        """One optimizer step (``accum`` micro-batches): mean losses, gradient norm, lr."""
        opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "kl": 0.0, "nll": 0.0}
        for micro in range(accum):
            i0 = (step * accum + micro) * bs
            x = seqs[i0:i0 + bs].to(device)
            s_logits = logits_of(model, x, device)[:, :-1]
            if cache is not None:
                kl = topk_kl_divergence(s_logits, *cache.get(i0, i0 + bs, device),
                                        temperature=T)
            else:
                with torch.no_grad():
                    t_logits = logits_of(teacher, x, device)[:, :-1]
                kl = kl_divergence(s_logits, t_logits, temperature=T)
                del t_logits
            with torch.set_grad_enabled(nll_w > 0):
                nll = _nll(s_logits, x[:, 1:])
            loss = kl_w * kl + nll_w * nll
            (loss / accum).backward()
            for key, v in (("loss", loss), ("kl", kl), ("nll", nll)):
                sums[key] += float(v.detach()) / accum
            del s_logits, loss, kl, nll
        grad_norm = None
        if c["max_grad_norm"] is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                             c["max_grad_norm"]))
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sums, grad_norm, lr_now

    if start == 0:
        evaluate(0)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc="heal", unit="step", disable=not progress)
    session_tokens, session_seconds = 0, 0.0
    try:
        for step in range(start, steps):
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            with checkpointed_blocks(model, c["grad_checkpointing"]):
                sums, grad_norm, lr_now = train_step(step)
            dt = time.perf_counter() - t0
            session_seconds += dt
            session_tokens += per_step
            report.seconds["train"] += dt
            report.steps, report.tokens = step + 1, (step + 1) * per_step
            report.losses.append({"step": step + 1, "tokens": report.tokens, **sums,
                                  "lr": lr_now, "grad_norm": grad_norm})
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}",
                            tok_s=f"{session_tokens / max(session_seconds, 1e-9):.0f}")
            last = step + 1 == steps
            if crossed(c["eval_every"], step) or last:
                evaluate(step + 1)
            if crossed(checkpoint_every, step) or last or (stop_after is not None
                                                           and step + 1 >= stop_after):
                checkpoint(step + 1)
    finally:
        bar.close()
    report.finished = report.steps == steps
    return report

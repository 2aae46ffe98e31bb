"""One name and one default for every tunable quantity.

The API (:func:`kronlab.nearest_kronecker`, :func:`kronlab.compress.compress`), the CLI,
the scripts, the benchmarks and the book's parameter cells all import these, so a
default is changed in one place and every caller follows. The values are the settings
the book records and recommends (the LLM sweep in ``data/results``).

This module imports nothing heavy: scripts may read it before torch is loaded.
"""

from __future__ import annotations

__all__ = [
    "ALS_SWEEPS",
    "ALS_TOL",
    "CALIBRATION",
    "CALIB_TOKENS",
    "CG_MAX_ITER",
    "CHOOSER_SCREEN",
    "CHOOSER_TOP_K",
    "CG_TOL",
    "DAMPING",
    "DIRECT_SOLVER_MAX",
    "EVAL_BOS",
    "EVAL_TEXTS",
    "EVAL_TOKENS",
    "HEAL_ACTIVATION_LIMIT",
    "HEAL_BATCH_SIZE",
    "HEAL_CACHE_TOP_K",
    "HEAL_EVAL_EVERY",
    "HEAL_GRAD_ACCUM",
    "HEAL_KL_WEIGHT",
    "HEAL_LR",
    "HEAL_MAX_GRAD_NORM",
    "HEAL_NLL_WEIGHT",
    "HEAL_OVERLAP_NGRAM",
    "HEAL_SEQ_LEN",
    "HEAL_TEMPERATURE",
    "HEAL_TEXTS",
    "HEAL_TOKENS",
    "HEAL_TRAIN",
    "HEAL_WARMUP",
    "HEAL_WEIGHT_DECAY",
    "INIT",
    "N_OVERSAMPLES",
    "N_POWER_ITER",
    "PERMUTE",
    "SEED",
    "SEQ_LEN",
    "SHAPE_POLICY",
    "THREADS",
    "WINDOW",
]

# ----------------------------------------------------------------------------- algorithms

#: ALS sweeps (one A half-step and one B half-step each) of the activation-aware fit.
#: The recorded SmolLM2 sweep used 2: a third sweep changed the mean output error by
#: less than 1% at 1.5x the time.
ALS_SWEEPS = 2
#: ALS stops early when a sweep lowers the objective by less than this, relatively.
ALS_TOL = 1e-4
#: Relative ridge added to covariances: ``C + DAMPING * mean(diag C) * I`` (raised tenfold
#: until a Cholesky factorisation succeeds; the value used is reported in ``info``).
DAMPING = 1e-6
#: Preconditioned CG steps per ALS half-step, and the relative residual that stops them.
CG_MAX_ITER = 12
CG_TOL = 1e-3
#: ``solver="auto"`` solves a half-step directly (Cholesky of the r*q1 Gram matrix) when
#: ``rank * max(n1, n2) <= DIRECT_SOLVER_MAX``, else by CG.
DIRECT_SOLVER_MAX = 1536
#: Randomized SVD: extra columns, power iterations, seed.
N_OVERSAMPLES = 10
N_POWER_ITER = 4
SEED = 0
#: Start of the activation-aware ALS: the better of the plain optimum and the closed
#: form under the nearest Kronecker factorisation of C (see ``nearest_kronecker``).
INIT = "best"
#: Input-channel permutation of kron-aa: sort channels by decreasing variance.
PERMUTE = "variance"
#: Shape chooser (:func:`kronlab.choose_kron`): candidates kept after the cheap spectral
#: screen (the low-rank extremes always stay), and how many of the best closed-form starts
#: (measured under the full covariance) are refined by ALS.
CHOOSER_SCREEN = 12
CHOOSER_TOP_K = 3
#: Factor shapes chosen once per layer type (the first block's layer) and reused.
SHAPE_POLICY = "per-type"

# ----------------------------------------------------------------------------- LLM protocol

#: Calibration corpus (a stored corpus in data/corpora), tokens and sequence length.
CALIBRATION = "sotu"
CALIB_TOKENS = 8192
SEQ_LEN = 512
#: Held-out evaluation corpora, tokens per corpus and perplexity window.
EVAL_TEXTS = ("sotu", "austen")
EVAL_TOKENS = 8192
WINDOW = 1024
#: Start token put before every perplexity window (``kronlab.evaluate.perplexity``'s
#: ``bos``): "auto" is the tokenizer's BOS when the tokenizer adds it to every encoding
#: (the sign the model was trained with it), else none. SmolLM2 gets none: its tokenizer
#: names ``<|im_start|>`` (a chat-turn opener) as BOS but never adds it, and its
#: pre-training documents were separated by ``<|endoftext|>`` with no BOS, so the recorded
#: sweeps (no start token) follow this protocol unchanged.
EVAL_BOS = "auto"
#: CPU threads used by scripts and benchmarks (the machines have 2 cores).
THREADS = 2

# ----------------------------------------------------------------------------- healing

#: Training text of :func:`kronlab.heal.heal`: the *calibration* parts of these stored
#: corpora (``split_corpus(name)[0]``), joined; their held-out parts are never trained on.
HEAL_TEXTS = ("sotu", "austen", "brown")
#: Training tokens (the budget), tokens per sequence, sequences per micro-batch and
#: micro-batches per optimizer step: HEAL_SEQ_LEN * HEAL_BATCH_SIZE * HEAL_GRAD_ACCUM = 1024
#: tokens a step, 48 steps. Sized for SmolLM2-135M on the 2-core CPU (AMD EPYC, shared):
#: a training step of a low-rank student at ratio 0.8 (teacher forward, student forward and
#: backward) ran at 42 tokens/s, so the budget takes ~20 min, plus ~80 s per held-out
#: evaluation (2 x EVAL_TOKENS tokens at ~200 tokens/s): ~25 min in all. A Kronecker
#: student costs what its shapes cost: at the shapes of the recorded kron-aa 0.8 sweep
#: (8.2x the dense layers' multiply-adds) a step ran at 3.3 tokens/s (blocks recomputed),
#: ~4 h for this budget; the current chooser's kron-aa 0.8 shapes (0.96x, first two blocks,
#: ``benchmarks/bench_heal.py --quick``) train as fast as the dense model.
HEAL_TOKENS = 49152
HEAL_SEQ_LEN = 256
HEAL_BATCH_SIZE = 4
HEAL_GRAD_ACCUM = 1
#: AdamW: peak learning rate (not tuned: the usual range for fine-tuning factored LLMs is
#: 1e-4 to 3e-4, and this budget has few steps), the fraction of the steps spent in linear
#: warm-up (then a cosine decay to zero), weight decay of the factors (norms and biases get
#: none), and the gradient-norm clip (None: no clipping).
HEAL_LR = 2e-4
HEAL_WARMUP = 0.05
HEAL_WEIGHT_DECAY = 0.0
HEAL_MAX_GRAD_NORM = 1.0
#: Loss = HEAL_KL_WEIGHT * T^2 KL(teacher || student) at temperature T + HEAL_NLL_WEIGHT * NLL.
HEAL_KL_WEIGHT = 1.0
HEAL_NLL_WEIGHT = 0.0
HEAL_TEMPERATURE = 1.0
#: What is trained: "factors" (KronLinear A, B; LowRankLinear U, V) or
#: "factors+norms+biases".
HEAL_TRAIN = "factors"
#: Held-out perplexity every this many training tokens (0: before and after only).
HEAL_EVAL_EVERY = 16384
#: Recompute each decoder block in the backward pass (gradient checkpointing) when the
#: KronLinear intermediates of one micro-batch would take more bytes than this.
HEAL_ACTIVATION_LIMIT = 2 * 2**30
#: Teacher tokens kept per position when the teacher is cached on disk (top-k log-probs).
HEAL_CACHE_TOP_K = 64
#: The training tokens may share no run of this many tokens with the evaluated tokens.
HEAL_OVERLAP_NGRAM = 64

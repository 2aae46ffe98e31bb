"""Tiny randomly initialised causal LMs for tests, built in-process (no download).

    from tiny_model import tiny_llama, tiny_gpt2
    model, tok = tiny_llama(seed=0)   # LlamaForCausalLM, eval mode, float32
    model, tok = tiny_gpt2(seed=0)    # GPT2LMHeadModel: its linear layers are Conv1D

Tokenizer: :class:`ByteTokenizer`, the UTF-8 bytes of the text as token ids
(vocabulary 256, no special tokens). It has the two methods kronlab uses,
``encode(text, add_special_tokens=False) -> list[int]`` and
``decode(ids, skip_special_tokens=False) -> str``; it is exact and needs no files, which
a trained BPE tokenizer (e.g. SmolLM2's, from the 98 MB GGUF) would not be.

Shapes (out x in) of the linear layers:

* tiny Llama: hidden 32, 2 blocks, 4 heads of 8, 2 KV heads, MLP 64:
  q,o 32x32; k,v 16x32; gate,up 64x32; down 32x64; lm_head tied to the embedding.
* tiny GPT-2: hidden 32, 2 blocks, 4 heads: c_attn 96x32, attn c_proj 32x32,
  c_fc 128x32, mlp c_proj 32x128 (Conv1D stores the transpose, (in, out)).
"""

from __future__ import annotations

import torch

VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255); no special tokens, ``eos_token_id`` None."""

    vocab_size = VOCAB
    eos_token_id = None
    bos_token_id = None
    pad_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, **_):
        return {"input_ids": self.encode(text)}


def tiny_llama(seed: int = 0, *, n_layers: int = 2, hidden: int = 32):
    """A random Llama-architecture causal LM (eval mode) and a :class:`ByteTokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, ByteTokenizer()


def tiny_gpt2(seed: int = 0, *, n_layers: int = 2, hidden: int = 32):
    """A random GPT-2 causal LM (eval mode, Conv1D layers, dropout off) and a :class:`ByteTokenizer`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    return model, ByteTokenizer()

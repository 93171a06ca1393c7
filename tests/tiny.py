"""Tiny in-process models and tokenizers for tests: no hub, a few hundred thousand parameters."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def char_tokenizer():
    """A character-level tokenizer over printable ASCII: ``<eos>`` 0, ``<pad>`` 1, ``<unk>`` 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab_size: int = 103, layers: int = 4, hidden: int = 32, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=0, pad_token_id=1,
                      bos_token_id=None, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def save_tiny_model(path: Path, layers: int = 4, seed: int = 0) -> Path:
    """A tiny Llama and its tokenizer saved as a model directory (``model=PATH`` in a config)."""
    tok = char_tokenizer()
    model = tiny_llama(len(tok), layers=layers, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_examples(path: Path, n: int = 64, seed: int = 0) -> Path:
    """An LLM-Adapters JSONL file of tiny sums."""
    import json
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(json.dumps({"instruction": f"{a}+{b}=", "input": "", "output": f"The answer is {a + b}",
                                 "answer": str(a + b)}))
    path.write_text("\n".join(lines) + "\n")
    return path

"""The model: a causal LM and its tokenizer loaded from a packaged name, a hub id or a local directory; its decoder
blocks found; its weights made to open with ``from_pretrained``.

``load`` (the packaged offline model, model sources and their checks, loading), ``blocks`` (which parameters
belong to which decoder block, activation checkpointing) and ``export`` (the metadata beside saved weights). It
imports ``base`` only: the method, the data and the planner read the model through it. ``grass_ft.models``, the
old path, is this package.
"""

from .blocks import BLOCK_PATHS, BlockLayout, block_layout, enable_checkpointing, find_blocks
from .load import (PACKAGED, PACKAGED_NOTE, ModelError, cache_dir, check_model_source, empty_model, load_model,
                   load_model_and_tokenizer, load_tokenizer, num_blocks_hint, packaged_model_dir, resolve_dtype,
                   resolve_model_path, vocab_size_hint)

__all__ = ["BLOCK_PATHS", "PACKAGED", "PACKAGED_NOTE", "BlockLayout", "ModelError", "block_layout", "cache_dir",
           "check_model_source", "empty_model", "enable_checkpointing", "find_blocks", "load_model",
           "load_model_and_tokenizer", "load_tokenizer", "num_blocks_hint", "packaged_model_dir", "resolve_dtype",
           "resolve_model_path", "vocab_size_hint"]

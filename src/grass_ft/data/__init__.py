"""Training and evaluation data, from a source to batches: read, normalised once, tokenised, batched.

``formats`` (the four row formats: detection, checks, chat templates, rendering, token ids with a label mask),
``loading`` (files, directories and hub data sets through ``datasets``, reasoning-gym generators, the held-out
split, tokenisation and the resumable batch stream) and ``packing`` (several examples to a row, and the check that
the model keeps them apart). It imports ``base``, ``config`` and ``model``; nothing here knows about methods, runs
or front ends. The names below are the package's face, and ``grass_ft.data``'s since its first release.
"""

from .formats import IGNORE_INDEX, FormatError
from .loading import (DATA_SUFFIXES, EASY_ARITH, EVAL_SEED_OFFSET, GENERATORS, GROUP_BATCHES, PROMPT_NO_INPUT,
                      PROMPT_WITH_INPUT, REQUIRED_KEYS, BatchStream, DataError, LoadedData, _rg_examples, as_example,
                      check_data_sources, check_rows, collate, format_prompt, generate_examples, holds_out,
                      load_data, load_examples, load_json_examples, load_rows, pack_features, prepare_tokenizer,
                      preview_rows, read_json_objects, read_utf8, resolve_format, source_kind, tokenize_dataset,
                      tokenize_example)

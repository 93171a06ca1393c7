"""Training and evaluation data, from a source to batches, in one pass: load -> normalise -> tokenise -> batch.

``formats`` (the four row formats, the Alpaca prompt, the data errors), ``sources`` (files, directories and hub data
sets through ``datasets``) and ``generators`` (reasoning-gym word problems) read rows; ``examples`` settles each row
once into the canonical example every consumer reads (format, prompt and target or conversation, task, gold
answer); ``loading`` is a run's data (training rows and held-out examples); ``tokenize`` (token ids with a label
mask, the evaluation prompt, chat templates), ``batches`` (padding, the resumable stream) and ``packing``. It imports
``base``, ``config`` and ``model``; nothing here knows about methods, runs or front ends. The names below are the
package's face: ``grass_ft.data``'s since its first release, and those of ``grass_ft.formats`` (the old path).
"""

from .batches import GROUP_BATCHES, BatchStream, collate
from .examples import Example, has_prompt, is_example, normalise, row_format
from .formats import (FORMATS, IGNORE_INDEX, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, REQUIRED, ROLES, DataError,
                      FormatError, chat_messages, check_row, detect_format, format_prompt, is_chat, tagged)
from .generators import EASY_ARITH, EVAL_SEED_OFFSET, GENERATORS, _rg_examples, generate_examples
from .loading import LoadedData, check_data_sources, holds_out, load_data
from .packing import PackingError, check_packing, mixing, pack_features
from .sources import (DATA_SUFFIXES, REQUIRED_KEYS, check_rows, load_examples, load_json_examples, load_rows,
                      preview_rows, read_json_objects, read_utf8, resolve_format, source_kind)
from .tokenize import (chat_spans, check_renders, encode, encode_example, prepare_tokenizer, prompt_ids, prompt_text,
                       require_chat_template, set_chat_template, tokenize_dataset, tokenize_example, tokenize_examples)

__all__ = ["DATA_SUFFIXES", "EASY_ARITH", "EVAL_SEED_OFFSET", "FORMATS", "GENERATORS", "GROUP_BATCHES", "IGNORE_INDEX",
           "PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "REQUIRED", "REQUIRED_KEYS", "ROLES", "BatchStream", "DataError",
           "Example", "FormatError", "LoadedData", "PackingError", "_rg_examples", "chat_messages", "chat_spans",
           "check_data_sources", "check_packing", "check_renders", "check_row", "check_rows", "collate",
           "detect_format", "encode", "encode_example", "format_prompt", "generate_examples", "has_prompt", "holds_out",
           "is_chat",
           "is_example", "load_data", "load_examples", "load_json_examples", "load_rows", "mixing", "normalise",
           "pack_features", "prepare_tokenizer", "preview_rows", "prompt_ids", "prompt_text", "read_json_objects",
           "read_utf8", "require_chat_template", "resolve_format", "row_format", "set_chat_template", "source_kind",
           "tagged", "tokenize_dataset", "tokenize_example", "tokenize_examples"]

"""Token ids with a label mask for canonical examples (:mod:`grass_ft.data.examples`), for training and evaluation
alike, so that a model is scored on exactly the text it was trained to continue.

Plain formats: the prompt's tokens (with the tokenizer's special tokens), the target's and EOS, the prompt masked.
Chat formats: the chat template's rendering tokenised whole, a token carrying loss when it starts inside an
assistant turn (:func:`chat_spans`). The evaluation prompt (:func:`prompt_ids`) is the same rendering cut before the
last target. A data set is tokenised with ``Dataset.map``, cached beside a file-backed data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .examples import Example, normalise
from .formats import IGNORE_INDEX, DataError, FormatError


# -------------------------------------------------------------------------------------------- chat template


def set_chat_template(tokenizer, spec: str | None) -> None:
    """Install ``chat_template=`` on the tokenizer: a path to a Jinja file, or the template text itself.

    Raises:
        FormatError: ``spec`` is neither an existing file nor template text (no ``{{`` or ``{%``).
    """
    if not spec:
        return
    if "{{" in spec or "{%" in spec:
        tokenizer.chat_template = spec
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FormatError(f"`chat_template` file {spec!r} does not exist (give a Jinja file or the template text)")
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def require_chat_template(tokenizer, model: str) -> None:
    """Raise :class:`FormatError` when the data needs a chat template and the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError(f"the data is in a chat format (messages), but the tokenizer of model {model!r} has no "
                          f"chat template; set chat_template=FILE.jinja (a Jinja chat template), or use "
                          f"data_format=text / prompt_completion with plain strings")


def prepare_tokenizer(tokenizer, chat_template: str | None, examples: Sequence[dict[str, Any]], model: str) -> None:
    """Install ``chat_template=`` on the tokenizer (a Jinja file or the template text) and check that the chat
    examples among ``examples`` have a template to render them.

    Raises:
        DataError: a chat-format row and no chat template, or a missing template file.
    """
    try:
        set_chat_template(tokenizer, chat_template)
        if any((r if isinstance(r, Example) else normalise(r))["_messages"] for r in examples):
            require_chat_template(tokenizer, model)
    except FormatError as e:
        raise DataError(str(e)) from None


def check_renders(row: dict[str, Any], fmt: str, tokenizer, model: str) -> None:
    """Render one row as training will; :class:`FormatError` if the template is missing or fails on it."""
    ex = normalise(row, fmt)
    if ex["_messages"]:
        require_chat_template(tokenizer, model)
    encode_example(ex, tokenizer, 1 << 30, False)


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # raise_exception() in a template, or a template bug
        raise FormatError(f"the chat template fails on it: {e}") from None


def chat_spans(tokenizer, messages: list[dict[str, Any]], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns from message ``first`` on.

    A turn's span runs from the end of the generation prompt before it (``apply_chat_template(messages[:i],
    add_generation_prompt=True)``) to the end of the conversation rendered through it, without trailing
    whitespace: its content and the end-of-turn token (``<|im_end|>`` for ChatML), which is what the model must
    learn to emit so that generation stops. This needs a template whose renderings of a conversation's prefixes
    are prefixes of the whole (ChatML, Llama, Mistral and most others are); one that rewrites earlier turns is
    refused rather than trained on misplaced labels.
    """
    full = _render(tokenizer, messages)
    spans = []
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise FormatError(f"the chat template renders message {i} differently inside the whole conversation "
                              f"than at its end, so the assistant tokens cannot be located; use a template whose "
                              f"prefixes are stable (chat_template=FILE.jinja)")
        spans.append((len(before), len(through.rstrip())))
    return full, spans


# ------------------------------------------------------------------------------------------------ encoding


def encode(row: dict[str, Any], tokenizer, max_seq_len: int, train_on_inputs: bool = False,
           fmt: str | None = None) -> dict[str, list[int]]:
    """:func:`encode_example` of a row as written (normalised first, as format ``fmt`` or the one its keys name) or
    of an :class:`~grass_ft.data.examples.Example`."""
    ex = row if isinstance(row, Example) else normalise(row, fmt)
    return encode_example(ex, tokenizer, max_seq_len, train_on_inputs)


def encode_example(ex: dict[str, Any], tokenizer, max_seq_len: int,
                   train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one canonical example (an :class:`~grass_ft.data.examples.Example`, or a row
    of a table of them), truncated to ``max_seq_len``.

    Plain formats: prompt tokens (with the tokenizer's special tokens) + target tokens + EOS, the prompt masked.
    Chat formats: the template's text tokenised whole (no extra special tokens: the template holds them), a
    token carrying loss when it starts inside an assistant span of :func:`chat_spans`.
    """
    if ex["_messages"]:
        text, spans = chat_spans(tokenizer, ex["_messages"], ex["_first"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_seq_len]
        if train_on_inputs:
            return {"input_ids": ids, "labels": list(ids)}
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for t, (s, _) in zip(ids, enc["offset_mapping"])]
        return {"input_ids": ids, "labels": labels}
    prompt_ids = tokenizer(ex["_prompt"], add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(ex["_target"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_seq_len]
    if train_on_inputs or ex["_format"] == "text":
        return {"input_ids": ids, "labels": list(ids)}
    return {"input_ids": ids, "labels": ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_seq_len]}


def prompt_text(row: dict[str, Any], tokenizer) -> str:
    """The evaluation prompt: the text before the (last) target, rendered as in training.

    For a conversation: every message before the last assistant turn, with the template's generation prompt.

    Raises:
        FormatError: a ``text`` row, which has no prompt.
    """
    ex = row if isinstance(row, Example) else normalise(row)
    if ex["_messages"]:
        msgs = ex["_messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= ex["_first"])
        return _render(tokenizer, msgs[:last], generation_prompt=True)
    if ex["_format"] == "text":
        raise FormatError("a `text` example has no prompt to answer; it can be scored by eval loss only")
    return ex["_prompt"]


def prompt_ids(row: dict[str, Any], tokenizer, text: str | None = None) -> list[int]:
    """Token ids of :func:`prompt_text` (or of ``text``, that prompt already rendered), with special tokens added
    exactly as :func:`encode` adds them."""
    ex = row if isinstance(row, Example) else normalise(row)
    text = prompt_text(ex, tokenizer) if text is None else text
    return tokenizer(text, add_special_tokens=not ex["_messages"])["input_ids"]


def tokenize_example(tokenizer, example: dict[str, Any], max_seq_len: int,
                     train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one example in any format (:func:`encode`): the prompt's labels masked unless
    ``train_on_inputs``."""
    try:
        return encode(example, tokenizer, max_seq_len, train_on_inputs)
    except FormatError as e:
        raise DataError(str(e)) from None


def tokenize_dataset(ds, tokenizer, fmt: str, max_seq_len: int, train_on_inputs: bool = False):
    """Tokenise a ``datasets.Dataset`` of rows as written in format ``fmt`` (:func:`encode`); see
    :func:`tokenize_examples`."""
    def tokens(row: dict[str, Any]) -> dict[str, list[int]]:
        return encode(row, tokenizer, max_seq_len, train_on_inputs, fmt)

    return _map_tokens(ds, tokens)


def tokenize_examples(ds, tokenizer, max_seq_len: int, train_on_inputs: bool = False):
    """Tokenise a ``datasets.Dataset`` of canonical examples (a run's training rows, :func:`grass_ft.data.load_data`)
    with ``Dataset.map``, which caches the result next to a file-backed data set (a rerun with the same data,
    tokenizer and settings reads it back). Returns a Dataset of ``input_ids`` and ``labels``."""
    def tokens(ex: dict[str, Any]) -> dict[str, list[int]]:
        return encode_example(ex, tokenizer, max_seq_len, train_on_inputs)

    return _map_tokens(ds, tokens)


def _map_tokens(ds, tokens):
    try:
        return ds.map(tokens, remove_columns=ds.column_names, desc="tokenise")
    except FormatError as e:
        raise DataError(str(e)) from None

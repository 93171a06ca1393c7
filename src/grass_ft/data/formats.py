"""Data formats: detect a row's format, check it, and turn it into token ids with a label mask.

Four formats, as TRL and LLaMA-Factory users write them (docs/DATA.md has one example of each):

* ``alpaca``: ``instruction``, ``input`` (may be empty), ``output`` (LLM-Adapters' files), rendered with the
  Alpaca prompt of :func:`grass_ft.data.format_prompt`, so results stay comparable with LLM-Adapters' tables.
* ``prompt_completion``: ``prompt`` and ``completion`` (TRL). Two strings are joined as they are; two lists of
  ``{role, content}`` messages (TRL's conversational form) are rendered with the chat template.
* ``messages``: a list of ``{role, content}`` (OpenAI / TRL), any number of turns, rendered with
  ``tokenizer.apply_chat_template``.
* ``text``: plain language modelling on ``text``.

Loss falls on the target tokens only (label ``IGNORE_INDEX`` elsewhere): the output / completion plus EOS, or
every assistant turn of a conversation (for ``prompt_completion`` conversations, the completion's assistant
turns); ``text`` and ``train_on_inputs`` supervise every token. Evaluation renders the prompt with the same
functions (:func:`prompt_ids`), so a model is scored on exactly the text it was trained to continue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
FORMATS = ("alpaca", "prompt_completion", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")

REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "messages": ("messages",), "text": ("text",)}
# The Alpaca prompt (data.format_prompt) is imported at call time: data imports this module.


class FormatError(ValueError):
    """A row that does not fit its format. ``data`` re-raises it as ``DataError`` with the file and row."""


def detect_format(columns: list[str] | set[str], where: str) -> str:
    """The format a table's columns name, in the order messages, prompt_completion, alpaca, text.

    Raises:
        FormatError: no format fits; the message lists the columns and what each format needs.
    """
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise FormatError(f"{where}: cannot tell the data format from the columns {sorted(cols)}; expected "
                      f"`messages` (messages), `prompt`+`completion` (prompt_completion), `instruction`+`output` "
                      f"(alpaca) or `text` (text), or set data_format=")


def _check_messages(msgs: Any, key: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"`{key}` must be a non-empty list of {{role, content}} objects, got {_short(msgs)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FormatError(f"`{key}`[{i}] must be an object with string `role` and `content`, got {_short(m)}")
        if m["role"] not in ROLES:
            raise FormatError(f"`{key}`[{i}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_row(row: dict[str, Any], fmt: str) -> None:
    """Raise :class:`FormatError` naming the key when ``row`` does not fit ``fmt``."""
    if not isinstance(row, dict):
        raise FormatError(f"expected a JSON object, got {type(row).__name__}")

    def need_str(*keys: str) -> None:
        bad = [k for k in keys if not isinstance(row.get(k), str)]
        if bad:
            raise FormatError(f"missing or non-string key(s) {', '.join(bad)} (format {fmt}: "
                              f"{', '.join(REQUIRED[fmt])})")

    if fmt == "alpaca":
        need_str("instruction", "output")
    elif fmt == "text":
        need_str("text")
    elif fmt == "messages":
        _check_messages(row.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise FormatError("`messages` has no assistant turn, so nothing would carry loss")
    elif fmt == "prompt_completion":
        p, c = row.get("prompt"), row.get("completion")
        if isinstance(p, str) and isinstance(c, str):
            return
        if isinstance(p, list) and isinstance(c, list):
            _check_messages(p, "prompt")
            _check_messages(c, "completion")
            if not any(m["role"] == "assistant" for m in c):
                raise FormatError("`completion` has no assistant turn, so nothing would carry loss")
            return
        raise FormatError(f"`prompt` and `completion` must both be strings or both lists of messages, got "
                          f"{type(p).__name__} and {type(c).__name__}")
    else:
        raise FormatError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")


def row_format(row: dict[str, Any]) -> str:
    """A single row's format: its ``_format`` key (set by the loader) or the keys it holds."""
    return row.get("_format") or detect_format({k for k, v in row.items() if v is not None}, "example")


def is_chat(row: dict[str, Any], fmt: str) -> bool:
    """Whether the row is rendered with the chat template."""
    return fmt == "messages" or (fmt == "prompt_completion" and isinstance(row.get("prompt"), list))


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


def check_renders(row: dict[str, Any], fmt: str, tokenizer, model: str) -> None:
    """Render one row as training will; :class:`FormatError` if the template is missing or fails on it."""
    if is_chat(row, fmt):
        require_chat_template(tokenizer, model)
    encode(row, tokenizer, 1 << 30, False, fmt)


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # raise_exception() in a template, or a template bug
        raise FormatError(f"the chat template fails on it: {e}") from None


def _chat_messages(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], int]:
    """The conversation and the index of its first message that may carry loss."""
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]], 0
    msgs = [{"role": m["role"], "content": m["content"]} for m in [*row["prompt"], *row["completion"]]]
    return msgs, len(row["prompt"])


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


def _prompt_and_target(row: dict[str, Any], fmt: str) -> tuple[str, str]:
    if fmt == "alpaca":
        from .loading import format_prompt

        return format_prompt(row), row["output"]
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    return "", row["text"]


def encode(row: dict[str, Any], tokenizer, max_seq_len: int, train_on_inputs: bool = False,
           fmt: str | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one row, truncated to ``max_seq_len``.

    Plain formats: prompt tokens (with the tokenizer's special tokens) + target tokens + EOS, the prompt masked.
    Chat formats: the template's text tokenised whole (no extra special tokens: the template holds them), a
    token carrying loss when it starts inside an assistant span of :func:`chat_spans`.
    """
    fmt = fmt or row_format(row)
    if is_chat(row, fmt):
        msgs, first = _chat_messages(row, fmt)
        text, spans = chat_spans(tokenizer, msgs, first)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_seq_len]
        if train_on_inputs:
            return {"input_ids": ids, "labels": list(ids)}
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for t, (s, _) in zip(ids, enc["offset_mapping"])]
        return {"input_ids": ids, "labels": labels}
    prompt, target = _prompt_and_target(row, fmt)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_seq_len]
    if train_on_inputs or fmt == "text":
        return {"input_ids": ids, "labels": list(ids)}
    return {"input_ids": ids, "labels": ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_seq_len]}


def prompt_text(row: dict[str, Any], tokenizer) -> str:
    """The evaluation prompt: the text before the (last) target, rendered as in training.

    For a conversation: every message before the last assistant turn, with the template's generation prompt.

    Raises:
        FormatError: a ``text`` row, which has no prompt.
    """
    fmt = row_format(row)
    if is_chat(row, fmt):
        msgs, first = _chat_messages(row, fmt)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= first)
        return _render(tokenizer, msgs[:last], generation_prompt=True)
    if fmt == "text":
        raise FormatError("a `text` example has no prompt to answer; it can be scored by eval loss only")
    return _prompt_and_target(row, fmt)[0]


def prompt_ids(row: dict[str, Any], tokenizer) -> list[int]:
    """Token ids of :func:`prompt_text`, with special tokens added exactly as :func:`encode` adds them."""
    chat = is_chat(row, row_format(row))
    return tokenizer(prompt_text(row, tokenizer), add_special_tokens=not chat)["input_ids"]


def has_prompt(row: dict[str, Any]) -> bool:
    """Whether the row can be answered by generation (all formats but ``text``)."""
    return row_format(row) != "text"

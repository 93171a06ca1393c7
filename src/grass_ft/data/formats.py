"""The four row formats, as TRL and LLaMA-Factory users write them (docs/DATA.md has one example of each), and the
errors of a source or a row that does not fit:

* ``alpaca``: ``instruction``, ``input`` (may be empty), ``output`` (LLM-Adapters' files), rendered with the
  Alpaca prompt of :func:`format_prompt`, so results stay comparable with LLM-Adapters' tables.
* ``prompt_completion``: ``prompt`` and ``completion`` (TRL). Two strings are joined as they are; two lists of
  ``{role, content}`` messages (TRL's conversational form) are rendered with the chat template.
* ``messages``: a list of ``{role, content}`` (OpenAI / TRL), any number of turns, rendered with
  ``tokenizer.apply_chat_template``.
* ``text``: plain language modelling on ``text``.

Loss falls on the target tokens only (label ``IGNORE_INDEX`` elsewhere): the output / completion plus EOS, or
every assistant turn of a conversation (for ``prompt_completion`` conversations, the completion's assistant
turns); ``text`` and ``train_on_inputs`` supervise every token (:mod:`grass_ft.data.tokenize`). A row's format is
told once, when it is loaded, and kept in its canonical example (:mod:`grass_ft.data.examples`).
"""

from __future__ import annotations

from typing import Any

from ..base.errors import UserError
from ..base.tasks import gold_answer

IGNORE_INDEX = -100
FORMATS = ("alpaca", "prompt_completion", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")

REQUIRED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "messages": ("messages",), "text": ("text",)}

# LLM-Adapters' Alpaca-style template (their finetune.py / evaluate.py `generate_prompt`).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(UserError, ValueError):
    """A data file or generator spec that cannot be used; the message names the file, line and problem."""


class FormatError(ValueError):
    """A row that does not fit its format; the loaders re-raise it as :class:`DataError` with the file and row."""


def format_prompt(example: dict[str, Any]) -> str:
    """The Alpaca-style prompt for an example, ending just before the response."""
    if str(example.get("input") or "").strip():
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


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


def is_chat(row: dict[str, Any], fmt: str) -> bool:
    """Whether the row is rendered with the chat template."""
    return fmt == "messages" or (fmt == "prompt_completion" and isinstance(row.get("prompt"), list))


def chat_messages(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], int]:
    """The conversation of a chat row and the index of its first message that may carry loss."""
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]], 0
    msgs = [{"role": m["role"], "content": m["content"]} for m in [*row["prompt"], *row["completion"]]]
    return msgs, len(row["prompt"])


def tagged(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A row as a loader reads it for evaluation: its format tagged (``_format``) and its gold answer normalised; the
    rest (its task, with the caller's default) is settled by :func:`grass_ft.data.examples.normalise` once the caller's
    default is known."""
    ex = {k: v for k, v in row.items() if v is not None}
    ex["_format"] = fmt
    if fmt == "alpaca":
        ex["input"] = str(ex.get("input") or "")
    # LLM-Adapters stores some golds as one-element lists ([2304.0], ["C"]): the element
    ex["answer"] = gold_answer(ex["answer"]) if ex.get("answer") is not None else ""
    return ex

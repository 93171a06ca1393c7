"""The canonical example: every row, whatever its format or source, settled once when it is loaded.

A loaded row keeps its own fields (``instruction``, ``messages``, ``choices``, its ``task`` as written, ...) and gains
the ones every consumer reads, so that tokenisation, batching, evaluation and scoring never tell a format or a task
again (HF datasets' ``map``: normalise once, then every consumer reads the same columns):

* ``_format``: alpaca, prompt_completion, messages or text (:mod:`grass_ft.data.formats`);
* ``_prompt`` and ``_target``: the text before the target (alpaca: the Alpaca prompt rendered) and the target
  (output, completion, text), for the plain formats; ``""`` otherwise;
* ``_messages`` and ``_first``: a chat row's conversation and the index of its first message that may carry loss;
  ``[]`` and 0 otherwise;
* ``_task``: the answer rule it is scored by, by the one rule of :func:`grass_ft.base.tasks.example_task` (its
  ``task`` key, else the run's ``task``; canonical when it has a rule), ``""`` when it has none;
* ``answer``: the gold answer as a string (a one-element list reduced to its element), ``""`` when absent.

Every value has one type whatever the row (strings, never None), so a ``datasets`` table of examples has fixed
columns. A row written by hand and handed to a public function (``encode``, ``evaluate``) is normalised there, once;
an :class:`Example` passes through everything as it is.
"""

from __future__ import annotations

from typing import Any

from ..base.tasks import example_task
from .formats import chat_messages, detect_format, format_prompt, is_chat, tagged


class Example(dict):
    """A canonical example: the row's own fields and the settled ones of the module docstring (``_format``,
    ``_prompt``, ``_target``, ``_messages``, ``_first``, ``_task``, ``answer``), made by :func:`normalise` alone. A
    dict, so that it goes wherever a row goes (a ``datasets`` table, JSON); its type says it is settled."""


def normalise(row: dict[str, Any], fmt: str | None = None, task: str | None = None) -> Example:
    """The canonical example of ``row``: its format ``fmt`` (else the one its loader tagged, ``_format``, else the
    one its keys name) and task (its ``task`` key, else ``task``) settled, its prompt and target or conversation
    taken out, its gold answer normalised. A row that is already an example is returned as it is."""
    if is_example(row):
        return row if isinstance(row, Example) else Example(row)
    fmt = fmt or row_format(row)
    ex = tagged(row, fmt)
    ex["_task"] = example_task(ex, task) or ""
    ex["_prompt"], ex["_target"], ex["_messages"], ex["_first"] = "", "", [], 0
    if is_chat(ex, fmt):
        ex["_messages"], ex["_first"] = chat_messages(ex, fmt)
    elif fmt == "alpaca":
        ex["_prompt"], ex["_target"] = format_prompt(ex), ex["output"]
    elif fmt == "prompt_completion":
        ex["_prompt"], ex["_target"] = ex["prompt"], ex["completion"]
    else:
        ex["_target"] = ex["text"]
    return Example(ex)


def is_example(row: dict[str, Any]) -> bool:
    """Whether ``row`` is a canonical example already (the loaders' output, or a row of a table of them) rather than
    a row as written."""
    return isinstance(row, Example) or "_task" in row


def row_format(row: dict[str, Any]) -> str:
    """A row's format: the one its loader tagged (``_format``) or the one its keys name."""
    return row.get("_format") or detect_format({k for k, v in row.items() if v is not None}, "example")


def has_prompt(row: dict[str, Any]) -> bool:
    """Whether an example can be answered by generation (every format but ``text``)."""
    return (row["_format"] if is_example(row) else row_format(row)) != "text"
